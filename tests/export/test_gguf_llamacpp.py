"""The GGUF files tunesmith writes, run by llama.cpp itself (through llama-cpp-python): what a user of llama.cpp,
Ollama or LM Studio gets.

- Each family's f16 GGUF continues 5 prompts greedily with the same 8 tokens as transformers' greedy generate on the
  HF model, and its logits agree within a stated tolerance.
- A chat rendered by the GGUF's embedded template (llama-cpp-python's Jinja2ChatFormatter, as its server renders
  it) and tokenised by llama.cpp gives the HF tokenizer's apply_chat_template ids: system prompt, several turns, and
  tool calls with the families' official templates.
- Generation ends in llama.cpp on every token that ends it in transformers (generation_config's eos_token_id).
- llama.cpp's quantiser makes every type of GGUF_TYPES it is asked for from one call, quietly, and a K-quant file
  really holds K-quant tensors.
"""
import json
import os

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'tunesmith[gguf]'")

from tunesmith.errors import TunesmithError
from tunesmith.export.to_gguf import GGUF_FAMILIES, LLAMA_CPP_TYPES, quantize_gguf, source_from_folder, write_gguf

PROMPTS = ["The capital of France is", "12 + 30 = 42, 7 * 6 =", "Once upon a time", "你好, héllo wörld!",
           "<think>\nOK</think> answer:"]


def _read(model_dir, name):
    with open(os.path.join(model_dir, name), encoding="utf-8") as fh:
        return json.load(fh)


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _hf_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def export(model_dir, out_dir, types):
    """write_gguf on a model folder, as `tunesmith export` calls it."""
    return write_gguf(source_from_folder(model_dir), _read(model_dir, "config.json"), _tokenizer(model_dir),
                      str(out_dir), "m", types, generation_config=_read(model_dir, "generation_config.json"))


def _llama(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, **kw)


@pytest.fixture(scope="module")
def varied(tmp_path_factory, tiny_models):
    """family -> a tiny model whose random weights are drawn wide enough (std 0.1, random biases) that greedy
    decoding does not repeat one token: a continuation that differs anywhere shows."""
    import torch

    built = {}

    def get(family, **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in built:
            out = str(tmp_path_factory.mktemp(f"varied_{family}"))
            src = tiny_models(family, **kw)
            model, tok = _hf_model(src), _tokenizer(src)
            torch.manual_seed(2)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() >= 2 and "norm" not in name or name.endswith(("bias", "_bias")):
                        p.normal_(0, 0.1)
            model.save_pretrained(out)
            tok.save_pretrained(out)
            built[key] = out
        return built[key]

    return get


def _greedy_hf(model, ids, n):
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None,
                              pad_token_id=model.generation_config.pad_token_id)
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()


