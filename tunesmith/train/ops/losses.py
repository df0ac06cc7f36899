"""Preference losses as small pure functions on per-pair tensors, one per published variant.

Notation (as in the DPO paper, Rafailov et al. 2023, and TRL's trainers): ℓ_c, ℓ_r are the policy's log-probs
of the chosen and rejected completions summed over their tokens (nats, [B] each), ℓ^ref the reference's; r_c = ℓ_c − ℓ^ref_c, r_r = ℓ_r − ℓ^ref_r are the
implicit rewards (before β), h = r_c − r_r; ε is label_smoothing. Every function returns one loss per pair
(a tensor shaped like its inputs); averaging over pairs is the training loop's business. The conventions (summed
vs per-token averaged log-probs, which variant reads ε) follow TRL's DPOTrainer, CPOTrainer and ORPOTrainer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# ------------------------------------------------------------------ DPO family (reference model needed)

def dpo_sigmoid(h: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290): −log σ(βh). With ε > 0 the conservative DPO of
    Mitchell 2023 ("cDPO"): −(1−ε) log σ(βh) − ε log σ(−βh)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo(h_avg: Tensor, beta: float) -> Tensor:
    """IPO, Azar et al. 2023 (arXiv:2310.12036): (h̄ − 1/(2β))², with h̄ built from per-token *averaged*
    log-ratios (r/|y|), the normalisation TRL confirmed with the authors."""
    return (h_avg - 1 / (2 * beta)) ** 2


def hinge(h: Tensor, beta: float) -> Tensor:
    """SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425), as used by RSO, Liu et al. 2023 (arXiv:2309.06657):
    max(0, 1 − βh)."""
    return torch.relu(1 - beta * h)


def robust(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (rDPO), Chowdhury et al. 2024 (arXiv:2403.00409), for labels flipped with probability
    ε ∈ [0, 0.5): (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε)."""
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) \
        / (1 - 2 * label_smoothing)


def exo_pair(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """EXO (pairwise), Ji et al. 2024 (arXiv:2402.00856), ε > 0 (1e-3 recommended):
    σ(βh) [log σ(βh) − log(1−ε)] + σ(−βh) [log σ(−βh) − log ε]."""
    eps = label_smoothing
    return torch.sigmoid(beta * h) * (F.logsigmoid(beta * h) - math.log(1 - eps)) \
        + torch.sigmoid(-beta * h) * (F.logsigmoid(-beta * h) - math.log(eps))


def nca_pair(r_c: Tensor, r_r: Tensor, beta: float) -> Tensor:
    """NCA (pairwise), Chen et al. 2024 (arXiv:2402.05369): −log σ(βr_c) − ½ log σ(−βr_c) − ½ log σ(−βr_r)."""
    return -F.logsigmoid(beta * r_c) - 0.5 * F.logsigmoid(-beta * r_c) - 0.5 * F.logsigmoid(-beta * r_r)


def bco_pair(r_c: Tensor, r_r: Tensor, beta: float, delta: float = 0.0) -> Tensor:
    """BCO (pairwise), Jung et al. 2024 (arXiv:2404.04656): −log σ(βr_c − δ) − log σ(−(βr_r − δ)). TRL 1.x
    uses δ = 0 (TRL DPOTrainer's bco_pair); TRL 0.x subtracted a running mean of the rewards."""
    return -F.logsigmoid(beta * r_c - delta) - F.logsigmoid(-(beta * r_r - delta))


def sppo_hard(r_c: Tensor, r_r: Tensor, beta: float) -> Tensor:
    """SPPO with hard labels, Wu et al. 2024 (arXiv:2405.00675): (r_c − 1/(2β))² + (r_r + 1/(2β))²."""
    return (r_c - 1 / (2 * beta)) ** 2 + (r_r + 1 / (2 * beta)) ** 2


def apo_zero(r_c: Tensor, r_r: Tensor, beta: float) -> Tensor:
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266), for chosen replies better than the model's:
    (1 − σ(βr_c)) + σ(βr_r)."""
    return (1 - torch.sigmoid(beta * r_c)) + torch.sigmoid(beta * r_r)


def apo_down(r_c: Tensor, r_r: Tensor, beta: float) -> Tensor:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266), for chosen replies worse than the model's:
    σ(βr_c) + (1 − σ(β(r_c − r_r)))."""
    return torch.sigmoid(beta * r_c) + (1 - torch.sigmoid(beta * (r_c - r_r)))


