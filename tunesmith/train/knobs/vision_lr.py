"""ms-swift's multimodal optimiser (--vit_lr, --aligner_lr; --optimizer multimodal): a vision-language model's
vision tower, aligner and language model (with anything else trained) stepped at their own learning rates, each
split into decay / no-decay groups as every tunesmith optimiser (swift/optimizers/multimodal.py).
"""
from __future__ import annotations

from tunesmith.errors import ConfigError
from tunesmith.log import note


def vision_lr_optimizer(model, cls, kwargs: dict, optim):
    """The optimiser `cls(**kwargs)` over three learning rates: --vit_lr (vision tower), --aligner_lr (aligner),
    --learning_rate (the rest); an unset one is --learning_rate. Raises ConfigError for a model that is not a
    supported vision-language model."""
    from tunesmith.models.load import unwrap_model
    from tunesmith.models.vision import PARTS, part_of
    from tunesmith.train.param_groups import decay_groups

    base = unwrap_model(model)
    kind = getattr(getattr(base, "config", None), "model_type", None)
    if kind not in PARTS:
        raise ConfigError(f"--vit_lr / --aligner_lr / --optimizer multimodal: {kind} is not a vision-language model "
                          f"(they set the vision tower's and aligner's learning rates)")
    lr = optim.learning_rate
    rates = {"vision_tower": lr if optim.vit_lr is None else optim.vit_lr,
             "aligner": lr if optim.aligner_lr is None else optim.aligner_lr}
    where = {id(p): part_of(n, PARTS[kind]) for n, p in model.named_parameters()}
    groups = []
    for g in decay_groups(model, optim.weight_decay):
        for part in ("vision_tower", "aligner", None):
            params = [p for p in g["params"] if (where[id(p)] == part if part else where[id(p)] not in rates)]
            if params:
                groups.append({**g, "params": params, "lr": rates.get(part, lr)})
    note(f"learning rates: vision tower {rates['vision_tower']}, aligner {rates['aligner']}, language model {lr}")
    return cls(groups, **kwargs)
