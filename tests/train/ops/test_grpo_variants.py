"""GRPO's further variants (tunesmith.train.ops.grpo_variants and their place in losses.grpo_loss) equal ms-swift
4.6's formulas (rlhf_trainers/grpo_trainer.py, rl_core/advantage.py), recomputed here independently with plain
float64 Python loops on hand-picked inputs (the fixture of test_grpo_losses: two groups of two completions)."""
import math

import pytest
import torch

from test_grpo_losses import ADV, BETA, EPS_HIGH, EPS_LOW, LOG_RATIO, LOGP, MASK, REF, k3, old_logps, t
from tunesmith.train.ops import grpo_variants as V
from tunesmith.train.ops import losses as L

OLD = old_logps()
# the sampling engine's own log-probs: the old policy's, off by a per-token gap (some above log 2, one far below)
GAP = [[0.1, -0.9, 0.0, 0.3], [0.8, 0.2, -0.1, 0.0], [-0.2, 1.2, 0.0, 0.0], [0.05, -0.4, 0.9, 0.0]]
ROLLOUT = [[o - g for o, g in zip(ro, rg)] for ro, rg in zip(OLD, GAP)]  # so old − rollout = GAP


def rows():
    return range(len(LOGP))


def masked(i):
    return [j for j in range(len(LOGP[i])) if MASK[i][j]]


# ------------------------------------------------------------------ KL in the reward

def test_kl_in_reward_subtracts_beta_times_the_summed_k1_kl_before_the_advantages():
    kl = V.sequence_kl(t(OLD), t(REF), t(MASK))
    want = [sum(OLD[i][j] - REF[i][j] for j in masked(i)) for i in rows()]
    assert kl.tolist() == pytest.approx(want, rel=1e-12)
    rewards = t([1.0, 0.0, 0.5, 0.5])
    pen = V.kl_penalised_rewards(rewards, kl, 0.1)
    assert pen.tolist() == pytest.approx([r - 0.1 * k for r, k in zip([1.0, 0.0, 0.5, 0.5], want)], rel=1e-12)
    assert V.kl_penalised_rewards(rewards, kl, 0.0) is rewards
    # rloo on the penalised rewards: a group of equal rewards gets advantages from the KL alone
    adv = L.group_advantages(pen, 2, "rloo", "none")
    assert adv[2].item() == pytest.approx(2 * (pen[2].item() - (pen[2].item() + pen[3].item()) / 2), rel=1e-12)


# ------------------------------------------------------------------ REAL

def hand_real(log_ratio, advantages, g, tau):
    scores = [sum(log_ratio[i][j] for j in masked(i)) / max(len(masked(i)), 1) for i in rows()]
    total, groups = 0.0, len(scores) // g
    for k in range(groups):
        s, a = scores[k * g:(k + 1) * g], advantages[k * g:(k + 1) * g]
        pos = [x for x, y in zip(s, a) if y > 0]
        neg = [x for x, y in zip(s, a) if y <= 0]
        if pos and neg:
            total += math.log(1 + sum(math.exp(x / tau) for x in neg)) + math.log(1 + sum(math.exp(-x / tau)
                                                                                        for x in pos))
    return total / groups


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_real_equals_its_group_formula(tau):
    got = V.real_loss(t(LOG_RATIO), t(MASK), t(ADV), 2, tau)
    assert got.item() == pytest.approx(hand_real(LOG_RATIO, ADV, 2, tau), rel=1e-12)
    # through grpo_loss: REAL's loss plus β · the token mean of the k3 KL
    var = V.GRPOVariants(num_generations=2, real_tau=tau)
    loss, metrics = L.grpo_loss("real", logps=t(LOGP), old_logps=t(OLD), ref_logps=t(REF), advantages=t(ADV),
                                mask=t(MASK), beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, variants=var)
    toks = [(i, j) for i in rows() for j in masked(i)]
    kl = sum(k3(LOGP[i][j], REF[i][j]) for i, j in toks) / len(toks)
    assert loss.item() == pytest.approx(hand_real(LOG_RATIO, ADV, 2, tau) + BETA * kl, rel=1e-12)
    assert "clip_ratio/low_mean" not in metrics


