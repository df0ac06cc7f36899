"""`tunesmith <command> [flags]`: a plain mapping of subcommand to `main(args)`.

Only the standard library, tunesmith.config.parser and tunesmith.log are imported here, so `--help` and argument errors
answer at once; each command imports torch/transformers when it runs. Also here: turning ms-swift's launch
variables (NPROC_PER_NODE, NNODES, ...) into a torchrun launch of the same command.
"""
from __future__ import annotations

import importlib
import os
import sys

from tunesmith import __version__
from tunesmith.config.parser import ArgError, deferred_problems, format_help, parse_args, problems_message
from tunesmith.log import note, rank, world_size

# command -> (module, one-line description). The module's `main(args)` is also the Python API.
COMMANDS = {
    "sft": ("tunesmith.commands.train", "supervised fine-tuning (LoRA, QLoRA, full)"),
    "pt": ("tunesmith.commands.train", "continued pre-training on plain text: sft without a chat template, every "
                                       "token trained"),
    "rlhf": ("tunesmith.commands.train", "preference training (DPO and its variants, CPO, SimPO, ORPO, KTO), reward "
                                         "models, GRPO, PPO and GKD"),
    "dpo": ("tunesmith.commands.train", "short for `rlhf --rlhf_type dpo`"),
    "infer": ("tunesmith.commands.infer", "chat with a model or checkpoint, or infer over a dataset"),
    "export": ("tunesmith.commands.export", "merge adapters (--merge_lora true), write GGUF (--to_gguf true), an "
                                          "Ollama Modelfile (--to_ollama true) or a quantised checkpoint"),
    "merge-lora": ("tunesmith.commands.export", "short for `export --merge_lora true`"),
    "deploy": ("tunesmith.commands.deploy", "serve a model or checkpoint behind an OpenAI-compatible API"),
    "rollout": ("tunesmith.commands.rollout", "serve a model for GRPO's --vllm_mode server (ms-swift's rollout "
                                              "protocol; the policy's adapter arrives over HTTP)"),
    "data": ("tunesmith.commands.data", "inspect, validate, convert, split and measure datasets"),
    "report": ("tunesmith.commands.report", "plots and an HTML report of a run, or several runs compared"),
    "eval": ("tunesmith.commands.eval", "benchmarks from local files: base vs tuned side by side"),
    "web-ui": ("tunesmith.commands.web_ui", "train, watch, stop, compare, chat and export in a browser (gradio)"),
    "app": ("tunesmith.commands.app", "a chat page for one model or checkpoint in a browser (gradio)"),
}

# ms-swift commands that tunesmith will provide but does not yet: a clear message instead of "unknown command".
PLANNED: dict = {}
# what to use meanwhile
PLANNED_INSTEAD: dict = {}


def _usage() -> str:
    lines = [f"tunesmith {__version__}: fine-tune open LLMs with an ms-swift compatible command line.", "",
             "usage: tunesmith <command> [CONFIG.yaml] [--flag value ...]", "", "commands:"]
    for name, (_, desc) in COMMANDS.items():
        lines.append(f"  {name:<8} {desc}")
    lines += ["", "Run 'tunesmith <command> --help' for its flags. ms-swift 3.x and 4.x flag names are both accepted."]
    return "\n".join(lines)


TRAINING = ("sft", "pt", "rlhf", "dpo")
# their value checks also report the deferred flag problems
DEFERRED = (*TRAINING, "infer", "deploy", "rollout", "export", "eval", "web-ui", "app")


def _env_int(name: str, default: int, lo: int, hi: int | None = None) -> int:
    """The launch variable `name` as an integer in [lo, hi] (default when unset or empty). Raises ArgError saying
    what it must be for a value that is not one (MASTER_PORT=70000 is no TCP port)."""
    raw = os.environ.get(name) or ""
    try:
        value = int(raw) if raw.strip() else default
    except ValueError:
        value = None
    if value is None or value < lo or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
        raise ArgError(f"{name}={raw}: must be a whole number {span}" + (
            " (a TCP port; 29500 is torchrun's default)" if name == "MASTER_PORT" else ""))
    return value