def _greedy_llama(llm, ids, n):
    """llama.cpp's own greedy decoding (temperature 0), n tokens, not stopping at end-of-generation tokens."""
    out = []
    for token in llm.generate(ids, temp=0.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            return out
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_llama_cpp_continues_prompts_as_transformers_does(family, varied, tmp_path):
    """The f16 GGUF (and the f32 one) in llama.cpp gives transformers' greedy continuation of the HF model, 8 tokens
    for each of 5 prompts (these seeded weights have no near-tie that f16 rounding could flip), and llama.cpp
    tokenises each prompt as the HF tokenizer does; the f16 GGUF's logits over the prompt are within
    1e-2 + 1e-3 * max|logit| of the HF model's (llama.cpp sums in its own order; measured <= 5.6e-3 with logits up
    to 4)."""
    import numpy as np
    import torch

    model_dir = varied(family)
    f32, f16 = export(model_dir, tmp_path, ["f32", "f16"])
    tok, model = _tokenizer(model_dir), _hf_model(model_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    want = [_greedy_hf(model, ids, 8) for ids in prompts]
    for path in (f32, f16):
        llm = _llama(path)
        for prompt, ids, expected in zip(PROMPTS, prompts, want):
            assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
            assert _greedy_llama(llm, ids, 8) == expected, (os.path.basename(path), prompt)
        llm.close()
    llm = _llama(f16, logits_all=True)
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(np.asarray(llm.scores[: len(ids)]) - ref).max() < 1e-2 + 1e-3 * np.abs(ref).max()
    llm.close()


def _token_text(llm, token_id):
    return llm.detokenize([token_id], special=True).decode("utf-8") if token_id >= 0 else ""


def _conversations(family):
    """(messages, tools) pairs: a system prompt and several turns; for Qwen a tool call and its result too."""
    turns = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi there"},
             {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": "What is 2 + 2? Reply in 中文 please."}]
    out = [(turns, None), (turns[1:2], None)]
    if family in ("qwen2", "qwen3"):
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        call = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "{\"temp_c\": 21}"}]
        out.append((call, tools))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", GGUF_FAMILIES)
@pytest.mark.parametrize("official", [False, True])
def test_the_embedded_chat_template_gives_the_same_prompt_ids(family, official, tiny_models, tmp_path):
    """The GGUF's tokenizer.chat_template rendered by llama-cpp-python (Jinja2ChatFormatter: what its server and
    chat completion use) and tokenised by llama.cpp equals apply_chat_template's ids from the HF tokenizer, with the
    compact template and with the family's official one (tools, tool calls)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model_dir = tiny_models(family, official_template=official)
    path = export(model_dir, tmp_path, ["f16"])[0]
    tok = _tokenizer(model_dir)
    llm = _llama(path, vocab_only=True)
    template = llm.metadata["tokenizer.chat_template"]
    assert template == tok.chat_template
    render = Jinja2ChatFormatter(template=template, eos_token=_token_text(llm, llm.token_eos()),
                                 bos_token=_token_text(llm, llm.token_bos()))
    for messages, tools in _conversations(family):
        prompt = render(messages=messages, tools=tools).prompt
        want = tok.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == list(want), messages
    llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_generation_ends_on_the_models_end_tokens(family, tiny_models, tmp_path):
    """Every id of generation_config's eos_token_id (Qwen <|im_end|>, Llama <|eot_id|>, gpt-oss <|return|> and
    <|call|>) is an end-of-generation token for llama.cpp (llama_vocab_is_eog), and the tokenizer's EOS is its
    EOS."""
    model_dir = tiny_models(family)
    path = export(model_dir, tmp_path, ["f16"])[0]
    eos = _read(model_dir, "generation_config.json")["eos_token_id"]
    llm = _llama(path, vocab_only=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in (eos if isinstance(eos, list) else [eos]))
    assert llm.token_eos() == _tokenizer(model_dir).eos_token_id
    llm.close()


# ------------------------------------------------------------------ llama.cpp's quantiser

def _tensor_types(path):
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_f16_q8_0_and_q4_k_m_from_one_call(tiny_models, tmp_path, capfd):
    """Three files from one call and nothing else in the folder (the float intermediate is gone); the q4_k_m file
    holds llama.cpp's Q4_K/Q6_K mix (hidden 256: whole K-quant super-blocks) and runs in llama.cpp. Relative to the
    f16 file's logits in llama.cpp (||q - f|| / ||f|| over 5 prompts) q8_0 stays within 0.05 and q4_k_m within
    0.25 (measured 0.017 and 0.147: random weights have no structure to spare, so 4 bits cost more than on a
    trained model); llama.cpp printed nothing."""
    import numpy as np

    model_dir = tiny_models("llama", hidden=256)
    capfd.readouterr()
    paths = export(model_dir, tmp_path, ["f16", "q8_0", "q4_k_m"])
    assert sorted(os.listdir(tmp_path)) == ["m-F16.gguf", "m-Q4_K_M.gguf", "m-Q8_0.gguf"]
    assert capfd.readouterr().err == ""
    kinds = set(_tensor_types(paths[2]).values())
    assert {"Q4_K", "Q6_K"} <= kinds and "F16" not in kinds
    tok = _tokenizer(model_dir)
    logits = []
    for path in paths:
        llm = _llama(path, logits_all=True)
        rows = []
        for prompt in PROMPTS:
            llm.reset()
            ids = tok(prompt)["input_ids"]
            llm.eval(ids)
            rows.append(np.asarray(llm.scores[: len(ids)]))
        logits.append(np.concatenate(rows))
        llm.close()
    rel = [float(np.linalg.norm(q - logits[0]) / np.linalg.norm(logits[0])) for q in logits[1:]]
    assert rel[0] < 0.05 and rel[1] < 0.25, rel


@pytest.mark.slow
def test_a_bf16_model_is_quantised_from_a_bf16_intermediate(tiny_models, tmp_path):
    """A bf16 model (as training saves it) asked only for q4_k_m: llama.cpp quantises from a lossless bf16
    intermediate that is gone afterwards, and the file runs; asked for bf16 too, that file is the intermediate."""
    import torch

    from tunesmith.export.gguf_tensors import plan_tensors
    from tunesmith.export.to_gguf import float_type, source_from_model

    model_dir = tiny_models("qwen3", hidden=256)
    source = source_from_model(_hf_model(model_dir).to(torch.bfloat16))
    config, tok = _read(model_dir, "config.json"), _tokenizer(model_dir)
    assert float_type(source, plan_tensors("qwen3", config, dict(source.shapes))) == "bf16"
    (path,) = write_gguf(source, config, tok, str(tmp_path / "a"), "m", ["q4_k_m"])
    assert os.listdir(tmp_path / "a") == ["m-Q4_K_M.gguf"]
    llm = _llama(path)
    llm.eval(llm.tokenize(b"Hello", add_bos=True))
    llm.close()
    paths = write_gguf(source, config, tok, str(tmp_path / "b"), "m", ["q4_k_m", "bf16"])
    assert sorted(os.listdir(tmp_path / "b")) == ["m-BF16.gguf", "m-Q4_K_M.gguf"]
    assert "BF16" in set(_tensor_types(paths[1]).values())


@pytest.mark.slow
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_every_llama_cpp_type_is_made_without_an_importance_matrix(family, tiny_models, tmp_path):
    """Each of LLAMA_CPP_TYPES (GGUF_TYPES beyond the Python-written ones) quantises a hidden-256 model of the
    family in one call, and each file loads and evaluates in llama.cpp."""
    paths = export(tiny_models(family, hidden=256), tmp_path, list(LLAMA_CPP_TYPES))
    assert len(paths) == len(LLAMA_CPP_TYPES) and len(os.listdir(tmp_path)) == len(LLAMA_CPP_TYPES)
    for path in paths:
        llm = _llama(path, n_batch=64)
        llm.eval(llm.tokenize(b"Hello world", add_bos=True))
        llm.close()


@pytest.mark.slow
def test_a_quantiser_failure_is_one_message(tiny_models, tmp_path, capfd):
    """llama.cpp refusing a quantisation (IQ2_XXS needs an importance matrix) is one TunesmithError with
    llama.cpp's reason, and nothing of llama.cpp's log reaches the terminal."""
    src = export(tiny_models("qwen2", hidden=256), tmp_path, ["f16"])[0]
    capfd.readouterr()
    with pytest.raises(TunesmithError, match="IQ2_XXS: .*requires an importance matrix"):
        quantize_gguf(llama_cpp, src, str(tmp_path / "bad.gguf"), "iq2_xxs")
    assert capfd.readouterr().err == ""
    assert os.listdir(tmp_path) == ["m-F16.gguf"]
