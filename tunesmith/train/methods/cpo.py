"""The CPO method (`tunesmith rlhf --rlhf_type cpo`, and `--rlhf_type simpo`): reference-free preference training.
CPO (Xu et al. 2024, arXiv:2401.08417) with its loss types sigmoid, hinge, ipo, and SimPO (Meng et al. 2024,
arXiv:2405.14734: CPO's simpo loss type, which is what `--rlhf_type simpo` selects, with beta 2.0 by default);
plus cpo_alpha · NLL(chosen). The formulas are in losses.py (`cpo_loss`); what the pair methods share is in
pairs.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tunesmith.train import loop
from tunesmith.config.checks import between
from tunesmith.train.methods.pairs import (PairTerms, check_pairs, describe_nll, pair_batches, pair_header, pair_objective, preference_flags, reference_free_flags)


@dataclass(frozen=True)
class CPO:
    """CPO or SimPO on pairs, no reference; the last assistant turn is trained by default."""
    name: str                 # cpo | simpo (as the run is logged)
    beta: float
    loss_type: str
    cpo_alpha: float = 1.0
    simpo_gamma: float = 1.0
    label_smoothing: float = 0.0
    aux_coef: float = 0.0
    prefix_sharing: Optional[bool] = None
    rows = "preference"
    head = "causal_lm"
    default_loss_scale = "last_round"
    needs_reference = False
    ld_alpha = None

    @classmethod
    def from_args(cls, args, problems: list) -> "CPO":
        """One loss type (default sigmoid; simpo for --rlhf_type simpo), beta (default 0.1; SimPO 2.0)."""
        from tunesmith.train.ops.losses import CPO_LOSS_TYPES

        simpo = args.rlhf_type == "simpo"
        beta, types = preference_flags(args, problems, CPO_LOSS_TYPES, "sigmoid", default_beta=2.0 if simpo else 0.1,
                                       one_type=True, types=["simpo"] if simpo else None)
        reference_free_flags(args)
        between(problems, "label_smoothing", args.label_smoothing, 0, 0.5, hi_open=True)
        between(problems, "cpo_alpha", args.cpo_alpha, 0, None)
        between(problems, "simpo_gamma", args.simpo_gamma, 0, None, hint="the target margin; 0.5-1.5 is usual")
        return cls(args.rlhf_type, beta, types[0], args.cpo_alpha, args.simpo_gamma, args.label_smoothing,
                   args.router_aux_loss_coef or 0.0, args.prefix_sharing)

    def resolved_flags(self) -> dict:
        """beta, the one loss type, and rpo_alpha cleared (DPO only), for args.json."""
        return {"beta": self.beta, "loss_type": [self.loss_type], "rpo_alpha": None}

    @property
    def nll_weight(self) -> float:
        """cpo_alpha: CPO's NLL(chosen) term is part of the method (SimPO's too, as TRL's CPOTrainer has it)."""
        return self.cpo_alpha

    def shape_records(self, loaded):
        """Every row must be a pair (DataError at the first that is not)."""
        return check_pairs(loaded)

    def batches(self, cfg, prepared, model, reference):
        """Pairs, prefix-shared or as two sequences, padded/flat/packed; no reference."""
        return pair_batches(cfg, prepared, model, None, self.prefix_sharing, False)

    def pair_terms(self, c, r, n_c, n_r, ref) -> PairTerms:
        """The variant's loss per pair; rewards β·ℓ (averaged ℓ̄ for ipo/simpo, as TRL logs them). [B] each."""
        from tunesmith.train.ops import losses as L

        loss = L.cpo_loss(self.loss_type, chosen=c, rejected=r, chosen_len=n_c, rejected_len=n_r, beta=self.beta,
                          label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
        shown_c, shown_r = (c / n_c, r / n_r) if self.loss_type in L.CPO_AVERAGED else (c, r)
        return PairTerms(loss, self.beta * shown_c.detach(), self.beta * shown_r.detach(), shown_c, shown_r, {})

    def objective(self, reference, cfg) -> loop.Objective:
        """The pair objective: mean loss per pair + cpo_alpha · NLL per chosen token."""
        return pair_objective(self, reference, cfg.optim)

    def describe(self) -> str:
        """The loss as the log shows it, e.g. `SimPO (β=2, γ=1) + NLL(chosen) [logged as nll_loss]`."""
        name = "SimPO" if self.loss_type == "simpo" else f"CPO ({self.loss_type})"
        text = f"{name} (β={self.beta:g}" + (f", γ={self.simpo_gamma:g}" if self.loss_type == "simpo" else "") + ")"
        return describe_nll(text, self.nll_weight)

    def header(self, prepared, batches) -> str:
        """The run's header lines: the loss, the reference (none), the pairs."""
        return pair_header(self, prepared, batches)
