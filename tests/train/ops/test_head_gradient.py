"""The chunked output layer takes its gradient in the forward pass (ChunkedLogps): exact against the plain
[tokens × vocabulary] computation in float32 — frozen and trained heads, tied and untied, one upstream gradient
(SFT) and one per token (DPO, KTO, GRPO) — and it multiplies by the output weight only as often as the plain path."""
import pytest
import torch

from tunesmith.train.ops import token_logps as tl


def _plain(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def _case(n=37, h=16, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.rand(n, generator=g) + 0.5
    return hidden, weight, targets, upstream


@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("summed", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 37, 100])
def test_gradients_equal_the_plain_computation(train_weight, summed, chunk):
    hidden, weight, targets, upstream = _case()
    if summed:
        upstream = torch.full_like(upstream, -0.37)  # SFT: −1/tokens for every token
    grads = {}
    for name in ("plain", "chunked"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(train_weight)
        if name == "plain":
            logps = _plain(h, w, targets)
        else:
            logps, *_ = tl.ChunkedLogps.apply(h, w, targets, chunk, False, None, (True, train_weight), summed)
        (logps * upstream).sum().backward()
        grads[name] = (logps.detach(), h.grad, w.grad)
    (lp, hp, wp), (lc, hc, wc) = grads["plain"], grads["chunked"]
    assert torch.allclose(lp, lc, atol=1e-5)
    assert torch.allclose(hp, hc, atol=1e-5)
    if train_weight:
        assert torch.allclose(wp, wc, atol=1e-5)
    else:
        assert wc is None


def test_summed_refuses_a_per_token_upstream_gradient():
    hidden, weight, targets, upstream = _case()
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    logps, *_ = tl.ChunkedLogps.apply(h, w, targets, 8, False, None, (True, True), True)
    with pytest.raises(RuntimeError, match="summed"):
        (logps * upstream).sum().backward()


def _count_weight_products(fn):
    """How many matrix products involving a [V, H]-sized operand run inside fn() (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_", "matmul", "bmm"):
                if any(isinstance(a, torch.Tensor) and 53 in a.shape and 16 in a.shape and a.numel() == 53 * 16
                       for a in args):
                    seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Mode():
        fn()
    return len(seen)


@pytest.mark.parametrize("train_weight,summed,products", [
    (False, False, 2),  # LoRA, any loss: logits + the hidden gradient (plain path: 2)
    (True, True, 3),    # full fine-tuning, SFT: + the weight gradient, in the forward (plain path: 3)
    (True, False, 4),   # full fine-tuning, DPO/KTO/GRPO: the weight gradient needs the upstream one (recompute)
])
def test_weight_sized_products_per_chunk(train_weight, summed, products):
    hidden, weight, targets, upstream = _case(n=5)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(train_weight)

    def step():
        logps, *_ = tl.ChunkedLogps.apply(h, w, targets, 5, False, None, (True, train_weight), summed)
        (logps * (upstream[0] if summed else upstream)).sum().backward()

    assert _count_weight_products(step) == products


def test_no_gradient_work_under_no_grad():
    hidden, weight, targets, _ = _case(n=5)
    model_free = lambda: tl.ChunkedLogps.apply(hidden, weight, targets, 5, False, None, (False, False), False)  # noqa
    assert _count_weight_products(model_free) == 1  # the reference model's log-probs: the logits only


def test_chunk_rows_follow_the_hidden_size_and_bound_the_logits():
    assert tl.chunk_rows(151_936, 512) == 256          # hidden/4 = 128, raised to the floor
    assert tl.chunk_rows(151_936, 896) == 256          # Qwen2.5-0.5B: hidden/4 = 224, raised to the floor
    assert tl.chunk_rows(151_936, 3_584) == 432        # 7B: hidden/4 = 896, capped at 441 (256 MiB), a multiple of 16
    assert tl.chunk_rows(128_256, 4_096) == 512        # Llama 3 8B: capped at 523
    assert tl.chunk_rows(32_000, 8_192) == 2_048       # hidden/4
    assert tl.chunk_rows(1_000, 64) == 256             # tiny: the floor
    assert tl.chunk_rows(1 << 27, 4_096) == 1          # never 0
    assert tl.chunk_rows(1 << 22, 4_096) == 16         # 16 rows under the cap: kept
    assert tl.chunk_rows(3 << 22, 4_096) == 5          # fewer than 16: not rounded to 0
    for vocab, hidden in ((151_936, 896), (151_936, 3_584), (262_144, 5_376)):
        assert tl.chunk_rows(vocab, hidden) * vocab <= tl.MAX_CHUNK_FLOATS


def test_chunks_are_cut_evenly_in_multiples_of_16():
    """As many chunks as `chunk` rows would need, of near-equal sizes rounded up to a multiple of 16, never above
    `chunk`; every row is covered once."""
    assert tl.even_chunk(300, 208) == 160     # 160 + 140, not 208 + 92
    assert tl.even_chunk(500, 208) == 176     # 176 + 176 + 148
    assert tl.even_chunk(416, 208) == 208
    assert tl.even_chunk(100, 208) == 100     # one chunk
    assert tl.even_chunk(0, 208) == 1
    assert tl.even_chunk(7, 5) == 5           # below 16 rows: never above the chunk
    for n in range(1, 700, 7):
        for chunk in (1, 5, 16, 100, 128, 208):
            step = tl.even_chunk(n, chunk)
            assert 1 <= step <= chunk and -(-n // step) == -(-n // chunk), (n, chunk, step)


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # a tied output layer, an untied one
@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_sft_loss_gradients_equal_the_plain_path(tiny_models, family, train_type, monkeypatch):
    """SFT's loss (summed=True: the output layer's gradient taken in the forward pass when it is trained) gives
    every parameter the gradient of the plain [tokens × vocabulary] path, to 1e-5 in float32, chunk by chunk."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.train.methods.sft import token_loss

    monkeypatch.setattr(tl, "chunk_rows", lambda vocab, hidden: 9)  # 66 trained tokens: 8 chunks
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models(family))
    if train_type == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = {}
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        if chunked:
            loss = token_loss(model, batch)[0]["tokens"]
        else:
            loss = -tl.token_logps(model, batch, chunked=False).logps.sum()
        (loss / 66).backward()
        results[chunked] = (float(loss), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None})
    (lp, gp), (lc, gc) = results[False], results[True]
    assert abs(lp - lc) < 1e-4 * abs(lp)
    assert gp.keys() == gc.keys()
    assert any("lm_head" in k or "embed_tokens" in k for k in gp) == (train_type == "full")
    for k in gp:
        assert torch.allclose(gp[k], gc[k], atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("train_weight", [False, True])
def test_entropy_and_gradients_together(train_weight):
    """GRPO's policy forward asks for each token's entropy as well: the entropy equals a float64 computation from
    the full logits (1e-5 nats), and the gradients are still the plain path's."""
    hidden, weight, targets, upstream = _case()
    weight[3] *= 40  # a few very peaked rows: entropies from near 0 to near log V
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(train_weight)
    logps, _, _, ent = tl.ChunkedLogps.apply(h, w, targets, 6, True, None, (True, train_weight), False)
    (logps * upstream).sum().backward()
    logits = hidden.double() @ weight.double().t()
    want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert want.min() < 0.1 and want.max() > 2.0
    assert torch.allclose(ent.double(), want, atol=1e-5)
    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(train_weight)
    plain = (h2 @ w2.t()).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    (plain * upstream).sum().backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-5)
    if train_weight:
        assert torch.allclose(w.grad, w2.grad, atol=1e-5)


