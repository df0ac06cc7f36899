"""Choosing and stopping tokens, one row at a time, for the generation engine (`tunesmith.inference.engine`):
sampling with transformers' logits processors, per-request seeded generators, stop strings.

torch is imported inside the functions that use it, never at module level.
"""
from __future__ import annotations

from typing import Optional


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


def sample_token(logits, row, pad_id: int) -> int:
    """One token from a row's logits [V] with its processors (transformers' order and semantics).

    row: the engine's row (its params: SamplingParams, handle.prompt_ids, generated ids, generator or None)."""
    import torch

    p = row.params
    logits = logits.clone()
    if p.repetition_penalty != 1.0:  # CTRL (Keskar et al. 2019): divide positive, multiply negative scores
        seen = torch.tensor(sorted(set(row.handle.prompt_ids) | set(row.generated)), device=logits.device)
        score = logits[seen]
        logits[seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k and 0 < p.top_k < logits.numel():  # 0 and -1 (vLLM's, ms-swift's spelling) mean off
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - p.top_p)
        remove[-1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def seeded_generator(seed: Optional[int], device):
    """A torch.Generator on `device` seeded with `seed` (mod 2**63), or None without a seed."""
    if seed is None:
        return None
    import torch
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) % (1 << 63))
    return g
