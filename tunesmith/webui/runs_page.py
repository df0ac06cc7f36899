"""The Runs page: every run under the output folders (runs.find_runs, found again every REFRESH_S seconds and on
each page load, so a reload or a new page process lists the same runs), the selected run's live curves, progress
and ETA, log, checkpoints and end message; Stop (SIGTERM, launch.stop), Resume (the same command from the last
checkpoint), and the comparison report of several runs (tunesmith.runs.report.compare, the HTML `tunesmith
report` writes).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from tunesmith.webui.builder import Built, resume_argv
from tunesmith.webui.context import Context, relative, validate
from tunesmith.webui.curves import charts
from tunesmith.webui.runs import RunView, find, find_runs, log_tail, read_records

REFRESH_S = 2.0
SLOTS = 10  # charts shown at most (a GRPO run with every metric logged has about this many)
HEADERS = ["run", "method", "status", "step", "loss", "reward", "ETA", "started"]


def table(runs: list[RunView]) -> list[list]:
    """The runs table's rows (HEADERS): name, method, status, step/total, last loss and reward, ETA, start time."""
    rows = []
    for r in runs:
        loss, reward = r.last.get("loss"), r.last.get("reward")
        rows.append([r.name, r.method, r.status, f"{r.step}/{r.max_steps}" if r.max_steps else str(r.step or ""),
                     "" if loss is None else f"{loss:.4g}", "" if reward is None else f"{reward:.4g}",
                     r.remaining if r.live else "", time.strftime("%m-%d %H:%M:%S", time.localtime(r.started))])
    return rows


def progress(r: RunView) -> str:
    """One line: status, step of total (percent), elapsed and ETA, the command line."""
    pct = f" ({100 * r.step / r.max_steps:.1f}%)" if r.max_steps else ""
    parts = [f"**{r.status}**", f"step {r.step}/{r.max_steps or '?'}{pct}"]
    if r.elapsed:
        parts.append(f"elapsed {r.elapsed}")
    if r.remaining and r.live:
        parts.append(f"ETA {r.remaining}")
    line = " · ".join(parts)
    if r.launch is not None:
        line += f"\n\n`{r.launch.line}`"
    return line


def details(r: RunView) -> tuple[str, str, str, str]:
    """(progress, the end message, the checkpoints, the log tail) of a run."""
    message = f"```\n{r.message}\n```" if r.message else ""
    ckpts = "\n".join(f"- `{c}`" for c in r.checkpoints) or "none yet"
    if r.launch is not None:
        log = log_tail(r.launch.log, 40)
    else:
        log = "(started outside this page: its output is in the terminal that started it)"
    return progress(r), message, ckpts, log


def plot_updates(gr, r: RunView) -> list:
    """SLOTS chart updates for a run: each chart of curves.charts as a line plot (step, value, metric) with its
    caption; the slots left over hidden."""
    import pandas as pd

    records = read_records(os.path.join(r.path, "logging.jsonl")) if os.path.isdir(r.path) else []
    shown = charts(records)[:SLOTS]
    out = []
    for c in shown:
        frame = pd.DataFrame(c.rows, columns=["step", "value", "metric"])
        out.append(gr.update(value=frame, label=c.title, caption=c.caption, visible=True))
    return out + [gr.update(visible=False)] * (SLOTS - len(shown))


def _signature(r: RunView) -> str:
    return json.dumps([r.path, r.status, r.step, len(r.checkpoints), r.last.get("global_step")])


def refresh(gr, ctx: Context, selected, last_sig):
    """Everything the page shows, recomputed: the table, the run choices, the selected run's details and (when
    the run moved on since last_sig) its charts."""
    runs = find_runs(ctx.folders.outputs)
    rows = table(runs) or [[ctx.words["no_runs"]] + [""] * (len(HEADERS) - 1)]
    choices = [(f"{r.name} — {r.status}", r.path) for r in runs]
    comparable = gr.update(choices=[(r.name, r.path) for r in runs if os.path.isdir(r.path) and
                                    not r.name.endswith("(no run folder yet)")])
    run = next((r for r in runs if r.path == selected), None)
    if run is None and selected:  # a start that has its run folder now: follow it there
        run = next((r for r in runs if r.launch is not None and r.launch.output_dir == selected), None)
    if run is None:
        empty = [ctx.words["not_selected"], "", "", ""]
        return [rows, gr.update(choices=choices), comparable, *empty, *[gr.update(visible=False)] * SLOTS, ""]
    sig = _signature(run)
    plots = plot_updates(gr, run) if sig != last_sig else [gr.skip()] * SLOTS
    select = gr.update(choices=choices, value=run.path) if run.path != selected else gr.update(choices=choices)
    return [rows, select, comparable, *details(run), *plots, sig]


def stop_run(ctx: Context, selected) -> str:
    """Stop the selected run (launch.stop); runs started outside the page are not signalled."""
    from tunesmith.webui.launch import stop

    run = find(ctx.folders.outputs, selected) if selected else None
    if run is None:
        return ctx.words["not_selected"]
    if run.launch is None:
        return ("this run was started outside the page (no record of its process): stop it where it was started "
                "(Ctrl-C or `kill -TERM <pid>`)")
    return stop(run.launch)


