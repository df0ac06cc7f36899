"""Plots and a self-contained HTML report of one run, or a comparison of several: `tunesmith report RUN [RUN ...]`.

Everything comes from what a run already wrote: `logging.jsonl` (every logged step, eval lines, the final summary)
and `args.json` (the arguments, secrets already redacted, and the data statistics). PNG charts go to the run's
`images/` (as ms-swift does); `report.html` embeds them, so it opens anywhere without a network. Training calls
`write_run_report` when it finishes; the command rebuilds a report or compares runs side by side.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from tunesmith.errors import ConfigError

# (chart title, metrics drawn on it); a chart appears when any of its metrics was logged.
CHARTS = [
    ("loss", ("loss", "eval_loss")),
    ("learning rate", ("learning_rate",)),
    ("grad norm", ("grad_norm",)),
    ("token accuracy", ("token_acc", "eval_token_acc")),
    ("rewards", ("rewards/chosen", "rewards/rejected", "eval_rewards/chosen", "eval_rewards/rejected")),
    ("reward margin", ("rewards/margins", "eval_rewards/margins")),
    ("reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("log-probs", ("logps/chosen", "logps/rejected")),
    ("nll / preference loss", ("nll_loss", "pref_loss")),
    ("KL estimate", ("kl",)),
    ("reward (GRPO)", ("reward", "reward_std", "eval_reward")),
    ("divergence to the teacher (GKD)", ("jsd", "eval_jsd", "sft_loss")),
    ("score and reward (PPO)", ("objective/scores", "objective/rlhf_reward", "eval_objective/scores")),
    ("policy and value loss (PPO)", ("loss/policy_avg", "loss/value_avg")),
    ("KL and entropy (PPO)", ("objective/kl", "objective/entropy")),
    ("clipping (PPO)", ("policy/clipfrac_avg", "val/clipfrac_avg", "policy/approxkl_avg")),
    ("completion length (GRPO, PPO, GKD)", ("completions/mean_length", "eval_completions/mean_length")),
    ("entropy (GRPO)", ("entropy/mean", "entropy/threshold")),
    ("clip ratio (GRPO)", ("clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean")),
    ("tokens per second", ("tokens_per_second",)),
    ("memory (GiB)", ("memory(GiB)",)),
]
SUMMARY_KEYS = ("global_step", "train_runtime", "train_tokens_per_second", "memory(GiB)", "best_metric",
                "last_model_checkpoint", "best_model_checkpoint")
# arguments that differ between any two runs and say nothing about the experiment
_NOISE_ARGS = {"output_run_dir", "output_dir", "logging_dir", "library_versions", "tunesmith_version", "working_dir"}


@dataclass
class Run:
    path: str
    name: str
    args: dict
    series: dict = field(default_factory=dict)   # metric -> [(step, value)]
    summary: dict = field(default_factory=dict)
    last: dict = field(default_factory=dict)     # the last value of each metric


def load_run(path: str, name: Optional[str] = None) -> Run:
    log = os.path.join(path, "logging.jsonl")
    if not os.path.isfile(log):
        raise ConfigError(f"{path}: not a run directory (no logging.jsonl); pass output/<model>/vN-… directories")
    args = {}
    if os.path.isfile(os.path.join(path, "args.json")):
        with open(os.path.join(path, "args.json"), encoding="utf-8") as fh:
            args = json.load(fh)
    run = Run(path=os.path.abspath(path), name=name or _run_name(path), args=args)
    with open(log, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            if "train_runtime" in rec:
                run.summary = rec
                continue
            step = rec.get("global_step")
            if step is None:
                continue
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "global_step":
                    run.series.setdefault(k, []).append((step, float(v)))
                    run.last[k] = float(v)
    return run


def _run_name(path: str) -> str:
    path = os.path.abspath(path).rstrip(os.sep)
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def chart_lines(runs: list[Run], metrics: tuple) -> list[tuple[Run, str]]:
    """The curves of one chart: every (run, metric) that was logged; several runs share the chart."""
    return [(r, m) for r in runs for m in metrics if r.series.get(m)]


def _figure(title: str, runs: list[Run], metrics: tuple) -> Optional[bytes]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = chart_lines(runs, metrics)
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for r, m in lines:
        steps, values = zip(*r.series[m])
        label = m if len(runs) == 1 else (f"{r.name}" if len(metrics) == 1 else f"{r.name}: {m}")
        style = "o--" if m.startswith("eval_") else "-"
        ax.plot(steps, values, style, label=label, markersize=3, linewidth=1.5)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def charts(runs: list[Run]) -> list[tuple[str, bytes]]:
    """The CHARTS that have data, then one chart of GRPO's per-function rewards (rewards/<name>/mean)."""
    out = []
    per_function = tuple(sorted({m for r in runs for m in r.series
                                 if m.startswith("rewards/") and m.endswith("/mean")}))
    for title, metrics in CHARTS + [("reward per function (GRPO)", per_function)]:
        png = _figure(title, runs, metrics)
        if png:
            out.append((title, png))
    return out


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in title).strip("_")


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return "" if v is None else str(v)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1320px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top;max-width:520px;overflow-wrap:anywhere}th{background:#f4f4f4}
.charts{display:flex;flex-wrap:wrap;gap:12px}.charts figure{margin:0}.charts img{width:600px;border:1px solid #eee}
details{margin:8px 0}code{background:#f4f4f4;padding:1px 4px}"""


def render_html(runs: list[Run], figures: list[tuple[str, bytes]]) -> str:
    one = len(runs) == 1
    title = f"tunesmith run {runs[0].name}" if one else f"tunesmith: {len(runs)} runs compared"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append(_table([[r.name, r.path, r.args.get("model", ""), r.args.get("rlhf_type") or
                          ("sft" if r.args else ""), r.args.get("train_type", "")] for r in runs],
                        ["run", "directory", "model", "method", "train_type"]))
    parts.append("<h2>Final metrics</h2>")
    keys = [k for k in ("loss", "eval_loss", "token_acc", "eval_token_acc", "rewards/accuracies", "rewards/margins",
                        "eval_rewards/accuracies", "nll_loss", "reward", "eval_reward") if any(k in r.last for r in runs)]
    rows = [[k] + [r.last.get(k) for r in runs] for k in keys]
    rows += [[k] + [r.summary.get(k) for r in runs] for k in SUMMARY_KEYS if any(k in r.summary for r in runs)]
    parts.append(_table(rows, ["metric"] + [r.name for r in runs]))
    if not one:
        parts.append("<h2>Arguments that differ</h2>")
        keys = sorted({k for r in runs for k in r.args} - _NOISE_ARGS)
        diff = [[k] + [r.args.get(k) for r in runs] for k in keys
                if len({json.dumps(r.args.get(k), sort_keys=True, default=str) for r in runs}) > 1]
        parts.append(_table(diff, ["argument"] + [r.name for r in runs]) if diff else "<p>none</p>")
    parts.append("<h2>Charts</h2><div class='charts'>")
    for name, png in figures:
        data = base64.b64encode(png).decode()
        parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'></figure>")
    parts.append("</div>")
    for r in runs:
        stats = r.args.get("data_stats")
        if stats:
            parts.append(f"<h2>Data ({html.escape(r.name)})</h2>" + _table(sorted(stats.items()), ["", "value"]))
        ckpts = sorted((d for d in os.listdir(r.path) if d.startswith("checkpoint-")),
                       key=lambda d: int(d.split("-")[1]) if d.split("-")[1].isdigit() else -1)
        parts.append(f"<h2>Checkpoints ({html.escape(r.name)})</h2>"
                     + (_table([[os.path.join(r.path, c), "best" if os.path.join(r.path, c) ==
                                 r.summary.get("best_model_checkpoint") else ""] for c in ckpts],
                               ["checkpoint", ""]) if ckpts else "<p>none saved</p>"))
        parts.append(_completions_table(r))
        parts.append(f"<details><summary>All arguments ({html.escape(r.name)}; secrets redacted)</summary>"
                     + _table(sorted(r.args.items()), ["argument", "value"]) + "</details>")
    parts.append("</body></html>")
    return "".join(parts)


COMPLETIONS_SHOWN = 24


def _completions_table(r: Run) -> str:
    """--log_completions: the last COMPLETIONS_SHOWN rollouts of completions.jsonl — GRPO's (prompt, completion,
    each reward, advantage) or GKD's on-policy samples (step, the end of the rendered prompt, completion); "" when
    the run logged none."""
    path = os.path.join(r.path, "completions.jsonl")
    if not os.path.isfile(path):
        return ""
    from collections import deque

    with open(path, encoding="utf-8") as fh:
        last = [json.loads(line) for line in deque(fh, maxlen=COMPLETIONS_SHOWN) if line.strip()]
    title = f"<h2>Last {len(last)} rollouts ({html.escape(r.name)}; all in {html.escape(path)})</h2>"
    if last and isinstance(last[0].get("prompt"), str):  # GKD: the prompt as rendered, its end shown
        rows = [[c.get("step"), c["prompt"][-200:], c.get("completion", "")] for c in last]
        return title + _table(rows, ["step", "prompt (its end)", "completion"])
    rows = [[c.get("round"), (c.get("prompt") or [{}])[-1].get("content", ""), c.get("completion", ""),
             json.dumps(c.get("rewards", {}), ensure_ascii=False), c.get("reward"), c.get("advantage")] for c in last]
    return title + _table(rows, ["round", "prompt (last message)", "completion", "rewards", "reward", "advantage"])


def write_run_report(run_dir: str) -> str:
    """images/*.png and report.html for one run; returns the report's path."""
    from tunesmith.files import write_text_atomic

    run = load_run(run_dir)
    figures = charts([run])
    images = os.path.join(run_dir, "images")
    os.makedirs(images, exist_ok=True)
    for name, png in figures:
        with open(os.path.join(images, f"{_slug(name)}.png"), "wb") as fh:
            fh.write(png)
    path = os.path.join(run_dir, "report.html")
    write_text_atomic(path, render_html([run], figures))
    return path


def compare(run_dirs: list[str], output: str) -> str:
    from tunesmith.files import write_text_atomic

    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same vN-date under different parents: fall back to full paths
        for r in runs:
            r.name = r.path
    write_text_atomic(output, render_html(runs, charts(runs)))
    return output