def discopop(h: Tensor, beta: float, tau: float = 0.05) -> Tensor:
    """DiscoPOP (log-ratio modulated loss), Lu et al. 2024 (arXiv:2406.08414):
    (1 − m) · (−log σ(βh)) + m · e^{−βh}, with m = σ(βh / τ)."""
    x = beta * h
    m = torch.sigmoid(x / tau)
    return (1 - m) * -F.logsigmoid(x) + m * torch.exp(-x)


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "apo_zero", "apo_down", "discopop", "sft")


def dpo_loss(loss_type: str, *, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             chosen_len: Tensor, rejected_len: Tensor, beta: float, label_smoothing: float = 0.0,
             discopop_tau: float = 0.05) -> Tensor:
    """The per-pair loss ([B] nats) of one DPO variant from summed log-probs ([B] nats, policy and reference) and
    completion lengths ([B] tokens). `sft` is not a pair loss (it is the NLL over chosen tokens) and is handled by
    the caller. Raises ValueError for an unknown loss type."""
    r_c, r_r = chosen - ref_chosen, rejected - ref_rejected
    h = r_c - r_r
    variants = {
        "sigmoid": lambda: dpo_sigmoid(h, beta, label_smoothing),
        "ipo": lambda: ipo(r_c / chosen_len - r_r / rejected_len, beta),
        "hinge": lambda: hinge(h, beta),
        "robust": lambda: robust(h, beta, label_smoothing),
        "exo_pair": lambda: exo_pair(h, beta, label_smoothing),
        "nca_pair": lambda: nca_pair(r_c, r_r, beta),
        "bco_pair": lambda: bco_pair(r_c, r_r, beta),
        "sppo_hard": lambda: sppo_hard(r_c, r_r, beta),
        "apo_zero": lambda: apo_zero(r_c, r_r, beta),
        "apo_down": lambda: apo_down(r_c, r_r, beta),
        "discopop": lambda: discopop(h, beta, discopop_tau),
    }
    if loss_type not in variants:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return variants[loss_type]()


# ------------------------------------------------------------------ reference-free methods

