"""The Export and Eval pages: `tunesmith export` and `tunesmith eval` of a checkpoint, built from a short form,
checked with the command's own validation, and run as detached processes like training (launch.start), so their
output and end message are shown while they run and after a reload.

EXPORT_KINDS is the list of what the Export page offers: each entry is enabled when `tunesmith export` has its
flag, so a new export target (GGUF, Ollama, quantised) is one line here once its flag exists.
"""
from __future__ import annotations

import dataclasses
import os

from tunesmith.config.commands import COMMAND_ARGS
from tunesmith.webui.builder import Built
from tunesmith.webui.context import Context, validate
from tunesmith.webui.launch import launch_path, read_launch
from tunesmith.webui.runs import log_tail, message_of

# (label, the flags it sets, the export flag it needs, the further flags it takes from text boxes): offered when
# `tunesmith export` has the flag it needs; of its further flags, those export has are shown
EXPORT_KINDS = [
    ("merge LoRA into the base model (a Hugging Face folder)", ("--merge_lora", "true"), "merge_lora",
     ("output_dir", "max_shard_size")),
    ("GGUF for llama.cpp, LM Studio, Jan", ("--to_gguf", "true"), "to_gguf", ("output_dir", "gguf_quant")),
    ("GGUF with an Ollama Modelfile", ("--to_gguf", "true", "--to_ollama", "true"), "to_ollama",
     ("output_dir", "gguf_quant")),
    ("Ollama Modelfile with the merged weights", ("--to_ollama", "true"), "to_ollama", ("output_dir",)),
    ("quantised checkpoint (bnb, fp8, gptq)", (), "quant_method",
     ("quant_method", "quant_bits", "dataset", "output_dir")),
]
LIST_OPTIONS = ("gguf_quant",)
BENCHMARKS = ("general_qa", "general_mcq", "gsm8k", "mmlu", "ceval", "cmmlu", "humaneval")


def export_flags() -> dict:
    """{flag: its help text} of `tunesmith export`."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(COMMAND_ARGS["export"])}


def export_kinds() -> list[tuple]:
    """The EXPORT_KINDS whose flag `tunesmith export` has."""
    have = export_flags()
    return [k for k in EXPORT_KINDS if k[2] in have]


def task_dir(ctx: Context, kind: str) -> str:
    """Where a page's export or eval runs are recorded: <first output folder>/.tunesmith-webui-tasks/<kind> (hidden:
    not listed as a run)."""
    return os.path.join(ctx.folders.outputs[0], ".tunesmith-webui-tasks", kind)


def _no_flags(name: str, values: list) -> list:
    """values, or ValueError when one begins with -- (the command line would read it as a flag: a form field must
    never add a flag the page does not show)."""
    bad = [v for v in values if str(v).startswith("--")]
    if bad:
        raise ValueError(f"--{name} {bad[0]}: a value cannot begin with -- (the command line would read it as a flag)")
    return values


def export_command(checkpoint: str, kind_label: str, options: dict) -> Built:
    """`tunesmith export --adapters CKPT <the kind's flags> [--option value ...]` (the kind's options; empty ones
    left out).
    Raises ValueError for a kind that is not offered, or a value that begins with --."""
    kind = next((k for k in export_kinds() if k[0] == kind_label), None)
    if kind is None:
        raise ValueError(f"{kind_label!r} is not an export this version offers")
    argv = ["export", "--adapters", *_no_flags("adapters", [str(checkpoint).strip()]), *kind[1]]
    for name, value in options.items():
        if name in kind[3] and str(value or "").strip():
            # a list flag (several GGUF types) takes its values as separate arguments, as on a command line
            vals = str(value).split() if name in LIST_OPTIONS else [str(value).strip()]
            argv += [f"--{name}", *_no_flags(name, vals)]
    return Built(argv)


def eval_command(checkpoint: str, datasets, limit, dataset_args: str) -> Built:
    """`tunesmith eval --adapters CKPT --eval_dataset ... [--eval_limit N] [--eval_dataset_args JSON]`: the base
    (the adapter switched off) and the tuned model side by side."""
    argv = ["eval", "--adapters", *_no_flags("adapters", [str(checkpoint).strip()]),
            "--eval_dataset", *_no_flags("eval_dataset", list(datasets or []))]
    if limit not in (None, ""):
        argv += ["--eval_limit", str(int(limit))]
    if str(dataset_args or "").strip():
        argv += ["--eval_dataset_args", *_no_flags("eval_dataset_args", [str(dataset_args).strip()])]
    return Built(argv)


def _writes_inside(ctx: Context, built: Built) -> str:
    """The page's folder rule for what export and eval write by default (next to the checkpoint), or ""."""
    from tunesmith.webui.paths import within

    flag = "--output_dir" if built.command == "export" else "--eval_output_dir"
    ckpt = built.argv[built.argv.index("--adapters") + 1]
    if flag in built.argv or within(ckpt, ctx.folders.outputs):
        return ""
    return (f"tunesmith web-ui: {built.command} writes next to {ckpt} by default, outside the output folders "
            f"({', '.join(ctx.folders.outputs)}); give {flag} inside one")


