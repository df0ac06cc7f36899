"""Batched sampling (tunesmith/inference/sampling.py): the processors equal transformers' on every row of a mixed
batch; a row's tokens depend only on its logits and its seed — alone, in any batch, in any order, split between
processes, or resumed with its first tokens known; the tokens follow the processed distribution; and the engine's
seeded rows give the same completions alone, together, or in two halves (GRPO's two processes)."""
from types import SimpleNamespace

import pytest
import torch

from tunesmith.inference.engine import SamplingParams
from tunesmith.inference.sampling import processed_scores, row_uniform, sample_tokens

V = 1000  # not a multiple of any SIMD width: row ends fall inside vector blocks in a batch, at the end alone

PARAMS = [SamplingParams(max_new_tokens=40, temperature=0.9),
          SamplingParams(max_new_tokens=40, temperature=0.7, top_k=20),
          SamplingParams(max_new_tokens=40, temperature=1.3, top_p=0.8),
          SamplingParams(max_new_tokens=40, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.3),
          SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.2),  # greedy, penalised
          SamplingParams(max_new_tokens=40, temperature=0.5, top_k=-1, repetition_penalty=0.8)]
MIN_P = [SamplingParams(max_new_tokens=40, temperature=1.1, min_p=0.05),  # GRPO's --min_p
         SamplingParams(max_new_tokens=40, temperature=0.8, top_k=100, top_p=0.95, min_p=0.2)]


def _row(params, seed, prompt=(1, 2, 3), generated=()):
    return SimpleNamespace(params=params, seed=seed, handle=SimpleNamespace(prompt_ids=list(prompt)),
                           generated=list(generated))


def _logits(seed: int, step: int):
    """A row's logits [V] at a step: a function of the row and the step only (what a model would give it)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(V, generator=g) * 4


def _run(rows, steps):
    """Sample `steps` tokens for `rows` as one batch; returns each row's generated tokens."""
    for _ in range(steps):
        logits = torch.stack([_logits(r.seed, len(r.generated)) for r in rows])
        for r, t in zip(rows, sample_tokens(logits, rows)):
            r.generated.append(t)
    return [r.generated for r in rows]


def test_a_rows_tokens_depend_only_on_its_logits_and_seed():
    """Whatever the batch around it — alone, all six together, reversed, split in two halves as two processes
    take a GRPO round — and after a resume with its first tokens already generated, a row draws the same tokens."""
    seeds = [11, 12, 13, 14, 15, 16]
    together = _run([_row(p, s) for p, s in zip(PARAMS, seeds)], 30)
    alone = [_run([_row(p, s)], 30)[0] for p, s in zip(PARAMS, seeds)]
    reversed_ = _run([_row(p, s) for p, s in zip(PARAMS[::-1], seeds[::-1])], 30)[::-1]
    even = _run([_row(PARAMS[i], seeds[i]) for i in range(0, 6, 2)], 30)
    odd = _run([_row(PARAMS[i], seeds[i]) for i in range(1, 6, 2)], 30)
    resumed = _run([_row(p, s, generated=tok[:17]) for p, s, tok in zip(PARAMS, seeds, together)], 13)
    assert together == alone == reversed_ == [even[0], odd[0], even[1], odd[1], even[2], odd[2]] == resumed
    # every row with the same processors (the batch-wide path of top-k, top-p and the draws)
    same = _run([_row(PARAMS[3], s) for s in seeds], 30)
    assert same == [_run([_row(PARAMS[3], s)], 30)[0] for s in seeds]
    assert all(len(set(t)) > 5 for t in together[:4])  # the sampled rows really vary
    assert len({tuple(t) for t in _run([_row(PARAMS[0], s) for s in range(8)], 30)}) == 8  # seeds differ
    mixed = _run([_row(p, s) for p, s in zip(MIN_P + PARAMS[:2], seeds)], 30)  # min-p rows in a batch and alone
    assert mixed[:2] == [_run([_row(p, s)], 30)[0] for p, s in zip(MIN_P, seeds)]