def test_real_groups_without_both_signs_count_but_add_nothing():
    same_sign = [1.0, 0.5, 0.6, -1.2]  # group 0 has no negative: only group 1 contributes, divided by 2 groups
    got = V.real_loss(t(LOG_RATIO), t(MASK), t(same_sign), 2, 0.5)
    assert got.item() == pytest.approx(hand_real(LOG_RATIO, same_sign, 2, 0.5), rel=1e-12)
    logp = t(LOGP).requires_grad_(True)
    none = V.real_loss(logp - t(OLD), t(MASK), t([1.0, 1.0, 2.0, 2.0]), 2, 0.5)
    none.backward()  # zero, but on the graph
    assert none.item() == 0.0 and logp.grad is not None
    with pytest.raises(ValueError, match="whole groups"):
        V.real_loss(t(LOG_RATIO), t(MASK), t(ADV), 3, 0.5)


def test_real_gradient_weight_is_bounded_by_one_over_tau():
    logp = t(LOGP).requires_grad_(True)
    V.real_loss(logp - t(LOGP), t(MASK), t(ADV), 2, 0.5).backward()
    per_completion = [sum(logp.grad[i, j].item() for j in masked(i)) for i in rows()]
    assert all(abs(x) <= 1 / 0.5 / 2 + 1e-12 for x in per_completion)  # 1/τ, over the 2 groups


# ------------------------------------------------------------------ FIPO

def hand_future_kl(delta, mask, gamma):
    out = []
    for i in rows():
        row = [0.0] * len(delta[i])
        for t_ in range(len(delta[i])):
            if mask[i][t_]:
                row[t_] = sum(gamma ** (s - t_) * delta[i][s] * mask[i][s] for s in range(t_, len(delta[i])))
        out.append(row)
    return out


def test_future_kl_is_the_discounted_sum_of_the_log_ratios_ahead():
    gamma = V.fipo_gamma(32.0)
    assert gamma == pytest.approx(0.5 ** (1 / 32))
    got = V.future_kl(t(LOG_RATIO), t(MASK), gamma)
    want = [x for row in hand_future_kl(LOG_RATIO, MASK, gamma) for x in row]
    assert got.flatten().tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    long = torch.randn(3, 300, dtype=torch.float64)  # more than one 128-column block
    m = (torch.rand(3, 300) > 0.1).double()
    f = V.future_kl(long, m, 0.9)
    back = torch.zeros(3, dtype=torch.float64)
    want = torch.zeros_like(long)
    for s in range(299, -1, -1):  # F_t = m_t·δ_t + γ F_{t+1}
        back = long[:, s] * m[:, s] + 0.9 * back
        want[:, s] = back * m[:, s]
    assert torch.allclose(f, want, rtol=1e-10, atol=1e-12)


def hand_fipo_weight(gamma, clip, high_only, safety, delta):
    ratio = [[math.exp(x) for x in row] for row in LOG_RATIO]
    lr = [[0.0 if (delta is not None and ratio[i][j] > delta) else LOG_RATIO[i][j] for j in range(4)] for i in rows()]
    f = hand_future_kl(lr, MASK, gamma)
    w = []
    for i in rows():
        row = []
        for j in range(4):
            x = math.exp(f[i][j])
            if clip:
                x = min(max(x, 1.0 if high_only else 1 - clip), 1 + clip)
            if safety is not None and ADV[i] < 0 and ratio[i][j] > safety:
                x = min(max(x, 0.8), 1.0)
            row.append(x)
        w.append(row)
    return w


@pytest.mark.parametrize("clip,high_only,safety,delta", [(0.2, True, 4.0, None), (0.2, False, 1.5, None),
                                                          (None, True, None, 1.7), (0.5, False, 1.2, 1.7)])
