"""Partial full fine-tuning (`--train_type full` with --freeze_parameters, --freeze_parameters_regex,
--freeze_parameters_ratio, --trainable_parameters, --trainable_parameters_regex).

ms-swift's order (swift/utils/transformers_utils.py: freeze_parameters, then activate_parameters): every parameter
starts trainable; the first --freeze_parameters_ratio of the parameters' elements, counted in the model's parameter
order (embeddings first, then the layers bottom up), is frozen — the parameters before the one at which the count
passes the ratio —; then the parameters whose names start with a --freeze_parameters prefix or match
--freeze_parameters_regex (re.search); finally those whose names start with a --trainable_parameters prefix or
match --trainable_parameters_regex are made trainable again.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from itertools import accumulate

from tunesmith.log import note


def frozen_by_ratio(sizes: list[int], ratio: float) -> int:
    """How many of the first parameters (element counts `sizes`, in order) the ratio freezes: ms-swift's
    bisect_right(cumulative sizes, int(total × ratio))."""
    if ratio <= 0:
        return 0
    return bisect_right(list(accumulate(sizes)), int(sum(sizes) * ratio))


def apply_freezing(model, knobs) -> None:
    """Set requires_grad on `model`'s parameters as the flags say (model slice `knobs`), in place; a
    --trainable_parameters prefix or regex that matches nothing is noted."""
    params = list(model.named_parameters())
    n_ratio = frozen_by_ratio([p.numel() for _, p in params], knobs.freeze_parameters_ratio)
    freeze_re = re.compile(knobs.freeze_parameters_regex) if knobs.freeze_parameters_regex else None
    train_re = re.compile(knobs.trainable_parameters_regex) if knobs.trainable_parameters_regex else None
    activated = False
    for i, (name, p) in enumerate(params):
        if i < n_ratio or any(name.startswith(x) for x in knobs.freeze_parameters) or \
                (freeze_re is not None and freeze_re.search(name)):
            p.requires_grad_(False)
        if any(name.startswith(x) for x in knobs.trainable_parameters) or \
                (train_re is not None and train_re.search(name)):
            p.requires_grad_(True)
            activated = True
    if (knobs.trainable_parameters or train_re is not None) and not activated:
        note("--trainable_parameters/--trainable_parameters_regex: no parameter name matches, so nothing was made "
             "trainable again")
