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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from tunesmith.data.encode import IGNORE

# floats per chunk of logits: 2^22 × 4 bytes = 16 MiB whatever the vocabulary size
CHUNK_FLOATS = 1 << 22


@dataclass
class TokenLogps:
    logps: torch.Tensor        # [N] log p(label) at each trained position, row-major order
    rows: torch.Tensor         # [N] which sequence (batch row, or packed segment) each position belongs to
    n_seq: int                 # number of sequences
    correct: torch.Tensor      # [N] argmax == label (no gradient)
    logits_mean: torch.Tensor  # [N] the vocabulary-mean logit (no gradient; DPO's logits/* metrics)
    aux_loss: Any = None       # MoE router loss from the plain path


class ChunkedLogps(torch.autograd.Function):
    """log softmax(h Wᵀ)[target] for rows of h, chunk by chunk, with the logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        mean = torch.empty_like(logps)
        for s in range(0, n, chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            t = targets[s:s + chunk]
            logps[s:s + chunk] = logits.gather(-1, t[:, None]).squeeze(-1) - lse[s:s + chunk]
            correct[s:s + chunk] = logits.argmax(-1) == t
            mean[s:s + chunk] = logits.mean(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(correct, mean)
        return logps, correct, mean

    @staticmethod
    def backward(ctx, grad_logps, _grad_correct, _grad_mean):
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
        return grad_h, (grad_w.to(weight.dtype) if want_w else None), None, None


def chunked_head(model):
    """(decoder, output-embedding weight) when the chunked path is exact for this model, else None.

    It needs a plain Linear head without bias, no logit soft-capping or scaling, no MoE router loss to return, and
    a model that is not wrapped for data parallelism (calling the decoder directly would bypass DDP's hooks)."""
    if hasattr(model, "module"):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    cfg = getattr(base, "config", None)
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if type(head) is not torch.nn.Linear or head.bias is not None or decoder is None or cfg is None:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) \
            or getattr(cfg, "output_router_logits", False):
        return None
    return decoder, head.weight


def _inputs(batch: dict) -> dict:
    kw = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kw["attention_mask"] = batch["attention_mask"]
    if batch.get("position_ids") is not None:
        kw["position_ids"] = batch["position_ids"]
    return kw


def token_logps(model, batch: dict, chunked: Optional[bool] = None) -> TokenLogps:
    """Log-probs of every trained (label != -100) position of the batch; chunked unless told or unable."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    target = labels[mask]
    if "seq_ids" in batch:
        rows = batch["seq_ids"][:, 1:][mask]
        n_seq = int(batch["n_seq"])
    else:
        rows = mask.nonzero()[:, 0]
        n_seq = labels.shape[0]
    parts = chunked_head(model) if chunked is not False else None
    if parts is not None:
        decoder, weight = parts
        out = decoder(**_inputs(batch))
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, :-1][mask]
        chunk = max(1, CHUNK_FLOATS // weight.shape[0])
        logps, correct, mean = ChunkedLogps.apply(hidden, weight, target, chunk)
        return TokenLogps(logps, rows, n_seq, correct, mean)
    out = model(**_inputs(batch))
    picked = out.logits[:, :-1][mask].float()
    logps = picked.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(picked, -1)
    with torch.no_grad():
        correct, mean = picked.argmax(-1) == target, picked.mean(-1)
    return TokenLogps(logps, rows, n_seq, correct, mean, getattr(out, "aux_loss", None))
