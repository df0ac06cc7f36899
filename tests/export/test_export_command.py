"""`tunesmith export` from a trained checkpoint to a laptop, as a user runs it: `--to_gguf` (the adapters merged on
the way) and `--to_ollama`, `--quant_method bnb`, and what is refused before anything is written.

The proof that the GGUF is the same model: llama.cpp (llama-cpp-python) answers the chat questions with the text
`tunesmith infer` gives on the merged Hugging Face model, greedy, prompts rendered by the GGUF's embedded template.
"""
import json
import os
import shutil
import types

import pytest
import torch

from conftest import cli, read_jsonl, write_jsonl
from tunesmith.config.parser import parse_args

CAPITALS = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data", "capitals_messages.jsonl")
SYSTEM = 'You answer in one sentence. Say """yes""" when unsure.'
QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?", "Name a river.",
             "What is 7 * 6?", "Say hello."]


@pytest.fixture(scope="module")
def ckpt(tiny_models, tmp_path_factory):
    """A LoRA checkpoint of a few SFT steps on the tiny Qwen2 model, trained with a --system prompt."""
    from tunesmith.train import recipe

    res = recipe.main(parse_args("sft", [
        "--model", tiny_models("qwen2"), "--dataset", CAPITALS, "--max_steps", "6", "--learning_rate", "5e-2",
        "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path_factory.mktemp("sft")),
        "--report_to", "none", "--system", SYSTEM, "--lora_rank", "8"]))
    return res["state"].last_model_checkpoint


def _infer_answers(capsys, model, tmp_path):
    data = str(tmp_path / "q.jsonl")
    write_jsonl(data, [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS])
    rc, _, err = cli(capsys, "infer", "--model", model, "--val_dataset", data, "--max_new_tokens", "8",
                     "--temperature", "0", "--result_path", str(tmp_path / "r.jsonl"))
    assert rc == 0, err
    return [row["response"] for row in read_jsonl(tmp_path / "r.jsonl")]


