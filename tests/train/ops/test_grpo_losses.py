"""The GRPO-family losses and advantage estimators (tunesmith.train.ops.losses, "GRPO family") equal ms-swift 4.6's
formulas, recomputed here independently with plain float64 Python loops on hand-picked inputs."""
import math
import statistics

import pytest
import torch

from tunesmith.train.ops import losses as L

EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04
# four completions (two groups of two), up to four tokens each; row 2 has two padding positions, row 3 one.
# The log-ratios logp − old are chosen so that some ratios fall below 1 − ε_low (e^−0.5 = 0.61), some above
# 1 + ε_high (e^0.5 = 1.65) and some inside, under both a positive and a negative advantage.
LOGP = [[-1.0, -0.5, -2.0, -0.1],
        [-0.3, -1.2, -0.7, -2.5],
        [-0.9, -0.2, 3.0, -4.0],
        [-1.5, -0.6, -0.4, 9.0]]
LOG_RATIO = [[0.5, -0.5, 0.1, 0.0],
             [0.5, -0.5, -0.1, 0.3],
             [0.6, -0.4, 0.0, 0.0],
             [-0.3, 0.2, 0.7, 0.0]]
REF = [[-1.2, -0.4, -1.5, -0.3],
       [-0.1, -1.0, -0.9, -2.0],
       [-1.4, -0.2, 0.0, 0.0],
       [-1.0, -0.9, -0.5, 0.0]]
MASK = [[1, 1, 1, 1],
        [1, 1, 1, 1],
        [1, 1, 0, 0],
        [1, 1, 1, 0]]
ADV = [1.5, -0.8, 0.6, -1.2]
MAX_LEN = 6


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def old_logps():
    return [[lp - lr for lp, lr in zip(row_lp, row_lr)] for row_lp, row_lr in zip(LOGP, LOG_RATIO)]


def k3(logp, ref):
    d = min(max(ref - logp, -20.0), 20.0)
    return min(max(math.exp(d) - d - 1, -10.0), 10.0)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def token_ratios(i, level):
    """The ratio of each token of row i: per token, or one per sequence (masked mean of the log-ratios)."""
    n = sum(MASK[i])
    if level == "token":
        return [math.exp(x) for x in LOG_RATIO[i]]
    s = sum(x * m for x, m in zip(LOG_RATIO[i], MASK[i])) / max(n, 1)
    return [math.exp(s)] * len(LOG_RATIO[i])


def token_loss(loss_type, r, a, logp, ref, beta, delta, tau_pos=1.0, tau_neg=1.05):
    if loss_type == "cispo":
        out = -min(r, EPS_HIGH) * a * logp
    elif loss_type == "sapo":
        tau = tau_pos if a > 0 else tau_neg
        out = -sigmoid(tau * (r - 1)) * 4 / tau * a
    else:
        r1 = min(r, delta) if delta is not None else r
        r2 = min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)
        out = -min(r1 * a, r2 * a)
    if beta:
        out += beta * k3(logp, ref)
    return out


def expected_loss(loss_type, level="token", beta=BETA, delta=None, num_items=None, num_processes=1):
    per_row, total, tokens = [], 0.0, 0
    for i in range(len(LOGP)):
        ratios = token_ratios(i, level)
        row = [token_loss(loss_type, ratios[j], ADV[i], LOGP[i][j], REF[i][j], beta, delta)
               for j in range(len(LOGP[i])) if MASK[i][j]]
        per_row.append(sum(row) / max(len(row), 1))
        total += sum(row)
        tokens += len(row)
    if loss_type in ("grpo", "sapo"):
        return sum(per_row) / len(per_row)
    if loss_type == "luspo":  # each completion's summed loss, averaged over completions (TRL 1.16)
        return sum(r * sum(m) for r, m in zip(per_row, MASK)) / len(per_row)
    if loss_type == "bnpo":
        return total / tokens
    if loss_type == "dr_grpo":
        return total / (len(LOGP) * MAX_LEN)
    return total / ((num_items if num_items is not None else tokens) / num_processes)