def test_entropy_never_holds_a_second_logits_sized_buffer():
    """The entropy of a chunk is summed over blocks of vocabulary entries: no op inside it outputs a tensor as large
    as the chunk's [vocabulary x rows] logits (which stay the only buffer of that size), and it equals a float64
    computation from the full logits, −inf logits included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    logits = torch.randn(8, 40_000) * 4
    logits[:, :5] = float("-inf")
    shifted = (logits - logits.max(-1, keepdim=True).values).t().contiguous()  # [V, rows], as ChunkedLogps holds it
    largest = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.data_ptr() != shifted.data_ptr():
                largest.append(out.numel())
            return out

    with Mode():
        got = tl._shifted_entropy(shifted)
    p = torch.softmax(logits.double(), -1)
    want = -(p * torch.log_softmax(logits.double(), -1).nan_to_num(neginf=0.0)).sum(-1)
    assert torch.allclose(got.double(), want, rtol=5e-5, atol=0)  # float32 sums over 40,000 entries
    assert max(largest) <= 8 * tl.ENTROPY_ROWS < shifted.numel()


def test_token_accuracy_breaks_exact_ties_as_argmax():
    """`correct` is torch.argmax(logits) == target, ties included: with two identical output rows (an untrained
    model's duplicated or zero embeddings), the first of them is the arg-max, the second never counts as correct.
    The tall layout takes the arg-max by blocks of the vocabulary, so the tie spans two blocks here too."""
    g = torch.Generator().manual_seed(0)
    vocab = tl.ARGMAX_BLOCK + 50
    weight = torch.randn(vocab, 8, generator=g) * 0.01
    direction = torch.randn(8, generator=g)
    hidden = direction + 0.01 * torch.randn(12, 8, generator=g)
    top_row = 5 * direction  # a row that wins for every hidden state here, copied into a later block
    first, second = 3, tl.ARGMAX_BLOCK + 7
    weight[first] = weight[second] = top_row
    logits = hidden @ weight.t()
    assert bool((logits.argmax(-1) == first).all())
    targets = torch.tensor([first, second] * 6)
    _, correct, _, _ = tl.ChunkedLogps.apply(hidden, weight, targets, 5, False, None, (False, False), False)
    assert correct.tolist() == [True, False] * 6
    assert torch.equal(correct, logits.argmax(-1) == targets)
