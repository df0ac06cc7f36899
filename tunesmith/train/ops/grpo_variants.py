"""GRPO's further loss and advantage variants, as small pure tensor functions (the main surrogate, its clipping and
its aggregation are `losses.grpo_loss`'s): the KL in the reward (--kl_in_reward), REAL (--loss_type real), FIPO
(--loss_type fipo), off-policy sequence masking (--off_policy_sequence_mask_delta) and the rollout
importance-sampling correction with its diagnostics (--rollout_importance_sampling_mode,
--log_rollout_offpolicy_metrics).

Notation as in losses.py's GRPO family: N completions in groups of G consecutive rows, T the padded completion
length; logps, old_logps, ref_logps, rollout_logps [N, T] are per-token log-probs (nats) of the sampled tokens under
the policy being trained, the policy as it was when the completions were sampled (computed by a training forward),
the reference, and the sampling engine itself; mask [N, T] is 1 on completion tokens. Each function says which
lines of ms-swift 4.6 (rlhf_trainers/grpo_trainer.py, rl_core/advantage.py) it follows — the CLI's contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_SAFETY_BOUND = 20.0  # |log-ratio| bound before exp (ms-swift's SAFETY_BOUND): e^20 ≈ 4.9e8


@dataclass(frozen=True)
class GRPOVariants:
    """The options of `losses.grpo_loss` beyond the surrogate itself, resolved once from the flags (ms-swift's
    names and defaults): REAL's τ (--real_tau 0.5) and group size, FIPO's γ (from --fipo_decay_rate 32: `fipo_gamma`),
    --fipo_clip_range 0.2, --fipo_clip_high_only true, --fipo_safety_threshold 4.0, --off_policy_sequence_mask_delta
    (None: off), --rollout_importance_sampling_mode (None: off) and its --rollout_importance_sampling_threshold 2.0,
    --log_rollout_offpolicy_metrics."""
    num_generations: int = 1
    real_tau: float = 0.5
    fipo_gamma: float = 2 ** (-1 / 32.0)
    fipo_clip_range: Optional[float] = 0.2
    fipo_clip_high_only: bool = True
    fipo_safety_threshold: Optional[float] = 4.0
    off_policy_sequence_mask_delta: Optional[float] = None
    rollout_is_mode: Optional[str] = None
    rollout_is_threshold: float = 2.0
    log_rollout_offpolicy_metrics: bool = False

    @property
    def wants_rollout_logps(self) -> bool:
        """Whether the sampling engine's own log-probs are needed (the correction or its diagnostics)."""
        return self.rollout_is_mode is not None or self.log_rollout_offpolicy_metrics


def rollout_correction(variants: GRPOVariants, old_logps: Tensor, rollout_logps, mask: Tensor) -> tuple:
    """(the rollout IS weights [N, T] or None, {"rollout_correction/<name>": 0-dim tensor}) for one micro-batch, as
    ms-swift 4.6 grpo_trainer.py:983-1004: nothing without rollout_logps [N, T] or when neither the correction nor
    the diagnostics are asked for; the diagnostics (`rollout_offpolicy_metrics`) whenever either is, the weights
    and their own metrics (`rollout_is_weights`, `is_correction_metrics`) with a mode."""
    if rollout_logps is None or not variants.wants_rollout_logps:
        return None, {}
    old = old_logps.detach()
    metrics = rollout_offpolicy_metrics(old, rollout_logps, mask)
    weights = None
    if variants.rollout_is_mode is not None:
        log_ratio = old - rollout_logps
        weights = rollout_is_weights(variants.rollout_is_mode, log_ratio, mask, variants.rollout_is_threshold)
        metrics.update(is_correction_metrics(variants.rollout_is_mode, log_ratio, weights, mask,
                                             variants.rollout_is_threshold))
    return weights, {f"rollout_correction/{k}": v.detach() for k, v in metrics.items()}


def _masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


# ------------------------------------------------------------------ KL in the reward

