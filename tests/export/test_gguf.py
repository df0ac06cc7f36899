"""GGUF export (tunesmith.export.to_gguf), checked without llama.cpp: what a user loading the file elsewhere sees.

- The weights: each family's GGUF read back by transformers' own GGUF loader gives the HF model's logits (f32 to
  float rounding, f16 within 1e-3, q8_0 and q4_k_m within stated tolerances, their perplexity near f16's). gpt-oss
  is read back by this file's own reader (`_gpt_oss_from_gguf`), written from transformers' GptOss definition,
  because transformers' GGUF loader cannot load llama.cpp's gpt-oss expert layout (it looks for
  `ffn_gate_up_projs`/`ffn_*_projs` tensors, and reads no head_dim); llama.cpp itself runs every family in
  test_gguf_llamacpp.py.
- The tokenizer: tokenizer.ggml.* read back with gguf.GGUFReader equal the HF tokenizer's, and transformers'
  GGUF tokenizer encodes text to the same ids (the tiny tokenizers, and the real Qwen2.5 one).
- The refusals: a family, type, pre-tokenizer or tensor the writer cannot write is one message before anything is
  written; a failure while writing leaves no file.
- Streaming: at most a couple of source tensors are alive at once.
"""
import gc
import json
import os
import weakref

import pytest

from tunesmith.errors import ConfigError
from tunesmith.export.to_gguf import (
    GGUF_FAMILIES, GGUF_TYPES, TensorSource, gguf_family_problem, gguf_quant_problems, llama_cpp_available,
    source_from_folder, source_from_model, tokenizer_problem, write_gguf)

FAMILIES = list(GGUF_FAMILIES)
PROMPTS = ["The capital of France is Paris and the capital of Japan is", "12 + 30 = 42, 7 * 6 =",
           "你好, héllo wörld! <think>x</think> ok"]
HELD_OUT = ("Once upon a time there was a little river that ran down from the mountain to the sea. "
            "Every morning the children of the town walked to school along its banks, and every evening "
            "they came back to play in the water until the sun went down behind the hills.")


def _read(model_dir, name):
    with open(os.path.join(model_dir, name), encoding="utf-8") as fh:
        return json.load(fh)


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def export(model_dir, out_dir, types, source=None, tokenizer=None, stem="m"):
    """write_gguf on a model folder, as `tunesmith export` calls it."""
    return write_gguf(source or source_from_folder(model_dir), _read(model_dir, "config.json"),
                      tokenizer or _tokenizer(model_dir), str(out_dir), stem, types,
                      generation_config=_read(model_dir, "generation_config.json"))


def _hf_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _gguf_field(path, key):
    import gguf

    field = gguf.GGUFReader(path).fields.get(key)
    return None if field is None else field.contents()


def _gpt_oss_from_gguf(path, model_dir):
    """The HF GptOss model with its weights read from the GGUF at path: llama.cpp's layout undone as transformers'
    GptOssExperts defines its own (gate_up_proj [E, hidden, 2*ff] with gate at even and up at odd columns,
    down_proj [E, ff, hidden]); every other tensor by gguf's own name map."""
    import gguf
    import torch

    model = _hf_model(model_dir)
    t = {x.name: torch.from_numpy(gguf.dequantize(x.data, x.tensor_type).copy()).float()
         for x in gguf.GGUFReader(path).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, model.config.num_hidden_layers)
    sd = {}
    for hf_name, ref in model.state_dict().items():
        stem, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is not None:
            sd[hf_name] = t[f"{mapped}.{suffix}"].reshape(ref.shape)
        elif hf_name.endswith("self_attn.sinks"):
            sd[hf_name] = t[f"{names.get_name(hf_name)}.weight"]
    for i in range(model.config.num_hidden_layers):
        p, b = f"model.layers.{i}.mlp.experts.", f"blk.{i}."
        gate, up = t[b + "ffn_gate_exps.weight"].transpose(1, 2), t[b + "ffn_up_exps.weight"].transpose(1, 2)
        sd[p + "gate_up_proj"] = torch.stack([gate, up], dim=-1).flatten(-2)
        sd[p + "gate_up_proj_bias"] = torch.stack([t[b + "ffn_gate_exps.bias"], t[b + "ffn_up_exps.bias"]],
                                                  dim=-1).flatten(-2)
        sd[p + "down_proj"] = t[b + "ffn_down_exps.weight"].transpose(1, 2)
        sd[p + "down_proj_bias"] = t[b + "ffn_down_exps.bias"]
    model.load_state_dict(sd, strict=True)
    return model