def test_fipo_loss_is_the_clipped_surrogate_times_the_influence_weight(clip, high_only, safety, delta):
    gamma = V.fipo_gamma(2.0)
    var = V.GRPOVariants(fipo_gamma=gamma, fipo_clip_range=clip, fipo_clip_high_only=high_only,
                         fipo_safety_threshold=safety)
    loss, metrics = L.grpo_loss("fipo", logps=t(LOGP), old_logps=t(OLD), ref_logps=t(REF), advantages=t(ADV),
                                mask=t(MASK), beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, delta=delta,
                                variants=var)
    w = hand_fipo_weight(gamma, clip, high_only, safety, delta)
    total, toks = 0.0, 0
    for i in rows():
        for j in masked(i):
            r = math.exp(LOG_RATIO[i][j])
            r1 = min(r, delta) if delta is not None else r
            surrogate = -min(r1 * ADV[i], min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH) * ADV[i])
            total += surrogate * w[i][j] + BETA * k3(LOGP[i][j], REF[i][j])
            toks += 1
    assert loss.item() == pytest.approx(total / toks, rel=1e-12)  # dapo's normalisation: the batch's tokens
    mean_w = sum(w[i][j] for i in rows() for j in masked(i)) / toks
    assert metrics["fipo/influence_weight_mean"].item() == pytest.approx(mean_w, rel=1e-12)
    assert "clip_ratio/region_mean" in metrics


# ------------------------------------------------------------------ off-policy sequence masking

