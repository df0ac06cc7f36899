"""What a tuner adds to the training loop beyond its weights: today AdaLoRA's, as ms-swift runs it (its
AdaloraCallback and peft's AdaLoraModel.forward) — explicitly, through the loop's Objective, without subclassing or
patching anything.

- the orthogonality penalty `orth_reg_weight · mean ‖PPᵀ − I‖_F, ‖QᵀQ − I‖_F` added to the loss (peft adds it inside
  AdaLoraModel.forward only when the model computes the loss from labels, which tunesmith's chunked loss never
  asks it to; `orth_penalty`), logged in the loss as ms-swift logs it;
- after every optimiser update, before the gradients are cleared, peft's `update_and_allocate(step)`: the importance
  scores (EMAs of |w · ∂L/∂w|) and the rank budget; the run's step count is set into the adapter's total_step first,
  as ms-swift's callback sets it at on_train_begin (`AdaLoraSteps.update`);
- its state in every checkpoint (the scores and the rank pattern, `AdaLoraSteps.save` / `load`), so a resumed run
  allocates exactly as the uninterrupted one.

`with_tuner(objective, model, train_type)` returns the objective with these attached (the same objective for every
other tuner).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

from tunesmith.errors import FlagError
from tunesmith.train import loop

ADALORA_STATE = "adalora_state.pt"  # in each checkpoint of an AdaLoRA run
_ORTH = "adalora_orth"              # the penalty's loss term: one unit per micro-batch


def with_tuner(objective: loop.Objective, model, train_type: str) -> loop.Objective:
    """`objective` with the tuner's own training steps attached: for --train_type adalora the orthogonality penalty
    as one more loss term, the rank allocation after each update and its state in the checkpoints; unchanged for
    the other tuners. model: the peft model prepare_model built (before any distributed wrapping)."""
    if train_type != "adalora":
        return objective
    steps = AdaLoraSteps(model)
    return dataclasses.replace(objective, loss=partial(_loss_with_penalty, objective.loss, steps),
                               count=partial(_count_with_penalty, objective.count),
                               hooks=tuple(objective.hooks) + (steps,),
                               after_update=tuple(objective.after_update) + (steps.update,))


def _loss_with_penalty(loss, steps: "AdaLoraSteps", model, batch: dict) -> tuple[dict, dict]:
    parts, stats = loss(model, batch)
    return {**parts, _ORTH: orth_penalty(steps.model)}, stats


def _count_with_penalty(count, batch: dict) -> dict:
    # one unit per micro-batch: the loop divides the term by the step's micro-batches over every process, so the
    # step's gradient carries the penalty once, as in ms-swift (each micro-batch's loss / accumulation steps)
    return {**count(batch), _ORTH: 1}


def orth_penalty(model):
    """AdaLoRA's orthogonality regulariser times --adalora_orth_reg_weight: the mean over the adapter's P (lora_A,
    [r, in]) and Q (lora_B, [out, r]) matrices of ‖PPᵀ − I‖_F and ‖QᵀQ − I‖_F, as peft's AdaLoraModel.forward computes
    it (peft/tuners/adalora/model.py) — a scalar tensor on the weights' device."""
    import torch

    weight = model.peft_config["default"].orth_reg_weight
    total, count = None, 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and ".default" in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            term = torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype))
            total, count = (term if total is None else total + term.to(total.device)), count + 1
    if total is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return weight * total / count


@dataclass(frozen=True)
class AdaLoraSteps:
    """AdaLoRA's rank allocation, called by the loop after each update (`update`) and carried by the checkpoints
    (`save`, `load`: a loop.Objective hook). model: the peft model (its AdaLoraModel keeps the scores)."""
    model: Any

    def update(self, model, step: int, total_steps: int) -> None:
        """peft's update_and_allocate(step) for optimiser step `step` (1-based) of `total_steps`, the gradients still
        in place. Raises FlagError when the run is too short for --adalora_tinit and --adalora_tfinal (peft's rule:
        tinit < total_steps − tfinal)."""
        config = self.model.peft_config["default"]
        if config.total_step != total_steps:
            if config.tinit >= total_steps - config.tfinal:
                raise FlagError(f"--adalora_tinit {config.tinit} and --adalora_tfinal {config.tfinal} leave no step "
                                f"of this {total_steps}-step run for AdaLoRA to allocate ranks in (tinit must be below "
                                f"the steps minus tfinal); lower them or train longer")
            config.total_step = total_steps
        self.model.base_model.update_and_allocate(step)

    def begin(self, model, step: int) -> None:
        """Nothing before the first step: the rank allocation runs after each update."""

    def after_step(self, model, step: int) -> None:
        """Nothing: the allocation runs in `update`, before the gradients are cleared."""

    def save(self, path: str) -> None:
        """The importance scores (sensitivity, its EMA, the uncertainty EMA) and the rank pattern, as ADALORA_STATE."""
        import torch

        allocator = self.model.base_model.rankallocator
        torch.save({"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
                    "rank_pattern": self.model.peft_config["default"].rank_pattern},
                   os.path.join(path, ADALORA_STATE))

    def load(self, path: str) -> None:
        """What `save` wrote into the checkpoint folder `path` (nothing when it has no ADALORA_STATE)."""
        import torch

        file = os.path.join(path, ADALORA_STATE)
        if not os.path.isfile(file):
            return
        state = torch.load(file, map_location="cpu", weights_only=False)
        allocator = self.model.base_model.rankallocator
        device = next(self.model.parameters()).device
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {n: t.to(device) for n, t in state[key].items()})
        self.model.peft_config["default"].rank_pattern = state["rank_pattern"]