def gguf_model(path, model_dir, family):
    """The GGUF at path as a transformers model: transformers' GGUF loader (head_dim passed from the file's
    attention.key_length, which the loader does not read for qwen3), or _gpt_oss_from_gguf for gpt-oss."""
    import torch
    from transformers import AutoModelForCausalLM

    if family == "gpt_oss":
        return _gpt_oss_from_gguf(path, model_dir)
    extra = {}
    key_length = _gguf_field(path, f"{family}.attention.key_length")
    if key_length is not None:
        extra["head_dim"] = int(key_length)
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32, **extra).eval()


def _logits(model, tok, texts):
    import torch

    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).logits[0] for t in texts]


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _perplexity(model, tok, text):
    import torch

    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


@pytest.fixture(scope="module")
def gpt_oss_with_biases(tmp_path_factory, tiny_models):
    """The tiny gpt-oss with random expert and router biases (transformers initialises them to zero), so that the
    bias split is checked too."""
    import torch

    out = str(tmp_path_factory.mktemp("gpt_oss_biased"))
    src = tiny_models("gpt_oss")
    model, tok = _hf_model(src), _tokenizer(src)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_bias", "router.bias")):
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _family_dir(family, tiny_models, gpt_oss_with_biases):
    return gpt_oss_with_biases if family == "gpt_oss" else tiny_models(family)


# ------------------------------------------------------------------ weights: logits through transformers

@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_float_ggufs_give_the_models_logits(family, tiny_models, gpt_oss_with_biases, tmp_path):
    """f32 reproduces the logits to float rounding (1e-5; measured 0), f16 within 1e-3 (the issue's bound;
    measured 2.9e-4 to 3.4e-4), q8_0 within 3e-2 (measured 6.7e-3 to 9.2e-3: 8-bit blocks of 32 values with one
    f16 scale each)."""
    model_dir = _family_dir(family, tiny_models, gpt_oss_with_biases)
    paths = export(model_dir, tmp_path, ["f32", "f16", "q8_0"])
    assert [os.path.basename(p) for p in paths] == ["m-F32.gguf", "m-F16.gguf", "m-Q8_0.gguf"]
    tok = _tokenizer(model_dir)
    ref = _logits(_hf_model(model_dir), tok, PROMPTS)
    diffs = [_max_diff(_logits(gguf_model(p, model_dir, family), tok, PROMPTS), ref) for p in paths]
    assert diffs[0] < 1e-5, diffs
    assert diffs[1] < 1e-3, diffs
    assert diffs[2] < 3e-2, diffs


def _relative(a, b):
    """||a - b|| / ||b|| over all the prompts' logits."""
    import torch

    return float(torch.linalg.norm(torch.cat(a) - torch.cat(b)) / torch.linalg.norm(torch.cat(b)))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_quantised_ggufs_stay_near_the_model(family, tiny_models, tmp_path):
    """hidden 256 (so that K-quant super-blocks of 256 apply instead of their fallbacks): relative to the HF model's
    logits (||q - f|| / ||f||) q8_0 stays within 0.05 and q4_k_m (llama.cpp's quantiser, when installed) within
    0.25 (measured 0.013-0.014 and 0.14-0.16: random weights have no structure to spare, so 4 bits cost more than on a
    trained model); their perplexity on a held-out text is within 1% (q8_0) and 5% (q4_k_m) of f16's (measured
    0.2% and 0.5%). The model is random, so this measures the quantisers' numerical fidelity, not language
    quality."""
    model_dir = tiny_models(family, hidden=256)
    types = ["f16", "q8_0"] + (["q4_k_m"] if llama_cpp_available() else [])
    paths = export(model_dir, tmp_path, types)
    tok = _tokenizer(model_dir)
    ref = _logits(_hf_model(model_dir), tok, PROMPTS)
    models = {t: gguf_model(p, model_dir, family) for t, p in zip(types, paths)}
    ppl = {t: _perplexity(m, tok, HELD_OUT) for t, m in models.items()}
    assert _relative(_logits(models["q8_0"], tok, PROMPTS), ref) < 0.05
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.01, ppl
    if "q4_k_m" in models:
        assert _relative(_logits(models["q4_k_m"], tok, PROMPTS), ref) < 0.25
        assert abs(ppl["q4_k_m"] / ppl["f16"] - 1) < 0.05, ppl