@pytest.mark.slow
def test_adapter_to_gguf_and_ollama_answers_as_tunesmith_infer(ckpt, tmp_path, capsys):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install "
                                                        "'tunesmith[gguf]'")
    rc, _, err = cli(capsys, "export", "--adapters", ckpt, "--to_gguf", "true", "--gguf_quant", "f16", "q8_0",
                     "--to_ollama", "true", "--temperature", "0.3")
    out = ckpt + "-gguf"
    assert rc == 0, err
    files = sorted(os.listdir(out))
    ggufs = [f for f in files if f.endswith(".gguf")]
    assert len(ggufs) == 2 and files == sorted(ggufs + ["Modelfile"]), files
    assert all(f.endswith(("-F16.gguf", "-Q8_0.gguf")) and os.path.basename(ckpt) in f for f in ggufs)
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".tmp-")]  # nothing half-written
    modelfile = open(os.path.join(out, "Modelfile"), encoding="utf-8").read()
    f16 = next(f for f in ggufs if f.endswith("-F16.gguf"))
    assert modelfile.startswith(f"FROM ./{f16}\n") or f"\nFROM ./{f16}\n" in modelfile
    assert "PARAMETER stop <|im_end|>" in modelfile and "PARAMETER temperature 0.3" in modelfile
    assert "You answer in one sentence." in modelfile  # the run's --system, from the checkpoint
    assert f"ollama create" in err and os.path.join(out, "Modelfile") in err
    # the same model: along tunesmith infer's greedy answers on the merged HF model, llama.cpp (F16 file, its own
    # float16 KV cache) gives the merged model's logits — per step a largest difference of ~2e-4 typically, with a
    # rare step up to ~1 on a single token — and picks the same token wherever the top two are more than 0.05 apart
    # (this tiny model's top two are sometimes 0.005 apart: exact greedy equality across float16 and float32
    # weights would be luck there)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = str(tmp_path / "merged")
    assert cli(capsys, "export", "--adapters", ckpt, "--merge_lora", "true", "--output_dir", merged)[0] == 0
    expected = _infer_answers(capsys, merged, tmp_path)
    assert len(set(expected)) > 1  # the answers differ: a wrong weight would show
    tok, hf = AutoTokenizer.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(merged).eval()
    llm = llama_cpp.Llama(model_path=os.path.join(out, f16), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    per_step, decided = [], 0
    for q, answer in zip(QUESTIONS, expected):
        text = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompt, steps = len(ids), []
        with torch.no_grad():
            for _ in range(8):
                logits = hf(torch.tensor([ids])).logits[0, -1]
                steps.append(logits)
                ids.append(int(logits.argmax()))
        assert tok.decode(ids[prompt:], skip_special_tokens=True).strip() == answer  # infer = transformers' greedy
        llm.reset()
        llm.eval(ids[:-1])
        ours = torch.stack(steps)
        theirs = torch.from_numpy(llm.scores[prompt - 1:len(ids) - 1, :ours.shape[1]].copy()).float()
        per_step += (theirs - ours).abs().max(-1).values.tolist()
        for o, t in zip(ours, theirs):
            top = o.topk(2).values
            if float(top[0] - top[1]) > 0.05:
                decided += 1
                assert int(t.argmax()) == int(o.argmax())
    assert sorted(per_step)[len(per_step) // 2] < 0.01, per_step  # logits of magnitude ~1, float16 weights
    assert decided >= 20  # most of the 40 steps are clear choices, and llama.cpp made each of them


@pytest.mark.slow
def test_adapter_to_ollama_without_gguf_writes_the_merged_weights_with_the_modelfile(ckpt, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "ollama")
    rc, _, err = cli(capsys, "export", "--adapters", ckpt, "--to_ollama", "true", "--output_dir", out)
    assert rc == 0, err
    assert "FROM .\n" in open(os.path.join(out, "Modelfile"), encoding="utf-8").read()
    AutoModelForCausalLM.from_pretrained(out)  # Ollama imports the safetensors next to the Modelfile
    assert json.load(open(os.path.join(out, "args.json")))["system"] == SYSTEM


@pytest.mark.slow
def test_a_plain_model_to_ollama_points_at_its_folder(tiny_models, tmp_path, capsys):
    model = tiny_models("llama")
    rc, _, err = cli(capsys, "export", "--model", model, "--to_ollama", "true", "--output_dir", tmp_path / "o")
    assert rc == 0, err
    assert os.listdir(tmp_path / "o") == ["Modelfile"]
    assert f"FROM {os.path.abspath(model)}\n" in open(tmp_path / "o" / "Modelfile", encoding="utf-8").read()


@pytest.mark.slow
def test_adapter_to_bnb_4bit_loads_and_generates(ckpt, capsys):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rc, _, err = cli(capsys, "export", "--adapters", ckpt, "--quant_method", "bnb", "--quant_bits", "4")
    out = ckpt + "-bnb-int4"
    assert rc == 0, err
    model = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    args = json.load(open(os.path.join(out, "args.json")))
    assert args["system"] == SYSTEM and args["quant_method"] is None  # loads as written, never re-quantised
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith((".tmp-", ".merging-"))]


def _mistral(tmp_path):
    """A tiny model of a family tunesmith does not write GGUF or Modelfiles for."""
    import transformers as tf
    from tunesmith.testing import build_tokenizer

    cfg = tf.MistralConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    path = str(tmp_path / "mistral")
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    build_tokenizer("qwen2", 2048).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--to_gguf", "--to_ollama"])
def test_a_family_without_gguf_or_modelfile_is_refused_by_name(tmp_path, capsys, flag):
    model = _mistral(tmp_path)
    rc, _, err = cli(capsys, "export", "--model", model, flag, "true", "--output_dir", tmp_path / "out")
    assert rc == 1 and "mistral" in err and "qwen2" in err, err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_too_little_disk_is_refused_before_writing(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1 << 20))
    rc, _, err = cli(capsys, "export", "--model", tiny_models("qwen2"), "--to_gguf", "true",
                     "--output_dir", tmp_path / "g")
    assert rc == 1 and "GiB free" in err and "nothing was written" in err
    assert os.listdir(tmp_path) == []


