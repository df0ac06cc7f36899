"""Every speed/memory path is exact against the plain computation (fp32): chunked log-probs, padding-free packing."""
import os

import pytest
import torch

from conftest import EXAMPLES, write_jsonl
from tunesmith.data.collate import pad_collate
from tunesmith.data.encode import ChatEncoder
from tunesmith.data.formats import normalise_row
from tunesmith.data.load import load_datasets


def _rows(model_dir, n=12):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = ChatEncoder(tok)
    recs = load_datasets([os.path.join(EXAMPLES, "capitals_messages.jsonl"),
                          os.path.join(EXAMPLES, "capitals_alpaca.json")]).records[:n]
    return tok, [enc.encode(r) for r in recs]


def _lora(model_dir, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return m


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("train_lm_head", [False, True])
def test_chunked_logps_equal_plain_with_gradients(tiny_models, train_lm_head):
    from tunesmith.train.token_logps import chunked_head, token_logps, CHUNK_FLOATS
    import tunesmith.train.token_logps as tl

    model_dir = tiny_models("qwen2")
    tok, rows = _rows(model_dir)
    batch = pad_collate(rows, tok.pad_token_id)
    model = _lora(model_dir)
    if train_lm_head:
        model.get_base_model().lm_head.weight.requires_grad_(True)
    assert chunked_head(model) is not None
    results = {}
    old = tl.CHUNK_FLOATS
    tl.CHUNK_FLOATS = 7 * model.get_base_model().lm_head.weight.shape[0]  # 7 tokens per chunk: many chunks
    try:
        for chunked in (False, True):
            model.zero_grad(set_to_none=True)
            out = token_logps(model, batch, chunked=chunked)
            # an uneven upstream gradient per token (as DPO's per-sequence weights produce)
            weights = torch.linspace(0.5, 2.0, out.logps.numel())
            (-(out.logps * weights).sum()).backward()
            results[chunked] = (out, _grads(model))
    finally:
        tl.CHUNK_FLOATS = old
    (plain, gp), (fast, gf) = results[False], results[True]
    assert torch.allclose(plain.logps, fast.logps, atol=1e-5)
    assert torch.equal(plain.rows, fast.rows) and torch.equal(plain.correct, fast.correct)
    assert torch.allclose(plain.logits_mean, fast.logits_mean, atol=1e-5)
    assert gp.keys() == gf.keys() and len(gp) > 0
    # the tiny model ties lm_head to embed_tokens: the head's gradient shows under either name
    assert any("lm_head" in k or "embed_tokens" in k for k in gp) == train_lm_head
    for k in gp:
        assert torch.allclose(gp[k], gf[k], atol=1e-5, rtol=1e-4), k
    assert CHUNK_FLOATS == tl.CHUNK_FLOATS


def test_models_the_chunked_path_cannot_serve_use_the_plain_path(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from tunesmith.train.token_logps import chunked_head

    m = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"))
    saved = get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert chunked_head(saved) is None  # lm_head is wrapped: the model's own forward is the only exact path
    moe = AutoModelForCausalLM.from_pretrained(tiny_models("gpt_oss"), output_router_logits=True)
    assert chunked_head(moe) is None    # the router loss comes from the model's forward