def cpo(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """CPO, Xu et al. 2024 (arXiv:2401.08417), preference part: −log σ(β(ℓ_c − ℓ_r)) on summed log-probs
    (label-smoothed like DPO). The full CPO loss adds cpo_alpha · NLL(chosen)."""
    return dpo_sigmoid(chosen - rejected, beta, label_smoothing)


def simpo(chosen_avg: Tensor, rejected_avg: Tensor, beta: float, gamma: float,
          label_smoothing: float = 0.0) -> Tensor:
    """SimPO, Meng et al. 2024 (arXiv:2405.14734): −log σ(β(ℓ̄_c − ℓ̄_r) − γ) on per-token averaged log-probs.
    Written as TRL does: logits = (ℓ̄_c − ℓ̄_r) − γ/β, loss = −log σ(β · logits) (label-smoothed)."""
    return dpo_sigmoid(chosen_avg - rejected_avg - gamma / beta, beta, label_smoothing)


CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
CPO_AVERAGED = ("ipo", "simpo")  # the CPO variants that use per-token averaged log-probs ℓ̄ = ℓ / |y|


def cpo_loss(loss_type: str, *, chosen: Tensor, rejected: Tensor, chosen_len: Tensor, rejected_len: Tensor,
             beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 1.0) -> Tensor:
    """The per-pair loss of one reference-free CPO variant (TRL's CPOTrainer) from the policy's summed log-probs
    ([B] nats) and completion lengths ([B] tokens): sigmoid (CPO), hinge (SLiC on ℓ_c − ℓ_r), ipo (IPO on averaged
    log-probs), simpo (SimPO). Raises ValueError for another loss type."""
    avg_c, avg_r = chosen / chosen_len, rejected / rejected_len
    variants = {
        "sigmoid": lambda: cpo(chosen, rejected, beta, label_smoothing),
        "hinge": lambda: hinge(chosen - rejected, beta),
        "ipo": lambda: ipo(avg_c - avg_r, beta),
        "simpo": lambda: simpo(avg_c, avg_r, beta, simpo_gamma, label_smoothing),
    }
    if loss_type not in variants:
        raise ValueError(f"unknown CPO loss type {loss_type!r}")
    return variants[loss_type]()


def orpo_log_odds(chosen_avg: Tensor, rejected_avg: Tensor) -> Tensor:
    """ORPO's log odds ratio, Hong et al. 2024 (arXiv:2403.07691), with p = exp(ℓ̄) from averaged log-probs:
    log(p_c / (1 − p_c)) − log(p_r / (1 − p_r))."""
    return (chosen_avg - rejected_avg) - (torch.log1p(-torch.exp(chosen_avg)) - torch.log1p(-torch.exp(rejected_avg)))


def orpo(chosen_avg: Tensor, rejected_avg: Tensor, beta: float) -> Tensor:
    """ORPO's odds-ratio term per pair: −λ log σ(log OR), λ = beta. The full ORPO loss adds NLL(chosen)."""
    return -beta * F.logsigmoid(orpo_log_odds(chosen_avg, rejected_avg))


# ------------------------------------------------------------------ unpaired

def kto(logratio: Tensor, desirable: Tensor, kl: Tensor, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> Tensor:
    """KTO, Ethayarajh et al. 2024 (arXiv:2402.01306), per example with r = ℓ − ℓ^ref and the detached batch
    KL estimate z₀ (clamped at 0): desirable λ_D (1 − σ(β(r − z₀))), undesirable λ_U (1 − σ(β(z₀ − r)))."""
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, good, bad)


# ------------------------------------------------------------------ GRPO family
#
# Notation (GRPO, Shao et al. 2024, arXiv:2402.03300; DAPO, Yu et al. 2025, arXiv:2503.14476): N completions in
# groups of G consecutive rows (one group per prompt), T the padded completion length. logps, old_logps, ref_logps
# are per-token log-probs [N, T] (nats) of the sampled tokens under the policy being trained, the policy that
# sampled them, and the reference; mask [N, T] is 1 on completion tokens. r = exp(logps − old_logps) is the
# importance ratio, A the advantage of a completion. Everything follows ms-swift 4.6 (rl_core/advantage.py and
# GRPOTrainer._compute_loss_and_metrics in rlhf_trainers/grpo_trainer.py), which is the CLI's contract.

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "real", "fipo", "luspo")
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
ADVANTAGE_EPS = 1e-4  # added to the std before dividing (ms-swift rl_core/advantage.py:97)


def combine_rewards(per_func: Tensor, weights) -> Tensor:
    """One reward per completion ([N]) from the rewards of F reward functions ([N, F]) and their weights (F
    floats): Σ_f w_f · r_f with NaN terms (a function that returned None for that completion) left out — a
    weighted nansum, so a row where every function returned None gets 0. As ms-swift 4.6
    rl_core/advantage.py:58 (`(rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)`) and TRL
    GRPOTrainer. Raises ValueError when the number of weights is not F."""
    if per_func.dim() != 2 or per_func.shape[1] != len(weights):
        raise ValueError(f"{len(weights)} reward weights for rewards shaped {tuple(per_func.shape)} (expected [N, F] "
                         f"with F = the number of weights)")
    w = torch.as_tensor(list(weights), dtype=per_func.dtype, device=per_func.device)
    return (per_func * w.unsqueeze(0)).nansum(dim=1)