def test_off_policy_sequence_mask_drops_negative_completions_the_sampler_preferred():
    # mean(old − logp) per row = −mean(LOG_RATIO): rows 1 (A < 0, −0.05) and 3 (A < 0, −0.2) ...
    seq = [-sum(LOG_RATIO[i][j] for j in masked(i)) / len(masked(i)) for i in rows()]
    for delta in (-0.25, -0.1, 0.0):
        keep = V.off_policy_sequence_mask(t(LOGP), t(OLD), t(MASK), t(ADV), delta)
        assert keep.tolist() == [not (s > delta and a < 0) for s, a in zip(seq, ADV)]
    # in the loss: the dropped completion leaves the mask (grpo: it still counts in N, contributing 0)
    var = V.GRPOVariants(off_policy_sequence_mask_delta=-0.1)
    loss, _ = L.grpo_loss("grpo", logps=t(LOGP), old_logps=t(OLD), ref_logps=None, advantages=t(ADV), mask=t(MASK),
                          beta=0.0, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, variants=var)
    keep = V.off_policy_sequence_mask(t(LOGP), t(OLD), t(MASK), t(ADV), -0.1).tolist()
    assert keep == [True, False, True, True]
    want = 0.0
    for i in rows():
        if keep[i]:
            want += sum(-min(math.exp(LOG_RATIO[i][j]) * ADV[i], min(max(math.exp(LOG_RATIO[i][j]), 1 - EPS_LOW),
                                                                     1 + EPS_HIGH) * ADV[i])
                        for j in masked(i)) / len(masked(i))
    assert loss.item() == pytest.approx(want / 4, rel=1e-12)
    # the sampling engine's log-probs, when known, are the behaviour policy instead of the old policy's
    with_rollout, _ = L.grpo_loss("grpo", logps=t(LOGP), old_logps=t(OLD), ref_logps=None, advantages=t(ADV),
                                  mask=t(MASK), beta=0.0, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                                  variants=var, rollout_logps=t(LOGP) - 1.0)  # mean gap −1 < δ: none dropped
    plain, _ = L.grpo_loss("grpo", logps=t(LOGP), old_logps=t(OLD), ref_logps=None, advantages=t(ADV),
                           mask=t(MASK), beta=0.0, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    assert with_rollout.item() == pytest.approx(plain.item(), rel=1e-12)


# ------------------------------------------------------------------ rollout importance sampling

def hand_is_weights(mode, c):
    rho = [[math.exp(min(max(g, -20), 20)) for g in row] for row in GAP]
    seq = [math.exp(sum(math.log(max(rho[i][j], 1e-10)) for j in masked(i)) / len(masked(i))) for i in rows()]
    if mode == "token_truncate":
        return [[min(x, c) for x in row] for row in rho]
    if mode == "token_mask":
        return [[x if x <= c else 0.0 for x in row] for row in rho]
    if mode == "sequence_truncate":
        return [[min(seq[i], c)] * 4 for i in rows()]
    return [[x if seq[i] <= c else 0.0 for x in rho[i]] for i in rows()]


@pytest.mark.parametrize("mode", V.ROLLOUT_IS_MODES)
@pytest.mark.parametrize("c", [2.0, 1.3])
def test_rollout_is_weights_and_their_metrics(mode, c):
    w = V.rollout_is_weights(mode, t(GAP), t(MASK), c)
    want = hand_is_weights(mode, c)
    for i in rows():
        for j in masked(i):
            assert w[i, j].item() == pytest.approx(want[i][j], rel=1e-12)
    m = V.is_correction_metrics(mode, t(GAP), w, t(MASK), c)
    toks = [(i, j) for i in rows() for j in masked(i)]
    assert m["is_weight_mean"].item() == pytest.approx(sum(want[i][j] for i, j in toks) / len(toks), rel=1e-12)
    clamped = {(i, j): min(max(want[i][j], 1 / c), c) for i, j in toks}
    mean = sum(clamped.values()) / len(toks)
    ess = 1 / (sum((x / (mean + 1e-8)) ** 2 for x in clamped.values()) / len(toks))
    assert m["ess"].item() == pytest.approx(ess, rel=1e-10)
    rho = {(i, j): math.exp(GAP[i][j]) for i, j in toks}
    if mode == "token_truncate":
        frac = sum(rho[k] > c for k in toks) / len(toks)
    elif mode == "token_mask":
        frac = sum(want[i][j] == 0 for i, j in toks) / len(toks)
    else:
        frac = sum(math.exp(sum(GAP[i][j] for j in masked(i)) / len(masked(i))) > c for i in rows()) / 4
    assert m["clipped_frac"].item() == pytest.approx(frac, rel=1e-12)


def test_rollout_offpolicy_metrics_equal_their_definitions():
    m = {k: v.item() for k, v in V.rollout_offpolicy_metrics(t(OLD), t(ROLLOUT), t(MASK)).items()}
    train = [sum(OLD[i][j] for j in masked(i)) / len(masked(i)) for i in rows()]
    roll = [sum(ROLLOUT[i][j] for j in masked(i)) / len(masked(i)) for i in rows()]
    toks = [(i, j) for i in rows() for j in masked(i)]
    diff = [r - tr for r, tr in zip(roll, train)]
    want = {"training_ppl": sum(math.exp(-x) for x in train) / 4, "training_log_ppl": -sum(train) / 4,
            "rollout_ppl": sum(math.exp(-x) for x in roll) / 4, "rollout_log_ppl": -sum(roll) / 4,
            "kl": sum(-GAP[i][j] for i, j in toks) / len(toks),
            "k3_kl": sum(math.exp(GAP[i][j]) - GAP[i][j] - 1 for i, j in toks) / len(toks),
            "log_ppl_diff": sum(diff) / 4, "log_ppl_abs_diff": sum(map(abs, diff)) / 4,
            "log_ppl_diff_max": max(diff), "log_ppl_diff_min": min(diff),
            "ppl_ratio": sum(math.exp(d) for d in diff) / 4,
            "chi2_token": sum(math.exp(GAP[i][j]) ** 2 for i, j in toks) / len(toks) - 1,
            "chi2_seq": sum(math.exp(sum(GAP[i][j] for j in masked(i)) / len(masked(i))) ** 2 for i in rows()) / 4
            - 1}
    assert m == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
def test_the_correction_multiplies_the_per_token_loss_kl_included(loss_type):
    var = V.GRPOVariants(rollout_is_mode="token_truncate", rollout_is_threshold=1.3)
    kw = dict(logps=t(LOGP), old_logps=t(OLD), ref_logps=t(REF), advantages=t(ADV), mask=t(MASK), beta=BETA,
              epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    loss, metrics = L.grpo_loss(loss_type, **kw, variants=var, rollout_logps=t(ROLLOUT))
    w = hand_is_weights("token_truncate", 1.3)
    toks = [(i, j) for i in rows() for j in masked(i)]
    per = {}
    for i, j in toks:
        r = math.exp(LOG_RATIO[i][j])
        if loss_type == "cispo":
            pg = -min(r, EPS_HIGH) * ADV[i] * LOGP[i][j]
        else:
            pg = -min(r * ADV[i], min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH) * ADV[i])
        per[i, j] = (pg + BETA * k3(LOGP[i][j], REF[i][j])) * w[i][j]
    if loss_type == "grpo":
        want = sum(sum(per[i, j] for j in masked(i)) / len(masked(i)) for i in rows()) / 4
    else:
        want = sum(per.values()) / len(toks)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert {"rollout_correction/ess", "rollout_correction/chi2_seq", "rollout_correction/clipped_frac"} <= set(metrics)
    # diagnostics only: the loss is untouched
    diag, m2 = L.grpo_loss(loss_type, **kw, variants=V.GRPOVariants(log_rollout_offpolicy_metrics=True),
                           rollout_logps=t(ROLLOUT))
    plain, _ = L.grpo_loss(loss_type, **kw)
    assert diag.item() == pytest.approx(plain.item(), rel=1e-15)
    assert "rollout_correction/kl" in m2 and "rollout_correction/ess" not in m2


# ------------------------------------------------------------------ RLSD, SDAR

def test_rlsd_lambda_schedule():
    assert [V.rlsd_lambda(s, 0.5, 0, 0) for s in (0, 10)] == [0.5, 0.5]
    assert [V.rlsd_lambda(s, 0.5, 4, 0) for s in (0, 2, 4, 9)] == [0.0, 0.25, 0.5, 0.5]
    assert [V.rlsd_lambda(s, 0.5, 2, 4) for s in (1, 2, 4, 6, 9)] == [0.25, 0.5, 0.25, 0.0, 0.0]


@pytest.mark.parametrize("negative_only", [False, True])
def test_rlsd_reweight_never_flips_the_advantage_and_equals_its_formula(negative_only):
    lam, eps = 0.7, 0.2
    teacher = [[o + g for o, g in zip(ro, rg)] for ro, rg in zip(OLD, GAP)]  # so teacher − old = GAP
    got = V.rlsd_reweight(t(ADV), t(MASK), t(teacher), t(OLD), lam, eps, negative_only)
    for i in rows():
        for j in range(4):
            if not MASK[i][j]:
                assert got[i, j].item() == 0.0
                continue
            a = ADV[i]
            w = min(max(math.exp(math.copysign(1, a) * GAP[i][j]), 1 - eps), 1 + eps)
            want = a * ((1 - lam) + lam * w)
            if negative_only and a >= 0:
                want = a
            assert got[i, j].item() == pytest.approx(want, rel=1e-12)
            assert got[i, j].item() * a > 0  # the sign of the reward's advantage is kept


def test_sdar_loss_value_gradient_and_metrics():
    beta = 5.0
    teacher = [[o + g for o, g in zip(ro, rg)] for ro, rg in zip(LOGP, GAP)]  # so teacher − logp = GAP
    logp = t(LOGP).requires_grad_(True)
    loss, m = V.sdar_loss(logp, t(teacher), t(MASK), beta)
    toks = [(i, j) for i in rows() for j in masked(i)]
    gate = {k: 1 / (1 + math.exp(-beta * GAP[k[0]][k[1]])) for k in toks}
    assert loss.item() == pytest.approx(sum(gate[k] * GAP[k[0]][k[1]] for k in toks) / len(toks), rel=1e-12)
    loss.backward()
    for i in rows():
        for j in range(4):
            want = -gate[(i, j)] / len(toks) if MASK[i][j] else 0.0  # the gate is detached
            assert logp.grad[i, j].item() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert m["sdar/gate_active_ratio"].item() == pytest.approx(sum(GAP[i][j] > 0 for i, j in toks) / len(toks))
    assert m["sdar/teacher_gap_mean"].item() == pytest.approx(sum(GAP[i][j] for i, j in toks) / len(toks))
