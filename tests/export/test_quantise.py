"""Quantised Hugging Face checkpoints (tunesmith.export.quantise): bnb 4/8-bit, fp8 and gptq/gptq_v2 written from a
tiny Qwen2 (hidden 256, so every Linear holds two 128-column GPTQ groups) load back with transformers' own
AutoModelForCausalLM.from_pretrained, carry quantised layers, generate, and give logits close to the float model;
every refused combination is one clear message, found before the model loads.

The tolerances: `rel` is the mean |logit difference| over 5 prompts (100 positions) divided by the mean |logit -
its row mean| of the float model (the spread of its logits); top1 is the share of positions whose argmax agrees.
For scale, a second random model of the same shape is at rel 1.42, top1 0.20 (its argmax often repeats the input
token, tied embeddings). Measured (transformers 5.25, bitsandbytes 0.50.2, compressed-tensors 0.20.1, gptqmodel
7.6.0, CPU): bnb 4-bit rel 0.198 top1 0.72; bnb 8-bit 0.020 / 0.96; fp8 0.070 / 0.87; gptq 4-bit 0.055 / 0.92
(gptq_v2 the same); gptq 8-bit 0.003 / 1.00. The bounds below leave about 1.5x of room."""
import importlib.util
import json
import os

import pytest
from conftest import mounted_tmpfs

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.export import quantise
from tunesmith.export.quantise import (
    AWQ_REFUSED,
    calibration_texts,
    default_output_dir,
    quant_problems,
    write_quantised,
)

PROMPTS = ["The capital of France is Paris, and the capital of Italy is",
           "def add(a, b):\n    return a + b\n\nprint(add(",
           "Once upon a time there was a small fox who lived in",
           "1, 2, 3, 4, 5, 6, 7, 8,",
           "Quantisation keeps the weights small while the outputs stay"]
CALIBRATION = [p * 3 for p in PROMPTS] * 4  # 20 texts of 30-60 tokens


@pytest.fixture(scope="module")
def model256(tiny_models):
    """A tiny Qwen2 with hidden 256 (its tokenizer alongside) and the float model's logits on PROMPTS."""
    import torch
    from transformers import AutoTokenizer

    path = tiny_models("qwen2", hidden=256)
    tok = AutoTokenizer.from_pretrained(path)
    return path, tok, _logits(path, tok, dtype=torch.float32)


