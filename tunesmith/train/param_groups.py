"""Which parameters an optimiser steps together: the decay / no-decay groups every optimiser of tunesmith starts
from (train/optim.py and the plugins of train/knobs/), and the names of the 8-bit optimisers."""
from __future__ import annotations

from tunesmith.errors import TunesmithError

EIGHT_BIT = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")  # --optim: bitsandbytes'


def decay_groups(model, weight_decay: float, skip=frozenset()) -> list[dict]:
    """[{params: weights, weight_decay}, {params: biases, norms and other 1-D parameters, weight_decay: 0}] over
    the trainable parameters not in `skip` (ids). Raises TunesmithError when the model has nothing to train."""
    decay, no_decay = [], []
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise TunesmithError("the model has no trainable parameters (check --train_type, --target_modules, "
                             "--target_regex); nothing would be learned")
    for name, p in trainable:
        if id(p) not in skip:
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


