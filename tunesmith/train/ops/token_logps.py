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
# 2.2x slower than at 256 (bench/head_breakdown.py, RESULTS.md). Below MIN_CHUNK_ROWS rows the ~10 operations per
# chunk cost more than their arithmetic on small models; above MAX_CHUNK_FLOATS floats (256 MiB of float32 logits,
# plus their gradient in place) a chunk stops paying for its memory.
MIN_CHUNK_ROWS = 256
MAX_CHUNK_FLOATS = 1 << 26


def chunk_rows(vocab: int, hidden: int) -> int:
    """Rows (tokens) per chunk of the chunked output layer for a [vocab, hidden] output weight.

    hidden // 4 rows: a product then does hidden/4 multiply-adds per weight element it reads, and the chunk's
    float32 logits are a quarter of the weight's size (224 rows for Qwen2.5-0.5B, 896 for 7B before the cap);
    at least MIN_CHUNK_ROWS, and at most MAX_CHUNK_FLOATS // vocab (441 rows at Qwen's 151,936), at least 1."""
    return max(1, min(max(hidden // 4, MIN_CHUNK_ROWS), MAX_CHUNK_FLOATS // vocab))


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


ENTROPY_COLUMNS = 16384  # vocabulary columns per block of the entropy's exp: [rows x 16,384] floats at a time


def _shifted_entropy(shifted: torch.Tensor) -> torch.Tensor:
    """Entropy [n] (nats) of softmax over rows of shifted = logits − rowmax [n, V] (float32):
    H = log Σe − Σ e·x / Σe with e = exp(x), x = shifted, summed ENTROPY_COLUMNS columns at a time so that e never
    exists whole (the chunk's logits stay the only [n, V] buffer). Clamps shifted in place to the float32 minimum,
    so that a −inf logit adds 0, not NaN (exp of it is 0 either way)."""
    shifted.clamp_(min=torch.finfo(torch.float32).min)
    total = shifted.new_zeros(shifted.shape[0])
    dot = shifted.new_zeros(shifted.shape[0])
    for c in range(0, shifted.shape[1], ENTROPY_COLUMNS):
        x = shifted[:, c:c + ENTROPY_COLUMNS]
        e = x.exp()
        total += e.sum(-1)
        dot += torch.bmm(e[:, None, :], x[:, :, None]).view(-1)
    return total.log() - dot / total


def _d_logits(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d log p(t) / d logits = onehot(t) − softmax(logits), [n, V] float32, computed in place over `logits`."""
    g = logits.sub_(lse[:, None]).exp_().neg_()
    return g.scatter_add_(-1, targets[:, None], torch.ones_like(g[:, :1]))


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
        want_h, want_w = grads
        weight_now = want_w and summed
        logps = torch.empty(n, dtype=torch.float32, device=dev)
        lse = torch.empty_like(logps)
        correct = torch.empty(n, dtype=torch.bool, device=dev)
        mean = torch.empty_like(logps)
        ent = torch.empty(n if entropy else 0, dtype=torch.float32, device=dev)
        d_hidden = torch.empty(hidden.shape, dtype=weight.dtype, device=dev) if want_h else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if weight_now else None
        for s in range(0, n, chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            logits = (h @ weight.t()).float()
            logps[s:s + chunk] = logits.gather(-1, t[:, None]).squeeze(-1)
            top, best = logits.max(-1, keepdim=True)  # one pass for the arg-max and logsumexp's shift
            correct[s:s + chunk] = best.squeeze(-1) == t
            mean[s:s + chunk] = logits.mean(-1)
            # logsumexp as torch computes it (max + log Σ exp(x − max)), in place over the logits
            shifted = logits.sub_(top)
            if entropy:
                ent[s:s + chunk] = _shifted_entropy(shifted)
            total = shifted.exp_().sum(-1)
            lse[s:s + chunk] = total.log() + top.squeeze(-1)
            if want_h or weight_now:
                logits.div_(total.neg_()[:, None])  # −softmax
            logps[s:s + chunk] -= lse[s:s + chunk]
            if want_h or weight_now:
                # d log p(t) / d logits = onehot(t) − softmax(logits), in place over −softmax
                logits.scatter_add_(-1, t[:, None], torch.ones_like(logits[:, :1]))
                if want_h:
                    torch.matmul(logits.to(weight.dtype), weight, out=d_hidden[s:s + chunk])
                if weight_now:
                    d_weight.addmm_(logits.t(), h.float())
            del logits  # before the next chunk's product: one chunk of logits alive at a time
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
        """Σ_i g_i (onehot(t_i) − p_i)ᵀ h_i [V, H] float32, recomputing each chunk's logits."""
        chunk = ctx.chunk
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            d = _d_logits((h @ weight.t()).float(), lse[s:s + chunk], targets[s:s + chunk])
            grad_w.addmm_(d.mul_(g[s:s + chunk, None]).t(), h.float())
            del d
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
