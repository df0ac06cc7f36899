"""Log-probabilities of the trained tokens: the one place where training turns hidden states into logits.

SFT's cross-entropy is −Σ log p(label) and DPO's sequence log-probs are sums of the same per-token values, so both
objectives call `token_logps`. Two exact paths:

- plain: the model's own forward returns logits [batch, tokens, vocabulary]; only the trained positions are turned
  into float32 log-softmax.
- chunked (used whenever the model allows it): the decoder returns its last hidden states, and only the trained
  positions meet the output embedding, `chunk` tokens at a time, inside a custom autograd function that recomputes
  each chunk's logits in the backward pass. No [tokens × vocabulary] tensor larger than one chunk ever exists,
  forward or backward, and the prompt's positions never get logits at all.

Packed batches (several sequences in one row, `position_ids` restarting at 0) carry `seq_ids`, the sequence each
position belongs to; the log-probs are attributed per sequence from it.

Prefix-shared preference batches (train/preference.py) lay a pair out as [prompt, chosen, rejected] in one row. Two
things then differ from a plain causal row, and both are described by the batch, never guessed here:
- `label_src[b, t]`: the position whose hidden state predicts the token at t. It is t − 1 except for the first
  rejected token, which is predicted from the prompt's last position.
- `attn_group` / `attn_part`: which pair each position belongs to and whether it is prompt (0), chosen (1) or
  rejected (2); `prefix_sharing_mask` turns them into the 4D mask (rejected never sees chosen) in the format the
  model's attention implementation expects.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from tunesmith.data.encode import IGNORE
from tunesmith.models.head import chunked_head, hidden_states_head, zero3_gather
from tunesmith.models.load import unwrap_model

# floats per chunk of logits: 2^25 × 4 bytes = 128 MiB whatever the vocabulary size (220 rows at Qwen's 151,936).
# Each chunk reads the whole output weight, so a chunk must be large enough to pay for that read: at 27 rows
# (16 MiB) the real-vocabulary head ran 2.2x slower than at 256 (bench/head_breakdown.py, RESULTS.md), while the
# full logits of one 8,192-token gpt-oss row would be 6.6 GB
CHUNK_FLOATS = 1 << 25


@dataclass
class TokenLogps:
    logps: torch.Tensor        # [N] log p(label) at each trained position, row-major order
    rows: torch.Tensor         # [N] which sequence (batch row, or packed segment) each position belongs to
    n_seq: int                 # number of sequences
    correct: torch.Tensor      # [N] argmax == label (no gradient)
    logits_mean: torch.Tensor  # [N] the vocabulary-mean logit (no gradient; DPO's logits/* metrics)
    aux_loss: Any = None       # MoE router loss from the plain path
    entropy: Optional[torch.Tensor] = None  # [N] nats, H(softmax(logits / T)), no gradient; only when asked (GRPO)


def _entropy(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Shannon entropy [n] (nats, float32) of softmax(logits) for logits [n, V] (float32) whose logsumexp is lse
    [n]: H = −Σ p·log p with log p = logits − lse (TRL's and ms-swift's entropy_from_logits). log p is clamped to the
    float32 minimum so that a −inf logit contributes 0, not NaN."""
    logp = (logits - lse[:, None]).clamp_(min=torch.finfo(torch.float32).min)
    return -(logp.exp().mul_(logp)).sum(-1)


