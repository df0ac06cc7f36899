"""Choosing and stopping tokens for the generation engine (`tunesmith.inference.engine`): the logits processors
(transformers' order and semantics), sampling, per-row random draws, stop strings.

How a batch samples. Every row's logits go through the processors together ([B, V] tensor ops: the repetition
penalty row by row, since each row has its own seen tokens), then each row takes one token by inverse-CDF sampling:
the cumulative sum of its probabilities softmax(scores) in float64, searched for u × total with one uniform draw u.
That draw is a pure function of the row's seed and the index of the token being chosen (`row_uniform`: SplitMix64,
Steele et al. 2014, counter-based), never of a generator's state or of the row's place in the batch. So a row's
tokens depend only on its own logits and its seed: the same alone, in any batch, on any process, or resumed with
its first tokens already known — which is what GRPO's exact resume and multi-process equality rest on. (The logits
themselves are equal across batch shapes up to float summation order, as for greedy rows.)

Why not `torch.multinomial` with a generator per row: multinomial draws one exponential per vocabulary entry
(V = 151,936 for Qwen) per row per token, and a per-row generator forces one call per row; inverse-CDF sampling
draws one number per row and runs the vocabulary-sized work batched (bench/RESULTS.md, GRPO).

torch is imported inside the functions that use it, never at module level.
"""
from __future__ import annotations

from typing import Optional

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / golden ratio, odd


def stop_string_hit(tokenizer, generated: list, stops) -> Optional[str]:
    """The stop string that the output now contains, if any. Only the tail can hold a new match: a stop string
    spans at most len(s) tokens (plus bytes that decode together), so the last few tokens are decoded each step.

    generated: the token ids so far; stops: strings. Returns the first of `stops` (in their order) found in the
    decoded tail (special tokens kept), else None."""
    if not stops:
        return None
    span = max(len(s) for s in stops) + 4
    tail = tokenizer.decode(generated[-span:], skip_special_tokens=False)
    return next((s for s in stops if s and s in tail), None)


def _mix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators";
    the constants of Java's SplittableRandom): a bijection of 64-bit integers that scrambles every bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def row_uniform(seed: int, index: int) -> float:
    """The uniform draw in [0, 1) for token `index` (0-based, counted from the first generated token) of a row
    seeded with `seed` (any int, taken mod 2^64): the top 53 bits of the (index + 1)-th output of a SplitMix64
    stream whose state starts at mix64(seed) — so streams of consecutive seeds (GRPO's completions) do not
    overlap. A pure function: no state, the same in any batch or process."""
    state = (_mix64(int(seed) & _MASK64) + (index + 1) * _GAMMA) & _MASK64
    return (_mix64(state) >> 11) * (1.0 / (1 << 53))


def random_seed() -> int:
    """A seed for a row submitted without one, from torch's global generator (so `torch.manual_seed` still makes
    unseeded generation repeatable, admission order permitting): an int in [0, 2^62)."""
    import torch

    return int(torch.randint(0, 1 << 62, (1,)))


def processed_scores(logits, rows):
    """The rows' scores [B, V] (float32, a new tensor) after their processors, in transformers' order and with
    its semantics: repetition penalty (CTRL, Keskar et al. 2019: a seen token's positive logit divided by it, a
    negative one multiplied), temperature, top-k (the k highest kept), top-p (Holtzman et al. 2020: the smallest
    set of most likely tokens with probability above top_p kept, at least one), min-p (Nguyen et al. 2024,
    arXiv:2407.01082: tokens whose probability is below min_p × the most likely token's removed; transformers'
    MinPLogitsWarper). Removed tokens score −inf. A greedy row (temperature 0) gets the penalty only.

    logits: [B, V] (any float dtype); rows: the engine's rows (`params`: SamplingParams, `handle.prompt_ids`,
    `generated`), one per logits row."""
    import torch

    scores = logits.float()
    penalised = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if penalised:
        scores = scores.clone()
    for i in penalised:
        r = rows[i]
        seen = torch.tensor(sorted(set(r.handle.prompt_ids) | set(r.generated)), device=scores.device)
        s = scores[i, seen]
        scores[i, seen] = torch.where(s < 0, s * r.params.repetition_penalty, s / r.params.repetition_penalty)
    # 1/T as a float32 multiplier, 1 for a greedy row (exact): one pass over the batch that leaves `logits` as they
    # are. (A division would round a lone row differently: torch divides by a broadcast [1, 1] tensor through a
    # reciprocal multiply but by a [B, 1] one exactly.)
    inv_t = torch.tensor([[1.0 / r.params.temperature if r.params.temperature else 1.0] for r in rows],
                         device=scores.device)
    scores = scores * inv_t
    sampled = [i for i, r in enumerate(rows) if r.params.temperature != 0]
    _top_k(scores, [rows[i].params.top_k if i in sampled else 0 for i in range(len(rows))])
    _top_p(scores, [rows[i].params.top_p if i in sampled else 1.0 for i in range(len(rows))])
    _min_p(scores, [rows[i].params.min_p if i in sampled else 0.0 for i in range(len(rows))])
    return scores


