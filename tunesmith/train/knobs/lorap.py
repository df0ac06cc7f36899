"""LoRA+ (`--lorap_lr_ratio`): the LoRA B matrices learn faster than the A matrices.

Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models" (arXiv:2402.12354): with
η_B = λ·η_A (λ ≫ 1, 16 is their usual ratio) the adapter's features learn efficiently at large widths. The groups
are peft's `create_loraplus_optimizer` (as ms-swift's `create_optimizer_param_groups`): A matrices and other 2-D
weights at --learning_rate, B matrices and 1-D parameters at --learning_rate × ratio, LoRA embeddings at 1e-6
(ms-swift's lorap_emb_lr); weight decay as --weight_decay on all but the B group's no-decay parameters.
"""
from __future__ import annotations

LORAP_EMBEDDING_LR = 1e-6  # ms-swift's LoRAConfig.lorap_emb_lr default


def lorap_optimizer(model, cls, kwargs: dict, optim):
    """The --optim class `cls` (with `kwargs`) over peft's LoRA+ groups of `model` (a peft model): group 0 at
    --learning_rate (A), the last two at --learning_rate × --lorap_lr_ratio (B). The schedule scales every group's
    own rate, so the ratio holds at every step."""
    from peft.optimizers import create_loraplus_optimizer

    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(model, cls, lr=optim.learning_rate, loraplus_lr_ratio=optim.lorap_lr_ratio,
                                     loraplus_weight_decay=optim.weight_decay,
                                     loraplus_lr_embedding=LORAP_EMBEDDING_LR, **kwargs)