@pytest.mark.slow
def test_an_in_memory_model_writes_the_same_file_as_its_folder(tiny_models, tmp_path):
    """source_from_model (a LoRA-merged model in memory, whose state dict also lists a tied lm_head) and
    source_from_folder give byte-identical GGUFs."""
    for family in ("qwen2", "llama"):
        model_dir = tiny_models(family)
        a = export(model_dir, tmp_path / family / "a", ["f16", "q8_0"])
        b = export(model_dir, tmp_path / family / "b", ["f16", "q8_0"], source=source_from_model(_hf_model(model_dir)))
        for x, y in zip(a, b):
            with open(x, "rb") as fa, open(y, "rb") as fb:
                assert fa.read() == fb.read()


# ------------------------------------------------------------------ tensors: llama.cpp's names, shapes and types

def _tensors(path):
    import gguf

    return {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_llama_cpp_layouts_and_types(tiny_models, gpt_oss_with_biases, tmp_path):
    """Shapes as ggml `ne` (llama.cpp's create_tensor in src/models/*.cpp) and the F32 rule: in an f16 file the
    norms, biases, sinks and the MoE router stay F32, the matrices are F16; tied embeddings (qwen2) have no output
    tensor, untied ones (llama) have."""
    qwen = _tensors(export(tiny_models("qwen2"), tmp_path / "q", ["f16"])[0])
    assert "output.weight" not in qwen and qwen["token_embd.weight"] == ((64, 2054), "F16")
    assert qwen["blk.0.attn_q.bias"] == ((64,), "F32") and qwen["blk.0.attn_k.weight"] == ((64, 32), "F16")
    llama = _tensors(export(tiny_models("llama"), tmp_path / "l", ["f16"])[0])
    assert llama["output.weight"] == ((64, 2054), "F16") and llama["blk.1.ffn_norm.weight"] == ((64,), "F32")
    qwen3 = _tensors(export(tiny_models("qwen3"), tmp_path / "q3", ["f16"])[0])
    assert qwen3["blk.0.attn_q_norm.weight"] == ((16,), "F32")
    oss = _tensors(export(gpt_oss_with_biases, tmp_path / "o", ["f16"])[0])
    hidden, ff, experts, heads = 64, 64, 4, 4
    assert oss["blk.0.ffn_gate_exps.weight"] == ((hidden, ff, experts), "F16")
    assert oss["blk.0.ffn_up_exps.weight"] == ((hidden, ff, experts), "F16")
    assert oss["blk.0.ffn_down_exps.weight"] == ((ff, hidden, experts), "F16")
    assert oss["blk.0.ffn_gate_exps.bias"] == ((ff, experts), "F32")
    assert oss["blk.0.ffn_gate_inp.weight"] == ((hidden, experts), "F32")
    assert oss["blk.0.attn_sinks.weight"] == ((heads,), "F32")
    assert oss["blk.0.post_attention_norm.weight"] == ((hidden,), "F32")


def test_architecture_metadata(tiny_models, tmp_path):
    """The key/value metadata llama.cpp's loaders read (src/models/openai-moe.cpp: sliding window and its pattern,
    expert counts and feed-forward length; head counts, RoPE base, RMS epsilon)."""
    import gguf

    path = export(tiny_models("gpt_oss"), tmp_path, ["f32"])[0]
    fields = gguf.GGUFReader(path).fields
    got = {k: fields[k].contents() for k in fields if k.startswith("gpt-oss.")}
    assert got["gpt-oss.attention.sliding_window_pattern"] == [True, False]
    assert got["gpt-oss.attention.sliding_window"] == 128
    assert (got["gpt-oss.expert_count"], got["gpt-oss.expert_used_count"]) == (4, 2)
    assert got["gpt-oss.expert_feed_forward_length"] == 64
    assert (got["gpt-oss.attention.head_count"], got["gpt-oss.attention.head_count_kv"]) == (4, 2)
    assert (got["gpt-oss.attention.key_length"], got["gpt-oss.rope.freq_base"]) == (16, 10000.0)
    assert got["gpt-oss.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    """A Llama 3.1 `rope_type: llama3` scaling is written as llama.cpp's rope_freqs tensor (LlamaModel.
    generate_extra_tensors): factor 1 for the high frequencies, `factor` for the low ones."""
    import gguf

    from tunesmith.export.gguf_tensors import llama3_rope_factors, plan_tensors

    config = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 128, "num_attention_heads": 2,
              "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}}
    plan = plan_tensors("llama", config, {"model.embed_tokens.weight": (10, 128)})
    assert plan[0].name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    factors = llama3_rope_factors(config)
    assert factors.shape == (32,) and factors[0] == 1.0 and factors[-1] == 8.0


# ------------------------------------------------------------------ tokenizer metadata

# the tiny tokenizers split with GPT-2's ByteLevel regex; transformers 5 opens the qwen2 one as Qwen2Tokenizer,
# which splits with Qwen2's regex instead
_EXPECTED_PRE = {"qwen2": "qwen2", "qwen3": "gpt-2", "llama": "gpt-2", "gpt_oss": "gpt-2"}
TEXTS = ["Hello world", "  spaces   and\ttabs\n\nnewlines", "12345 + 678 = 999", "héllo wörld 你好 🦙 ñ",
         "I've been 'told' it's OK, WE'RE sure", "<think>x</think> <tool_call>{\"a\": 1}</tool_call>"]


def _special_texts(tok):
    return [f"{tok.eos_token}x{tok.pad_token}", "".join(tok.all_special_tokens[:4]) + " hi"]


def assert_tokenizer_metadata(path, tok, pre, generation_config):
    """tokenizer.ggml.* in the GGUF at path equal the HF tokenizer's, and transformers' GGUF tokenizer encodes
    TEXTS and special-token strings to the same ids."""
    from transformers import AutoTokenizer

    fields = {k: v.contents() for k, v in _gguf_fields(path).items() if k.startswith("tokenizer.")}
    by_id = {i: t for t, i in tok.get_vocab().items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert all(tokens[i] == (tok.added_tokens_decoder[i].content if i in tok.added_tokens_decoder else t)
               for i, t in by_id.items())
    types = fields["tokenizer.ggml.token_type"]
    assert {types[i] for i in by_id if i not in tok.added_tokens_decoder} == {1}  # NORMAL
    assert all(types[i] == 3 for i, a in tok.added_tokens_decoder.items() if a.special)  # CONTROL
    assert fields["tokenizer.ggml.pre"] == pre and fields["tokenizer.ggml.model"] == "gpt2"
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == fields["tokenizer.ggml.eot_token_id"]
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert fields.get("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert fields["tokenizer.chat_template"] == tok.chat_template
    gen_eos = generation_config.get("eos_token_id")
    if isinstance(gen_eos, list):  # every id that ends HF generation is eos, eot or eom
        assert set(gen_eos) <= {fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")}
    back = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in TEXTS + _special_texts(tok):
        assert back(text)["input_ids"] == tok(text)["input_ids"], text


def _gguf_fields(path):
    import gguf

    return gguf.GGUFReader(path).fields


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_metadata_matches_the_hf_tokenizer(family, tiny_models, tmp_path):
    model_dir = tiny_models(family)
    path = export(model_dir, tmp_path, ["f16"])[0]
    assert_tokenizer_metadata(path, _tokenizer(model_dir), _EXPECTED_PRE[family],
                              _read(model_dir, "generation_config.json"))


def test_embedding_rows_beyond_the_tokenizer_are_padded(tiny_models, tmp_path):
    """An embedding wider than the tokenizer (Qwen2.5's 151,936 rows for 151,665 tokens) gets [PAD{id}] tokens
    typed UNUSED, as llama.cpp's converter writes them."""
    path = export(tiny_models("qwen2", model_vocab=2060), tmp_path, ["f16"])[0]
    fields = _gguf_fields(path)
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 2060 and tokens[2054:] == [f"[PAD{i}]" for i in range(2054, 2060)]
    assert set(types[2054:]) == {5}  # UNUSED


@pytest.mark.slow
def test_the_real_qwen25_tokenizer(tiny_models, tmp_path):
    """The real Qwen2.5 tokenizer (151,665 tokens, Qwen2's split regex, NFC) on a model with Qwen2.5's 151,936
    embedding rows: the GGUF's tokenizer metadata and transformers' GGUF tokenizer match it (bench/peers/
    qwen_tokenizer.py rebuilds it offline; its first build downloads the dashscope wheel from the registry)."""
    import shutil
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench", "peers"))
    from qwen_tokenizer import copy_cached_qwen25_tokenizer

    model_dir = tmp_path / "qwen25"
    shutil.copytree(tiny_models("qwen2", model_vocab=151936), model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_dir / name).unlink(missing_ok=True)
    try:
        copy_cached_qwen25_tokenizer(str(model_dir))
    except Exception as e:  # noqa: BLE001 - first build needs the package registry
        pytest.skip(f"the real Qwen2.5 tokenizer could not be built here ({e})")
    tok = _tokenizer(model_dir)
    assert len(tok) == 151665
    path = export(model_dir, tmp_path / "out", ["f16"], tokenizer=tok)[0]
    assert_tokenizer_metadata(path, tok, "qwen2", _read(model_dir, "generation_config.json"))
    assert tok("Hello world")["input_ids"] == [9707, 1879]


def test_split_regexes_are_the_ones_transformers_reads_back():
    """The pre-tokenizer names written here split text with the regex transformers' GGUF tokenizer rebuilds for
    them (its table comes from the models' own tokenizer.json files)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
    )

    from tunesmith.export.gguf_vocab import SPLITS

    assert all(GGUF_PRE_TOKENIZER_SPLITS[name] == regex for regex, name in SPLITS.items())


def _with_pre_tokenizer(tok, pre):
    tok = tok.__class__(tokenizer_object=tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str()))
    tok.backend_tokenizer.pre_tokenizer = pre
    return tok


@pytest.mark.parametrize("regex,name", [("LLAMA3_SPLIT", "llama-bpe"), ("GPT4O_SPLIT", "gpt-4o"),
                                        ("QWEN2_SPLIT", "qwen2")])
def test_pre_tokenizer_names(regex, name, tiny_models):
    """Llama 3's, o200k's (gpt-oss) and Qwen2's split regexes get llama.cpp's names for them."""
    from tokenizers import Regex, pre_tokenizers

    from tunesmith.export import gguf_vocab

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(getattr(gguf_vocab, regex)), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = _with_pre_tokenizer(_tokenizer(tiny_models("llama")), pre)
    assert tokenizer_problem(tok) is None
    assert gguf_vocab.pre_tokenizer_name(gguf_vocab.tokenizer_json(tok)) == name


# ------------------------------------------------------------------ refusals

def test_unknown_families_are_refused_by_name():
    from transformers import GPT2Config, MistralConfig

    for config, model_type in ((MistralConfig().to_dict(), "mistral"), (GPT2Config().to_dict(), "gpt2")):
        why = gguf_family_problem(config)
        assert f"model_type '{model_type}'" in why and "qwen2, qwen3, llama, gpt_oss" in why
    assert gguf_family_problem({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}) is None
    assert "Qwen2ForSequenceClassification" in gguf_family_problem(
        {"model_type": "qwen2", "architectures": ["Qwen2ForSequenceClassification"]})
    assert "mxfp4-quantised" in gguf_family_problem({"model_type": "gpt_oss",
                                                     "quantization_config": {"quant_method": "mxfp4"}})
    assert "'dynamic'" in gguf_family_problem({"model_type": "llama", "rope_scaling": {"rope_type": "dynamic"}})


def test_quant_type_problems(monkeypatch):
    assert gguf_quant_problems(["f16", "Q8_0", "bf16", "f32"]) == []
    assert "did you mean q4_k_m?" in gguf_quant_problems(["q4km"])[0]
    assert gguf_quant_problems(["f16", "F16"]) == ["--gguf_quant F16: given twice"]
    monkeypatch.setattr("tunesmith.export.to_gguf.llama_cpp_available", lambda: False)
    (msg,) = gguf_quant_problems(["f16", "q4_k_m", "q6_k"])
    assert "q4_k_m q6_k" in msg and "pip install 'tunesmith[gguf]'" in msg
    assert set(GGUF_TYPES) >= {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "iq4_xs"}


def test_unknown_pre_tokenizers_are_refused(tiny_models):
    from tokenizers import Regex, pre_tokenizers

    tok = _tokenizer(tiny_models("qwen2"))
    odd = _with_pre_tokenizer(tok, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    why = tokenizer_problem(odd)
    assert "not one llama.cpp reproduces" in why and r"\\w+|\\s+" in why
    assert "not one llama.cpp reproduces" in tokenizer_problem(_with_pre_tokenizer(tok, pre_tokenizers.Whitespace()))
    assert tokenizer_problem(tok) is None


def test_refusals_write_nothing(tiny_models, tmp_path):
    """A tensor llama.cpp has no place for, or an unknown type, is a ConfigError before any file exists."""
    model_dir = tiny_models("qwen2")
    src = source_from_folder(model_dir)
    extra = TensorSource({**src.shapes, "score.weight": (2, 64)}, {**src.dtypes, "score.weight": "float32"},
                         src.load)
    with pytest.raises(ConfigError, match="score.weight"):
        export(model_dir, tmp_path, ["f16"], source=extra)
    with pytest.raises(ConfigError, match="did you mean"):
        export(model_dir, tmp_path, ["f16", "q4km"])
    assert not os.path.exists(tmp_path) or os.listdir(tmp_path) == []


def test_a_failure_mid_write_leaves_no_file(tiny_models, tmp_path):
    model_dir = tiny_models("qwen2")
    src = source_from_folder(model_dir)
    seen = []

    def failing(name):
        seen.append(name)
        if len(seen) == 5:
            raise RuntimeError("disk gone")
        return src.load(name)

    with pytest.raises(RuntimeError, match="disk gone"):
        export(model_dir, tmp_path, ["f32", "f16", "q8_0"], source=TensorSource(src.shapes, src.dtypes, failing))
    assert os.listdir(tmp_path) == []


def test_a_full_disk_leaves_no_file(tiny_models, tmp_path):
    from conftest import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "small", "size=1m", "a 1 MiB tmpfs") as small:
        with pytest.raises(OSError):
            export(tiny_models("qwen2"), small, ["f32", "f16"])
        assert os.listdir(small) == []


# ------------------------------------------------------------------ streaming

def test_tensors_are_streamed_one_at_a_time(tiny_models, tmp_path):
    """write_gguf holds about one source tensor at a time, whatever the number of files: the most alive at once
    (tracked by weak references to what load() returned) stays at 2."""
    model_dir = tiny_models("gpt_oss")
    src = source_from_folder(model_dir)
    alive, most = [0], [0]

    def counted(name):
        t = src.load(name).clone()
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(t, lambda: alive.__setitem__(0, alive[0] - 1))
        return t

    export(model_dir, tmp_path, ["f32", "f16", "bf16", "q8_0"], source=TensorSource(src.shapes, src.dtypes, counted))
    gc.collect()
    assert most[0] <= 2 and alive[0] == 0


def test_tensor_encodings_are_the_gguf_packages_bytes():
    """The streamed encodings (torch casts for F16/BF16 straight from the source dtype, Q8_0 by row chunks) are
    byte for byte what gguf.quants (llama.cpp's rounding, reimplemented) makes from float32, over 10 decades of
    magnitude and from a bf16 source."""
    import gguf
    import torch

    from tunesmith.export.to_gguf import _encode

    q = gguf.GGMLQuantizationType
    torch.manual_seed(0)
    x = torch.randn(5000, 64) * torch.logspace(-6, 4, 64)
    for qtype in (q.F32, q.F16, q.BF16, q.Q8_0):
        assert _encode(x, qtype).tobytes() == gguf.quants.quantize(x.numpy(), qtype).tobytes(), qtype.name
    xb = x.to(torch.bfloat16)
    for qtype in (q.F16, q.BF16):
        assert _encode(xb, qtype).tobytes() == gguf.quants.quantize(xb.float().numpy(), qtype).tobytes()
