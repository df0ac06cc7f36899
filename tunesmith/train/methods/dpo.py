"""The DPO method (`tunesmith rlhf --rlhf_type dpo`, `tunesmith dpo`): Direct Preference Optimization
(Rafailov et al. 2023, arXiv:2305.18290) and its loss variants (--loss_type, several mixed with --loss_weights;
the formulas are in losses.py), with LD-DPO (--ld_alpha) and RPO's NLL term (--rpo_alpha, or the `sft` type).

Against a reference: the adapter switched off, a frozen SFT adapter, or a frozen model (train/reference.py). What
the pair methods share (collation, the objective's statistics) is in pairs.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tunesmith.train import loop
from tunesmith.config.checks import between
from tunesmith.train.methods.pairs import (PairTerms, check_pairs, describe_nll, pair_batches, pair_header, pair_objective, preference_flags)


@dataclass(frozen=True)
class DPO:
    """DPO and its variants on pairs, with a reference; the last assistant turn is trained by default."""
    beta: float
    loss_types: tuple
    loss_weights: tuple
    label_smoothing: float = 0.0
    rpo_alpha: Optional[float] = None
    ld_alpha: Optional[float] = None
    discopop_tau: float = 0.05
    aux_coef: float = 0.0
    prefix_sharing: Optional[bool] = None
    precompute_ref_log_probs: bool = False
    ref_model: Optional[str] = None
    ref_adapters: tuple = ()
    name = "dpo"
    head = "causal_lm"
    rows = "preference"
    default_loss_scale = "last_round"
    needs_reference = True

    @classmethod
    def from_args(cls, args, problems: list) -> "DPO":
        """beta (default 0.1), the loss types (default sigmoid) and weights, checked; problems are appended."""
        from tunesmith.train.ops.losses import DPO_LOSS_TYPES

        beta, types = preference_flags(args, problems, DPO_LOSS_TYPES, "sigmoid")
        eps = args.label_smoothing
        if "exo_pair" in types:
            if not 0 < eps < 1:
                problems.append(f"--label_smoothing {eps}: exo_pair needs 0 < label_smoothing < 1 (1e-3 is the "
                                f"usual value)")
        else:  # the probability that a label is flipped (cDPO, robust): below one half, or the labels mean nothing
            between(problems, "label_smoothing", eps, 0, 0.5, hi_open=True)
        if args.rpo_alpha is not None:
            between(problems, "rpo_alpha", args.rpo_alpha, 0, None)
        if args.ld_alpha is not None:
            between(problems, "ld_alpha", args.ld_alpha, 0, 1)
        if "discopop" in types:
            between(problems, "discopop_tau", args.discopop_tau, 0, None, lo_open=True, hint="0.05 is the usual value")
        return cls(beta, tuple(types), tuple(args.loss_weights or [1.0] * len(types)), eps, args.rpo_alpha,
                   args.ld_alpha, args.discopop_tau, args.router_aux_loss_coef or 0.0, args.prefix_sharing,
                   args.precompute_ref_log_probs, args.ref_model, tuple(args.ref_adapters))

    def resolved_flags(self) -> dict:
        """beta and the loss types as resolved (defaults filled), for args.json."""
        return {"beta": self.beta, "loss_type": list(self.loss_types)}

    @property
    def nll_weight(self) -> float:
        """The weight of NLL(chosen): --rpo_alpha plus the weight of an `sft` loss type (0: no hidden SFT term)."""
        return (self.rpo_alpha or 0.0) + sum(w for t, w in zip(self.loss_types, self.loss_weights) if t == "sft")

    def shape_records(self, loaded):
        """Every row must be a pair (DataError at the first that is not)."""
        return check_pairs(loaded)

    def batches(self, cfg, prepared, model, reference):
        """Pairs, prefix-shared or as two sequences, padded/flat/packed; with --precompute_ref_log_probs the
        reference log-probs are computed once first."""
        return pair_batches(cfg, prepared, model, reference, self.prefix_sharing, self.precompute_ref_log_probs)

    def pair_terms(self, c, r, n_c, n_r, ref) -> PairTerms:
        """The weighted sum of the chosen variants per pair; rewards β(ℓ − ℓ_ref). c, r, n_c, n_r: [B]; ref: [2B]."""
        import torch

        from tunesmith.train.ops import losses as L

        b = c.shape[0]
        rc, rr = ref[:b], ref[b:]
        loss = torch.zeros_like(c)
        for t, w in zip(self.loss_types, self.loss_weights):
            if t != "sft":
                loss = loss + w * L.dpo_loss(t, chosen=c, rejected=r, ref_chosen=rc, ref_rejected=rr, chosen_len=n_c,
                                             rejected_len=n_r, beta=self.beta, label_smoothing=self.label_smoothing,
                                             discopop_tau=self.discopop_tau)
        return PairTerms(loss, self.beta * (c - rc).detach(), self.beta * (r - rr).detach(), c, r, {})

    def objective(self, reference, cfg) -> loop.Objective:
        """The pair objective: mean loss per pair (+ the NLL per chosen token when weighted in)."""
        return pair_objective(self, reference, cfg.optim)

    def describe(self) -> str:
        """The loss as the log shows it, e.g. `sigmoid (β=0.1) + NLL(chosen) [logged as nll_loss]`."""
        terms = [f"{w:g}·{t}" if w != 1 else t for t, w in zip(self.loss_types, self.loss_weights) if t != "sft"]
        text = " + ".join(terms) + f" (β={self.beta:g}"
        if self.label_smoothing:
            text += f", label_smoothing={self.label_smoothing:g}"
        if self.ld_alpha is not None:
            text += f", ld_alpha={self.ld_alpha:g}"
        return describe_nll(text + ")", self.nll_weight)

    def header(self, prepared, batches) -> str:
        """The run's header lines: the loss, the reference, the pairs."""
        return pair_header(self, prepared, batches)