def test_processors_equal_transformers_on_each_row_of_a_mixed_batch():
    from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    rows = [_row(p, i, prompt=[5, 7, 9, 700], generated=[9, 33]) for i, p in enumerate(PARAMS + MIN_P)]
    logits = torch.stack([_logits(i, 0) for i in range(len(rows))])
    ours = processed_scores(logits, rows)
    for i, (r, p) in enumerate(zip(rows, PARAMS + MIN_P)):
        ids = torch.tensor([r.handle.prompt_ids + r.generated])
        want = logits[i:i + 1].clone()
        if p.repetition_penalty != 1.0:
            want = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, want)
        if p.temperature:
            want = TemperatureLogitsWarper(p.temperature)(ids, want)
            if p.top_k > 0:
                want = TopKLogitsWarper(p.top_k)(ids, want)
            if p.top_p < 1:
                want = TopPLogitsWarper(p.top_p)(ids, want)
            if p.min_p > 0:
                want = MinPLogitsWarper(p.min_p)(ids, want)
        kept = torch.isfinite(want[0])
        assert torch.equal(torch.isfinite(ours[i]), kept), i  # the same tokens removed
        # the same scores: 1/T is a float32 multiplier here, a division there (≤ 1 ulp apart)
        torch.testing.assert_close(ours[i][kept], want[0][kept], rtol=3e-7, atol=0)
    assert int(torch.isfinite(ours[1]).sum()) == 20  # top-k 20 keeps 20
    assert 1 < int(torch.isfinite(ours[6]).sum()) < V  # min-p removes some tokens, not all
    picks = sample_tokens(logits, rows)
    assert picks[4] == int(ours[4].argmax())  # greedy: the arg-max of the penalised logits


def test_tokens_follow_the_processed_distribution():
    """40,000 rows with the same logits and seeds 0..39,999: each token's share matches its probability under
    the processors (temperature 0.8, top-k 40, top-p 0.95): total variation below 0.01 (the sampling error of
    40,000 draws over ~35 tokens is about 0.006), and no removed token is ever drawn. The draws themselves
    are uniform: mean 1/2 and variance 1/12 within 0.002 over 100,000 (seed, index) pairs."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, V, generator=g) * 3
    params = SamplingParams(max_new_tokens=1, temperature=0.8, top_k=40, top_p=0.95)
    n = 40_000
    rows = [_row(params, s) for s in range(n)]
    picks = torch.tensor(sample_tokens(logits.expand(n, V), rows))
    probs = processed_scores(logits, rows[:1])[0].double().softmax(-1)
    freq = torch.bincount(picks, minlength=V).double() / n
    assert float(freq[probs == 0].sum()) == 0.0
    assert 0.5 * float((freq - probs).abs().sum()) < 0.01
    u = torch.tensor([row_uniform(s, i) for s in range(1000) for i in range(100)], dtype=torch.float64)
    assert abs(float(u.mean()) - 0.5) < 0.002 and abs(float(u.var()) - 1 / 12) < 0.002
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0


def test_a_row_whose_weights_overflow_gets_none():
    rows = [_row(SamplingParams(max_new_tokens=1, temperature=1e-45), 0), _row(PARAMS[0], 1)]
    picks = sample_tokens(torch.stack([_logits(0, 0), _logits(1, 0)]), rows)
    assert picks[0] is None and isinstance(picks[1], int)


@pytest.mark.slow
def test_engine_seeded_rows_are_the_same_alone_together_and_in_two_halves(tiny_models):
    """GRPO's rollouts: G completions of each prompt, each with its own seed, submitted at once; under two
    processes each generates half the prompts. Every completion is the same in all three layouts, and alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.inference.chat import ChatEngine, GenConfig

    d = tiny_models("qwen2")
    chat = ChatEngine(AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d))
    try:
        prompts = [chat.prompt([{"role": "user", "content": f"say something {j}"}]).ids for j in range(4)]
        cfg = [GenConfig(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=1000 + 4 * j) for j in range(4)]

        def run(which, choices=range(4)):
            handles = [chat.engine.submit(prompts[j], chat.sampling(cfg[j], k)) for j in which for k in choices]
            return [h.result().token_ids for h in handles]

        together = run([0, 1, 2, 3])
        even, odd = run([0, 2]), run([1, 3])
        halves = even[:4] + odd[:4] + even[4:] + odd[4:]
        alone = [run([j], [k])[0] for j in range(4) for k in range(4)]
        assert together == halves == alone
        assert len({tuple(t) for t in together}) == 16
    finally:
        chat.close()