def group_advantages(rewards: Tensor, num_generations: int, estimator: str = "grpo",
                     scale_rewards: str = "group") -> Tensor:
    """Advantages [N] from combined rewards [N] (see combine_rewards), rows grouped G = num_generations at a time.
    As ms-swift 4.6 rl_core/advantage.py:63-97 (compute_advantages), with b the group mean of r:
      grpo: A = r − b (GRPO, Shao et al. 2024, §4.1.2); rloo: A = (r − b)·G/(G−1), which equals r minus the mean
      of the other G−1 rewards (RLOO, Ahmadian et al. 2024, arXiv:2402.14740); reinforce_plus_plus: A = r − b
      (REINFORCE++, Hu 2025, arXiv:2501.03262, the group-mean baseline variant).
    Then A /= (std + 1e-4) with std the *unbiased* (Bessel-corrected, torch's default) std of — for grpo and
    rloo — the rewards of the group ("group") or of the whole batch ("batch"); for reinforce_plus_plus the std
    of the advantages themselves (group or batch); "none" divides by nothing. A group of one (G = 1) has std 0.
    Pass rewards of the whole global batch (all processes), as ms-swift does. ms-swift's defaults are
    scale_rewards group for grpo, none for rloo, batch for reinforce_plus_plus (arguments/rlhf_args.py:385-391);
    "gdpo" needs the per-function rewards: see gdpo_advantages. Raises ValueError for an unknown estimator or
    scaling, num_generations < 1, or N not a multiple of num_generations."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r} "
                         f"(expected one of {', '.join(ADVANTAGE_ESTIMATORS)})")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r} (expected one of {', '.join(SCALE_REWARDS)})")
    k = num_generations
    if k < 1 or rewards.dim() != 1 or rewards.numel() % k:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of num_generations={k}")
    grouped = rewards.view(-1, k)
    group_mean = grouped.mean(dim=1).repeat_interleave(k)
    if estimator == "rloo" and k > 1:
        advantages = (rewards - group_mean) * k / (k - 1)
    else:
        advantages = rewards - group_mean
    if scale_rewards == "none":
        return advantages
    # which values the std is taken over: the advantages for REINFORCE++, the rewards otherwise (rloo included:
    # ms-swift scales the leave-one-out advantage by the std of the rewards, rl_core/advantage.py:79-82)
    source = advantages if estimator == "reinforce_plus_plus" else rewards
    if scale_rewards == "batch":
        std = source.std().expand_as(source) if source.numel() > 1 else torch.zeros_like(source)
    else:
        std = source.view(-1, k).std(dim=1).repeat_interleave(k) if k > 1 else torch.zeros_like(source)
    return advantages / (std + ADVANTAGE_EPS)


def gdpo_advantages(per_func: Tensor, weights, num_generations: int) -> Tensor:
    """Advantages [N] for scale_rewards "gdpo" (GDPO, arXiv:2601.05242): each reward function's rewards [N, F]
    are normalised within their group separately — (r − nanmean) / (unbiased nanstd + 1e-8), NaN (None rewards,
    groups with one valid value) → 0 — then summed with the weights, and the sum normalised over the batch:
    (s − mean) / (std + 1e-8). As ms-swift 4.6 rl_core/advantage.py:83-93, which applies it for the grpo and rloo
    estimators (the same result for both); with reinforce_plus_plus ms-swift ignores "gdpo" and returns the
    unscaled r − group mean (group_advantages(..., "reinforce_plus_plus", "none")). Raises ValueError on
    mismatched shapes."""
    k = num_generations
    if per_func.dim() != 2 or per_func.shape[1] != len(weights) or k < 1 or per_func.shape[0] % k:
        raise ValueError(f"rewards shaped {tuple(per_func.shape)} do not fit {len(weights)} weights and groups of "
                         f"num_generations={k}")
    total = torch.zeros(per_func.shape[0], dtype=per_func.dtype, device=per_func.device)
    for i, w in enumerate(weights):
        r = per_func[:, i].view(-1, k)
        mean = torch.nanmean(r, dim=1, keepdim=True)
        count = (~torch.isnan(r)).sum(dim=1, keepdim=True)
        var = torch.nanmean((r - mean) ** 2, dim=1, keepdim=True) * count / (count - 1)  # Bessel, NaN when count ≤ 1
        std = torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))
        total = total + w * torch.nan_to_num((r - mean) / (std + 1e-8), nan=0.0).view(-1)
    return (total - total.mean()) / (total.std() + 1e-8)


def _importance_log_weights(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str) -> Tensor:
    """log r per token ([N, T]) or per sequence ([N, 1]); see grpo_loss."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {level!r} "
                         f"(expected one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)})")
    seq = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if level == "sequence":
        return seq
    # GSPO-token: sg[s_i(θ)] · π_θ(y_t)/sg[π_θ(y_t)] — the value of the sequence ratio, a per-token gradient
    return logps - logps.detach() + seq.detach()