class ChunkedLogps(torch.autograd.Function):
    """log softmax(h Wᵀ)[target] for rows of h, chunk by chunk, with the logits recomputed in backward; with
    `entropy`, also each row's entropy from the same chunk's logits (no gradient; otherwise an empty tensor)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, entropy: bool = False, gather=None):
        ctx.gather = gather  # ZeRO-3: a context that gathers the partitioned weight, in forward and in backward
        with gather() if gather is not None else contextlib.nullcontext():
            return ChunkedLogps._forward(ctx, hidden, weight, targets, chunk, entropy)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk: int, entropy: bool):
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        mean = torch.empty_like(logps)
        ent = torch.empty(n if entropy else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            t = targets[s:s + chunk]
            logps[s:s + chunk] = logits.gather(-1, t[:, None]).squeeze(-1) - lse[s:s + chunk]
            correct[s:s + chunk] = logits.argmax(-1) == t
            mean[s:s + chunk] = logits.mean(-1)
            if entropy:
                ent[s:s + chunk] = _entropy(logits, lse[s:s + chunk])
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(correct, mean, ent)
        return logps, correct, mean, ent

    @staticmethod
    def backward(ctx, grad_logps, _grad_correct, _grad_mean, _grad_entropy):
        with ctx.gather() if ctx.gather is not None else contextlib.nullcontext():
            return ChunkedLogps._backward(ctx, grad_logps)

    @staticmethod
    def _backward(ctx, grad_logps):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            logits = (h @ weight.t()).float()
            g_out = grad_logps[s:s + chunk].float()
            # d log p(t) / d logits = onehot(t) − softmax
            g = torch.exp(logits - lse[s:s + chunk, None]).mul_(-g_out[:, None])
            g.scatter_add_(-1, targets[s:s + chunk, None], g_out[:, None])
            if want_h:
                grad_h[s:s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_w:
                grad_w += g.t() @ h.float()
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None, None, None


SHARED_PREFIX_ATTENTION = ("sdpa", "eager")  # implementations that take an arbitrary 4D mask


def _attention_kinds(config) -> Optional[dict]:
    """{layer kind: sliding window or None} for the layer kinds this model has, or None when some layer kind cannot
    be expressed as a dense mask (chunked or linear attention)."""
    kinds = set(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if not kinds:  # older configs: one kind for every layer
        use = getattr(config, "use_sliding_window", True)
        return {"full_attention": window if (window and use) else None}
    if not kinds <= {"full_attention", "sliding_attention"}:
        return None
    return {k: (window if k == "sliding_attention" else None) for k in kinds}


def prefix_sharing_support(model) -> Optional[str]:
    """None when prefix-shared batches are exact for this model, else the reason they are not."""
    cfg = unwrap_model(model).config
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in SHARED_PREFIX_ATTENTION:
        return f"--attn_impl {impl} takes no arbitrary attention mask (sdpa and eager do)"
    if _attention_kinds(cfg) is None:
        return f"layer types {sorted(set(cfg.layer_types))} cannot take a dense mask"
    return None


def prefix_sharing_mask(batch: dict, config, dtype):
    """The attention mask of a prefix-shared batch: position i sees j when both are in the same pair, j comes first,
    and i is not rejected while j is chosen (each position always sees itself, so padding rows stay finite). For
    sliding-window layers the window is measured in position ids, as it would be in the two separate sequences.
    Boolean (True = attend) for sdpa, additive float for eager; a {layer kind: mask} dict when kinds differ."""
    import torch

    group, part, pos = batch["attn_group"], batch["attn_part"], batch["position_ids"]
    t = group.shape[1]
    idx = torch.arange(t, device=group.device)
    allowed = (group[:, :, None] == group[:, None, :]) & (idx[None, :, None] >= idx[None, None, :])
    allowed &= ~((part[:, :, None] == 2) & (part[:, None, :] == 1))
    allowed |= torch.eye(t, dtype=torch.bool, device=group.device)[None]
    kinds = _attention_kinds(config)
    eager = (getattr(config, "_attn_implementation", None) or "eager") == "eager"
    masks = {}
    for kind, window in kinds.items():
        m = allowed
        if window:
            m = m & ((pos[:, :, None] - pos[:, None, :]) < window)
        m = m[:, None]  # [batch, 1 (heads), query, key]
        if eager:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)
        masks[kind] = m
    return next(iter(masks.values())) if len(masks) == 1 else masks


def _inputs(batch: dict, model) -> dict:
    kw = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attn_group" in batch:
        inner = getattr(model, "module", model)  # under DDP / DeepSpeed: the wrapped model holds the config
        dtype = inner.get_input_embeddings().weight.dtype  # the activations' dtype, also under 4-bit weights
        kw["attention_mask"] = prefix_sharing_mask(batch, inner.config, dtype)
    elif batch.get("attention_mask") is not None:
        kw["attention_mask"] = batch["attention_mask"]
    if batch.get("position_ids") is not None:
        kw["position_ids"] = batch["position_ids"]
    return kw


def token_logps(model, batch: dict, chunked: Optional[bool] = None, temperature: float = 1.0,
                entropy: bool = False) -> TokenLogps:
    """Log-probs of every trained (label != -100) position of the batch; chunked unless told or unable.
    temperature: of the distribution the tokens were sampled from (GRPO): log softmax(logits / T), as TRL's and
    ms-swift's GRPOTrainer (the hidden state is divided, never the [V, H] output weight).
    entropy: also `TokenLogps.entropy` [N], H(softmax(logits / T)) in nats at each trained position, without
    gradient, from the same forward and still `chunk` rows at a time (GRPO's entropy metrics and
    --top_entropy_quantile, TRL's entropy_from_logits); off, nothing extra is computed."""
    labels = batch["labels"]
    b, t = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    t = t + 1                                       # the trained positions, row-major
    target = labels[b, t]
    src = batch["label_src"][b, t] if "label_src" in batch else t - 1
    if "seq_ids" in batch:
        rows, n_seq = batch["seq_ids"][b, t], int(batch["n_seq"])
    else:
        rows, n_seq = b, labels.shape[0]
    parts = chunked_head(model) if chunked is not False else None
    aux, weight = None, None
    if parts is not None:
        decoder, weight = parts
        out = decoder(**_inputs(batch, decoder))
        last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    elif chunked is not False and (weight := hidden_states_head(model)) is not None:
        # through the wrapper's own forward (DDP's and DeepSpeed's hooks hold; an MoE model returns its router
        # loss), asking for the last hidden states and the logits of one position only
        out = model(**_inputs(batch, model), logits_to_keep=1, output_hidden_states=True)
        last, aux = out.hidden_states[-1], getattr(out, "aux_loss", None)
        # FSDP2 swaps the whole weight in for the forward and keeps it until the backward (the outer unit is not
        # re-sharded after its forward): read it again, so that the product and its gradient use the gathered one
        weight = unwrap_model(model).get_output_embeddings().weight
        if hasattr(weight, "full_tensor"):  # still sharded (a frozen head: gathering it changes no gradient)
            if weight.requires_grad:
                raise RuntimeError("FSDP re-sharded the trained output layer after the forward pass; the outer "
                                   "unit must keep it gathered (distributed.shard_model)")
            weight = weight.full_tensor()
    if weight is not None:
        hidden = last[b, src]
        if temperature != 1.0:
            hidden = hidden / temperature
        vocab = weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]
        chunk = max(1, CHUNK_FLOATS // vocab)
        logps, correct, mean, ent = ChunkedLogps.apply(hidden, weight, target, chunk, entropy, zero3_gather(weight))
        return TokenLogps(logps, rows, n_seq, correct, mean, aux, entropy=ent if entropy else None)
    out = model(**_inputs(batch, model))
    picked = out.logits[b, src].float() / temperature
    lse = torch.logsumexp(picked, -1)
    logps = picked.gather(-1, target[:, None]).squeeze(-1) - lse
    ent = None
    with torch.no_grad():
        correct, mean = picked.argmax(-1) == target, picked.mean(-1)
        if entropy:
            chunk = max(1, CHUNK_FLOATS // picked.shape[-1])
            ent = torch.cat([_entropy(picked[s:s + chunk], lse[s:s + chunk])
                             for s in range(0, picked.shape[0], chunk)]) if picked.shape[0] else lse.detach()
    return TokenLogps(logps, rows, n_seq, correct, mean, getattr(out, "aux_loss", None), ent)