def run(loss_type, level="token", beta=BETA, delta=None, **kw):
    return L.grpo_loss(loss_type, logps=t(LOGP), old_logps=t(old_logps()), ref_logps=t(REF), advantages=t(ADV),
                       mask=t(MASK), beta=beta, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, delta=delta,
                       importance_sampling_level=level, max_completion_length=MAX_LEN, **kw)


# ------------------------------------------------------------------ loss values

@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("loss_type", [x for x in L.GRPO_LOSS_TYPES if x not in ("real", "fipo")])  # their own file
def test_loss_matches_hand_computation(loss_type, level):
    loss, _ = run(loss_type, level)
    ref_level = "token" if level == "token" else "sequence"  # sequence_token has the sequence ratio's value
    assert loss.item() == pytest.approx(expected_loss(loss_type, ref_level), rel=1e-12, abs=1e-12)


def test_clipping_exercised_on_both_sides():
    ratios = [math.exp(x) for row in LOG_RATIO for x in row]
    assert any(r < 1 - EPS_LOW for r in ratios) and any(r > 1 + EPS_HIGH for r in ratios)
    # clipping active means the clipped surrogate differs from the plain ratio·A on some tokens
    unclipped = sum(-math.exp(LOG_RATIO[i][j]) * ADV[i] for i in range(4) for j in range(4) if MASK[i][j])
    clipped = sum(token_loss("grpo", math.exp(LOG_RATIO[i][j]), ADV[i], 0, 0, 0, None)
                  for i in range(4) for j in range(4) if MASK[i][j])
    assert clipped != pytest.approx(unclipped)
    loss, _ = run("bnpo", beta=0.0)
    assert loss.item() == pytest.approx(clipped / sum(map(sum, MASK)), rel=1e-12)


def test_clip_metrics():
    _, m = run("grpo")
    low = high = 0
    for i in range(4):
        for j in range(4):
            if MASK[i][j]:
                r = math.exp(LOG_RATIO[i][j])
                low += r < 1 - EPS_LOW and ADV[i] < 0
                high += r > 1 + EPS_HIGH and ADV[i] > 0
    n = sum(map(sum, MASK))
    assert (low, high) == (2, 2)  # both kinds of clipping occur in the fixture
    assert m["clip_ratio/low_mean"].item() == pytest.approx(low / n)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(high / n)
    assert m["clip_ratio/region_mean"].item() == pytest.approx((low + high) / n)
    kl = sum(k3(LOGP[i][j], REF[i][j]) for i in range(4) for j in range(4) if MASK[i][j]) / n
    assert m["kl"].item() == pytest.approx(kl, rel=1e-12)


def test_cispo_and_sapo_metrics():
    _, m = run("cispo", beta=0.0)
    n = sum(map(sum, MASK))
    clipped = sum(math.exp(LOG_RATIO[i][j]) > EPS_HIGH and ADV[i] > 0 for i in range(4) for j in range(4) if MASK[i][j])
    assert set(m) == {"cispo_clip_ratio"} and m["cispo_clip_ratio"].item() == pytest.approx(clipped / n)
    _, m = run("sapo", beta=0.0)
    assert m == {}


def test_delta_bounds_the_ratio_for_negative_advantages():
    delta = 1.4  # row 1 (A < 0) has a token with r = e^0.5 = 1.65 > delta
    with_delta, m = run("grpo", delta=delta, beta=0.0)
    without, _ = run("grpo", beta=0.0)
    assert with_delta.item() == pytest.approx(expected_loss("grpo", beta=0.0, delta=delta), rel=1e-12)
    assert with_delta.item() < without.item()
    # the metrics read the ratio after the delta bound, as ms-swift (a ratio bounded to 1.4 is still > 1.28)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(2 / sum(map(sum, MASK)))


