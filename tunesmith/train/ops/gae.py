"""PPO's arithmetic on per-token tensors [B, C] (B completions, C completion tokens; `mask` [B, C] is 1 on each
completion's own tokens, 0 on the right padding): the per-token rewards (a KL penalty to the reference at every
token, the reward model's or functions' score at the last), generalised advantage estimation, whitening, and the
clipped policy and value losses. Pure functions of tensors, as TRL's PPOTrainer computes them
(trl/experimental/ppo/ppo_trainer.py, TRL 0.29), so each one is checked against an independent computation in
tests/train/methods/test_ppo.py.

One difference from TRL, on purpose: TRL puts the score one position past a completion's last token (its
`sequence_lengths_p1`: the padding state after the end-of-turn token, where it also trains the value head) whenever
the completion is shorter than the batch's longest. Here the score lands on the last token itself and the state
after it is terminal (value 0), as in the GAE paper's episodic setting (Schulman et al. 2016, §3) and InstructGPT's
PPO; for completions that fill the batch's width both agree exactly.
"""
from __future__ import annotations


def masked_mean(x, mask):
    """Mean of x over the positions where mask is 1 (a scalar tensor; 0 when the mask is empty). Positions off the
    mask take no part even when they hold inf or NaN (no 0 · inf)."""
    import torch

    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, shift_mean: bool = True):
    """x [B, C] whitened over the masked positions: (x − mean) / sqrt(var + 1e-8) with the unbiased variance (TRL's
    masked_whiten); shift_mean False adds the mean back (only the scale changes). Positions outside the mask keep
    whatever the formula gives (callers zero them). With fewer than two masked positions the variance is undefined:
    x is only centred (or returned as it is, shift_mean False)."""
    import torch

    n = mask.sum()
    mean = masked_mean(x, mask)
    if n < 2:
        return x - mean if shift_mean else x
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def kl_per_token(logps, ref_logps, mask, estimator: str = "k1"):
    """The per-token KL estimate [B, C] of the policy to the reference at the sampled tokens (nats), 0 off the mask:
    k1 = log π(y_t) − log π_ref(y_t), k3 = (r − 1) − log r with r = π_ref / π (Schulman, "Approximating KL
    Divergence", 2020; TRL's kl_estimator). Raises ValueError for another estimator."""
    import torch

    log_ratio = ref_logps - logps
    if estimator == "k1":
        kl = -log_ratio
    elif estimator == "k3":
        kl = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")
    return kl * mask


def token_rewards(kl, scores, mask, kl_coef: float):
    """Per-token rewards [B, C]: −kl_coef · KL at every token (the non-score reward), plus each completion's score
    [B] at its last token (InstructGPT's reward, Ouyang et al. 2022, eq. 2, per token as Ziegler et al. 2019 §2.2).
    kl [B, C] from `kl_per_token`; completions have at least one token."""
    import torch

    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", eq. 11-16): δ_t = r_t + γ·V_{t+1} − V_t, Â_t = Σ_l (γλ)^l δ_{t+l}, computed
    backwards as Â_t = δ_t + γλ·Â_{t+1}; returns R_t = Â_t + V_t (the value target). rewards, values [B, C]; the
    state after a completion's last token is terminal (V = 0: values and rewards are zeroed off the mask). Returns
    (advantages [B, C], returns [B, C]), both 0 off the mask."""
    import torch

    rewards, values = rewards * mask, values * mask
    c = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(c)):
        next_values = values[:, t + 1] if t < c - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def policy_loss(logps, old_logps, advantages, mask, cliprange: float):
    """PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7) as a loss:
    mean over the masked tokens of max(−Â·ρ, −Â·clip(ρ, 1 − ε, 1 + ε)), ρ = exp(log π − log π_old). logps [B, C]
    with gradient; old_logps, advantages [B, C]. Returns (loss, statistics: clipfrac — the share of tokens where the
    clipped term is the larger —, approxkl ½·mean (log ρ)², ratio — the mean ρ —, all detached scalars)."""
    import torch

    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask), "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """PPO's clipped value loss (as OpenAI baselines' ppo2 and TRL): ½ · mean over the masked tokens of
    max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²). values [B, C] with gradient; old_values (the rollout's),
    returns [B, C]. Returns (loss, statistics: clipfrac, the share of tokens where the clipped error is larger)."""
    import torch

    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).float(), mask)}
    return loss, stats
