"""A run's curves for the Runs page: the charts of the run's HTML report (tunesmith.runs.report.CHARTS: loss, learning
rate, grad norm, tokens/s, eval loss; DPO rewards, margins and accuracies; GRPO reward per function, KL, completion
length; ...), each metric downsampled so that a 10,000-step run is drawn from a few hundred points per curve.

Downsampling is Largest-Triangle-Three-Buckets (S. Steinarsson, "Downsampling Time Series for Visual
Representation", MSc thesis, University of Iceland, 2013, ch. 4.2): the first and last points are kept; the points
between are cut into equal buckets and from each the point is kept that makes the largest triangle with the point
kept before it and the mean of the next bucket — peaks and dips survive, unlike every-k-th sampling or averaging.
"""
from __future__ import annotations

from dataclasses import dataclass

from tunesmith.runs.report import CHARTS

POINTS = 300  # per curve


def lttb(points: list, threshold: int = POINTS) -> list:
    """Downsample [(x, y), ...] (x increasing) to at most `threshold` points by LTTB (module docstring); fewer
    points than that, or a threshold under 3, come back unchanged. O(n) time, pure Python."""
    n = len(points)
    if threshold >= n or threshold < 3:
        return list(points)
    out = [points[0]]
    every = (n - 2) / (threshold - 2)
    a = 0
    for i in range(threshold - 2):
        lo, hi = int(i * every) + 1, int((i + 1) * every) + 1
        nxt_lo, nxt_hi = hi, min(int((i + 2) * every) + 1, n)
        nxt = points[nxt_lo:nxt_hi] or [points[-1]]
        avg_x = sum(p[0] for p in nxt) / len(nxt)
        avg_y = sum(p[1] for p in nxt) / len(nxt)
        ax, ay = points[a]
        best, best_area = lo, -1.0
        for j in range(lo, min(hi, n - 1)):
            x, y = points[j]
            area = abs((ax - avg_x) * (y - ay) - (ax - x) * (avg_y - ay))
            if area > best_area:
                best, best_area = j, area
        out.append(points[best])
        a = best
    out.append(points[-1])
    return out


def series(records: list[dict]) -> dict[str, list]:
    """{metric: [(step, value), ...]} of a run's logging.jsonl records (numeric values of the step records; the
    final summary line and text fields are left out)."""
    out: dict[str, list] = {}
    for rec in records:
        step = rec.get("global_step")
        if step is None or "train_runtime" in rec:
            continue
        for k, v in rec.items():
            if k != "global_step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((step, float(v)))
    return out


@dataclass(frozen=True)
class Chart:
    """One chart: its title, the downsampled rows (step, value, metric) and a caption saying how many points each
    metric has and its last value."""
    title: str
    rows: list
    caption: str


def charts(records: list[dict], points: int = POINTS) -> list[Chart]:
    """The charts of the report that have data, in its order, then GRPO's reward per function
    (rewards/<name>/mean) next to the reward; each metric downsampled to `points`."""
    data = series(records)
    per_function = tuple(sorted(m for m in data if m.startswith("rewards/") and m.endswith("/mean")))
    layout = []
    for title, metrics in CHARTS:
        layout.append((title, metrics))
        if title.startswith("reward (GRPO)") and per_function:
            layout.append(("reward per function (GRPO)", per_function))
    out = []
    for title, metrics in layout:
        present = [m for m in metrics if data.get(m)]
        if not present:
            continue
        rows, notes = [], []
        for m in present:
            kept = lttb(data[m], points)
            rows += [(s, v, m) for s, v in kept]
            step, value = data[m][-1]
            notes.append(f"{m}: {len(data[m])} points ({len(kept)} drawn), last {value:.4g} at step {step}")
        out.append(Chart(title, rows, "; ".join(notes)))
    return out