def test_k3_kl_estimator():
    logp, ref = t([[-1.0, -2.0, 0.0, -30.0]]), t([[-1.5, -1.0, 0.0, -3.0]])
    got = L.grpo_k3_kl(logp, ref)[0].tolist()
    want = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0, 10.0]  # last: e^20 − 21 clamped to 10
    assert got == pytest.approx(want, rel=1e-12)
    assert all(x >= 0 for x in got)


def test_no_kl_when_beta_zero_or_no_reference():
    a, m = run("grpo", beta=0.0)
    b, m2 = L.grpo_loss("grpo", logps=t(LOGP), old_logps=t(old_logps()), ref_logps=None, advantages=t(ADV),
                        mask=t(MASK), beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    assert a.item() == pytest.approx(expected_loss("grpo", beta=0.0)) == b.item()
    assert "kl" not in m and "kl" not in m2


def test_dapo_normalises_by_global_token_count():
    loss, _ = run("dapo", num_items_in_batch=40.0, num_processes=2)
    assert loss.item() == pytest.approx(expected_loss("dapo", num_items=40.0, num_processes=2), rel=1e-12)
    # without a global count, this batch's completion tokens: the same as bnpo
    assert run("dapo")[0].item() == pytest.approx(run("bnpo")[0].item(), rel=1e-12)


def test_entropy_mask_drops_policy_term_but_keeps_kl():
    ent = t([[1, 0, 1, 1]] * 4)
    loss, _ = run("bnpo", entropy_mask=ent)
    total = 0.0
    for i in range(4):
        for j in range(4):
            if MASK[i][j]:
                pg = token_loss("bnpo", math.exp(LOG_RATIO[i][j]), ADV[i], 0, 0, 0, None) * ent[i][j].item()
                total += pg + BETA * k3(LOGP[i][j], REF[i][j])
    assert loss.item() == pytest.approx(total / sum(map(sum, MASK)), rel=1e-12)


def test_high_entropy_mask_keeps_tokens_at_or_above_the_quantile():
    """TRL's get_high_entropy_mask: threshold = torch.quantile(entropies of the completion tokens, 1 − q) (linear
    interpolation), keep = entropy ≥ threshold on completion tokens; padding never, whatever its value."""
    ent = t([[0.5, 2.0, 1.0, 7.0],
             [3.0, 0.1, 1.0, 5.0],
             [0.0, 4.0, 9.0, 9.0],
             [2.0, 0.3, 6.0, 8.0]])
    values = sorted(e for row_e, row_m in zip(ent.tolist(), MASK) for e, m in zip(row_e, row_m) if m)  # 13
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        keep, threshold = L.high_entropy_mask(ent, t(MASK), q)
        pos = (1 - q) * (len(values) - 1)
        lo = int(pos)
        want = values[lo] + (values[min(lo + 1, len(values) - 1)] - values[lo]) * (pos - lo)
        assert threshold.item() == pytest.approx(want, rel=1e-6), q  # in float32, as TRL
        assert keep.tolist() == [[bool(m) and e >= want for e, m in zip(row_e, row_m)]
                                 for row_e, row_m in zip(ent.tolist(), MASK)], q
    assert L.high_entropy_mask(ent, t(MASK), 1.0)[0].tolist() == [[bool(m) for m in row] for row in MASK]
    only_max, _ = L.high_entropy_mask(ent, t(MASK), 0.0)
    assert only_max.sum().item() == 1 and only_max[0, 3]  # 7.0: the 9.0s and the 8.0 are padding
    assert L.high_entropy_mask(ent, t(MASK), 0.5)[0][3].tolist() == [True, False, True, False]  # median 2.0 kept
    # the threshold over given values (the caller gathers every process's tokens)
    keep, threshold = L.high_entropy_mask(ent, t(MASK), 0.5, values=t([100.0, 200.0]))
    assert threshold.item() == 150.0 and not keep.any()
    none, threshold = L.high_entropy_mask(ent, torch.zeros(4, 4), 0.5)
    assert threshold is None and not none.any()  # no completion token: nothing to train


# ------------------------------------------------------------------ masking

@pytest.mark.parametrize("loss_type", L.GRPO_LOSS_TYPES)
def test_padding_values_do_not_change_the_loss(loss_type):
    base, _ = run(loss_type)
    lp, old, ref = t(LOGP), t(old_logps()), t(REF)
    pad = t(MASK) == 0
    lp[pad], old[pad], ref[pad] = 5.0, -7.0, 2.0
    # and one more all-padding column (T grows): only real tokens count
    grow = lambda x: torch.cat([x, torch.full((4, 1), 3.0, dtype=torch.float64)], dim=1)  # noqa: E731
    loss, _ = L.grpo_loss(loss_type, logps=grow(lp), old_logps=grow(old), ref_logps=grow(ref), advantages=t(ADV),
                          mask=grow(t(MASK)) * torch.tensor([1, 1, 1, 1, 0.0], dtype=torch.float64), beta=BETA,
                          epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, max_completion_length=MAX_LEN)
    assert loss.item() == pytest.approx(base.item(), rel=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_masked_row_contributes_nothing(loss_type):
    """A fifth completion masked out entirely (e.g. truncated with overlong_filter) adds nothing to the numerator;
    it still counts as a completion in grpo's and dr_grpo's N, as in ms-swift."""
    extra = lambda x, v: torch.cat([x, torch.full((1, 4), v, dtype=torch.float64)])  # noqa: E731
    loss, m = L.grpo_loss(loss_type, logps=extra(t(LOGP), -0.2), old_logps=extra(t(old_logps()), -3.0),
                          ref_logps=extra(t(REF), -9.0), advantages=torch.cat([t(ADV), t([5.0])]),
                          mask=extra(t(MASK), 0.0), beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                          max_completion_length=MAX_LEN)
    want = expected_loss(loss_type)
    if loss_type in ("grpo", "dr_grpo"):
        want *= 4 / 5
    assert loss.item() == pytest.approx(want, rel=1e-12)
    base_metrics = run(loss_type)[1]
    assert {k: v.item() for k, v in m.items()} == pytest.approx({k: v.item() for k, v in base_metrics.items()})


# ------------------------------------------------------------------ gradient

@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_policy_gradient_form_at_ratio_one(level):
    """At r = 1 with β = 0, ∂loss/∂logp_{i,t} = −A_i / |y_i| / N on each completion token (0 on padding)."""
    logp = t(LOGP).requires_grad_(True)
    loss, _ = L.grpo_loss("grpo", logps=logp, old_logps=t(LOGP), ref_logps=t(REF), advantages=t(ADV),
                          mask=t(MASK), beta=0.0, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                          importance_sampling_level=level)
    loss.backward()
    for i in range(4):
        n = sum(MASK[i])
        for j in range(4):
            want = -ADV[i] / n / 4 if MASK[i][j] else 0.0
            assert logp.grad[i, j].item() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown GRPO loss type"):
        run("ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        run("grpo", level="tokens")
    with pytest.raises(ValueError, match="max_completion_length"):
        L.grpo_loss("dr_grpo", logps=t(LOGP), old_logps=t(LOGP), ref_logps=None, advantages=t(ADV), mask=t(MASK),
                    beta=0.0, epsilon_low=0.2, epsilon_high=0.2)


# ------------------------------------------------------------------ rewards → advantages

REWARDS = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0]  # three groups of G = 2 ... or two of G = 3


def groups(xs, g):
    return [xs[i:i + g] for i in range(0, len(xs), g)]


def hand_advantages(rewards, g, estimator, scale):
    adv = []
    for grp in groups(rewards, g):
        mean = sum(grp) / g
        for i, r in enumerate(grp):
            if estimator == "rloo":
                others = grp[:i] + grp[i + 1:]
                adv.append(r - sum(others) / len(others))
            else:
                adv.append(r - mean)
    if scale == "none":
        return adv
    src = adv if estimator == "reinforce_plus_plus" else rewards
    if scale == "batch":
        stds = [statistics.stdev(src)] * len(src)  # unbiased (n − 1), torch's default
    else:
        stds = [statistics.stdev(grp) for grp in groups(src, g) for _ in grp]
    return [a / (s + 1e-4) for a, s in zip(adv, stds)]


@pytest.mark.parametrize("g", [2, 3])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator", L.ADVANTAGE_ESTIMATORS)
def test_advantages(estimator, scale, g):
    got = L.group_advantages(t(REWARDS), g, estimator, scale).tolist()
    assert got == pytest.approx(hand_advantages(REWARDS, g, estimator, scale), rel=1e-12, abs=1e-12)


def test_grpo_group_of_equal_rewards_gives_zero_and_known_value():
    # group (3, 3): zero advantage (std 0, divided by 1e-4, not NaN); group (1, 0): ±0.5 / (0.7071 + 1e-4)
    got = L.group_advantages(t([1.0, 0.0, 3.0, 3.0]), 2).tolist()
    s = math.sqrt(0.5)
    assert got == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0], rel=1e-12)