def grpo_k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL to the reference [N, T] (nats) by Schulman's k3 estimator, d = ref − logp:
    e^d − d − 1 ≥ 0 (GRPO, Shao et al. 2024, eq. 4). d is clamped to [−20, 20] and the result to [−10, 10] as in
    ms-swift 4.6 rlhf_trainers/grpo_trainer.py:975-976, so that padding or a far-off token cannot overflow."""
    d = torch.clamp(ref_logps - logps, min=-20, max=20)
    return torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_quantile: float, values=None):
    """(keep [N, T] bool, threshold 0-dim or None): the completion tokens whose entropy is in the top `top_quantile`
    of the batch's (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv:2506.01939). threshold = torch.quantile(values,
    1 − top_quantile) (linear interpolation), values being the entropies of every completion token (mask = 1) of
    the micro-batch — gathered over the processes by the caller when distributed, default entropy[mask] — and
    keep = (entropy ≥ threshold) ∧ mask, as TRL 0.29 GRPOTrainer.get_high_entropy_mask (grpo_trainer.py:969-1005).
    top_quantile 1 keeps every token, 0 only the highest entropy; no completion token at all: nothing kept, None.
    entropy, mask: [N, T]; entropy in nats."""
    values = entropy[mask.bool()] if values is None else values
    if values.numel() == 0:
        return torch.zeros(entropy.shape, dtype=torch.bool, device=entropy.device), None
    threshold = torch.quantile(values.float(), 1.0 - top_quantile)
    return (entropy >= threshold) & mask.bool(), threshold


def _grpo_per_token(loss_type: str, coef_1: Tensor, adv: Tensor, logps: Tensor, epsilon_low: float,
                    epsilon_high: float, delta, tau_pos: float, tau_neg: float):
    """The per-token policy loss ([N, T]) and the ratio the clip metrics read (ms-swift's coef_1 after delta)."""
    if loss_type == "cispo":
        # CISPO (MiniMax-M1, Chen et al. 2025, arXiv:2506.13585): the IS weight is clipped above at epsilon_high
        # itself (not 1 + ε) and detached, so every token keeps a REINFORCE gradient (grpo_trainer.py:1036-1038)
        return -torch.clamp(coef_1, max=epsilon_high).detach() * adv * logps, coef_1
    if loss_type == "sapo":
        # SAPO (arXiv:2511.20347): a soft sigmoid gate instead of the hard clip (grpo_trainer.py:1039-1045)
        gate_pos = torch.sigmoid(tau_pos * (coef_1 - 1)) * (4.0 / tau_pos)
        gate_neg = torch.sigmoid(tau_neg * (coef_1 - 1)) * (4.0 / tau_neg)
        return -torch.where(adv > 0, gate_pos, gate_neg) * adv, coef_1
    if loss_type == "real":  # REAL's loss is its own (grpo_variants.real_loss); no per-token surrogate
        return torch.zeros_like(logps), coef_1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        # two-sided clipping (INTELLECT-2, arXiv:2505.07291): bound r from above in the unclipped term too, so a
        # negative advantage cannot be multiplied by an unbounded ratio (grpo_trainer.py:1052-1054)
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * adv, coef_2 * adv), coef_1