def _top_k(scores, ks: list) -> None:
    """In place on scores [b, V]: each row keeps the scores at or above its k-th highest (k 0 or −1: off)."""
    import torch

    v = scores.shape[-1]
    on = [j for j, k in enumerate(ks) if k and 0 < k < v]
    if not on:
        return
    k = torch.tensor([[ks[j] - 1] for j in on], device=scores.device)
    sub = scores[on] if len(on) < len(ks) else scores
    kth = torch.topk(sub, int(k.max()) + 1).values.gather(1, k)
    _remove(scores, on, sub < kth)


def _top_p(scores, ps: list) -> None:
    """In place on scores [b, V]: transformers' TopPLogitsWarper with each row's top_p (1: off); ties are sorted
    stably, so a row's kept set is the same whatever the batch."""
    import torch

    on = [j for j, p in enumerate(ps) if p < 1.0]
    if not on:
        return
    sub = scores[on] if len(on) < len(ps) else scores
    sorted_scores, order = torch.sort(sub, descending=False, stable=True)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    remove = cum <= torch.tensor([[1 - ps[j]] for j in on], device=scores.device)
    remove[:, -1] = False  # keep at least the most likely token
    _remove(scores, on, remove.scatter(1, order, remove))


def _min_p(scores, ps: list) -> None:
    """In place on scores [b, V]: transformers' MinPLogitsWarper with each row's min_p (0: off): p = softmax(scores)
    of the scores left by top-k/top-p, tokens with p < min_p · max p removed, the most likely always kept."""
    import torch

    on = [j for j, p in enumerate(ps) if p > 0.0]
    if not on:
        return
    sub = scores[on] if len(on) < len(ps) else scores
    probs = sub.softmax(-1)
    remove = probs < torch.tensor([[ps[j]] for j in on], device=scores.device) * probs.amax(-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(-1, keepdim=True), False)
    _remove(scores, on, remove)


def _remove(scores, on: list, mask) -> None:
    """scores[on] = −inf where mask [len(on), V] is True, in place (without copying rows when `on` is all)."""
    if len(on) == scores.shape[0]:
        scores.masked_fill_(mask, float("-inf"))
    else:
        scores[on] = scores[on].masked_fill(mask, float("-inf"))


def sample_tokens(logits, rows) -> list:
    """Each row's next token from its logits [B, V]: `processed_scores`, then the arg-max for a greedy row and,
    for the others, inverse-CDF sampling with the row's own draw `row_uniform(row.seed, len(row.generated))`
    (see the module docstring): the first token whose cumulative probability exceeds u × total, so a token whose
    probability is 0 (removed) is never chosen. Returns B ints; None for a row whose probabilities are not finite
    (its logits overflowed at this temperature), which has no distribution to sample.

    rows: as `processed_scores`, each with `seed` (int) for its draws."""
    import torch

    scores = processed_scores(logits, rows)
    out: list = [None] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0]
    if greedy:
        for i, t in zip(greedy, scores[greedy].argmax(-1).tolist()):
            out[i] = t
    sampled = [i for i, r in enumerate(rows) if r.params.temperature != 0]
    if not sampled:
        return out
    sub = scores[sampled] if len(sampled) < len(rows) else scores
    # softmax works row by row (vectorised within a row), so a row's probabilities are the same in any batch; a
    # removed token's is 0. Summed in float64: each token's interval is kept to ~1e-16 of the total
    cum = sub.softmax(-1).cumsum(-1, dtype=torch.float64)
    total = cum[:, -1:]
    u = torch.tensor([[row_uniform(rows[i].seed, len(rows[i].generated))] for i in sampled], dtype=torch.float64,
                     device=cum.device)
    # u < 1, but u x total can round up to total: the largest double below it picks the last token above 0
    target = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    picks = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[-1] - 1).flatten().tolist()
    ok = (torch.isfinite(total) & (total > 0)).flatten().tolist()
    for j, i in enumerate(sampled):
        out[i] = picks[j] if ok[j] else None
    return out
