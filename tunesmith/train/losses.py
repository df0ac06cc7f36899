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
