"""The ORPO method (`tunesmith rlhf --rlhf_type orpo`): Odds Ratio Preference Optimization (Hong et al. 2024,
arXiv:2403.07691), reference-free: NLL(chosen) + λ · the odds-ratio term (λ = beta), every assistant turn trained
by default as ms-swift does. The formula is in losses.py; what the pair methods share is in pairs.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tunesmith.log import note
from tunesmith.train import loop
from tunesmith.train.methods.pairs import (PairTerms, check_pairs, describe_nll, pair_batches, pair_header, pair_objective, preference_flags, reference_free_flags)


@dataclass(frozen=True)
class ORPO:
    """ORPO on pairs, no reference; its NLL(chosen) term always has weight 1."""
    beta: float
    aux_coef: float = 0.0
    prefix_sharing: Optional[bool] = None
    name = "orpo"
    head = "causal_lm"
    rows = "preference"
    default_loss_scale = "default"
    needs_reference = False
    nll_weight = 1.0
    ld_alpha = None

    @classmethod
    def from_args(cls, args, problems: list) -> "ORPO":
        """beta (λ, default 0.1); --loss_type is ignored with a note (ORPO has one loss)."""
        if args.loss_type:
            note("--rlhf_type orpo has one loss (NLL + the odds-ratio term); --loss_type is ignored")
        beta, _ = preference_flags(args, problems, ("orpo",), "orpo", types=["orpo"])
        reference_free_flags(args)
        return cls(beta, args.router_aux_loss_coef or 0.0, args.prefix_sharing)

    def resolved_flags(self) -> dict:
        """beta, the fixed loss type orpo, rpo_alpha cleared (DPO only), for args.json."""
        return {"beta": self.beta, "loss_type": ["orpo"], "rpo_alpha": None}

    def shape_records(self, loaded):
        """Every row must be a pair (DataError at the first that is not)."""
        return check_pairs(loaded)

    def batches(self, cfg, prepared, model, reference):
        """Pairs, prefix-shared or as two sequences, padded/flat/packed; no reference."""
        return pair_batches(cfg, prepared, model, None, self.prefix_sharing, False)

    def pair_terms(self, c, r, n_c, n_r, ref) -> PairTerms:
        """−λ log σ(log OR) per pair on averaged log-probs ℓ̄ = ℓ/|y|; rewards β·ℓ̄; log odds logged. [B] each."""
        import torch

        from tunesmith.train.ops import losses as L

        avg_c, avg_r = c / n_c, r / n_r
        log_odds = L.orpo_log_odds(avg_c, avg_r).detach()
        extra = {"log_odds_ratio": float(torch.nn.functional.logsigmoid(log_odds).sum()),
                 "log_odds_chosen": float(log_odds.sum())}
        return PairTerms(L.orpo(avg_c, avg_r, self.beta), self.beta * avg_c.detach(), self.beta * avg_r.detach(),
                         avg_c, avg_r, extra)

    def objective(self, reference, cfg) -> loop.Objective:
        """The pair objective: mean odds-ratio term per pair + NLL per chosen token."""
        return pair_objective(self, reference, cfg.optim)

    def describe(self) -> str:
        """The loss as the log shows it: `ORPO odds-ratio term (λ=β=0.1) + NLL(chosen) [logged as nll_loss]`."""
        return describe_nll(f"ORPO odds-ratio term (λ=β={self.beta:g})", self.nll_weight)

    def header(self, prepared, batches) -> str:
        """The run's header lines: the loss, the reference (none), the pairs."""
        return pair_header(self, prepared, batches)