def _torchrun_args(command: str) -> list[str]:
    """ms-swift's launch variables (NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT) as torchrun
    arguments, when they ask for more than one process and this is not already a launched worker."""
    nproc = _env_int("NPROC_PER_NODE", 1, 0)
    nnodes = _env_int("NNODES", 1, 0)
    if (nproc <= 1 and nnodes <= 1) or "LOCAL_RANK" in os.environ:
        return []
    if command not in TRAINING:
        note(f"NPROC_PER_NODE/NNODES apply to training; {command} runs in one process")
        return []
    addr = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = _env_int("MASTER_PORT", 29500, 1, 65535)
    node_rank = _env_int("NODE_RANK", 0, 0, max(nnodes, 1) - 1)
    if node_rank == 0:
        import socket
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("" if addr in ("127.0.0.1", "localhost") else addr, port))
            except OSError:
                raise ArgError(f"MASTER_PORT={port} is in use on this machine (another training run, or its "
                               f"leftover processes); pick a free one, e.g. MASTER_PORT={port + 1}") from None
    return [f"--nproc_per_node={nproc}", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--master_addr={addr}", f"--master_port={port}"]


def _launch(cmd: list[str]) -> int:
    """Run torchrun and return its exit code. A SIGTERM sent to this process goes on to torchrun, which passes it
    to every rank (rank 0 then says where training stopped); Ctrl-C reaches them all from the terminal already, so
    this process only waits."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd)

    def forward(signum, _frame):
        """SIGTERM: pass it on; SIGINT: the terminal sent it to the whole process group."""
        if signum == signal.SIGTERM and proc.poll() is None:
            proc.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def torchrun(argv: list[str]) -> int:
    """torchrun (torch.distributed.run) over `argv`, in this process; returns its exit code. A run that a signal
    stopped — the agent's own SIGTERM/SIGINT, or every failed rank exiting 128 + a signal (rank 0 said where
    training stopped) — ends with that code and without the agent's traceback; other failures print torchrun's
    summary of them (no traceback) and return 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_args
    from torch.distributed.run import run

    try:
        run(torchrun_args(argv))
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        signalled = {c if c > 0 else 128 - c for c in codes} & {128 + 2, 128 + 15}
        if signalled and all(c in (130, 143, -2, -15) for c in codes):
            return max(signalled)
        print(e, file=sys.stderr)
        return 1
    return 0


# Library warnings about the libraries' own calls, which no user of tunesmith can act on: peft (0.21, the newest)
# reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model. tunesmith's own calls use
# the current names; tests/test_structure.py checks that no module of ours reads the deprecated one.
LIBRARY_NOISE = (r"`is_gradient_checkpointing` is deprecated",)
# peft's notes about its own internals, whatever the category: BOFT's optional CUDA kernel failing to build on a
# machine without CUDA (its pure-PyTorch path runs; "setting boft_n_butterfly_factor to 1" changes nothing it was
# given), and AdaLoRA's saved rank_pattern, whose keys peft itself wrote, "not matching" on load.
PEFT_NOISE = (r"Failed to load the CUDA extension", r"Setting boft_n_butterfly_factor to 1",
              r"The following rank_pattern keys did not match any targeted module")
# DeepSpeed logs this when it is imported on a machine without a GPU. transformers' save_pretrained imports
# DeepSpeed whenever it is installed (its unwrap_model goes through accelerate's extract_model_from_parallel), so
# every run that saves weights would print it; it is kept for --deepspeed runs, where it is news.
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"
BNB_CPU_LOGGER, BNB_KERNEL_NOTICE = "bitsandbytes.backends.cpu.ops", "from kernels-community"
MODEL_COMMANDS = (*TRAINING, "infer", "export", "deploy", "rollout", "eval", "app", "web-ui")  # load or save weights


def _ignore_library_warnings() -> None:
    import warnings

    for message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for message in PEFT_NOISE:
        warnings.filterwarnings("ignore", message=message)


