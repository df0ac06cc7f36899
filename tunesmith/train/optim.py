"""The optimiser and its learning-rate schedule, built from the optimisation slice (config.OptimConfig): AdamW (or
SGD, or bitsandbytes' 8-bit/paged AdamW) without weight decay on 1-D parameters — or ms-swift's optimiser plugins
(--optimizer, --lorap_lr_ratio, --use_galore: train/knobs/) —, and transformers' schedule over the run's optimiser
steps. The loop (train/loop.py) builds both once, in `prepare_run`."""
from __future__ import annotations

import math

from tunesmith.errors import TunesmithError
from tunesmith.train.param_groups import decay_groups


ADAMW = ("adamw_torch", "adamw", "adamw_hf", "adamw_torch_fused")


def optimizer_plugin(optim) -> str:
    """ms-swift's optimiser plugin for the optimisation slice: --optimizer when given, else lorap for
    --lorap_lr_ratio, galore for --use_galore, else default (ms-swift's SftArguments.__post_init__ rule)."""
    if optim.optimizer and optim.optimizer != "default":
        return optim.optimizer
    if optim.lorap_lr_ratio:
        return "lorap"
    if optim.vit_lr is not None or optim.aligner_lr is not None:
        return "multimodal"
    return "galore" if optim.use_galore else "default"


def optimizer_class(optim) -> tuple:
    """(optimiser class, its keyword arguments) for --optim: torch's AdamW (fused when asked, on a GPU), SGD, or
    a bitsandbytes 8-bit/paged AdamW. Raises TunesmithError when bitsandbytes is missing."""
    import torch

    lr, betas, eps = optim.learning_rate, (optim.adam_beta1, optim.adam_beta2), optim.adam_epsilon
    name = optim.optim
    if name in ADAMW:
        fused = name == "adamw_torch_fused" and torch.cuda.is_available()
        return torch.optim.AdamW, {"lr": lr, "betas": betas, "eps": eps, "fused": fused or None}
    if name == "sgd":
        return torch.optim.SGD, {"lr": lr}
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TunesmithError(f"--optim {name} needs bitsandbytes: pip install 'tunesmith[qlora]'") from None
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "adamw_bnb_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls, {"lr": lr, "betas": betas, "eps": eps}


def build_optimizer(model, optim, drop_empty_groups: bool = False):
    """The optimiser over the trainable parameters (optimisation slice): --optim (AdamW, SGD or a bitsandbytes
    8-bit/paged AdamW) without weight decay on biases, norms and other 1-D parameters; or ms-swift's plugin
    (`optimizer_plugin`): LoRA+ (knobs/lorap.py), GaLore (knobs/galore.py), Muon with AdamW (knobs/muon.py).
    drop_empty_groups: DeepSpeed drops empty groups itself, and the schedule must see the same groups. Raises
    TunesmithError when nothing is trainable or a needed package is missing."""
    plugin = optimizer_plugin(optim)
    if plugin == "muon":
        from tunesmith.train.knobs.muon import muon_optimizer

        return muon_optimizer(model, optim)
    if plugin == "lorap":
        from tunesmith.train.knobs.lorap import lorap_optimizer

        decay_groups(model, optim.weight_decay)  # something to train
        opt = lorap_optimizer(model, *optimizer_class(optim), optim)
    elif plugin == "multimodal":
        from tunesmith.train.knobs.vision_lr import vision_lr_optimizer

        opt = vision_lr_optimizer(model, *optimizer_class(optim), optim)
    elif plugin == "galore":
        from tunesmith.train.knobs.galore import galore_optimizer

        opt = galore_optimizer(model, optim)
    else:
        cls, kwargs = optimizer_class(optim)
        opt = cls(decay_groups(model, optim.weight_decay), **kwargs)
    if drop_empty_groups:
        opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
    return opt


def schedule_shape(kind: str, kwargs, warmup_steps: int, warmup_ratio: float, total_steps: int) -> tuple:
    """(--lr_scheduler_type, its kwargs, warm-up steps) of a schedule over `total_steps` optimiser steps: --warmup_steps,
    or --warmup_ratio of the steps rounded up; cosine_with_min_lr's floor defaults to 0.1 of the rate. What
    `build_scheduler` builds, and what a resume compares with the checkpoint's (checkpoint.resume_schedule)."""
    warmup = warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)
    kwargs = dict(kwargs or {})
    if kind == "cosine_with_min_lr" and not kwargs:
        kwargs = {"min_lr_rate": 0.1}
    return kind, kwargs, warmup


def build_scheduler(optimizer, optim, total_steps: int):
    """transformers' schedule --lr_scheduler_type over `total_steps` optimiser steps, warming up for --warmup_steps
    (or --warmup_ratio of the steps, rounded up)."""
    from transformers import get_scheduler

    kind, kwargs, warmup = schedule_shape(optim.lr_scheduler_type, optim.lr_scheduler_kwargs, optim.warmup_steps,
                                          optim.warmup_ratio, total_steps)
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=kwargs or None)


def move_schedule_to(scheduler, step: int) -> None:
    """Put the schedule at optimiser step `step` of its own curve and give its optimiser that step's rates (base rate
    times the schedule's factor at `step`, computed as the step that reaches it computes them): the state an
    uninterrupted run with this schedule has after `step` steps, whatever curve the loaded state came from."""
    scheduler.last_epoch = step - 1
    scheduler.step()