def sequence_kl(old_logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """Each completion's KL to the reference as --kl_in_reward subtracts it: Σ_t (old − ref) over its completion
    tokens ([N], nats; the k1 estimator of KL(π_old ‖ π_ref), summed, not averaged), as ms-swift 4.6
    grpo_trainer.py:439-447. old_logps, ref_logps, mask: [N, T]."""
    return ((old_logps - ref_logps) * mask).sum(-1)


def kl_penalised_rewards(rewards: Tensor, kl: Tensor, beta: float) -> Tensor:
    """r − β·KL ([N]): the combined rewards [N] with the per-completion KL [N] (`sequence_kl`) subtracted before
    the advantages are computed (the KL-in-reward form of PPO/RLHF, Ouyang et al. 2022 eq. 2; ms-swift 4.6
    rl_core/advantage.py:60-61). β = 0 leaves the rewards as they are."""
    return rewards - beta * kl if beta != 0.0 else rewards


# ------------------------------------------------------------------ REAL

def real_loss(log_ratio: Tensor, mask: Tensor, advantages: Tensor, num_generations: int, tau: float) -> Tensor:
    """REAL's policy loss (scalar; arXiv:2602.05630), as ms-swift 4.6 grpo_trainer.py:1090-1121. Each completion's
    score is its mean log-ratio s_i = Σ_t m·(logp − old) / Σ_t m; within a group (G consecutive rows) the completions
    with advantage > 0 are positives P, the others negatives Q, and a group with both contributes
        log(1 + Σ_{j∈Q} e^{s_j/τ}) + log(1 + Σ_{i∈P} e^{−s_i/τ}),
    summed over such groups and divided by the number of groups in the batch (those without both count too; no
    such group at all: a zero loss that keeps the graph). The gradient weight of each score is bounded by 1/τ.
    log_ratio, mask: [N, T]; advantages: [N] or [N, T] (per-token: their masked mean per row). Raises ValueError
    when N is not a multiple of num_generations."""
    n = log_ratio.shape[0]
    if num_generations < 1 or n % num_generations:
        raise ValueError(f"loss_type real needs whole groups: {n} completions are not a multiple of "
                         f"num_generations={num_generations}")
    scores = _masked_mean(log_ratio, mask, -1).view(-1, num_generations)
    adv = advantages if advantages.dim() == 1 else _masked_mean(advantages, mask, -1)
    adv = adv.view(-1, num_generations)
    pos, neg = adv > 0, adv <= 0
    valid = (pos.sum(1) != 0) & (neg.sum(1) != 0)
    if not valid.any():
        return torch.zeros((), dtype=scores.dtype, device=scores.device) * scores.mean()
    s = scores[valid] / tau
    zeros = torch.zeros(s.shape[0], 1, dtype=s.dtype, device=s.device)
    neg_loss = torch.logsumexp(torch.cat([s.masked_fill(~neg[valid], float("-inf")), zeros], 1), 1)
    pos_loss = torch.logsumexp(torch.cat([(-s).masked_fill(~pos[valid], float("-inf")), zeros], 1), 1)
    return (neg_loss + pos_loss).sum() / adv.shape[0]


# ------------------------------------------------------------------ FIPO

def fipo_gamma(decay_rate: float) -> float:
    """FIPO's discount per token from its half-life --fipo_decay_rate (tokens): γ = 2^(−1/decay_rate), so a
    log-ratio decay_rate tokens ahead counts half (ms-swift 4.6 grpo_trainer.py:2158)."""
    return 2 ** (-1 / decay_rate)


def future_kl(log_ratio: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """FIPO's Future-KL [N, T] (arXiv:2603.19835): F_t = Σ_{s ≥ t} γ^{s−t} m_s·(logp_s − old_s), the discounted sum
    of the log-ratios from token t on (0 on masked positions). Computed, as ms-swift 4.6 grpo_trainer.py:896-907,
    as a product with the upper-triangular decay matrix, in column blocks of 128 (never [T × T] at once beyond a
    block). log_ratio, mask: [N, T]."""
    delta = log_ratio.masked_fill(~mask.bool(), 0.0)
    t = delta.shape[1]
    out = torch.zeros_like(delta)
    rows = torch.arange(t, device=delta.device).unsqueeze(1)
    g = torch.as_tensor(gamma, dtype=delta.dtype, device=delta.device)
    for start in range(0, t, 128):
        cols = torch.arange(start, min(t, start + 128), device=delta.device).unsqueeze(0)
        distance = cols - rows  # [T, block]: s − t
        decay = torch.pow(g, distance.clamp(min=0)) * (distance >= 0).to(delta.dtype)
        out += delta[:, start:start + 128] @ decay.t()
    return out.masked_fill(~mask.bool(), 0.0)


def fipo_influence(log_ratio: Tensor, ratio: Tensor, advantages: Tensor, mask: Tensor, *, gamma: float,
                   clip_range, clip_high_only: bool, safety_threshold, delta=None) -> tuple[Tensor, dict]:
    """(FIPO's influence weight [N, T], detached; its metric tensors) as ms-swift 4.6 grpo_trainer.py:885-932:
    w = exp(F) with F the `future_kl` of the log-ratios — tokens whose ratio r exceeds --delta (two-sided clipping)
    left out of F — clipped to [1, 1 + c] (clip_high_only) or [1 − c, 1 + c] (c = --fipo_clip_range; None or 0: no
    clip); where A < 0 and r > --fipo_safety_threshold, w is clamped to [0.8, 1.0] so that a very off-policy
    negative token is not amplified. The clipped surrogate's per-token loss is multiplied by w.
    log_ratio, ratio (= e^log_ratio, before delta's bound), mask: [N, T]; advantages: [N, T] (or broadcastable).
    Metrics: future_kl, influence_weight [N, T], safety_mask [N, T] bool (True = kept)."""
    delta_lr = log_ratio.masked_fill(~mask.bool(), 0.0)
    if delta is not None:
        delta_lr = torch.where(ratio > delta, torch.zeros_like(delta_lr), delta_lr)
    f = future_kl(delta_lr, mask, gamma)
    weight = torch.exp(f)
    if clip_range:
        weight = torch.clamp(weight, min=1.0 if clip_high_only else 1 - clip_range, max=1 + clip_range)
    weight = weight.detach()
    safe = torch.ones_like(mask, dtype=torch.bool)
    if safety_threshold is not None:
        safe = ~((advantages < 0) & (ratio > safety_threshold))
        weight = torch.where(safe, weight, torch.clamp(weight, min=0.8, max=1.0))
    return weight, {"future_kl": f.detach(), "influence_weight": weight, "safety_mask": safe}


# ------------------------------------------------------------------ off-policy sequence masking

def off_policy_sequence_mask(logps: Tensor, behaviour_logps: Tensor, mask: Tensor, advantages: Tensor,
                             delta: float) -> Tensor:
    """Which completions stay in the loss ([N] bool, True = kept): DeepSeek-V3.2's off-policy sequence masking
    (arXiv:2512.02556, §3.1), as ms-swift 4.6 grpo_trainer.py:2395-2435 — a completion is dropped when its mean
    log-ratio mean_t(behaviour − logp) exceeds delta (the sampling policy liked it much more than the policy now
    does) and its advantage is negative. behaviour_logps: the sampling engine's log-probs when known, else the old
    policy's. logps, behaviour_logps, mask: [N, T]; advantages: [N] (or [N, T]: their masked mean per row)."""
    seq = _masked_mean(behaviour_logps - logps, mask, -1)
    adv = advantages if advantages.dim() == 1 else _masked_mean(advantages, mask, -1)
    return ~((seq > delta) & (adv < 0))


# ------------------------------------------------------------------ rollout importance sampling (TIS / MIS)

def _sequence_ratios(is_ratio: Tensor, mask: Tensor) -> Tensor:
    """Each completion's geometric-mean ratio exp(mean_t log r) ([N]), ms-swift grpo_trainer.py:2328-2343."""
    return torch.exp(_masked_mean(torch.log(is_ratio.clamp(min=1e-10)), mask, -1))


def rollout_is_weights(mode: str, rollout_log_ratio: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """The rollout importance-sampling weights [N, T] that multiply the per-token loss, correcting for the gap
    between the engine that sampled (π_rollout) and the training forward's π_old (truncated IS, Yao et al. 2025,
    "Your efficient RL framework secretly brings you off-policy RL training"; masked IS), as ms-swift 4.6
    grpo_trainer.py:2345-2393. ρ_t = exp(clamp(log ρ_t, ±20)), log ρ = old − rollout:
      token_truncate: min(ρ_t, C); token_mask: ρ_t where ρ_t ≤ C, else 0;
      sequence_truncate: min(ρ̄, C) on every token of the completion, ρ̄ its geometric-mean ratio;
      sequence_mask: ρ_t where ρ̄ ≤ C, else 0.
    C = threshold. rollout_log_ratio, mask: [N, T]. Raises ValueError for another mode."""
    ratio = torch.exp(torch.clamp(rollout_log_ratio, min=-_SAFETY_BOUND, max=_SAFETY_BOUND))
    if mode == "token_truncate":
        return torch.clamp(ratio, max=threshold)
    if mode == "token_mask":
        return torch.where(ratio <= threshold, ratio, torch.zeros_like(ratio))
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"unknown rollout_importance_sampling_mode {mode!r} "
                         f"(expected one of {', '.join(ROLLOUT_IS_MODES)})")
    seq = _sequence_ratios(ratio, mask)
    if mode == "sequence_truncate":
        return torch.clamp(seq, max=threshold).unsqueeze(-1).expand_as(ratio)
    return ratio * (seq <= threshold).to(ratio.dtype).unsqueeze(-1)


def rollout_offpolicy_metrics(old_logps: Tensor, rollout_logps: Tensor, mask: Tensor) -> dict:
    """The off-policy diagnostics of ms-swift 4.6 grpo_trainer.py:2437-2553 (0-dim tensors, this micro-batch),
    with ρ = π_old / π_rollout per token: training_ppl, training_log_ppl (mean over completions of exp(−mean logp)
    and −mean logp, π_old), rollout_ppl, rollout_log_ppl (the same for the engine), kl (token mean of −log ρ, the
    direct estimator of KL(π_rollout ‖ π_old)), k3_kl (token mean of clamp(ρ − log ρ − 1, ±10)), log_ppl_diff and
    log_ppl_abs_diff (mean over completions of rollout − training mean log-prob, and of its absolute value),
    log_ppl_diff_max, log_ppl_diff_min, ppl_ratio (mean of exp(log_ppl_diff)), chi2_token (token mean of ρ² − 1)
    and chi2_seq (mean over completions of ρ̄² − 1, ρ̄ the geometric-mean ratio). old_logps, rollout_logps,
    mask: [N, T]."""
    m = mask.to(old_logps.dtype)
    train_mean = _masked_mean(old_logps, m, -1)
    rollout_mean = _masked_mean(rollout_logps, m, -1)
    log_ratio = (old_logps - rollout_logps) * m
    safe = torch.clamp(log_ratio, min=-_SAFETY_BOUND, max=_SAFETY_BOUND)
    diff = rollout_mean - train_mean
    seq = torch.clamp(_masked_mean(log_ratio, m, -1), min=-_SAFETY_BOUND, max=_SAFETY_BOUND)
    return {"training_ppl": torch.exp(-train_mean).mean(), "training_log_ppl": (-train_mean).mean(),
            "kl": _masked_mean(-log_ratio, m),
            "k3_kl": _masked_mean(torch.clamp(torch.exp(safe) - safe - 1, min=-10, max=10), m),
            "rollout_ppl": torch.exp(-rollout_mean).mean(), "rollout_log_ppl": (-rollout_mean).mean(),
            "log_ppl_diff": diff.mean(), "log_ppl_abs_diff": diff.abs().mean(), "log_ppl_diff_max": diff.max(),
            "log_ppl_diff_min": diff.min(), "ppl_ratio": torch.exp(diff).mean(),
            "chi2_token": _masked_mean(torch.exp(safe).square(), m) - 1.0,
            "chi2_seq": torch.exp(seq).square().mean() - 1.0}


def is_correction_metrics(mode: str, rollout_log_ratio: Tensor, weights: Tensor, mask: Tensor,
                          threshold: float) -> dict:
    """The correction's own metrics, ms-swift 4.6 grpo_trainer.py:2555-2616 (0-dim tensors): is_weight_mean (token
    mean of the weights), ess (1 / token mean of (w / mean w)², with w clamped to [1/C, C]: the effective sample
    share) and clipped_frac (token modes: the share of tokens with ρ > C (truncate) or weight 0 (mask); sequence
    modes: the share of completions with ρ̄ > C). rollout_log_ratio, weights, mask: [N, T]."""
    m = mask.to(weights.dtype)
    ratio = torch.exp(torch.clamp(rollout_log_ratio, min=-_SAFETY_BOUND, max=_SAFETY_BOUND))
    clamped = weights.clamp(min=1.0 / threshold, max=threshold)
    normalised = clamped / (_masked_mean(clamped, m) + 1e-8)
    if mode == "token_truncate":
        clipped = _masked_mean((ratio > threshold).to(m.dtype), m)
    elif mode == "token_mask":
        clipped = _masked_mean((weights == 0).to(m.dtype), m)
    else:
        clipped = (_sequence_ratios(ratio, m) > threshold).to(m.dtype).mean()
    return {"is_weight_mean": _masked_mean(weights, m),
            "ess": 1.0 / _masked_mean(normalised.square(), m).clamp(min=1e-10), "clipped_frac": clipped}


# ------------------------------------------------------------------ self-distillation: RLSD, SDAR

def rlsd_lambda(step: int, target: float, warmup_steps: int, decay_steps: int) -> float:
    """RLSD's mixing weight λ at optimiser step `step` (ms-swift 4.6 grpo_trainer.py:2191-2207): a linear ramp
    0 → target over warmup_steps, then (decay_steps > 0) a linear decay target → 0 over decay_steps; else target."""
    if warmup_steps > 0 and step < warmup_steps:
        return target * (step / warmup_steps)
    if decay_steps > 0 and step >= warmup_steps:
        return target * max(1.0 - (step - warmup_steps) / decay_steps, 0.0)
    return target


def rlsd_reweight(advantages: Tensor, mask: Tensor, teacher_logps: Tensor, old_logps: Tensor, lam: float,
                  clip_range: float, negative_only: bool = False) -> Tensor:
    """RLSD's per-token advantages [N, T] (Self-Distilled RLVR, arXiv:2604.03128; ms-swift 4.6
    rl_core/advantage.py:294-343): δ_t = sg(log p_T − log p_old), w_t = e^{sign(A)·δ_t}, the advantage becomes
    A · ((1 − λ) + λ·clip(w_t, 1 − ε_w, 1 + ε_w)) — never changing its sign — and 0 outside the mask;
    negative_only leaves completions with A ≥ 0 at A. advantages: [N]; mask, teacher_logps, old_logps: [N, T]."""
    base = advantages.unsqueeze(1).expand_as(mask)
    delta = (teacher_logps.detach() - old_logps.detach()) * mask
    weights = torch.exp(torch.sign(base) * delta) * mask
    reweight = (1.0 - lam) + lam * torch.clamp(weights, min=1.0 - clip_range, max=1.0 + clip_range)
    if negative_only:
        neg = (advantages < 0).to(mask.dtype).unsqueeze(1)
        reweight = neg * reweight + (1.0 - neg)
    return base * reweight.detach() * mask


def sdar_loss(logps: Tensor, teacher_logps: Tensor, mask: Tensor, gate_beta: float) -> tuple[Tensor, dict]:
    """SDAR's auxiliary loss (Self-Distilled Agentic RL, arXiv:2605.15155; ms-swift 4.6 rl_core/advantage.py:362-415)
    and its metrics: Δ_t = log p_T − log p_θ, g_t = sg(σ(gate_beta · Δ_t)), L = token mean of g_t·Δ_t over the mask
    (the gradient flows through log p_θ only, raising the tokens where the teacher is more confident).
    logps (with gradient), teacher_logps, mask: [N, T]. Metrics: sdar/gate_mean, sdar/gate_active_ratio (g > ½),
    sdar/teacher_gap_mean (mean Δ), sdar/loss."""
    teacher = teacher_logps.detach()
    delta = teacher - logps.detach()
    gate = torch.sigmoid(gate_beta * delta)
    loss = _masked_mean(gate * (teacher - logps), mask)
    metrics = {"sdar/gate_mean": _masked_mean(gate, mask), "sdar/gate_active_ratio":
               _masked_mean((gate > 0.5).to(mask.dtype), mask), "sdar/teacher_gap_mean": _masked_mean(delta, mask),
               "sdar/loss": loss.detach()}
    return loss, metrics
