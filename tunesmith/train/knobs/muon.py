"""Muon (`--optimizer muon`): orthogonalised momentum for the 2-D hidden weights, AdamW for everything else.

Jordan et al. 2024 (Muon: MomentUm Orthogonalized by Newton-Schulz) and Liu et al. 2025, "Muon is Scalable for LLM
Training" (arXiv:2502.16982), which ms-swift's MuonOptimizerCallback uses (MoonshotAI/Moonlight's Muon): each 2-D
hidden weight's update is the Newton–Schulz orthogonalisation of its Nesterov momentum, O ≈ UVᵀ for M = USVᵀ (all
singular values ≈ 1), scaled by 0.2·sqrt(max(A, B)) so that its RMS matches AdamW's (eq. 4: the same
--learning_rate and --weight_decay serve both); the input embedding, the output layer and every 1-D parameter take
AdamW, as in the paper. The Muon half is torch.optim.Muon (adjust_lr_fn "match_rms_adamw"); --optim_args sets its
momentum, ns_steps and nesterov (ms-swift's spelling: "momentum=0.95,ns_steps=5,nesterov=true").
"""
from __future__ import annotations

from typing import Any

import torch

from tunesmith.errors import ConfigError

MUON_ARGS = {"momentum": float, "ns_steps": int, "nesterov": lambda v: v.strip().lower() in ("1", "true", "yes")}


def muon_args(text) -> dict:
    """--optim_args "k=v,k=v" as Muon's keyword arguments (momentum float, ns_steps int, nesterov bool). Raises
    ConfigError for another key or a value of the wrong type."""
    out: dict[str, Any] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in MUON_ARGS or not value:
            raise ConfigError(f"--optim_args {text}: {item!r} is not one of Muon's settings "
                              f"({', '.join(k + '=...' for k in MUON_ARGS)})")
        try:
            out[key] = MUON_ARGS[key](value)
        except ValueError:
            raise ConfigError(f"--optim_args {text}: {key}={value} is not a number") from None
    return out


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over the 2-D hidden weights and torch.optim.AdamW over the rest, as one optimiser: its
    param_groups are the two optimisers' own (Muon's first), so the learning-rate schedule moves both; step,
    zero_grad, state_dict and load_state_dict go to both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.parts = {"muon": muon, "adamw": adamw}
        super().__init__([p for o in self.parts.values() for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in self.parts.values() for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        """One step of both (a closure is evaluated once)."""
        loss = closure() if closure is not None else None
        for opt in self.parts.values():
            opt.step()
        return loss

    def state_dict(self) -> dict:
        """{"muon": Muon's state_dict, "adamw": AdamW's}."""
        return {k: o.state_dict() for k, o in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Both halves' states, as `state_dict` wrote them."""
        for k, o in self.parts.items():
            o.load_state_dict(state_dict[k])
        self.param_groups = [g for o in self.parts.values() for g in o.param_groups]

    @property
    def muon_params(self) -> list:
        """The weights Muon steps."""
        return [p for g in self.parts["muon"].param_groups for p in g["params"]]


def muon_optimizer(model, optim) -> MuonWithAdamW:
    """Muon (match_rms_adamw, --learning_rate, --weight_decay, --optim_args) over the trainable 2-D weights but the
    input and output embeddings; AdamW (--adam_beta1/2, --adam_epsilon; no decay on 1-D parameters) over the rest."""
    from tunesmith.train.param_groups import decay_groups

    embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None}
    hidden = [p for p in model.parameters() if p.requires_grad and p.ndim == 2 and id(p) not in embeddings]
    rest = decay_groups(model, optim.weight_decay, skip={id(p) for p in hidden})
    lr = optim.learning_rate
    muon = torch.optim.Muon([{"params": hidden}] if hidden else [{"params": []}], lr=lr,
                            weight_decay=optim.weight_decay, adjust_lr_fn="match_rms_adamw",
                            **muon_args(optim.optim_args))
    adamw = torch.optim.AdamW(rest, lr=lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon)
    return MuonWithAdamW(muon, adamw)