def resume_command(run: RunView) -> Built:
    """The command that continues a run from its last checkpoint: its own command line (or, for a run started
    elsewhere, its args.json as the config) with --resume_from_checkpoint. Raises ValueError without a checkpoint."""
    if not run.checkpoints:
        raise ValueError("no checkpoint to resume from yet")
    if run.launch is not None:
        return Built(resume_argv(list(run.launch.argv), run.checkpoints[-1]), dict(run.launch.env))
    command = "sft" if run.method == "sft" else "rlhf"
    return Built(resume_argv([command, os.path.join(run.path, "args.json")], run.checkpoints[-1]))


def resume_run(ctx: Context, selected) -> str:
    """Check and start the resume command (resume_command) into the run's output folder."""
    from tunesmith.errors import ConfigError
    from tunesmith.webui.launch import start

    run = find(ctx.folders.outputs, selected) if selected else None
    if run is None or run.live:
        return ctx.words["not_selected"] if run is None else "the run is still running; stop it first"
    try:
        built = resume_command(run)
    except ValueError as e:
        return str(e)
    try:
        with open(os.path.join(run.path, "args.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
    except (OSError, ValueError):
        saved = {}
    problem = validate(ctx, built)
    if problem:
        return f"```\n{problem}\n```"
    out_dir = run.launch.output_dir if run.launch else saved.get("output_dir") or os.path.dirname(run.path)
    cwd = run.launch.cwd if run.launch else saved.get("working_dir") or ctx.cwd
    try:
        launch = start(built.process_argv(), built.argv, built.line, out_dir, built.env, cwd)
    except (ConfigError, OSError) as e:
        return f"```\ntunesmith web-ui: {e}\n```"
    return f"resumed (pid {launch.pid}) from `{run.checkpoints[-1]}`: `{built.line}`"


def compare_runs(ctx: Context, paths) -> tuple:
    """The comparison report (the HTML of `tunesmith report RUN RUN …`) of the chosen runs, written to a
    temporary folder the page serves; (the file, a line saying what was compared)."""
    from tunesmith.errors import ConfigError
    from tunesmith.runs.report import compare

    paths = [p for p in paths or [] if os.path.isfile(os.path.join(p, "logging.jsonl"))]
    if not paths:
        return None, "choose one or more runs that have logged a step"
    out = os.path.join(tempfile.mkdtemp(prefix="tunesmith-webui-"), "compare_report.html")
    try:
        compare(paths, out)
    except ConfigError as e:
        return None, str(e)
    return out, f"compared {', '.join(relative(p, ctx.cwd) for p in paths)}"


def build(gr, ctx: Context) -> dict:
    """The Runs page inside the current Blocks/Tab; returns the components other pages address ({"select",
    "chat", "export", "timer", "load_outputs", "load"})."""
    w = ctx.words
    table_c = gr.Dataframe(headers=HEADERS, value=[], interactive=False, label=w["runs"], elem_id="runs-table",
                           wrap=True)
    select = gr.Dropdown(choices=[], value=None, label=w["run"], elem_id="run-select", allow_custom_value=True)
    progress_c = gr.Markdown(elem_id="run-progress")
    message = gr.Markdown(elem_id="run-message")
    with gr.Row():
        stop_btn = gr.Button(w["stop"], variant="stop", elem_id="stop")
        resume_btn = gr.Button(w["resume"], elem_id="resume")
        chat_btn = gr.Button(w["chat_with"], elem_id="chat-with")
        export_btn = gr.Button(w["export_this"], elem_id="export-this")
    action = gr.Markdown(elem_id="run-action")
    plots = []
    for row in range(0, SLOTS, 2):  # two charts a row
        with gr.Row(equal_height=True):
            plots += [gr.LinePlot(x="step", y="value", color="metric", y_title="", visible=False, label="curve",
                                  show_label=True, elem_id=f"curve-{i}") for i in range(row, min(row + 2, SLOTS))]
    ckpts = gr.Markdown(label=w["checkpoints"], elem_id="run-checkpoints")
    log = gr.Textbox(label=w["log"], lines=12, max_lines=12, interactive=False, elem_id="run-log", autoscroll=True)
    with gr.Accordion(w["compare"], open=False):
        to_compare = gr.Dropdown(choices=[], multiselect=True, label=w["compare_runs"], elem_id="compare-select")
        compare_btn = gr.Button(w["compare"], elem_id="compare")
        report = gr.File(label="report.html", interactive=False, elem_id="compare-report")
        compare_msg = gr.Markdown(elem_id="compare-message")
    sig = gr.State("")
    timer = gr.Timer(REFRESH_S)
    outputs = [table_c, select, to_compare, progress_c, message, ckpts, log, *plots, sig]

    def do_refresh(selected, last):
        return refresh(gr, ctx, selected, last)

    timer.tick(do_refresh, [select, sig], outputs, show_progress="hidden", queue=False)
    select.change(lambda s: do_refresh(s, None), [select], outputs, show_progress="hidden")
    select.change(lambda: "", None, action)
    stop_btn.click(lambda s: stop_run(ctx, s), select, action)
    resume_btn.click(lambda s: resume_run(ctx, s), select, action)
    compare_btn.click(lambda ps: compare_runs(ctx, ps), to_compare, [report, compare_msg])
    return {"select": select, "chat": chat_btn, "export": export_btn, "timer": timer, "refresh": do_refresh,
            "outputs": outputs, "sig": sig}
