"""Curves for the Runs page: LTTB keeps a 10,000-step run to a few hundred points per curve without losing its
first and last points or its spikes, and the charts are the run report's (GRPO's reward per function included)."""
import math
import random

from tunesmith.webui.curves import POINTS, charts, lttb, series


def test_lttb_keeps_ends_spikes_and_order():
    pts = [(i, math.sin(i / 300) + (5.0 if i == 4321 else 0.0) - (4.0 if i == 7777 else 0.0)) for i in range(10_000)]
    kept = lttb(pts, 300)
    assert len(kept) == 300
    assert kept[0] == pts[0] and kept[-1] == pts[-1]
    assert (4321, pts[4321][1]) in kept and (7777, pts[7777][1]) in kept  # the spike and the dip survive
    assert [x for x, _ in kept] == sorted({x for x, _ in kept})  # increasing steps, no point twice
    assert set(kept) <= set(pts)  # points of the curve, not averages


def test_lttb_leaves_short_curves_alone():
    pts = [(i, float(i)) for i in range(50)]
    assert lttb(pts, 300) == pts and lttb(pts, 2) == pts
    assert lttb([], 10) == []


def _records(steps, grpo=False):
    rng = random.Random(0)
    out = []
    for s in range(1, steps + 1):
        rec = {"loss": 2.0 / s + rng.random() * 0.01, "learning_rate": 1e-4, "grad_norm": 1.0, "global_step": s,
               "global_step/max_steps": f"{s}/{steps}"}
        if grpo:
            rec.update({"reward": rng.random(), "rewards/accuracy/mean": rng.random(), "rewards/format/mean": 0.5,
                        "kl": 0.01, "completions/mean_length": 8.0})
        out.append(rec)
        if s % 1000 == 0:
            out.append({"eval_loss": 1.0 / s, "global_step": s})
    return out + [{"global_step": steps, "train_runtime": 10.0}]


def test_a_10000_step_run_is_drawn_from_a_few_hundred_points():
    recs = _records(10_000)
    cs = {c.title: c for c in charts(recs)}
    loss = cs["loss"]
    per_metric = {m: sum(1 for r in loss.rows if r[2] == m) for m in ("loss", "eval_loss")}
    assert per_metric == {"loss": POINTS, "eval_loss": 10}
    assert "loss: 10000 points (300 drawn), last" in loss.caption
    assert set(cs) == {"loss", "learning rate", "grad norm"}


def test_grpo_charts_include_the_reward_per_function():
    titles = [c.title for c in charts(_records(20, grpo=True))]
    i = titles.index("reward (GRPO)")
    assert titles[i + 1] == "reward per function (GRPO)"
    per_fn = next(c for c in charts(_records(20, grpo=True)) if c.title == "reward per function (GRPO)")
    assert {r[2] for r in per_fn.rows} == {"rewards/accuracy/mean", "rewards/format/mean"}
    assert "KL estimate" in titles and "completion length (GRPO, PPO, GKD)" in titles


def test_series_skips_the_summary_and_text():
    s = series([{"loss": 1.0, "global_step": 1, "global_step/max_steps": "1/2", "flag": True},
                {"global_step": 2, "train_runtime": 3.0, "memory(GiB)": 1.0}])
    assert s == {"loss": [(1, 1.0)]}
