"""The greedy arg-max of a float32 output layer through a bfloat16 screen (inference/last_output.py) picks the
token the float32 product picks — on random weights, peaked (trained-like) scores, near-ties finer than bfloat16
can tell apart, exact ties, banned tokens, and weights changed in place between steps."""
import pytest
import torch

from tunesmith.inference.last_output import BLOCK, OutputScreen, chunked_argmax


def _reference(hidden, weight, banned=()):
    """torch.argmax over the full float32 logits (ties to the lowest id), banned ids excluded."""
    logits = hidden @ weight.T
    if banned:
        logits[:, list(banned)] = float("-inf")
    return logits.argmax(-1)


@pytest.mark.parametrize("vocab,hidden_size,rows", [(20_000, 64, 64), (9_001, 256, 7)])
def test_screen_equals_the_float32_argmax_on_random_weights(vocab, hidden_size, rows):
    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden_size) * 0.02
    hidden = torch.randn(rows, hidden_size)
    screen = OutputScreen()
    assert screen.argmax(hidden, weight).tolist() == _reference(hidden, weight).tolist()
    assert screen.argmax(hidden, weight).tolist() == chunked_argmax(hidden, weight).tolist()


def test_screen_equals_the_float32_argmax_on_peaked_scores():
    """Trained-like: each hidden state points at a few tokens (large margin) plus noise."""
    torch.manual_seed(1)
    weight = torch.randn(30_000, 128)
    targets = torch.randint(0, 30_000, (32,))
    hidden = weight[targets] * 3 + torch.randn(32, 128)
    got = OutputScreen().argmax(hidden, weight)
    assert got.tolist() == _reference(hidden, weight).tolist()
    assert (got == targets).float().mean() > 0.9  # the screen was decisive on the obvious winners


def test_near_ties_finer_than_bfloat16_are_resolved_in_float32(monkeypatch):
    """Rows that differ only below bfloat16's resolution score the same in the screen; the float32 rescoring
    must still find the one that is larger, wherever its id lies, and an exact tie must go to the lower id.
    With near-copies in more blocks than the screen rescores first, the row goes through the inconclusive-screen
    path (`_settle`)."""
    torch.manual_seed(2)
    vocab, h = 12_000, 64
    weight = torch.randn(vocab, h) * 0.05
    hidden = torch.randn(6, h)
    winners = {0: 5_000, 1: 40, 2: 3 + BLOCK * 50, 3: 11_001}
    for r, win in winners.items():
        top = hidden[r] / hidden[r].norm() * 4                  # a clear winner for row r ...
        for j in range(8):                                       # ... copied into 8 blocks
            weight[(win + 997 * (j + 1)) % vocab] = top
        k = int(hidden[r].abs().argmax())
        weight[win] = top
        weight[win, k] += 1e-4 * torch.sign(hidden[r, k])       # the one larger by ~1e-4 (bfloat16 cannot see it)
    weight[2_000] = weight[2_001] = hidden[4] / hidden[4].norm() * 4   # an exact tie: the lower id wins
    settled = []
    original = OutputScreen._settle
    monkeypatch.setattr(OutputScreen, "_settle", lambda self, *a: settled.append(1) or original(self, *a))
    got = OutputScreen().argmax(hidden, weight)
    assert got.tolist() == _reference(hidden, weight).tolist()
    assert [int(got[r]) for r in winners] == list(winners.values()) and int(got[4]) == 2_000
    assert len(settled) >= 4


def test_banned_tokens_never_win_even_when_largest():
    torch.manual_seed(3)
    weight = torch.randn(8_192, 32)
    hidden = torch.randn(5, 32)
    best = _reference(hidden, weight)
    banned = tuple(sorted(set(best.tolist()) | {0, 8_191}))
    got = OutputScreen().argmax(hidden, weight, banned)
    assert got.tolist() == _reference(hidden, weight, banned).tolist()
    assert not set(got.tolist()) & set(banned)


def test_weights_changed_in_place_are_noticed():
    """A full-weight update between steps (in place, through .data without a version bump, or a new tensor)
    must not leave the screen ranking the old weights."""
    torch.manual_seed(4)
    weight = torch.randn(10_000, 48)
    hidden = torch.randn(16, 48)
    screen = OutputScreen()
    assert screen.argmax(hidden, weight).tolist() == _reference(hidden, weight).tolist()
    weight.mul_(-1)                                          # in place: the version counter moves
    assert screen.argmax(hidden, weight).tolist() == _reference(hidden, weight).tolist()
    weight.data.copy_(torch.randn(10_000, 48))               # through .data: caught by the probe rows
    assert screen.argmax(hidden, weight).tolist() == _reference(hidden, weight).tolist()
    other = torch.randn(10_000, 48)
    assert screen.argmax(hidden, other).tolist() == _reference(hidden, other).tolist()


def test_non_finite_weights_fall_back_to_the_float32_product():
    torch.manual_seed(5)
    weight = torch.randn(6_000, 16)
    weight[17, 3] = float("inf")
    hidden = torch.randn(3, 16)
    assert OutputScreen().argmax(hidden, weight).tolist() == chunked_argmax(hidden, weight).tolist()


def test_engine_greedy_generation_equals_transformers_at_a_real_sized_vocabulary(tmp_path):
    """The engine's greedy rows (through the screen where this CPU multiplies bfloat16 natively, else the
    float32 chunks) generate the tokens transformers' own greedy `generate` does, batched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tunesmith.inference.engine import GenerationEngine, SamplingParams
    from tunesmith.inference.last_output import native_bfloat16
    from tunesmith.testing import build_tokenizer

    tok = build_tokenizer("qwen2")
    cfg = Qwen2Config(vocab_size=6_144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(6)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    prompts = [tok.encode(f"question {i}: " + "word " * (i % 5)) for i in range(8)]
    engine = GenerationEngine(model, tok, stop_ids=[], max_batch_size=8)
    try:
        got = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))]
        assert (engine._screen._weight16 is not None) == native_bfloat16(torch.device("cpu"))  # screened here?
    finally:
        engine.close()
    for ids, out in zip(prompts, got):
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("rows", [1, 5, 32, 40])
def test_head_product_and_chunked_argmax_in_either_orientation(rows):
    """Few rows take the tall product (weight @ hidden.T) on a CPU; both orientations give the wide product's
    logits (up to summation order) and the same arg-max, banned ids and cross-chunk ties included."""
    from tunesmith.inference.last_output import head_product

    torch.manual_seed(7)
    weight = torch.randn(3_000, 24)
    weight[2_500] = weight[10]                               # a tie across chunks: the lower id wins
    hidden = torch.randn(rows, 24)
    hidden[0] = weight[10] * 5
    wide = hidden @ weight.T
    assert head_product(hidden, weight).is_contiguous()
    assert torch.allclose(head_product(hidden, weight), wide, atol=1e-5)
    assert chunked_argmax(hidden, weight, chunk=512).tolist() == wide.argmax(-1).tolist()
    banned = (10, int(wide[-1].argmax()))
    assert chunked_argmax(hidden, weight, banned, chunk=512).tolist() == _reference(hidden, weight, banned).tolist()