def test_single_generation_has_zero_std():
    assert L.group_advantages(t([1.0, 2.0]), 1).tolist() == [0.0, 0.0]


def test_advantage_errors():
    with pytest.raises(ValueError, match="groups of num_generations=4"):
        L.group_advantages(t(REWARDS), 4)
    with pytest.raises(ValueError, match="advantage estimator"):
        L.group_advantages(t(REWARDS), 2, "ppo")
    with pytest.raises(ValueError, match="scale_rewards"):
        L.group_advantages(t(REWARDS), 2, "grpo", "gdpo")


def test_combine_rewards_skips_none():
    nan = float("nan")
    per_func = t([[1.0, 0.5], [nan, 2.0], [nan, nan], [0.25, nan]])
    w = [2.0, -1.0]
    want = []
    for row in per_func.tolist():
        want.append(sum(wi * r for wi, r in zip(w, row) if not math.isnan(r)))
    got = L.combine_rewards(per_func, w).tolist()
    assert got == pytest.approx(want) and got == pytest.approx([1.5, -2.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="3 reward weights"):
        L.combine_rewards(per_func, [1.0, 1.0, 1.0])


def test_nan_rewards_flow_into_advantages():
    nan = float("nan")
    per_func = t([[1.0, nan], [nan, nan], [0.0, 1.0], [1.0, 1.0]])
    adv = L.group_advantages(L.combine_rewards(per_func, [1.0, 1.0]), 2).tolist()
    s1, s2 = statistics.stdev([1.0, 0.0]), statistics.stdev([1.0, 2.0])
    assert adv == pytest.approx([0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s2 + 1e-4), 0.5 / (s2 + 1e-4)])


def test_gdpo_advantages():
    nan = float("nan")
    per_func = [[1.0, 10.0], [0.0, 20.0], [1.0, nan], [1.0, 5.0], [0.0, 7.0], [1.0, 9.0]]
    w, g = [1.0, 0.5], 3
    total = [0.0] * 6
    for f in range(2):
        for start in (0, 3):
            vals = [per_func[start + k][f] for k in range(g)]
            ok = [v for v in vals if not math.isnan(v)]
            mean = sum(ok) / len(ok)
            std = statistics.stdev(ok) if len(ok) > 1 else nan
            for k, v in enumerate(vals):
                z = (v - mean) / (std + 1e-8)
                total[start + k] += w[f] * (0.0 if math.isnan(z) else z)
    m, s = sum(total) / 6, statistics.stdev(total)
    got = L.gdpo_advantages(t(per_func), w, g).tolist()
    assert got == pytest.approx([(x - m) / (s + 1e-8) for x in total], rel=1e-10)