def quiet_libraries(command: str, args) -> None:
    """Keep library output that no tunesmith user can act on off the terminal, for a command that loads or saves
    weights (the warnings of LIBRARY_NOISE are filtered for every command, in main): transformers' own progress
    bars ("Loading weights", "Writing model shards": tunesmith says what it loads and writes; downloads keep
    huggingface_hub's bars) through transformers' tqdm hook, DeepSpeed's DEEPSPEED_CPU_NOTICE in a run
    without --deepspeed, and bitsandbytes' failed fetch of an optional CPU kernel (BNB_KERNEL_NOTICE)."""
    if command not in MODEL_COMMANDS:
        return
    import logging

    from transformers.utils import logging as hf_logging

    if hasattr(hf_logging, "set_tqdm_hook"):  # transformers 5
        hf_logging.set_tqdm_hook(lambda factory, bar_args, kwargs: factory(*bar_args, **{**kwargs, "disable": True}))
    from tunesmith.config.slices import flag_values

    if not flag_values(args).get("deepspeed"):
        logging.getLogger("DeepSpeed").addFilter(lambda record: DEEPSPEED_CPU_NOTICE not in record.getMessage())
    # bitsandbytes on a CPU tries to fetch an optional kernel from the hub whenever it is imported (transformers'
    # quantizers import it) and logs the refusal; its own CPU code runs either way
    logging.getLogger(BNB_CPU_LOGGER).addFilter(lambda record: BNB_KERNEL_NOTICE not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    _ignore_library_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(f"tunesmith {__version__}")
        return 0
    command = argv[0].replace("_", "-")
    command = {"merge_lora": "merge-lora"}.get(command, command)
    rest = argv[1:]
    if command not in COMMANDS:
        if command in PLANNED:
            instead = f" Meanwhile: {PLANNED_INSTEAD[command]}." if command in PLANNED_INSTEAD else ""
            print(f"tunesmith: '{command}' ({PLANNED[command]}) is not available in this version yet.{instead}",
                  file=sys.stderr)
            return 2
        import difflib
        near = difflib.get_close_matches(command, list(COMMANDS) + list(PLANNED), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        print(f"tunesmith: unknown command '{argv[0]}'.{hint} Run 'tunesmith --help'.", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(format_help("export" if command == "merge-lora" else command))
        return 0
    if command == "report":  # run directories are positional: `tunesmith report RUN [RUN ...]`
        k = next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))
        if k:
            rest = ["--runs", *rest[:k], *rest[k:]]
    if command == "merge-lora":  # ms-swift's `swift merge-lora` is `swift export --merge_lora true`
        command, rest = "export", ["--merge_lora", "true", *rest]
    try:
        # training, infer, deploy, export and eval report flag problems together with their value checks (all at once)
        args = parse_args(command, rest, defer_problems=command in DEFERRED)
        launch = _torchrun_args(command)
        if launch and deferred_problems(args):  # found here, once, not by every process torchrun would start
            raise ArgError(problems_message(deferred_problems(args)))
    except ArgError as e:
        print(f"tunesmith {command}: error: {e}", file=sys.stderr)
        return 2
    if launch and COMMANDS[command][0] == "tunesmith.commands.train":
        # the value checks too, once here rather than by every process torchrun would start (exit 2, as alone)
        from tunesmith.commands.train import check_flags
        from tunesmith.errors import ConfigError

        try:
            check_flags(args)
        except ConfigError as e:
            print(f"tunesmith {command}: error: {e}", file=sys.stderr)
            return 2
    if launch:
        cmd = [sys.executable, "-c", "import sys; from tunesmith.cli import torchrun; sys.exit(torchrun(sys.argv[1:]))",
               *launch, "-m", "tunesmith", command, *rest]
        note(f"launching: torchrun {' '.join(launch)} -m tunesmith {command} …")
        return _launch(cmd)
    module = importlib.import_module(COMMANDS[command][0])
    quiet_libraries(command, args)
    from tunesmith.errors import FlagError, Interrupted, TunesmithError
    try:
        rc = module.main(args)
    except Interrupted as e:  # every process got the signal: rank 0 says where training stopped
        if rank() == 0:
            print(f"tunesmith {command}: {e}", file=sys.stderr)
        return e.exit_code
    except FlagError as e:  # flag values refused before anything loaded: a usage error, like a bad flag
        where = f" (rank {rank()})" if world_size() > 1 else ""
        print(f"tunesmith {command}{where}: error: {e}", file=sys.stderr)
        return 2
    except TunesmithError as e:
        # every rank may fail (each prints its own error), so say which one this is
        where = f" (rank {rank()})" if world_size() > 1 else ""
        print(f"tunesmith {command}{where}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tunesmith {command}: interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
