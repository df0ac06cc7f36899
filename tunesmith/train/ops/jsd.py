"""GKD's divergence between a student's and a teacher's next-token distributions, over the whole vocabulary, at
every trained position, without the [tokens × vocabulary] logits of either model.

The generalised Jensen-Shannon divergence of Agarwal et al. 2024 ("On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", arXiv:2306.13649, eq. 1), as TRL's GKDTrainer.generalized_jsd_loss and
ms-swift's gkd_loss compute it: with p = softmax(student / T), q = softmax(teacher / T) and m = β·q + (1 − β)·p,

    JSD_β = β·KL(q ‖ m) + (1 − β)·KL(p ‖ m);   β = 0: KL(q ‖ p) (forward KL);   β = 1: KL(p ‖ q) (reverse KL).

`ChunkedJSD` takes both models' last hidden states at the trained positions and their output weights, and turns
`chunk` positions at a time into logits (the teacher's without gradient), the divergence and — while the chunk's
logits exist — its gradient with respect to the student's logits in closed form, then the hidden states' (and a
trained output layer's): d JSD / d z = p ⊙ (a − ⟨p, a⟩) with a = ∂JSD/∂p ((1 − β)(log p − log m); −q/p at β = 0;
log p − log q at β = 1), divided by T. No [N, V] tensor larger than one chunk exists, forward or backward, and
nothing is recomputed: the function returns the summed divergence, so every position's upstream gradient is the
same number and backward only scales what the forward kept ([N, H], the size of the hidden states).

Also ms-swift's two variants: --gkd_logits_topk k (the divergence over the teacher's k most likely tokens,
both distributions renormalised over them) and, where the two output layers have different numbers of rows
(Qwen2.5-7B's 152,064 against 0.5B's 151,936: padding rows of one tokenizer), ms-swift's `_align_vocab`: the
narrower model's missing columns take the other model's logits. And --sft_alpha's NLL of the dataset's tokens
(at temperature 1, as the model's own loss) from the same chunk's logits.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from tunesmith.errors import TunesmithError
from tunesmith.models.head import zero3_gather
from tunesmith.train.ops.token_logps import chunk_rows


@dataclass(frozen=True)
class JSDSpec:
    """What the divergence is: β (0-1), the temperature T (> 0), the teacher's top-k (None: the whole vocabulary)
    and the weight of the NLL of the target tokens (0: none)."""
    beta: float
    temperature: float = 1.0
    topk: Optional[int] = None
    nll_weight: float = 0.0


def generalized_jsd(student, teacher, spec: JSDSpec, grad: bool = True, teacher_idx=None):
    """(JSD_β per row [n], the gradient with respect to the student's logits [n, Vs], or None without `grad`) for
    student logits [n, Vs] and teacher logits [n, Vt] (float32), in closed form (the module's docstring). Vs ≠ Vt: ms-swift's alignment (the narrower side's missing columns take the
    other's logits; where the teacher takes the student's, their gradient flows through the teacher side too).
    teacher_idx [n, k] (int64): the teacher is given as its top-k only — `teacher` [n, k] its log-probabilities at
    those token ids (a teacher server's) — and the divergence is ms-swift's top-k one over them: the student's
    logits gathered at the ids, both renormalised over the k (a log-softmax over k is the same for log-probs as for
    the logits they come from, so this equals --gkd_logits_topk with the teacher's logits)."""
    vs, vt = student.shape[-1], teacher.shape[-1]
    idx = None
    if teacher_idx is not None:  # a teacher's top-k as given: no alignment (its ids are the student's)
        idx, t, vt = teacher_idx, teacher, vs
        s = student.gather(-1, idx)
    elif spec.topk:
        t, idx = teacher.topk(min(spec.topk, vt), dim=-1)
        s = (torch.cat([student, teacher[:, vs:]], -1) if vs < vt else student).gather(-1, idx)
    else:
        s = torch.cat([student, teacher[:, vs:]], -1) if vs < vt else student
        t = torch.cat([teacher, student[:, vt:]], -1) if vs > vt else teacher
    jsd, gs, gt = _divergence(s / spec.temperature, t / spec.temperature, spec.beta, grad)
    if gs is None:
        return jsd, None
    if idx is not None:
        full = torch.zeros(student.shape[0], max(vs, vt), dtype=gs.dtype, device=gs.device)
        return jsd, full.scatter_(-1, idx, gs)[:, :vs].div_(spec.temperature)
    grad = gs[:, :vs]
    if vs > vt:  # the teacher's borrowed columns are the student's logits: their gradient is the student's too
        grad[:, vt:] += gt[:, vt:]
    return jsd, grad.div_(spec.temperature)


def _divergence(zs, zt, beta: float, grad: bool):
    """(JSD_β [n], d/dzs [n, V] or None, d/dzt [n, V] or None) of temperature-scaled logits zs, zt [n, V]."""
    floor = torch.finfo(torch.float32).min  # a −inf logit adds 0, not NaN
    lp, lq = zs.log_softmax(-1).clamp_(min=floor), zt.log_softmax(-1).clamp_(min=floor)
    p, q = lp.exp(), lq.exp()
    if beta == 0:    # KL(q ‖ p): ∂/∂p = −q/p
        a = lq - lp
        jsd = (q * a).sum(-1)
        return (jsd, p - q, q * (a - jsd[:, None])) if grad else (jsd, None, None)
    if beta == 1:    # KL(p ‖ q): ∂/∂p = log p − log q (+1)
        a = lp - lq
        jsd = (p * a).sum(-1)
        return (jsd, p * (a - jsd[:, None]), q - p) if grad else (jsd, None, None)
    lm = torch.logaddexp(lp + math.log1p(-beta), lq + math.log(beta))
    a, b = (1 - beta) * (lp - lm), beta * (lq - lm)   # ∂JSD/∂p and ∂JSD/∂q (up to constants)
    pa, qb = (p * a).sum(-1), (q * b).sum(-1)
    jsd = pa + qb
    if not grad:
        return jsd, None, None
    return jsd, p * (a - pa[:, None]), q * (b - qb[:, None])


def _logits(hidden, weight):
    """A chunk's float32 logits: hidden [c, H] times the output weight [V, H], or hidden itself when weight is None
    (the plain path: the rows are logits already)."""
    return (hidden.float() if weight is None else hidden @ weight.t()).float()


class ChunkedJSD(torch.autograd.Function):
    """Σ_i JSD_β(i) + w·Σ_i NLL(i) over N trained positions, `chunk` at a time (see the module's docstring):
    student rows s_hidden [N, Hs] with its output weight [Vs, Hs] (None: the rows are logits), teacher rows
    t_hidden [N, Ht] with its weight [Vt, Ht] (None likewise; never differentiated), targets [N] (the NLL's
    tokens). Returns (the sum, JSD per position [N], NLL per position [N] or empty), the last two without gradient.
    grads = (student rows need a gradient, student weight needs one)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, targets, spec: JSDSpec, chunk: int,
                grads: tuple = (False, False), t_idx=None):
        want_h, want_w = grads
        want = want_h or want_w
        n, dev = s_hidden.shape[0], s_hidden.device
        jsd = torch.empty(n, dtype=torch.float32, device=dev)
        nll = torch.empty(n if spec.nll_weight else 0, dtype=torch.float32, device=dev)
        out_dtype = s_hidden.dtype if s_weight is None else s_weight.dtype
        d_hidden = torch.empty(s_hidden.shape, dtype=out_dtype, device=dev) if want_h else None
        d_weight = torch.zeros(s_weight.shape, dtype=torch.float32, device=dev) if want_w else None
        for a in range(0, n, chunk):
            h = s_hidden[a:a + chunk]
            s = _logits(h, s_weight)
            t = _logits(t_hidden[a:a + chunk], t_weight)
            j, d = generalized_jsd(s, t, spec, want, None if t_idx is None else t_idx[a:a + chunk])
            jsd[a:a + chunk] = j
            if spec.nll_weight:
                lse = s.logsumexp(-1)
                tgt = targets[a:a + chunk, None]
                nll[a:a + chunk] = lse - s.gather(-1, tgt).squeeze(-1)
                if want:  # d NLL / d s = softmax(s) − onehot(target)
                    soft = s.sub_(lse[:, None]).exp_().scatter_add_(-1, tgt, torch.full_like(tgt, -1, dtype=s.dtype))
                    d = d.add_(soft, alpha=spec.nll_weight)
            if want_h:
                d_hidden[a:a + chunk] = d.to(out_dtype) if s_weight is None else d.to(s_weight.dtype) @ s_weight
            if want_w:
                d_weight.addmm_(d.t(), h.float())
            del s, t, d  # one chunk of logits alive at a time
        ctx.save_for_backward(*(x for x in (d_hidden, d_weight) if x is not None))
        ctx.want, ctx.dtypes = grads, (s_hidden.dtype, None if s_weight is None else s_weight.dtype)
        ctx.mark_non_differentiable(jsd, nll)
        total = jsd.sum() + (spec.nll_weight * nll.sum() if spec.nll_weight else 0.0)
        return total, jsd, nll

    @staticmethod
    def backward(ctx, grad_total, _grad_jsd, _grad_nll):
        want_h, want_w = ctx.want
        saved = list(ctx.saved_tensors)
        g = grad_total.float()
        grad_h = (saved.pop(0).float() * g).to(ctx.dtypes[0]) if want_h else None
        grad_w = (saved.pop(0) * g).to(ctx.dtypes[1]) if want_w else None
        return grad_h, grad_w, None, None, None, None, None, None, None


def default_chunk(vocab: int, hidden: int) -> int:
    """Positions per chunk: an eighth of ChunkedLogps' (`chunk_rows`), since a chunk here holds up to about
    sixteen [chunk, vocabulary] float32 tensors at once (both models' logits, their log-probabilities and
    probabilities, the mixture's, the partial derivatives, the gradient) where ChunkedLogps holds two."""
    return max(1, chunk_rows(vocab, hidden) // 8)


def chunked_jsd(student, teacher, spec: JSDSpec, chunk: Optional[int] = None):
    """(Σ JSD_β + w·Σ NLL (differentiable), JSD per position [N], NLL per position [N] or empty) from the student's
    and the teacher's `token_logps.HeadInputs` of the same batch (the teacher's computed without gradient). A
    teacher output weight that DeepSpeed ZeRO-3 partitions (--teacher_deepspeed) is gathered whole on every rank
    for the divergence (`head.zero3_gather`, as the policy's frozen head in ChunkedLogps), and partitioned again
    after it: every rank must call this the same number of times."""
    s_h, s_w = student.hidden, student.weight
    grads = (torch.is_grad_enabled() and s_h.requires_grad,
             torch.is_grad_enabled() and s_w is not None and s_w.requires_grad)
    t_h = teacher.hidden.to(s_h.device)
    width = s_h.shape[-1] if s_w is None else s_w.shape[-1]
    vocab = s_h.shape[-1] if s_w is None else s_w.shape[0]
    gather = None if teacher.weight is None else zero3_gather(teacher.weight)
    with gather() if gather is not None else contextlib.nullcontext():  # the product reads it in forward only
        t_w = None if teacher.weight is None else teacher.weight.detach().to(s_h.device)
        return ChunkedJSD.apply(s_h, s_w, t_h.detach(), t_w, student.target, spec,
                                chunk or default_chunk(vocab, width), grads)


class TeacherVocabularyError(TunesmithError):
    """A teacher's top-k names a token id the student's vocabulary does not have (another tokenizer)."""


def chunked_topk_jsd(student, values, indices, spec: JSDSpec, chunk: Optional[int] = None):
    """`chunked_jsd` against a teacher given as its top-k at each trained position (a teacher server's): values
    [N, k] its log-probabilities (nats, temperature 1) at token ids indices [N, k], in the student's HeadInputs
    order. Raises TeacherVocabularyError for an id outside the student's vocabulary."""
    s_h, s_w = student.hidden, student.weight
    vocab = s_h.shape[-1] if s_w is None else s_w.shape[0]
    if indices.numel() and int(indices.max()) >= vocab:
        raise TeacherVocabularyError(f"the teacher's top-k holds token id {int(indices.max())}, outside the "
                                     f"student's vocabulary of {vocab}: the teacher server's model has another "
                                     f"tokenizer than the student --model; serve a teacher that shares it")
    grads = (torch.is_grad_enabled() and s_h.requires_grad,
             torch.is_grad_enabled() and s_w is not None and s_w.requires_grad)
    width = s_h.shape[-1] if s_w is None else s_w.shape[-1]
    vals = values.to(s_h.device, torch.float32)
    return ChunkedJSD.apply(s_h, s_w, vals, None, student.target, spec, chunk or default_chunk(vocab, width), grads,
                            indices.to(s_h.device))