def _benchmark_files(ctx: Context, built: Built) -> str:
    """The page's folder rule for the benchmark files eval reads (--eval_dataset_args' local_path), or ""."""
    import json

    from tunesmith.webui.paths import is_local, within

    if "--eval_dataset_args" not in built.argv:
        return ""
    try:
        spec = json.loads(built.argv[built.argv.index("--eval_dataset_args") + 1])
    except ValueError:
        return ""  # the command's own check says what is wrong with it
    paths = [str(v.get("local_path")) for v in (spec.values() if isinstance(spec, dict) else [])
             if isinstance(v, dict) and v.get("local_path")]
    bad = [p for p in paths if is_local(p) and not within(p, ctx.folders.readable)]
    return (f"tunesmith web-ui: --eval_dataset_args local_path {bad[0]}: outside the folders this page may read "
            f"({', '.join(ctx.folders.readable)})") if bad else ""


def run_task(ctx: Context, kind: str, built: Built) -> str:
    """Check `built` (the folder rule, the command's own check) and start it detached; the page's message."""
    from tunesmith.errors import ConfigError
    from tunesmith.webui.launch import start

    problem = _benchmark_files(ctx, built) or validate(ctx, built) or _writes_inside(ctx, built)
    if problem:
        return f"```\n{problem}\n```"
    try:
        launch = start(built.process_argv(), built.argv, built.line, task_dir(ctx, kind), built.env, ctx.cwd)
    except (ConfigError, OSError) as e:
        return f"```\ntunesmith web-ui: {e}\n```"
    return f"started (pid {launch.pid}): `{built.line}`"


def task_state(ctx: Context, kind: str) -> tuple[str, str, str]:
    """(status line, log tail, the table the command printed — eval's markdown) of the last export or eval."""
    from tunesmith.webui.launch import alive

    launch = read_launch(launch_path(task_dir(ctx, kind)))
    if launch is None:
        return "", "", ""
    log = log_tail(launch.log, 60)
    message = message_of(log)
    if alive(launch):
        state = "running"
    else:
        state = {0: "finished", None: "ended"}.get(launch.exit_code, "failed")
        state = "failed" if " error: " in message else state
    table = "\n".join(line for line in log.splitlines() if line.startswith("|"))
    return f"**{state}** · `{launch.line}`" + (f"\n```\n{message}\n```" if message else ""), log, table


def _checkpoints(ctx: Context) -> list[str]:
    from tunesmith.webui.runs import find_runs

    return [c for r in find_runs(ctx.folders.outputs) for c in reversed(r.checkpoints)]


def build_export(gr, ctx: Context) -> dict:
    """The Export page inside the current Blocks/Tab; returns {"checkpoint"} for the Runs page's button."""
    w = ctx.words
    kinds = export_kinds()
    ckpt = gr.Dropdown(choices=_checkpoints(ctx), allow_custom_value=True, label="--adapters", elem_id="export-ckpt")
    kind = gr.Radio(choices=[k[0] for k in kinds], value=kinds[0][0], label=w["export_kind"], elem_id="export-kind")
    have = export_flags()
    names = dict.fromkeys(n for k in kinds for n in k[3] if n in have)
    options = {name: gr.Textbox(label=f"--{name}", info=have[name], elem_id=f"export-{name}") for name in names}
    go = gr.Button(w["export"], variant="primary", elem_id="export-start")
    message = gr.Markdown(elem_id="export-message")
    status = gr.Markdown(elem_id="export-status")
    log = gr.Textbox(label=w["log"], lines=10, max_lines=10, interactive=False, elem_id="export-log")

    def start_export(c, k, *values):
        try:
            built = export_command(c or "", k, dict(zip(options, values)))
        except ValueError as e:
            return str(e)
        return run_task(ctx, "export", built)

    go.click(start_export, [ckpt, kind, *options.values()], message)
    gr.Timer(2.0).tick(lambda: task_state(ctx, "export")[:2], None, [status, log], show_progress="hidden",
                       queue=False)
    return {"checkpoint": ckpt, "refresh": lambda: gr.update(choices=_checkpoints(ctx))}


def build_eval(gr, ctx: Context) -> dict:
    """The Eval page inside the current Blocks/Tab: a checkpoint against its base on benchmark files."""
    w = ctx.words
    ckpt = gr.Dropdown(choices=_checkpoints(ctx), allow_custom_value=True, label="--adapters", elem_id="eval-ckpt")
    datasets = gr.Dropdown(choices=list(BENCHMARKS), value=["general_qa"], multiselect=True,
                           label=w["eval_datasets"], elem_id="eval-datasets")
    limit = gr.Number(value=20, precision=0, label="--eval_limit", elem_id="eval-limit")
    dataset_args = gr.Textbox(label="--eval_dataset_args", info="JSON: each benchmark's local_path (the files in "
                              "its published layout; docs/eval.md), subset_list, few_shot_num",
                              placeholder='{"general_qa": {"local_path": "data/qa.jsonl"}}', lines=2,
                              elem_id="eval-args")
    go = gr.Button(w["eval"], variant="primary", elem_id="eval-start")
    message = gr.Markdown(elem_id="eval-message")
    status = gr.Markdown(elem_id="eval-status")
    result = gr.Markdown(label=w["eval_result"], elem_id="eval-result")
    log = gr.Textbox(label=w["log"], lines=10, max_lines=10, interactive=False, elem_id="eval-log")
    def start(c, d, n, a):
        try:
            built = eval_command(c or "", d, n, a)
        except ValueError as e:
            return f"tunesmith web-ui: {e}"
        return run_task(ctx, "eval", built)

    go.click(start, [ckpt, datasets, limit, dataset_args], message)
    gr.Timer(2.0).tick(lambda: task_state(ctx, "eval"), None, [status, log, result], show_progress="hidden",
                       queue=False)
    return {"checkpoint": ckpt, "refresh": lambda: gr.update(choices=_checkpoints(ctx))}