def _logits(path, tok, **kw):
    """The model at path's logits for each of PROMPTS, concatenated: (positions, vocab) float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    with torch.no_grad():
        return torch.cat([model(tok(p, return_tensors="pt").input_ids).logits[0].float() for p in PROMPTS])


def _closeness(ref, got):
    """(rel, top1): mean |got - ref| over the spread of ref's logits, and the share of equal argmaxes."""
    spread = (ref - ref.mean(-1, keepdim=True)).abs().mean()
    return ((got - ref).abs().mean() / spread).item(), (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


def _generates(path, tok, **kw):
    """Greedy ids of 6 new tokens after each prompt, from the model at path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        new = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
        out.append(new.tolist())
    return out


def _weights_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _tensor_dtypes(path):
    """{tensor name: dtype} of path's model.safetensors."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def _write_args(folder):
    """An extra_files callback: the args.json the export command adds."""
    with open(os.path.join(folder, "args.json"), "w") as fh:
        json.dump({"quantised": True}, fh)


def _needs(module, extra):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed here (pip install 'tunesmith[{extra}]')")


# ------------------------------------------------------------------ refusals, before anything loads

def test_awq_is_refused_with_the_reason_and_what_to_use_instead():
    assert quant_problems("awq", 4, group_size=128, has_dataset=True) == [AWQ_REFUSED]
    for words in ("deprecated", "CUDA", "--quant_method gptq", "--gguf_quant q4_k_m"):
        assert words in AWQ_REFUSED


@pytest.mark.parametrize("method,bits,allowed", [("bnb", 2, "4 or 8"), ("bnb", 3, "4 or 8"), ("fp8", 4, "8"),
                                                 ("gptq", 5, "2 or 3 or 4 or 8"), ("gptq_v2", 16, "2 or 3 or 4 or 8")])
def test_bits_a_method_cannot_write_are_one_message(method, bits, allowed):
    problems = [p for p in quant_problems(method, bits, group_size=128, has_dataset=True) if "pip install" not in p]
    assert problems == [f"--quant_bits {bits}: --quant_method {method} writes {allowed}-bit weights"]


def test_bits_are_required_except_for_fp8():
    assert quant_problems("bnb", None, group_size=128, has_dataset=False) == [
        "--quant_method bnb needs --quant_bits (4 or 8)"]
    assert quant_problems("fp8", None, group_size=128, has_dataset=False) == []


def test_gptq_without_a_dataset_says_it_calibrates_on_one():
    for method in ("gptq", "gptq_v2"):
        problems = [p for p in quant_problems(method, 4, group_size=128, has_dataset=False) if "pip install" not in p]
        assert len(problems) == 1 and "pass --dataset" in problems[0] and method in problems[0]


def test_a_bad_group_size_and_an_unknown_method_are_one_message_each():
    problems = [p for p in quant_problems("gptq", 4, group_size=0, has_dataset=True) if "pip install" not in p]
    assert problems == [("--group_size 0: expected a positive number of input columns per scale (128 by default) "
                         "or -1 for one scale per output row")]
    assert not [p for p in quant_problems("gptq", 4, group_size=-1, has_dataset=True) if "group_size" in p]
    assert quant_problems("int4", 4, group_size=128, has_dataset=True) == [
        "--quant_method int4: expected one of bnb, fp8, gptq, gptq_v2, awq"]


@pytest.mark.parametrize("method,module,extra", [("bnb", "bitsandbytes", "qlora"),
                                                 ("fp8", "compressed_tensors", "fp8"),
                                                 ("gptq", "gptqmodel", "gptq"), ("gptq_v2", "gptqmodel", "gptq")])
def test_a_missing_library_is_named_with_its_extra(monkeypatch, method, module, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    problems = quant_problems(method, 8 if method != "bnb" else 4, group_size=128, has_dataset=True)
    assert problems == [f"--quant_method {method} needs {module.replace('_', '-')}: pip install 'tunesmith[{extra}]'"]


def test_write_refuses_before_loading(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:  # the model folder does not even exist: nothing was loaded
        write_quantised(str(tmp_path / "no-model"), None, str(out), "awq", 4)
    assert str(e.value) == AWQ_REFUSED
    with pytest.raises(ConfigError, match="pass --dataset"):
        write_quantised(str(tmp_path / "no-model"), None, str(out), "gptq", 4, calibration=[])
    assert not out.exists()


def test_an_output_on_a_read_only_file_system_is_refused_before_loading(tmp_path, read_only_dir):
    with pytest.raises(ConfigError) as e:
        write_quantised(str(tmp_path / "no-model"), None, str(read_only_dir / "q"), "bnb", 4)
    assert str(e.value) == (f"{read_only_dir / 'q'}: {read_only_dir} is on a read-only file system; give a path "
                            f"on a writable disk (or remount it read-write)")
    assert os.listdir(read_only_dir) == []


def test_calibration_rows_too_short_for_gptq_are_one_message():
    from tunesmith.testing import build_tokenizer

    tok = build_tokenizer("qwen2", 2048)
    assert calibration_texts(["hi", PROMPTS[0]], tok) == [PROMPTS[0]]  # gptqmodel would drop "hi"
    with pytest.raises(ConfigError) as e:  # gptqmodel itself fails with a ZeroDivisionError
        calibration_texts(["hi", "a b"], tok)
    assert str(e.value) == ("--dataset: none of the 2 calibration rows is 10 tokens or longer (GPTQ drops shorter "
                            "ones); give rows with more text, or more rows (--quant_n_samples)")


def test_default_output_dir_is_ms_swifts_name(tmp_path):
    assert default_output_dir(str(tmp_path / "ckpt-merged/"), "gptq", 4) == str(tmp_path / "ckpt-merged-gptq-int4")
    assert default_output_dir(str(tmp_path / "m"), "bnb", 8) == str(tmp_path / "m-bnb-int8")
    assert default_output_dir(str(tmp_path / "m"), "fp8", 8) == str(tmp_path / "m-fp8")


# ------------------------------------------------------------------ written, loaded back, compared

@pytest.mark.slow
def test_a_full_disk_mid_write_leaves_nothing(model256, tmp_path):
    _needs("bitsandbytes", "qlora")
    path, tok, _ = model256
    with mounted_tmpfs(tmp_path / "small", "size=1m", "a 1 MiB tmpfs") as mnt:  # the 8-bit weights take 3.4 MB
        with pytest.raises(TunesmithError) as e:
            write_quantised(path, tok, str(mnt / "q"), "bnb", 8)
        assert str(e.value).startswith(f"could not write the quantised model ({mnt / 'q'}): the disk is full;")
        assert "nothing was left half-written" in str(e.value)
        assert os.listdir(mnt) == []


@pytest.mark.slow
@pytest.mark.parametrize("bits,layer,max_rel,min_top1", [(4, "Linear4bit", 0.30, 0.60), (8, "Linear8bitLt", 0.04, 0.90)])
def test_bnb_loads_with_transformers_generates_and_stays_close(model256, tmp_path, bits, layer, max_rel, min_top1):
    import torch
    from transformers import AutoModelForCausalLM

    _needs("bitsandbytes", "qlora")
    path, tok, ref = model256
    out = tmp_path / f"bnb{bits}"
    write_quantised(path, tok, str(out), "bnb", bits, extra_files=_write_args)
    assert {"config.json", "generation_config.json", "tokenizer.json", "args.json"} <= set(os.listdir(out))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc[f"load_in_{bits}bit"] is True
    if bits == 4:
        assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    # the 8-bit matmul runs in float16 (bitsandbytes casts other inputs, with a warning)
    kw = {"dtype": torch.float16} if bits == 8 else {}
    model = AutoModelForCausalLM.from_pretrained(str(out), **kw)  # nothing but the folder: its config says bnb
    assert type(model.model.layers[0].mlp.down_proj).__name__ == layer
    rel, top1 = _closeness(ref, _logits(str(out), tok, **kw))
    assert rel < max_rel and top1 >= min_top1, (rel, top1)
    assert _weights_bytes(out) < 0.5 * _weights_bytes(path)  # measured 0.40 (4-bit), 0.49 (8-bit): float32 source
    assert all(len(ids) == 6 for ids in _generates(str(out), tok, **kw))


@pytest.mark.slow
def test_fp8_is_written_on_a_cpu_and_loads_back_close(model256, tmp_path):
    from transformers import AutoModelForCausalLM

    _needs("compressed_tensors", "fp8")
    path, tok, ref = model256
    out = tmp_path / "fp8"
    write_quantised(path, tok, str(out), "fp8", None)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["strategy"]) == (8, "float", "channel")
    dtypes = _tensor_dtypes(str(out))
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == "F8_E4M3"
    assert "model.layers.0.mlp.down_proj.weight_scale" in dtypes
    assert AutoModelForCausalLM.from_pretrained(str(out)) is not None
    rel, top1 = _closeness(ref, _logits(str(out), tok))
    assert rel < 0.10 and top1 >= 0.80, (rel, top1)
    assert all(len(ids) == 6 for ids in _generates(str(out), tok))


@pytest.mark.slow
@pytest.mark.parametrize("method,bits,max_rel,min_top1", [("gptq", 4, 0.08, 0.85), ("gptq_v2", 4, 0.08, 0.85),
                                                          ("gptq", 8, 0.01, 0.99)])
def test_gptq_on_a_cpu_loads_with_transformers_and_stays_close(model256, tmp_path, monkeypatch, method, bits, max_rel,
                                                              min_top1):
    from transformers import AutoModelForCausalLM

    _needs("gptqmodel", "gptq")
    _needs("optimum", "gptq")  # transformers loads GPTQ checkpoints through optimum
    path, tok, ref = model256
    out = tmp_path / method
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    write_quantised(path, tok, str(out), method, bits, calibration=CALIBRATION)
    assert os.listdir(tmp_path / "cwd") == []  # gptqmodel's ./logs went to a scratch folder
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == ("gptq", bits, 128)
    assert qc["checkpoint_format"] == ("gptq_v2" if method == "gptq_v2" else "gptq")
    with open(os.path.join(path, "generation_config.json")) as fh:  # gptqmodel turned do_sample on; undone
        assert json.loads((out / "generation_config.json").read_text()) == json.load(fh)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model.model.layers[0].mlp.down_proj).__module__.startswith("gptqmodel.nn_modules.qlinear")
    rel, top1 = _closeness(ref, _logits(str(out), tok))
    assert rel < max_rel and top1 >= min_top1, (rel, top1)
    generated = _generates(str(out), tok)
    assert all(len(ids) == 6 for ids in generated)
    if bits == 8:
        assert generated == _generates(path, tok)


def test_the_methods_and_their_widths_are_ms_swifts():
    assert quantise.QUANT_METHODS == ("bnb", "fp8", "gptq", "gptq_v2", "awq")
    assert quantise.default_torch_dtype("gptq") == "float16" and quantise.default_torch_dtype("bnb") is None
