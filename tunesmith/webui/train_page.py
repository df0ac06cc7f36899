"""The Train page: pick a method, a model and data (files found under the allowed folders, or uploaded), look at
the rows as training will see them (`tunesmith data inspect` and `data stats`, run as commands), set any flag (every
flag the command reads, grouped as the flag groups declare them, each with its help and default), see the exact
command line, check it with the command's own one-message validation, and start it as a detached process.

gradio is imported inside the function that builds the page (it takes seconds to import).
"""
from __future__ import annotations

import os

from tunesmith.webui.builder import BASICS, METHOD_GROUPS, METHODS, build_training, method_flags
from tunesmith.webui.context import Context, validate
from tunesmith.webui.flags import FlagSpec
from tunesmith.webui.paths import DATA_SUFFIXES, data_files, keep_upload, model_folders

GROUP_ORDER = ("ModelArgs", "QuantArgs", "TemplateArgs", "DataArgs", "TunerArgs", "OptimArgs", "OutputArgs",
               "TrackArgs", "DistArgs", "RLHFArgs", "GRPOArgs", "VllmArgs")


def all_specs() -> list[FlagSpec]:
    """Every method's fields, once each (GRPO's command has them all: its flags are a superset), in GROUP_ORDER."""
    seen: dict[str, FlagSpec] = {}
    for method in METHODS:
        for spec in method_flags(method):
            seen.setdefault(spec.name, spec)
    rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    return sorted(seen.values(), key=lambda s: rank.get(s.group, len(rank)))


def widget(gr, spec: FlagSpec, visible: bool = True):
    """The gradio input of one flag: a checkbox, a drop-down of its choices (unset/true/false for an optional
    switch) or a text box; labelled --name, its help and default as the info line."""
    info = spec.help + (f" [default: {spec.default_text}]" if spec.default_text else "")
    common = dict(label=f"--{spec.name}", info=info, elem_id=f"flag-{spec.name}", visible=visible)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(spec.default), **common)
    if spec.kind in ("tristate", "choice"):
        options = ["true", "false"] if spec.kind == "tristate" else [str(c) for c in spec.choices]
        options = ([""] if spec.default is None else []) + options
        return gr.Dropdown(choices=options, value=spec.default_text, **common)
    return gr.Textbox(value=spec.default_text, lines=1, max_lines=4, **common)


def _inputs(gr, ctx: Context, specs: list[FlagSpec]) -> dict:
    """Every flag's input, the basics first (model and dataset as drop-downs of what the allowed folders hold),
    then one closed accordion per flag group; returns {flag: component} and the group accordions."""
    words = ctx.words
    by_name = {s.name: s for s in specs}
    comps, groups = {}, {}
    with gr.Group():
        gr.Markdown(f"### {words['basics']}")
        comps["model"] = gr.Dropdown(choices=model_folders(ctx.folders), value=None, allow_custom_value=True,
                                     label="--model", info=by_name["model"].help, elem_id="flag-model")
        comps["dataset"] = gr.Dropdown(choices=data_files(ctx.folders), value=[], multiselect=True,
                                       allow_custom_value=True, label="--dataset", info=by_name["dataset"].help,
                                       elem_id="flag-dataset")
        with gr.Row():
            for name in BASICS[2:]:
                if name in by_name:  # a method's own (--beta, --reward_funcs): shown with its method
                    comps[name] = widget(gr, by_name[name], visible=by_name[name].group not in METHOD_GROUPS)
    gr.Markdown(f"### {words['all_flags']}")
    from tunesmith.webui.flags import group_title

    for group in dict.fromkeys(s.group for s in specs):
        command = "rlhf" if group in METHOD_GROUPS else "sft"
        with gr.Accordion(f"{group[:-4]}: {group_title(command, group)}", open=False,
                          visible=group not in METHOD_GROUPS, elem_id=f"group-{group}") as acc:
            for spec in specs:
                if spec.group == group and spec.name not in comps:
                    comps[spec.name] = widget(gr, spec)
        groups[group] = acc
    return {"flags": comps, "groups": groups}


def _values(names: list, values: tuple) -> dict:
    return dict(zip(names, values))


def _preview(ctx: Context, method: str, model, datasets, action: str) -> str:
    """`tunesmith data inspect|stats` over the chosen data (with the model's tokenizer when a model is chosen),
    run as a command; its output as the page shows it."""
    from tunesmith.webui.builder import Built
    from tunesmith.webui.launch import run_cli

    datasets = [d for d in (datasets or []) if str(d).strip()]
    if not datasets:
        return "Choose or upload a dataset first (--dataset)."
    argv = ["data", action, "--dataset", *datasets] + (["--model", str(model).strip()] if model else [])
    if action == "inspect":
        argv += ["--num_rows", "3"]
    if method != "sft":
        argv += ["--rlhf_type", method]
    built = Built(argv)
    problem = validate(ctx, built)
    if problem:
        return problem
    code, out = run_cli(built.process_argv(), timeout=300, cwd=ctx.cwd)
    return f"$ {built.line}\n{out.strip()}" + ("" if code == 0 else f"\n(exit code {code})")


