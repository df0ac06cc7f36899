"""GGUF export at the real shape: tunesmith against llama.cpp's own converter, in one run.

    python bench/export_gguf.py                  # Qwen2.5-0.5B's full shape (24 layers, 151,936-row vocabulary)
    python bench/export_gguf.py --layers 4       # quicker

The model: Qwen2.5-0.5B's shape (hidden 896, 14 heads / 2 KV heads, MLP 4864, tied embeddings, rope theta 1e6,
the real 151,936-row vocabulary and the real Qwen2.5 tokenizer and chat template from bench/peers/qwen_tokenizer.py),
random weights saved in bf16 as the real checkpoint is — 494M parameters, 0.99 GB of safetensors.

Systems, each in its own process (wall time includes the process start, imports and the tokenizer; peak RSS is the
process tree's, sampled every 50 ms):
- tunesmith: `tunesmith export --model DIR --to_gguf true --gguf_quant f16` and `... q4_k_m` (the second writes a
  bf16 intermediate and quantises it with llama.cpp's quantiser, through llama-cpp-python).
- llama.cpp: `convert_hf_to_gguf.py DIR --outtype f16` (the converter Unsloth runs, from the llama.cpp that
  llama-cpp-python 0.3.36 vendors: its sdist is fetched from the package registry into the cache; it needs
  `pip install sentencepiece`, as its requirements file says), and for q4_k_m the
  same converter's f16 output quantised by `llama_model_quantize` (what `llama-quantize` runs).
It also compares the two f16 files tensor by tensor (names, types, shapes, bytes) and their tokenizer metadata:
the converter is the reference layout llama.cpp loads.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "peers"))
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tunesmith-bench")
LLAMA_CPP_PYTHON = "0.3.36"


def build_model(out: str, layers: int) -> str:
    """Qwen2.5-0.5B's shape with random bf16 weights and the real tokenizer, saved once per layer count."""
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    from qwen_tokenizer import copy_cached_qwen25_tokenizer

    copy_cached_qwen25_tokenizer(out)
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=True,
                                               temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    model.save_pretrained(out)
    return out


def llama_cpp_converter() -> str:
    """Path to convert_hf_to_gguf.py of the llama.cpp vendored by llama-cpp-python, extracted once."""
    root = os.path.join(CACHE, f"llama_cpp_python-{LLAMA_CPP_PYTHON}")
    script = os.path.join(root, "vendor", "llama.cpp", "convert_hf_to_gguf.py")
    if os.path.isfile(script) and os.path.isdir(os.path.join(root, "vendor", "llama.cpp", "conversion")):
        return script
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
        with tarfile.open(glob.glob(os.path.join(tmp, "llama_cpp_python-*.tar.gz"))[0]) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                       ("convert_hf_to_gguf" in m.name or "/gguf-py/" in m.name
                                                                or "/llama.cpp/conversion/" in m.name)]
            tar.extractall(CACHE, members=members, filter="data")
    return script


def timed(argv: list[str]) -> dict:
    """Run argv; wall seconds and the peak RSS (GiB) of its process tree, sampled every 50 ms."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_gib": peak[0] / 2**30}


def quantise(src: str, dst: str, kind: str) -> None:
    """llama.cpp's quantiser (what `llama-quantize` runs), in this process."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {dst} failed")


def compare(ours: str, theirs: str) -> str:
    """Tensor-by-tensor and tokenizer comparison of two GGUF files: a one-line verdict."""
    import numpy as np
    from gguf import GGUFReader

    a, b = GGUFReader(ours), GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    if set(ta) != set(tb):
        return f"tensor names differ: only ours {sorted(set(ta) - set(tb))[:5]}, only theirs {sorted(set(tb) - set(ta))[:5]}"
    bad = [n for n in ta if ta[n].tensor_type != tb[n].tensor_type or list(ta[n].shape) != list(tb[n].shape)
           or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    keys = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.bos_token_id", "tokenizer.chat_template"]
    differ = [k for k in keys if _field(a, k) != _field(b, k)]
    return (f"{len(ta)} tensors: {len(ta) - len(bad)} identical (type, shape, bytes)"
            + (f", differing: {bad[:5]}" if bad else "") + "; tokenizer metadata "
            + (f"differs in {differ}" if differ else "identical"))


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    return [bytes(f.parts[i]).hex() for i in f.data]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    a = p.parse_args()
    model = build_model(os.path.join(CACHE, f"qwen25-05b-shape-{a.layers}l"), a.layers)
    converter = llama_cpp_converter()
    out = tempfile.mkdtemp(prefix="export-gguf-", dir=CACHE)
    rows = []
    for kind in ("f16", "q4_k_m"):
        ours = os.path.join(out, f"ours-{kind}")
        m = timed([sys.executable, "-m", "tunesmith", "export", "--model", model, "--to_gguf", "true",
                   "--gguf_quant", kind, "--output_dir", ours])
        f = glob.glob(os.path.join(ours, "*.gguf"))[0]
        rows.append(("tunesmith", kind, m, os.path.getsize(f), f))
    theirs_f16 = os.path.join(out, "llamacpp-f16.gguf")
    m = timed([sys.executable, converter, model, "--outtype", "f16", "--outfile", theirs_f16])
    rows.append(("llama.cpp convert", "f16", m, os.path.getsize(theirs_f16), theirs_f16))
    theirs_q = os.path.join(out, "llamacpp-q4_k_m.gguf")
    m2 = timed([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); from export_gguf import quantise; "
                                      f"quantise({theirs_f16!r}, {theirs_q!r}, 'q4_k_m')"])
    m2 = {"wall_s": m["wall_s"] + m2["wall_s"], "peak_gib": max(m["peak_gib"], m2["peak_gib"])}
    rows.append(("llama.cpp convert + quantize", "q4_k_m", m2, os.path.getsize(theirs_q), theirs_q))
    print(f"model: Qwen2.5-0.5B shape, {a.layers} layers, bf16 safetensors ({model})")
    print(f"{'system':30s} {'type':7s} {'wall s':>7s} {'peak RSS GiB':>13s} {'file MB':>8s}")
    for name, kind, m, size, _ in rows:
        print(f"{name:30s} {kind:7s} {m['wall_s']:7.1f} {m['peak_gib']:13.2f} {size / 1e6:8.1f}")
    for kind, (ours, theirs) in {"f16": (rows[0], rows[2]), "q4_k_m": (rows[1], rows[3])}.items():
        print(f"{kind}: tunesmith/llama.cpp wall {ours[2]['wall_s'] / theirs[2]['wall_s']:.2f}x, peak RSS "
              f"{ours[2]['peak_gib'] / theirs[2]['peak_gib']:.2f}x, size {ours[3] / theirs[3]:.3f}x")
    print("f16 files:", compare(rows[0][4], rows[2][4]))


if __name__ == "__main__":
    main()
