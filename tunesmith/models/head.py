"""The output head as the chunked log-prob path sees it: whether the (decoder, output weight) pair can be used directly, through the model's own forward, or gathered from DeepSpeed ZeRO-3."""
from __future__ import annotations

import torch
from tunesmith.models.load import unwrap_model


def chunked_head(model):
    """(decoder, output-embedding weight) when the chunked path is exact for this model, else None.

    It needs a plain Linear head without bias, no logit soft-capping or scaling, no MoE router loss to return, and
    a model that is not wrapped for data parallelism (calling the decoder directly would bypass DDP's hooks and
    FSDP2's gathering of the outer unit's weights), and an output weight that is not partitioned by ZeRO-3."""
    from torch.distributed.fsdp import FSDPModule

    if hasattr(model, "module") or isinstance(model, FSDPModule):
        return None
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    cfg = getattr(base, "config", None)
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if type(head) is not torch.nn.Linear or head.bias is not None or decoder is None or cfg is None:
        return None
    if hasattr(head.weight, "ds_id"):  # partitioned by DeepSpeed ZeRO-3: only the module's own forward gathers it
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) \
            or getattr(cfg, "output_router_logits", False):
        return None
    return decoder, head.weight


def hidden_states_head(model):
    """The output-embedding weight when the chunked product is exact through the model's own forward (a DDP or
    DeepSpeed wrapper, or an MoE model that must return its router loss), else None: a plain Linear head without
    bias, soft-capping or scaling, a forward that takes `logits_to_keep` (transformers computes the logits of the
    kept positions only) and returns hidden states whose last entry is the decoder's final (normed) output (also
    FSDP2's outer unit, which gathers the weight for its forward), and
    — when ZeRO-3 partitions the weight — a frozen head (LoRA), which `zero3_gather` gathers for each product."""
    import inspect

    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    cfg = getattr(base, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or cfg is None:
        return None
    if hasattr(head.weight, "ds_id") and head.weight.requires_grad:  # ZeRO-3 with a trained head: the plain path
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    inner = getattr(base, "get_base_model", lambda: base)()  # under peft: the transformers model's own forward
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return None
    return head.weight


def zero3_gather(weight):
    """For a weight DeepSpeed ZeRO-3 partitions: a callable giving a context in which every rank holds it whole
    (deepspeed.zero.GatheredParameters, read-only), for ChunkedLogps' forward and backward; None otherwise."""
    if not hasattr(weight, "ds_id"):
        return None
    import deepspeed

    return lambda: deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