def _build(ctx: Context, method: str, nproc, names: list, values: tuple):
    return build_training(method, _values(names, values), ctx.folders.outputs[0], int(nproc or 1))


def _check(ctx: Context, method: str, nproc, names: list, values: tuple) -> tuple[str, str]:
    """(the command line, the check's message: the CLI's error, or that the flags pass)."""
    built = _build(ctx, method, nproc, names, values)
    problem = validate(ctx, built)
    return built.line, (f"```\n{problem}\n```" if problem else "the flags pass the command's own check")


def _start(ctx: Context, method: str, nproc, names: list, values: tuple) -> tuple[str, str]:
    """Check, then start the command detached (launch.start); (the command line, what happened)."""
    from tunesmith.errors import ConfigError
    from tunesmith.webui.launch import start

    built = _build(ctx, method, nproc, names, values)
    problem = validate(ctx, built)
    if problem:
        return built.line, f"```\n{problem}\n```"
    out_dir = built.argv[built.argv.index("--output_dir") + 1]
    try:
        launch = start(built.process_argv(), built.argv, built.line, os.path.join(ctx.cwd, out_dir), built.env,
                       ctx.cwd)
    except (ConfigError, OSError) as e:
        return built.line, f"```\ntunesmith web-ui: {e}\n```"
    return built.line, (f"started (pid {launch.pid}) into {out_dir}; follow it on the "
                        f"{ctx.words['runs']} page")


def build(gr, ctx: Context) -> dict:
    """The Train page's components and events, inside the current gr.Blocks/Tab. Returns the components other
    pages address ({"method", "flags": {name: component}, "message", "command"}) and, for the page load, the
    drop-downs of model folders and data files and the function that lists them again ("pickers", "choices")."""
    words = ctx.words
    specs = all_specs()
    method = gr.Radio(choices=list(METHODS), value="sft", label=words["method"], elem_id="method")
    parts = _inputs(gr, ctx, specs)
    flags, groups = parts["flags"], parts["groups"]
    with gr.Row():
        upload = gr.File(file_count="multiple", file_types=list(DATA_SUFFIXES), label=words["upload"],
                         elem_id="upload")
        nproc = gr.Number(value=1, precision=0, minimum=1, label=words["nproc"], elem_id="nproc")
    with gr.Row():
        inspect_btn = gr.Button(words["preview"], elem_id="preview")
        stats_btn = gr.Button(words["stats"], elem_id="stats")
    preview = gr.Textbox(label="data", lines=8, max_lines=30, interactive=False, elem_id="preview-out")
    with gr.Row():
        check_btn = gr.Button(words["check"], elem_id="check")
        start_btn = gr.Button(words["start"], variant="primary", elem_id="start")
    command = gr.Code(label=words["command"], language="shell", interactive=False, elem_id="command")
    message = gr.Markdown(elem_id="train-message")

    names = list(flags)
    inputs = [method, nproc, *flags.values()]
    by_name = {s.name: s for s in specs}
    # the group accordions, and the basics of a method's own group (--beta, --reward_funcs), shown per method
    toggled = [(g, acc) for g, acc in groups.items()] + \
              [(by_name[n].group, flags[n]) for n in BASICS if n in flags and by_name[n].group in METHOD_GROUPS]

    def show_groups(m):
        return [gr.update(visible=m in METHOD_GROUPS.get(g, {m})) for g, _ in toggled]

    def uploaded(files, current):
        kept = [keep_upload(f if isinstance(f, str) else f.name, ctx.folders) for f in files or []]
        return gr.update(choices=data_files(ctx.folders) + kept, value=list(current or []) + kept), None

    method.change(show_groups, method, [c for _, c in toggled])
    upload.upload(uploaded, [upload, flags["dataset"]], [flags["dataset"], upload])
    inspect_btn.click(lambda m, mo, d: _preview(ctx, m, mo, d, "inspect"), [method, flags["model"], flags["dataset"]],
                      preview)
    stats_btn.click(lambda m, mo, d: _preview(ctx, m, mo, d, "stats"), [method, flags["model"], flags["dataset"]],
                    preview)
    check_btn.click(lambda m, n, *v: _check(ctx, m, n, names, v), inputs, [command, message])
    start_btn.click(lambda m, n, *v: _start(ctx, m, n, names, v), inputs, [command, message],
                    concurrency_limit=1)
    def choices():
        return gr.update(choices=model_folders(ctx.folders)), gr.update(choices=data_files(ctx.folders))

    return {"method": method, "flags": flags, "message": message, "command": command, "choices": choices,
            "pickers": [flags["model"], flags["dataset"]]}