def _grpo_reduce(loss_type: str, per_token: Tensor, mask: Tensor, max_completion_length, num_items_in_batch,
                 num_processes: int) -> Tensor:
    """Aggregate the per-token loss as ms-swift 4.6 grpo_trainer.py:1082-1132; see grpo_loss."""
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "luspo":  # TRL 1.16: each completion's summed loss, averaged over the completions
        return (per_token * mask).sum(-1).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        return (per_token * mask).sum() / (mask.shape[0] * max_completion_length)
    items = mask.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
    return (per_token * mask).sum() / (items / num_processes)


def grpo_loss(loss_type: str, *, logps: Tensor, old_logps: Tensor, ref_logps, advantages: Tensor, mask: Tensor,
              beta: float, epsilon_low: float, epsilon_high: float, delta=None,
              importance_sampling_level: str = "token", max_completion_length=None, num_items_in_batch=None,
              num_processes: int = 1, entropy_mask=None, tau_pos: float = 1.0, tau_neg: float = 1.05,
              variants=None, rollout_logps=None):
    """The GRPO-family policy loss (scalar, nats) and its metrics, as ms-swift 4.6 GRPOTrainer
    (rlhf_trainers/grpo_trainer.py:972-1226). Inputs: logps, old_logps [N, T] (old_logps = logps.detach() when
    there is one update per generation), ref_logps [N, T] or None, advantages [N] (or [N, T]), mask [N, T]
    (1 = completion token; 0 = padding or a completion excluded, e.g. truncated with overlong_filter),
    entropy_mask [N, T] or None (top_entropy_quantile: 1 = token kept), variants (grpo_variants.GRPOVariants: the
    options below; None = all off), rollout_logps [N, T] or None (the sampling engine's own log-probs).

    Ratio: r = e^{logp − old} per token ("token"); "sequence" uses one ratio per completion, the exp of the masked
    mean log-ratio (GSPO's s_i(θ), Zheng et al. 2025, arXiv:2507.18071); "sequence_token" has that value with a
    per-token gradient (GSPO-token; grpo_trainer.py:1008-1023). Per-token loss ℓ, by loss_type:
      grpo, bnpo, dr_grpo, dapo, luspo: −min(r'·A, clip(r, 1−ε_low, 1+ε_high)·A) (PPO/GRPO surrogate),
        r' = min(r, delta) when delta is set, else r; fipo: the same times FIPO's influence weight
        (grpo_variants.fipo_influence);
      cispo: −sg(min(r, ε_high))·A·logp (ε_high is the absolute bound here, as ms-swift);
      sapo: −g(r)·A with g(r) = σ(τ(r−1))·4/τ, τ = tau_pos when A > 0 else tau_neg;
      real: none — REAL's group loss (grpo_variants.real_loss) plus β·(token mean of the KL).
    ℓ is multiplied by entropy_mask, then β·KL (k3, grpo_k3_kl) is added when β ≠ 0 and ref_logps is given
    (pass ref_logps None when the KL is in the reward instead), then multiplied by the rollout importance-sampling
    weights (variants.rollout_is_mode, grpo_variants.rollout_is_weights, when rollout_logps are given); with
    variants.off_policy_sequence_mask_delta the completions `grpo_variants.off_policy_sequence_mask` drops leave
    the mask. Aggregation: grpo and sapo average each completion's tokens, then the N completions (fully masked
    rows count in N); luspo sums each completion's tokens, then averages over the N (TRL 1.16's LUSPO); bnpo sums
    over tokens / number of tokens; dr_grpo sums / (N · max_completion_length) (Dr. GRPO, Liu et al. 2025,
    arXiv:2503.20783); dapo, cispo and fipo sum / (num_items_in_batch / num_processes), num_items_in_batch being
    the completion tokens of the global batch (all processes, whole accumulation window; default: mask.sum() of
    this batch) — undoing the trainer's division by the accumulation steps is the caller's business
    (grpo_trainer.py:1228-1243).

    Metrics (detached 0-dim tensors, per process; ms-swift gathers them and also logs low_min/high_max):
    "kl" (masked token mean, when the KL is computed), and either "clip_ratio/low_mean" (r' < 1−ε_low and A < 0),
    "clip_ratio/high_mean" (r' > 1+ε_high and A > 0), "clip_ratio/region_mean" (either) as masked token means,
    or for cispo "cispo_clip_ratio" (r > ε_high and A > 0); sapo and real have no clip metric; fipo adds
    fipo/future_kl_mean, fipo/influence_weight_mean, fipo/safety_keep_ratio; rollout logps with the correction or
    variants.log_rollout_offpolicy_metrics add rollout_correction/* (grpo_variants.rollout_offpolicy_metrics and
    is_correction_metrics). Raises ValueError for an unknown loss type or importance-sampling level, dr_grpo
    without max_completion_length, or real without whole groups."""
    from tunesmith.train.ops import grpo_variants as V

    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss type {loss_type!r} (expected one of {', '.join(GRPO_LOSS_TYPES)})")
    var = variants or V.GRPOVariants()
    mask = mask.to(logps.dtype)
    adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).expand_as(logps)
    is_weights, metrics = V.rollout_correction(var, old_logps, rollout_logps, mask)
    coef_1 = torch.exp(_importance_log_weights(logps, old_logps, mask, importance_sampling_level))
    per_token, ratio = _grpo_per_token(loss_type, coef_1, adv, logps, epsilon_low, epsilon_high, delta,
                                       tau_pos, tau_neg)
    fipo = None
    if loss_type == "fipo":
        weight, fipo = V.fipo_influence(logps - old_logps, coef_1, adv, mask, gamma=var.fipo_gamma,
                                        clip_range=var.fipo_clip_range, clip_high_only=var.fipo_clip_high_only,
                                        safety_threshold=var.fipo_safety_threshold, delta=delta)
        per_token = per_token * weight
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    kl = grpo_k3_kl(logps, ref_logps) if beta != 0.0 and ref_logps is not None else None
    if kl is not None:
        per_token = per_token + beta * kl
    if is_weights is not None:
        per_token = per_token * is_weights
    if var.off_policy_sequence_mask_delta is not None:
        behaviour = old_logps if rollout_logps is None else rollout_logps
        mask = mask * V.off_policy_sequence_mask(logps, behaviour, mask, adv, var.off_policy_sequence_mask_delta)\
            .unsqueeze(-1).to(mask.dtype)
    if loss_type == "real":
        loss = V.real_loss(logps - old_logps, mask, adv, var.num_generations, var.real_tau)
        if kl is not None:
            loss = loss + beta * (kl * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        loss = _grpo_reduce(loss_type, per_token, mask, max_completion_length, num_items_in_batch, num_processes)
    return loss, {**metrics, **_grpo_metrics(loss_type, mask, kl, ratio, adv, epsilon_low, epsilon_high, fipo)}


def _grpo_metrics(loss_type: str, mask: Tensor, kl, ratio: Tensor, adv: Tensor, epsilon_low: float,
                  epsilon_high: float, fipo) -> dict:
    """grpo_loss's metrics (see there): masked token means over the final mask."""
    def _masked_mean(x):
        return (x.to(mask.dtype) * mask).sum().detach() / mask.sum().clamp(min=1.0)

    metrics = {} if kl is None else {"kl": _masked_mean(kl)}
    if fipo is not None:
        metrics.update({"fipo/future_kl_mean": _masked_mean(fipo["future_kl"]),
                        "fipo/influence_weight_mean": _masked_mean(fipo["influence_weight"]),
                        "fipo/safety_keep_ratio": _masked_mean(fipo["safety_mask"])})
    if loss_type == "cispo":
        metrics["cispo_clip_ratio"] = _masked_mean((ratio > epsilon_high) & (adv > 0))
    elif loss_type not in ("sapo", "real"):
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        metrics.update({"clip_ratio/low_mean": _masked_mean(low), "clip_ratio/high_mean": _masked_mean(high),
                        "clip_ratio/region_mean": _masked_mean(low | high)})
    return metrics
