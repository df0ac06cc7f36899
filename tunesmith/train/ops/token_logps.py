"""Log-probabilities of the trained tokens: the one place where training turns hidden states into logits.

SFT's cross-entropy is −Σ log p(label) and DPO's sequence log-probs are sums of the same per-token values, so both
objectives call `token_logps`. Two exact paths:

- plain: the model's own forward returns logits [batch, tokens, vocabulary]; only the trained positions are turned
  into float32 log-softmax.
- chunked (used whenever the model allows it): the decoder returns its last hidden states, and only the trained
  positions meet the output embedding, `chunk` tokens at a time, inside a custom autograd function that takes each
  chunk's gradient with respect to the hidden states while its logits exist (ChunkedLogps). No [tokens ×
  vocabulary] tensor larger than one chunk ever exists, forward or backward, nothing is recomputed for a frozen
  output layer, and the prompt's positions never get logits at all.

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

# Rows per chunk of the output layer (see chunk_rows). Each chunk's products read the whole [V, H] output weight, so
# a chunk must hold enough rows to pay for that read: at 27 rows (16 MiB of logits) the real-vocabulary head ran
# 2.2x slower than at 256 (bench/head_breakdown.py, RESULTS.md), and in the tall layout (_tall_logits) 128 rows
# still cost 10% more per row than 256 at Qwen's 151,936 x 512-896. Below MIN_CHUNK_ROWS rows the ~10 operations
# per chunk cost more than their arithmetic on small models; above MAX_CHUNK_FLOATS floats (256 MiB of float32
# logits, the one buffer every chunk reuses) a chunk stops paying for its memory.
MIN_CHUNK_ROWS = 256
MAX_CHUNK_FLOATS = 1 << 26
# Chunks of a multiple of this many rows: oneDNN's float32 products run a chunk of 220 rows ~30% slower per row than
# one of 208 or 224 (Qwen's vocabulary, hidden 512 and 896; bench/RESULTS.md, issue #30).
ROW_MULTIPLE = 16


def chunk_rows(vocab: int, hidden: int) -> int:
    """Rows (tokens) per chunk of the chunked output layer for a [vocab, hidden] output weight, at most.

    hidden // 4 rows: a product then does hidden/4 multiply-adds per weight element it reads, and the chunk's
    float32 logits are a quarter of the weight's size (224 rows for Qwen2.5-0.5B, 896 for 7B before the cap);
    at least MIN_CHUNK_ROWS, and at most MAX_CHUNK_FLOATS // vocab (441 rows at Qwen's 151,936); then rounded down
    to a multiple of ROW_MULTIPLE (432 there) when that leaves any; at least 1."""
    rows = max(1, min(max(hidden // 4, MIN_CHUNK_ROWS), MAX_CHUNK_FLOATS // vocab))
    return rows // ROW_MULTIPLE * ROW_MULTIPLE or rows


def even_chunk(n: int, chunk: int) -> int:
    """The step that cuts n rows into as many chunks as `chunk` rows would, of near-equal sizes rounded up to a
    multiple of ROW_MULTIPLE (never above chunk): at chunk 208, 300 rows → 160 + 140 rather than 208 + 92, and 500
    rows → 176 + 176 + 148 rather than 208 + 208 + 84. n ≤ chunk: one chunk of n rows (at least 1)."""
    if n <= chunk:
        return max(n, 1)
    pieces = -(-n // chunk)
    step = -(-n // pieces)
    return min(chunk, -(-step // ROW_MULTIPLE) * ROW_MULTIPLE)


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


ENTROPY_ROWS = 16384  # vocabulary entries per block of the entropy's exp: [16,384 x rows] floats at a time


def _shifted_entropy(shifted: torch.Tensor) -> torch.Tensor:
    """Entropy [n] (nats) of softmax over the columns of shifted = logits − column max [V, n] (float32, one column
    per row of hidden states, as ChunkedLogps lays its logits out): H = log Σe − Σ e·x / Σe with e = exp(x),
    x = shifted, summed ENTROPY_ROWS vocabulary entries at a time so that e never exists whole (the chunk's logits
    stay the only [V, n] buffer). Clamps shifted in place to the float32 minimum, so that a −inf logit adds 0, not
    NaN (exp of it is 0 either way)."""
    shifted.clamp_(min=torch.finfo(torch.float32).min)
    total = shifted.new_zeros(shifted.shape[1])
    dot = shifted.new_zeros(shifted.shape[1])
    for c in range(0, shifted.shape[0], ENTROPY_ROWS):
        x = shifted[c:c + ENTROPY_ROWS]
        e = x.exp()
        total += e.sum(0)
        dot += e.mul_(x).sum(0)
    return total.log() - dot / total


def _tall_logits(weight: torch.Tensor, h: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """The logits of rows h [r, H] under the output weight [V, H] as W hᵀ [V, r] float32 (tall: column i is row i's
    logits), written into the front of buf (≥ V·r floats) and returned as a view of it. On a CPU, oneDNN runs this
    orientation 1.15-1.45x faster than h Wᵀ at 128-256 rows (bench/RESULTS.md, issue #30); the forward
    and the backward's recompute both take their logits from here, so exp(logits − lse) in the backward uses
    bit-for-bit the logits the forward took lse from."""
    vocab, r = weight.shape[0], h.shape[0]
    logits = buf[:vocab * r].view(vocab, r)
    if weight.dtype == torch.float32 and h.dtype == torch.float32:
        torch.matmul(weight, h.t(), out=logits)
    else:
        logits.copy_(weight @ h.t())
    return logits


ARGMAX_BLOCK = 4096  # vocabulary entries per block of _first_argmax


def _first_argmax(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, 0) [r] for tall logits [V, r] whose column maxima are top [r] (the first index that
    attains each maximum), ARGMAX_BLOCK entries at a time: on a CPU torch's own arg-max over the outer dimension runs
    ~4x slower than this block scan (210 vs 46 ms at 151,936 x 256) and ~20x slower than amax. A column holding NaN
    has no index equal to its maximum: it gets V (never a token)."""
    vocab = logits.shape[0]
    first = torch.full(top.shape, vocab, dtype=torch.long, device=logits.device)
    for c in range(0, vocab, ARGMAX_BLOCK):
        eq = logits[c:c + ARGMAX_BLOCK] == top
        first = torch.where(eq.any(0) & (first == vocab), eq.byte().argmax(0) + c, first)
    return first


SKINNY_ROWS = 16  # below this many rows, oneDNN's Wᵀ G kernel sums over the vocabulary less accurately (5-20x)


def _hidden_grad(grad_logits: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out [r, H] = grad_logitsᵀ W for grad_logits [V, r] (tall, as _tall_logits) and weight [V, H]. From
    SKINNY_ROWS rows on as (Wᵀ G)ᵀ, which writes [H, r] and runs 1.1-1.4x faster on a CPU at H = 896 with the same
    bits (measured: torch.equal at 16-256 rows); below, as Gᵀ W, whose kernel keeps float32 accuracy there."""
    if grad_logits.shape[1] < SKINNY_ROWS:
        torch.matmul(grad_logits.t(), weight, out=out)
    else:
        out.copy_((weight.t() @ grad_logits).t())


class ChunkedLogps(torch.autograd.Function):
    """log softmax(h Wᵀ)[target] for rows of h [N, H] and an output weight W [V, H], `chunk` rows at a time, with
    the gradient taken in the forward pass (Liger's fused linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989,
    applied to per-token log-probs): log p_i depends on h_i alone, so d log p_i / d h_i = (onehot(t_i) − p_i) W is
    an [H] vector per row, computed from the chunk's logits while they exist and kept ([N, H], the size of h);
    backward only scales it by the upstream gradient. The logits are never recomputed and no [N, V] tensor exists:
    two weight-sized products per chunk when W is frozen (LoRA), as the plain path pays.

    A trained W needs Σ_i g_i (onehot(t_i) − p_i)ᵀ h_i, which depends on the upstream g_i. With `summed` (the
    caller's loss is c·Σ_i log p_i, SFT's cross-entropy: one g for every row) it is accumulated in the forward as
    well ([V, H] float32) and scaled in backward (three products, as the plain path); otherwise backward recomputes
    each chunk's logits for it (four). With `entropy`, also each row's entropy from the same chunk's logits (no
    gradient; otherwise an empty tensor). `grads` = (hidden needs a gradient, weight needs one), as seen by the
    caller (inside forward autograd cannot tell a no_grad call)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, entropy: bool = False, gather=None,
                grads: tuple = (False, False), summed: bool = False):
        ctx.gather = gather  # ZeRO-3: a context that gathers the partitioned weight, for each product
        with gather() if gather is not None else contextlib.nullcontext():
            return ChunkedLogps._forward(ctx, hidden, weight, targets, chunk, entropy, grads, summed)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk: int, entropy: bool, grads: tuple, summed: bool):
        n, dev = hidden.shape[0], hidden.device
        chunk = even_chunk(n, chunk)  # the backward's recompute (ctx.chunk) cuts the rows the same way
        want_h, want_w = grads
        weight_now = want_w and summed
        logps = torch.empty(n, dtype=torch.float32, device=dev)
        lse = torch.empty_like(logps)
        correct = torch.empty(n, dtype=torch.bool, device=dev)
        mean = torch.empty_like(logps)
        ent = torch.empty(n if entropy else 0, dtype=torch.float32, device=dev)
        d_hidden = torch.empty(hidden.shape, dtype=weight.dtype, device=dev) if want_h else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if weight_now else None
        # every chunk's logits in one reused buffer: a fresh one per chunk would be a fresh mapping of up to
        # MAX_CHUNK_FLOATS floats, whose pages the kernel zeroes on first touch (train/allocator.py)
        buf = torch.empty(weight.shape[0] * min(chunk, n), dtype=torch.float32, device=dev)
        for s in range(0, n, chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            r = h.shape[0]
            cols = torch.arange(r, device=dev)
            logits = _tall_logits(weight, h, buf)  # logits[v, i]: token v's logit for row i
            logps[s:s + r] = logits[t, cols]
            top = logits.amax(0)  # logsumexp's shift
            correct[s:s + r] = _first_argmax(logits, top) == t
            mean[s:s + r] = logits.mean(0)
            # logsumexp as torch computes it (max + log Σ exp(x − max)), in place over the logits
            shifted = logits.sub_(top)
            if entropy:
                ent[s:s + r] = _shifted_entropy(shifted)
            total = shifted.exp_().sum(0)
            lse[s:s + r] = total.log() + top
            if want_h or weight_now:
                logits.div_(total.neg_())  # −softmax
            logps[s:s + r] -= lse[s:s + r]
            if want_h or weight_now:
                logits[t, cols] += 1  # d log p(t) / d logits = onehot(t) − softmax(logits), in place
                if want_h:
                    _hidden_grad(logits.to(weight.dtype), weight, d_hidden[s:s + r])
                if weight_now:
                    d_weight.addmm_(logits, h.float())
        ctx.want, ctx.summed, ctx.chunk = grads, summed, chunk
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        if want_w and not summed:  # backward recomputes the logits for the weight's gradient
            ctx.save_for_backward(d_hidden, d_weight, hidden, weight, targets, lse)
        else:
            ctx.save_for_backward(d_hidden, d_weight)
        ctx.mark_non_differentiable(correct, mean, ent)
        return logps, correct, mean, ent

    @staticmethod
    def backward(ctx, grad_logps, _grad_correct, _grad_mean, _grad_entropy):
        want_h, want_w = ctx.want
        saved = ctx.saved_tensors
        d_hidden, d_weight = saved[0], saved[1]
        g = grad_logps.float()
        grad_h = (d_hidden.float() * g[:, None]).to(ctx.hidden_dtype) if want_h else None
        grad_w = None
        if want_w and ctx.summed:
            if g.numel() and not bool((g == g[0]).all()):
                raise RuntimeError("ChunkedLogps(summed=True) got a different upstream gradient per token; "
                                   "summed is only for losses of the form c * sum(log p)")
            grad_w = d_weight * (g[0] if g.numel() else 0.0)
        elif want_w:
            with ctx.gather() if ctx.gather is not None else contextlib.nullcontext():
                grad_w = ChunkedLogps._weight_grad(ctx, g, *saved[2:])
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None

    @staticmethod
    def _weight_grad(ctx, g, hidden, weight, targets, lse):
        """Σ_i g_i (onehot(t_i) − p_i)ᵀ h_i [V, H] float32, recomputing each chunk's logits (_tall_logits, as the
        forward: the same product, so p_i = exp(logits − lse) is exactly the forward's softmax)."""
        chunk, n = ctx.chunk, hidden.shape[0]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        buf = torch.empty(weight.shape[0] * min(chunk, n), dtype=torch.float32, device=weight.device)
        for s in range(0, n, chunk):
            h, t, gs = hidden[s:s + chunk], targets[s:s + chunk], g[s:s + chunk]
            logits = _tall_logits(weight, h, buf)
            logits.sub_(lse[s:s + chunk]).exp_().mul_(-gs)  # −g p
            logits[t, torch.arange(h.shape[0], device=h.device)] += gs  # g (onehot(t) − p)
            grad_w.addmm_(logits, h.float())
        return grad_w


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
    if getattr(cfg, "vision_config", None) is not None:
        return ("a vision-language model's 3-D M-RoPE positions are built per sequence by the model, which a shared "
                "prompt with two continuations does not fit")
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
    kw.update(vision_inputs(batch, model))  # a vision-language model's pictures and M-RoPE positions
    return kw


def vision_inputs(batch: dict, model) -> dict:
    """A vision-language model's extra keyword arguments for a batch: its pictures (pixel_values [P, C·t·p·p],
    image_grid_thw [N, 3]) and what its 3-D M-RoPE positions are built from. Padded rows: mm_token_type_ids [B, T]
    (1 at image placeholders), from which the model builds them itself (transformers' get_rope_index). Padding-free
    and packed rows (position_ids given, restarting per sequence): `packed_mrope_positions`. {} for a text model."""
    if batch.get("images"):  # picture references the collate did not turn into pixels: never train without them
        raise RuntimeError("a batch holds pictures but no pixel_values: its collate function was not wrapped in "
                           "tunesmith.data.vision.with_pixels")
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    if getattr(config, "vision_config", None) is None:
        return {}
    kw = {}
    if batch.get("pixel_values") is not None:
        kw = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    if batch.get("position_ids") is not None:
        kw["position_ids"] = packed_mrope_positions(batch, inner)
    elif kw:
        kw["mm_token_type_ids"] = (batch["input_ids"] == config.image_token_id).int()
    return kw


def packed_mrope_positions(batch: dict, model):
    """[4, B, T] position ids of padding-free / packed rows for a Qwen-VL model: row 0 the text positions as given
    (restarting at 0 for each sequence, from which transformers builds the block-diagonal mask), rows 1-3 each
    sequence's own 3-D M-RoPE positions (the model's get_rope_index on that sequence alone, with its pictures'
    grids), exactly as if the sequence were run alone. The pictures (image_grid_thw) are in sequence order."""
    owner = unwrap_model(model)
    owner = getattr(owner, "model", owner) if not hasattr(owner, "get_rope_index") else owner
    config = owner.config
    image = config.image_token_id
    merge = config.vision_config.spatial_merge_size
    ids, pos = batch["input_ids"], batch["position_ids"]
    grids = batch.get("image_grid_thw")
    per_image = (grids.prod(-1) // merge ** 2).tolist() if grids is not None else []
    out = pos[None].repeat(4, 1, 1)
    g = 0
    for b in range(ids.shape[0]):
        starts = (pos[b] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        for a, e in zip(starts[:-1], starts[1:]):
            seg = ids[b, a:e][None]
            kinds = (seg == image).int()
            k, have, need = g, 0, int(kinds.sum())
            while have < need:
                have, k = have + per_image[k], k + 1
            rope, _ = owner.get_rope_index(seg, mm_token_type_ids=kinds,
                                           image_grid_thw=grids[g:k] if k > g else None)
            out[1:, b, a:e] = rope[:, 0]
            g = k
    return out


@dataclass
class HeadInputs:
    """What the output layer turns into the logits of a batch's trained positions, before it does: `hidden` [N, H]
    the hidden states that predict each trained token (row-major order) with `weight` [V, H] the output embedding,
    or — on the plain path, `weight` None — `hidden` holds those positions' logits [N, V] themselves (the model's
    own forward computed them). `target` [N] the trained tokens, `rows` [N] their sequences, `aux_loss` an MoE
    router loss the forward returned."""
    hidden: torch.Tensor
    weight: Optional[torch.Tensor]
    target: torch.Tensor
    rows: torch.Tensor
    n_seq: int
    aux_loss: Any = None


def head_inputs(model, batch: dict, chunked: Optional[bool] = None) -> HeadInputs:
    """The forward pass up to the output layer for every trained (label != -100) position of the batch: the last
    hidden states at the predicting positions and the output weight (chunked: the decoder alone, or the model's own
    forward asking for hidden states — under DDP/DeepSpeed, or an MoE model's router loss), or, when the output layer
    cannot be applied apart (chunked False, or a head with bias, soft-capping or scaling), the model's logits at those
    positions. Packed rows carry `seq_ids`; prefix-shared pairs `label_src` (see the module's docstring)."""
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
        return HeadInputs(last[b, src], weight, target, rows, n_seq, aux)
    out = model(**_inputs(batch, model))
    return HeadInputs(out.logits[b, src], None, target, rows, n_seq, getattr(out, "aux_loss", None))


def token_logps(model, batch: dict, chunked: Optional[bool] = None, temperature: float = 1.0,
                entropy: bool = False, summed: bool = False, chunk: Optional[int] = None) -> TokenLogps:
    """Log-probs of every trained (label != -100) position of the batch; chunked unless told or unable.
    temperature: of the distribution the tokens were sampled from (GRPO): log softmax(logits / T), as TRL's and
    ms-swift's GRPOTrainer (the hidden state is divided, never the [V, H] output weight).
    entropy: also `TokenLogps.entropy` [N], H(softmax(logits / T)) in nats at each trained position, without
    gradient, from the same forward and still `chunk` rows at a time (GRPO's entropy metrics and
    --top_entropy_quantile, TRL's entropy_from_logits); off, nothing extra is computed.
    summed: the caller's loss is c·Σ logps (SFT): a trained output layer's gradient is then taken in the forward
    pass too (ChunkedLogps); a backward with per-token weights then raises RuntimeError.
    chunk: rows per chunk of the output layer (default chunk_rows(vocab, hidden))."""
    h = head_inputs(model, batch, chunked)
    target, rows, n_seq, aux, weight = h.target, h.rows, h.n_seq, h.aux_loss, h.weight
    if weight is not None:
        hidden = h.hidden
        if temperature != 1.0:
            hidden = hidden / temperature
        vocab, width = weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape
        grads = (torch.is_grad_enabled() and hidden.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
        logps, correct, mean, ent = ChunkedLogps.apply(hidden, weight, target, chunk or chunk_rows(vocab, width),
                                                       entropy, zero3_gather(weight), grads, summed)
        return TokenLogps(logps, rows, n_seq, correct, mean, aux, entropy=ent if entropy else None)
    picked = h.hidden.float() / temperature
    lse = torch.logsumexp(picked, -1)
    logps = picked.gather(-1, target[:, None]).squeeze(-1) - lse
    ent = None
    with torch.no_grad():
        correct, mean = picked.argmax(-1) == target, picked.mean(-1)
        if entropy:
            chunk = chunk or max(1, MAX_CHUNK_FLOATS // picked.shape[-1])
            ent = torch.cat([_entropy(picked[s:s + chunk], lse[s:s + chunk])
                             for s in range(0, picked.shape[0], chunk)]) if picked.shape[0] else lse.detach()
    return TokenLogps(logps, rows, n_seq, correct, mean, aux, ent)