def test_an_adapter_without_a_base_says_how_to_name_it(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    rc, _, err = cli(capsys, "export", "--adapters", adapter, "--to_gguf", "true")
    assert rc == 1 and "has no args.json naming its base model" in err and "--model BASE" in err, err
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


@pytest.mark.slow
def test_exist_ok_replaces_an_earlier_export_but_never_the_source_or_other_files(tiny_models, tmp_path, capsys):
    """--exist_ok replaces a folder as a whole, so it is refused where that would delete what the export reads or
    files an export did not write (the fresh-user run lost its checkpoint and notes this way)."""
    model = tiny_models("qwen2")
    rc, _, err = cli(capsys, "export", "--model", model, "--to_gguf", "true", "--output_dir",
                     os.path.dirname(model), "--exist_ok", "true")
    assert rc == 1 and "which this export reads" in err and os.path.isdir(model), err
    rc, _, err = cli(capsys, "export", "--model", model, "--to_ollama", "true", "--output_dir", model,
                     "--exist_ok", "true")
    assert rc == 1 and "which this export reads" in err and os.path.isfile(os.path.join(model, "config.json"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, _, err = cli(capsys, "export", "--model", model, "--to_gguf", "true", "--output_dir", mine,
                     "--exist_ok", "true")
    assert rc == 1 and "holds files an export did not write (notes.txt)" in err
    assert (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "g"
    assert cli(capsys, "export", "--model", model, "--to_gguf", "true", "--gguf_quant", "f16", "q8_0",
               "--output_dir", out)[0] == 0
    assert cli(capsys, "export", "--model", model, "--to_gguf", "true", "--gguf_quant", "f32",
               "--output_dir", out, "--exist_ok", "true")[0] == 0  # an earlier export: replaced whole
    assert [f.rsplit("-", 1)[1] for f in os.listdir(out)] == ["F32.gguf"]


@pytest.mark.slow
def test_a_folder_without_its_tokenizer_json_is_refused(tiny_models, tmp_path, capsys):
    model = str(tmp_path / "notok")
    shutil.copytree(tiny_models("qwen2"), model)
    os.remove(os.path.join(model, "tokenizer.json"))
    rc, _, err = cli(capsys, "export", "--model", model, "--to_gguf", "true", "--output_dir", tmp_path / "g")
    assert rc == 1 and "tokenizer.json" in err and "embedding rows" in err, err
    assert not os.path.exists(tmp_path / "g")


@pytest.mark.slow
def test_mxfp4_moe_on_a_dense_model_is_refused(tiny_models, tmp_path, capsys):
    rc, _, err = cli(capsys, "export", "--model", tiny_models("llama"), "--to_gguf", "true", "--gguf_quant",
                     "mxfp4_moe", "--output_dir", tmp_path / "g")
    assert rc == 1 and "has none: use q4_k_m" in err, err


def test_names_ollama_accepts_and_the_stem_of_a_full_checkpoint(tmp_path):
    from tunesmith.commands.export import export_stem, ollama_model_name

    assert ollama_model_name("Tiny-Mödel v1 (final)") == "tiny-model-v1-final"
    assert ollama_model_name("x" * 120) == "x" * 80 and ollama_model_name("日本語") == "model"
    ckpt = tmp_path / "checkpoint-120"
    ckpt.mkdir()
    (ckpt / "args.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-0.5B-Instruct"}))
    assert export_stem(str(ckpt), []) == "Qwen2.5-0.5B-Instruct-checkpoint-120"


def test_temporaries_of_a_killed_export_are_removed_and_a_live_ones_kept(tmp_path):
    from tunesmith.export.merge import remove_stale_temporaries

    out = tmp_path / "ckpt-gguf"
    dead, live = tmp_path / ".tmp-ckpt-gguf-999999999", tmp_path / f".tmp-ckpt-gguf-{os.getpid()}"
    other = tmp_path / ".tmp-other-999999999"
    for d in (dead, live, other):
        d.mkdir()
    assert remove_stale_temporaries(str(out)) == [str(dead)]
    assert live.exists() and other.exists() and not dead.exists()


def _interrupt_when(argv, ready, sig, timeout=120):
    """Run `tunesmith ARGV`, send sig once ready(proc) holds; (exit code, stderr)."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", *map(str, argv)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready(proc) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the export ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("sig_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_an_interrupted_gguf_export_leaves_nothing_and_stops_at_once(tiny_models, tmp_path, sig_name, code):
    """SIGTERM or Ctrl-C while llama.cpp's quantiser runs (a child process, killed with the export): the export
    stops with the signal's exit code, no temporary is left and no output appears."""
    import signal

    import psutil

    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'tunesmith[gguf]'")
    model = tiny_models("qwen2", hidden=512, layers=4)
    out = tmp_path / "g"

    def quantising(proc):
        return any("tunesmith.export.to_gguf" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children())
    rc, err = _interrupt_when(["export", "--model", model, "--to_gguf", "true", "--gguf_quant", "q4_k_m", "q5_k_m",
                               "q6_k", "--output_dir", out], quantising, getattr(signal, sig_name))
    assert rc == code, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_an_fp8_export_runs_in_tunesmith_infer_on_a_cpu(tiny_models, tmp_path, capsys):
    """compressed-tensors' W8A8 runs compressed only on a GPU; on a CPU infer decompresses it when loading (the
    fresh-user run got a dtype error from the forward pass)."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed: pip install 'tunesmith[fp8]'")
    out = str(tmp_path / "fp8")
    rc, _, err = cli(capsys, "export", "--model", tiny_models("qwen2"), "--quant_method", "fp8", "--output_dir", out)
    assert rc == 0, err
    answers = _infer_answers(capsys, out, tmp_path)
    assert len(answers) == len(QUESTIONS)
