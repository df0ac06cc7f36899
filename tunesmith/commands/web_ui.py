"""`tunesmith web-ui`: the browser pages of tunesmith.webui (train, watch, stop, compare, chat, export, eval), served
by gradio; and `check_command`, the commands' own one-message flag check that the pages run before starting a
command (command modules are imported only here and by the CLI, so the pages are handed this function)."""
from __future__ import annotations

from typing import Optional

from tunesmith.config.checks import raise_problems
from tunesmith.config.parser import ArgError, deferred_problems, parse_args
from tunesmith.errors import ConfigError


def _training(args) -> None:
    from tunesmith.commands.train import check_flags

    check_flags(args)


def _export(args) -> None:
    from tunesmith.commands.export import flag_problems
    from tunesmith.config.groups import ExportOutputArgs
    from tunesmith.config.slices import take
    from tunesmith.inference.flags import check_inference_flags

    check_inference_flags(args, flag_problems(args, take(ExportOutputArgs, args)))


def _inference(args) -> None:
    from tunesmith.inference.flags import check_inference_flags

    check_inference_flags(args)


def _parse_only(args) -> None:
    raise_problems(deferred_problems(args))


# command -> the value check its main() runs first (what `tunesmith <command>` reports before loading anything)
CHECKS = {"sft": _training, "rlhf": _training, "dpo": _training, "export": _export, "eval": _inference,
          "infer": _inference, "deploy": _inference, "data": _parse_only, "report": _parse_only}


def check_command(command: str, argv: list) -> Optional[str]:
    """What `tunesmith COMMAND ARGV` would print for bad flags before anything loads — the same line, `tunesmith
    <command>: error: <every problem, in one message>` — or None when the flags pass. The parse and the value checks
    are the command's own (the same functions the CLI calls), so the text is the CLI's."""
    try:
        args = parse_args(command, list(argv), defer_problems=True)
        CHECKS.get(command, _parse_only)(args)
    except (ArgError, ConfigError) as e:
        return f"tunesmith {command}: error: {e}"
    return None


def main(args) -> int:
    """Serve the pages until Ctrl-C or SIGTERM; returns 0. Raises FlagError (the server's flags: another address
    or --share without --api_key, --share offline, the port, TLS) or ConfigError (gradio missing, the port taken)."""
    from tunesmith.webui.app import api_key_of, gradio_module, serve, server_problems, web_ui

    key = api_key_of(args)
    raise_problems(deferred_problems(args) + server_problems(args, key) + _folder_problems(args))
    gradio_module()
    serve(web_ui(args, check_command), args, key, args.max_upload_mb)
    return 0


def _folder_problems(args) -> list[str]:
    """--output_dir (folders that can be made and written), --allowed_paths (existing folders), --max_upload_mb."""
    import os

    from tunesmith.config.checks import between
    from tunesmith.files import unwritable

    out: list[str] = []
    for d in args.output_dir:
        why = unwritable(d, folder=True)
        if why:
            out.append(f"--output_dir {d}: {why}")
    out += [f"--allowed_paths {p}: no such folder" for p in args.allowed_paths if not os.path.isdir(p)]
    if not args.output_dir:
        out.append("--output_dir: give at least one folder for the runs")
    between(out, "max_upload_mb", args.max_upload_mb, 1, None)
    return out
