"""One-command GPU check: what tunesmith does on one H100/H200, in about 8 minutes, as one JSON and one table.

    python bench/gpu_check.py                     # on the GPU machine: bench/gpu_check.json + bench/gpu_check.md
    python bench/gpu_check.py --dry-run --out /tmp/check.json   # the same code on the CPU, tiny shapes, ~1 minute

It uses the machine's own torch, transformers and peft, and detects the optional packages (liger-kernel,
flash-attn, bitsandbytes, vllm): a case that needs one that is missing is recorded as skipped, with the reason.
Every case runs in its own subprocess with a time budget, through tunesmith's real entry point
(`tunesmith.cli.main`, what the `tunesmith` command runs, or `python -m tunesmith deploy` for serving), so a
failure, an out-of-memory or a timeout is recorded and the other cases still run; the script itself never fails
because a case did.

Cases:
- `sft_sdpa`, `dpo_sdpa` (and `_flash_attn` when flash-attn imports, `_liger` when liger-kernel imports): bf16 full
  fine-tuning of a model with Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864, tied
  embeddings) and its full 151,936-row vocabulary, packed (`--packing true`), no gradient checkpointing. Reported:
  steady-state tokens/s (the median of the per-step rates after the warm-up steps; tokens are those tunesmith fed
  the model), the whole loop's tokens/s, MFU and peak CUDA memory.
- `lora_dpo_7b`: ms-swift's Qwen2.5-7B LoRA DPO recipe (examples/train/rlhf/dpo/lora.sh: bf16, r 8 / alpha 32
  all-linear, batch 1, rpo_alpha 0.1, gradient checkpointing, max_length 2048) on a Qwen2.5-7B-shaped model
  (vocabulary 152,064, hidden 3584, 28 layers, 28 heads / 4 KV heads, MLP 18944, untied), with pairs whose chosen
  and rejected sides each fill ~2,000 of the 2,048 tokens. Reported: peak CUDA memory (allocated and reserved).
- `qlora_dpo_7b` (when bitsandbytes imports): the same with `--quant_method bnb --quant_bits 4`.
- `serve_64_clients`: `tunesmith deploy` (its continuous-batching engine) on the 0.5B-shaped model, 64 concurrent
  clients x 2 requests x 128 greedy tokens (bench/serve_load.py's load): completion tokens/s, requests/s, p50/p95.
  `serve_vllm_64_clients` does the same with `--infer_backend vllm` when vllm imports.

Models have random bf16 weights, drawn directly on the device where the case runs (normal, std 0.02; norms 1,
biases 0) and written as a safetensors checkpoint that tunesmith loads like any other; the 7B one (15 GB) is
written once and shared by both 7B cases. The tokenizer is the real Qwen2.5 one when
bench/peers/qwen_tokenizer.py's cache (or --tokenizer DIR) has it, else tunesmith.testing's 2,048-token BPE: the
data are generated to token counts, so only the text differs.

MFU (model FLOPs utilisation) = model FLOPs per second / the device's dense bf16 peak. Model FLOPs per token fed:
6N (forward 2N + backward 4N) for full fine-tuning, plus 2N for DPO's reference forward, where N is the weights
used in matrix products per token (every linear layer and the output layer; not the embedding lookup); plus the
useful causal attention, 12 * layers * hidden * (attended query-key pairs / tokens) for training (x 4/12 more for
the reference), counted per packed row (each row only attends to itself) and, for DPO with prefix sharing, with
rejected tokens not attending to chosen ones. Peaks (dense, no sparsity): H100 SXM and H200 989 TFLOPS, H100 NVL
835, H100 PCIe 756, A100 312, L40S 362, L4 121; --peak-tflops overrides. In --dry-run the "peak" is this CPU's
measured bf16 matrix-product rate, so the MFU column only shows that the arithmetic runs.

--dry-run: the same cases and code path on the CPU with tiny shapes (2 layers, hidden 64, a vocabulary of a few
thousand rows, a handful of steps; the 7B case a tiny model of the same structure: untied, 4 query heads per KV
head, MLP ~5.3 x hidden), so the script is known to work before a GPU is lent. Peak memory is then the process's
peak RSS.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# (substring of torch.cuda.get_device_name(), dense bf16 TFLOPS, what the figure is). First match wins, so the
# more specific names come first.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0, "H200: 989 TFLOPS dense bf16 (the H100 SXM's tensor cores)"),
    ("H100 NVL", 835.0, "H100 NVL: 835 TFLOPS dense bf16"),
    ("H100 PCIe", 756.0, "H100 PCIe: 756 TFLOPS dense bf16"),
    ("H100", 989.0, "H100 SXM: 989 TFLOPS dense bf16"),
    ("GH200", 989.0, "GH200: 989 TFLOPS dense bf16"),
    ("A100", 312.0, "A100: 312 TFLOPS dense bf16"),
    ("L40S", 362.0, "L40S: 362 TFLOPS dense bf16"),
    ("L4", 121.0, "L4: 121 TFLOPS dense bf16"),
]
OPTIONAL = {"liger_kernel": "liger-kernel", "flash_attn": "flash-attn", "bitsandbytes": "bitsandbytes",
            "vllm": "vllm"}  # module -> distribution name


@dataclass(frozen=True)
class ModelShape:
    """A Qwen2-architecture model: sizes in elements; vocab = embedding rows."""
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    def matmul_params(self) -> int:
        """N: the weights that take part in a matrix product for each token (q/k/v/o, the MLP, the output layer),
        not norms, biases or the embedding lookup. A tied output layer is one product like an untied one."""
        kv_dim = self.hidden // self.heads * self.kv_heads
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv_dim + 3 * self.hidden * self.intermediate
        return self.layers * per_layer + self.vocab * self.hidden


QWEN25_05B = ModelShape("qwen2.5-0.5b", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                        vocab=151936, tied=True)
QWEN25_7B = ModelShape("qwen2.5-7b", hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                       vocab=152064, tied=False)
# Dry run: the same structures, tiny. Vocabularies stay above tunesmith.testing's tokenizer (~2,070 tokens).
DRY_05B = ModelShape("qwen2.5-0.5b-tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=352, vocab=4096,
                     tied=True)
DRY_7B = ModelShape("qwen2.5-7b-tiny", hidden=64, layers=2, heads=8, kv_heads=2, intermediate=336, vocab=4160,
                    tied=False)


@dataclass(frozen=True)
class Plan:
    """Sizes and time budgets of one check (lengths in tokens, budgets in seconds)."""
    dry_run: bool
    small: ModelShape                # the throughput and serving model
    big: ModelShape                  # the 7B memory model
    max_length: int                  # per row (SFT) or per side (DPO) for the throughput cases
    packing_length: int              # tokens per packed micro-batch (one packed row) of the throughput cases
    sft_rows: int
    dpo_pairs: int
    steps: int                       # --max_steps of the throughput cases
    warmup_steps: int                # first steps left out of the steady-state rate (CUDA/kernel warm-up)
    big_max_length: int              # the 7B case's --max_length (each side of a pair)
    big_pairs: int
    big_steps: int
    big_accumulation: int
    serve_clients: int
    serve_requests: int              # per client, one after the other
    serve_max_tokens: int
    total_budget_s: float
    budgets_s: dict = field(default_factory=dict)  # case kind -> most seconds one case may take


GPU_PLAN = Plan(dry_run=False, small=QWEN25_05B, big=QWEN25_7B, max_length=2048, packing_length=16384,
                sft_rows=800, dpo_pairs=600, steps=15, warmup_steps=3, big_max_length=2048, big_pairs=8, big_steps=3,
                big_accumulation=2,
                serve_clients=64, serve_requests=2, serve_max_tokens=128, total_budget_s=470,
                budgets_s={"train": 75, "big": 150, "serve": 90})
DRY_PLAN = Plan(dry_run=True, small=DRY_05B, big=DRY_7B, max_length=256, packing_length=512, sft_rows=48,
                dpo_pairs=24, steps=3, warmup_steps=1, big_max_length=128, big_pairs=4, big_steps=2, big_accumulation=1,
                serve_clients=64, serve_requests=1, serve_max_tokens=8, total_budget_s=240,
                budgets_s={"train": 60, "big": 60, "serve": 60})


@dataclass(frozen=True)
class Case:
    """One measurement. kind: "train" (0.5B throughput), "big" (7B memory) or "serve". needs: optional modules
    it cannot run without; cuda_only: modules that need a GPU (Triton kernels)."""
    name: str
    kind: str
    method: str = "sft"              # sft or dpo (train, big)
    attn: str = "sdpa"               # --attn_impl
    liger: bool = False
    quant: bool = False              # QLoRA: --quant_method bnb --quant_bits 4
    backend: str = "transformers"    # serve: --infer_backend
    needs: tuple = ()
    cuda_only: bool = False


CASES = [  # in priority order: when time runs short, the last ones are skipped (and say so)
    Case("sft_sdpa", "train", "sft"),
    Case("dpo_sdpa", "train", "dpo"),
    Case("lora_dpo_7b", "big", "dpo"),
    Case("qlora_dpo_7b", "big", "dpo", quant=True, needs=("bitsandbytes",)),
    Case("serve_64_clients", "serve"),
    Case("sft_flash_attn", "train", "sft", attn="flash_attn", needs=("flash_attn",), cuda_only=True),
    Case("dpo_flash_attn", "train", "dpo", attn="flash_attn", needs=("flash_attn",), cuda_only=True),
    Case("sft_sdpa_liger", "train", "sft", liger=True, needs=("liger_kernel",), cuda_only=True),
    Case("dpo_sdpa_liger", "train", "dpo", liger=True, needs=("liger_kernel",), cuda_only=True),
    Case("serve_vllm_64_clients", "serve", backend="vllm", needs=("vllm",), cuda_only=True),
]


# ----------------------------------------------------------------------------------------------------------------
# Worker side: runs inside one case's subprocess.

def write_random_checkpoint(out: str, shape: ModelShape, device: str, tokenizer_dir: Optional[str],
                            shard_gib: float = 2.0, seed: int = 0) -> None:
    """A loadable Qwen2 checkpoint of `shape` with random bf16 weights drawn on `device` (normal std 0.02, norms 1,
    biases 0), written a shard (~shard_gib GiB) at a time so host memory holds one shard, plus a tokenizer. Nothing
    is written if out/config.json exists (the 7B cases share one)."""
    if os.path.exists(os.path.join(out, "config.json")):
        return
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    os.makedirs(out, exist_ok=True)
    tok = save_tokenizer(out, tokenizer_dir, shape.vocab)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=shape.tied, bos_token_id=pad, eos_token_id=eos,
                      pad_token_id=pad, dtype="bfloat16")
    with torch.device("meta"):  # names and shapes only; no memory
        skeleton = Qwen2ForCausalLM(cfg)
    params = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]  # a tied output layer appears once
    shards, current, size = [], [], 0
    for name, shp in params:
        nbytes = 2 * math.prod(shp)
        if current and size + nbytes > shard_gib * 2 ** 30:
            shards.append(current)
            current, size = [], 0
        current.append((name, shp))
        size += nbytes
    shards.append(current)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shp in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(shp, dtype=torch.bfloat16, device=device)
            elif name.endswith(".bias"):
                t = torch.zeros(shp, dtype=torch.bfloat16, device=device)
            else:
                t = (torch.randn(shp, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            tensors[name] = t.cpu()
            weight_map[name] = fname
            total += 2 * t.numel()
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    cfg.save_pretrained(out)
    GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad).save_pretrained(out)


def save_tokenizer(out: str, tokenizer_dir: Optional[str], vocab: int):
    """The real Qwen2.5 tokenizer when tokenizer_dir holds one that fits `vocab` rows, else tunesmith.testing's
    (trained once per check into out/../tokenizer, since training it takes seconds); saved to out and returned."""
    from transformers import AutoTokenizer

    if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if len(tok) <= vocab:
            tok.save_pretrained(out)
            return tok
    shared = os.path.join(os.path.dirname(os.path.abspath(out)), "tokenizer")
    if os.path.isfile(os.path.join(shared, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(shared)
    else:
        from tunesmith.testing import build_tokenizer
        tok = build_tokenizer("qwen2")
        tok.save_pretrained(shared)
    tok.save_pretrained(out)
    return tok


def text_of_tokens(tok, n: int, rng: random.Random) -> str:
    """Text of about n tokens under `tok` (random common words, cut at n tokens)."""
    from train_speed import WORDS
    ids = tok(" ".join(rng.choice(WORDS) for _ in range(n + 8)), add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids).strip()


def write_data(path: str, tok, method: str, rows: int, max_length: int, seed: int = 0,
               fill: bool = False) -> None:
    """Chat rows sized in tokens to fit max_length (32 tokens left for the template). SFT: prompts 16-128 tokens,
    replies log-normal around max_length/6 (a long tail, as real chat data). DPO: prompts 32-256, chosen and
    rejected each log-normal around max_length/8. fill: DPO pairs whose prompt + each reply fills max_length (the
    7B memory case: the longest pair it accepts)."""
    rng = random.Random(seed)
    budget = max_length - 32
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            if fill:
                p = budget // 2
                c = r = budget - p
            else:
                p = rng.randint(16, 128) if method == "sft" else rng.randint(32, 256)
                p = min(p, budget // 4)
                median = max_length / (6 if method == "sft" else 8)
                c = min(budget - p, max(8, int(rng.lognormvariate(math.log(median), 0.8))))
                r = min(budget - p, max(8, int(c * rng.uniform(0.6, 1.4))))
            prompt, chosen = text_of_tokens(tok, p, rng), text_of_tokens(tok, c, rng)
            if method == "sft":
                row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]}
            else:
                row = {"prompt": prompt, "chosen": chosen, "rejected": text_of_tokens(tok, r, rng)}
            fh.write(json.dumps(row) + "\n")


def attention_stats(model_dir: str, data: str, method: str) -> dict:
    """Tokens and attended (query, key) pairs of the data as tunesmith encodes it, for the attention FLOPs: SFT rows
    causal (s^2/2 each); DPO pairs both as one prefix-shared sequence (prompt p, chosen c, rejected r: p^2/2 + c*p
    + c^2/2 + r*p + r^2/2 over p + c + r tokens) and as two sequences ((p+c)^2/2 + (p+r)^2/2 over 2p + c + r)."""
    from transformers import AutoTokenizer

    from tunesmith.data.encode import ChatEncoder
    from tunesmith.data.load import load_datasets

    enc = ChatEncoder(AutoTokenizer.from_pretrained(model_dir), loss_scale="last_round")
    st = {"tokens": 0, "pairs": 0.0, "tokens_unshared": 0, "pairs_unshared": 0.0}
    for rec in load_datasets([data]).records:
        if method == "sft":
            s = len(enc.encode(rec).input_ids)
            st["tokens"] += s
            st["pairs"] += s * s / 2
            continue
        ch, rj = enc.encode_pair(rec)
        a, b = list(ch.input_ids), list(rj.input_ids)
        p = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        c, r = len(a) - p, len(b) - p
        st["tokens"] += p + c + r
        st["pairs"] += p * p / 2 + c * p + c * c / 2 + r * p + r * r / 2
        st["tokens_unshared"] += 2 * p + c + r
        st["pairs_unshared"] += (p + c) ** 2 / 2 + (p + r) ** 2 / 2
    return st


def peak_memory() -> dict:
    """Peak memory of this process in GiB: CUDA allocated and reserved on a GPU, else the peak RSS."""
    import torch
    if torch.cuda.is_available():
        return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30, "memory_kind": "cuda_max_allocated"}
    import resource
    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "memory_kind": "cpu_peak_rss (dry run)"}


def step_records(out: str) -> list[dict]:
    """tunesmith's log records (out/v*/logging.jsonl), in order."""
    recs = []
    for path in sorted(glob.glob(os.path.join(out, "v*", "logging.jsonl"))):
        with open(path, encoding="utf-8") as fh:
            recs += [json.loads(line) for line in fh if line.strip()]
    return recs


def train_argv(case: Case, plan: Plan, model: str, data: str, out: str) -> list[str]:
    """The command line the case trains with (what a user would type after `tunesmith`)."""
    common = ["--model", model, "--dataset", data, "--torch_dtype", "bfloat16", "--logging_steps", "1",
              "--save_strategy", "no", "--report_to", "none", "--output_dir", out, "--seed", "0"]
    if case.kind == "big":  # ms-swift's examples/train/rlhf/dpo/lora.sh, with fewer steps
        argv = ["rlhf", "--rlhf_type", "dpo", *common, "--train_type", "lora", "--lora_rank", "8",
                "--lora_alpha", "32", "--target_modules", "all-linear", "--per_device_train_batch_size", "1",
                "--gradient_accumulation_steps", str(plan.big_accumulation), "--learning_rate", "1e-4",
                "--max_length", str(plan.big_max_length), "--rpo_alpha", "0.1", "--warmup_ratio", "0.05",
                "--max_steps", str(plan.big_steps)]
        if case.quant:
            argv += ["--quant_method", "bnb", "--quant_bits", "4"]
        return argv
    argv = [*common, "--train_type", "full", "--learning_rate", "1e-5", "--attn_impl", case.attn,
            "--packing", "true", "--max_length", str(plan.max_length),
            "--packing_length", str(plan.packing_length),
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
            "--gradient_checkpointing", "false", "--max_steps", str(plan.steps),
            "--use_liger_kernel", str(case.liger).lower()]
    return ["sft", *argv] if case.method == "sft" else ["rlhf", "--rlhf_type", "dpo", *argv]


def run_train_case(case: Case, plan: Plan, work: str, tokenizer_dir: Optional[str]) -> dict:
    """Build the model and data, train through tunesmith.cli.main, read tunesmith's log; the result's numbers."""
    import torch

    from tunesmith.cli import main as tunesmith_main

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = plan.big if case.kind == "big" else plan.small
    model = os.path.join(work, "models", shape.name)
    t0 = time.time()
    write_random_checkpoint(model, shape, device, tokenizer_dir)
    build_s = time.time() - t0
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    data = os.path.join(work, f"{case.name}.jsonl")
    if case.kind == "big":
        write_data(data, tok, "dpo", plan.big_pairs, plan.big_max_length, fill=True)
    else:
        write_data(data, tok, case.method, plan.sft_rows if case.method == "sft" else plan.dpo_pairs,
                   plan.max_length)
    out = os.path.join(work, "runs", case.name)
    argv = train_argv(case, plan, model, data, out)
    if torch.cuda.is_available():  # the peak from here on: the checkpoint's drawing is not training
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    rc = tunesmith_main(argv)
    wall = time.time() - t1
    if rc != 0:
        raise RuntimeError(f"tunesmith exited with {rc}")
    recs = step_records(out)
    steps = [r for r in recs if "tokens_per_second" in r and "global_step" in r]
    summary = next((r for r in reversed(recs) if "train_runtime" in r), {})
    steady = [r["tokens_per_second"] for r in steps if r["global_step"] > plan.warmup_steps]
    result = {"command": "tunesmith " + " ".join(argv), "model_build_s": build_s, "wall_s": wall,
              "steps": summary.get("global_step"), "train_runtime_s": summary.get("train_runtime"),
              "tokens_per_s_loop": summary.get("train_tokens_per_second"),
              "tokens_per_s": statistics.median(steady) if steady else summary.get("train_tokens_per_second"),
              "steady_steps": len(steady), "loss_first": steps[0].get("loss") if steps else None,
              "loss_last": steps[-1].get("loss") if steps else None, **peak_memory()}
    if case.kind == "train":  # for the MFU's attention term
        result["attention"] = attention_stats(model, data, case.method)
    return result


def run_serve_case(case: Case, plan: Plan, work: str, tokenizer_dir: Optional[str]) -> dict:
    """`tunesmith deploy` on the 0.5B-shaped model under bench/serve_load.py's closed-loop load."""
    import torch

    from serve_load import prompts, serve_and_load

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = os.path.join(work, "models", plan.small.name)
    write_random_checkpoint(model, plan.small, device, tokenizer_dir)
    if device == "cuda":  # the server process needs the GPU; this one only sends requests
        torch.cuda.empty_cache()
    a = SimpleNamespace(max_tokens=plan.serve_max_tokens, max_batch_size=64, stream_fraction=0.0,
                        requests=plan.serve_requests, clients=plan.serve_clients, timeout=120.0,
                        ready_timeout=300.0)

    def command(port: int):
        cmd = [sys.executable, "-m", "tunesmith", "deploy", "--model", model, "--host", "127.0.0.1", "--port",
               str(port), "--max_new_tokens", str(plan.serve_max_tokens), "--temperature", "0",
               "--max_batch_size", "64", "--infer_backend", case.backend]
        return cmd, None

    stop_at = time.time() + plan.budgets_s["serve"] - 10
    r = serve_and_load("tunesmith", model, prompts(a.clients * a.requests, seed=0), a, os.path.join(work, "runs"),
                       0, stop_at, command=command)
    if "error" in r:
        raise RuntimeError(f"{r['error']}\n{r.get('log_tail', '')[-1500:]}")
    return {"command": " ".join(command(0)[0][1:]).replace("--port 0", "--port P"), **{
        k: r[k] for k in ("ok", "failures", "errors", "wall_s", "req_s", "tok_s", "tok_per_req", "p50_s", "p95_s",
                          "startup_s", "peak_rss_gib")}}


def probe_environment(dry_run: bool) -> dict:
    """Versions, the device and its peak, and which optional packages import (and their versions)."""
    import importlib.metadata as md

    import torch
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "optional": {}}
    for lib in ("transformers", "peft", "accelerate", "datasets"):
        try:
            env[lib] = md.version(lib)
        except md.PackageNotFoundError:
            env[lib] = None
    for module, dist in OPTIONAL.items():
        try:
            importlib.import_module(module)
            env["optional"][module] = {"version": md.version(dist)}
        except Exception as e:  # noqa: BLE001  (a broken install, e.g. flash-attn built for another torch, is "no")
            env["optional"][module] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        env["device"] = name
        env["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        env["cuda"] = torch.version.cuda
        hit = next((p for p in PEAK_BF16_TFLOPS if p[0] in name), None)
        env["peak_tflops"], env["peak_source"] = (hit[1], hit[2]) if hit else (None, f"no datasheet peak for {name}")
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores)"
        # No datasheet peak: measure this CPU's bf16 product rate for 0.3 s, so the MFU arithmetic runs in a dry
        # run (CPUs without bf16 units reach well under 1 GFLOPS; the figure is not comparable to a GPU's)
        a = torch.randn(256, 256, dtype=torch.bfloat16)
        a @ a
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < 0.3:
            a @ a
            n += 1
        env["peak_tflops"] = 2 * 256 ** 3 * n / (time.perf_counter() - t) / 1e12
        env["peak_source"] = "dry run: this CPU's measured bf16 256x256 matrix-product rate, not a datasheet peak"
    return env


def worker(spec_path: str) -> int:
    """Run one case described by the JSON at spec_path and write its result JSON next to it."""
    with open(spec_path) as fh:
        spec = json.load(fh)
    plan = plan_from_dict(spec["plan"])
    case = Case(**{**spec["case"], "needs": tuple(spec["case"]["needs"])})
    if case.kind == "env":
        result = probe_environment(plan.dry_run)
    elif case.kind == "serve":
        result = run_serve_case(case, plan, spec["work"], spec["tokenizer_dir"])
    else:
        result = run_train_case(case, plan, spec["work"], spec["tokenizer_dir"])
    with open(spec["result"], "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    return 0


def plan_from_dict(d: dict) -> Plan:
    return Plan(**{**d, "small": ModelShape(**d["small"]), "big": ModelShape(**d["big"])})


# ----------------------------------------------------------------------------------------------------------------
# Parent side: schedules the cases, never imports torch (the GPU stays free for the cases).

def flops_per_token(shape: ModelShape, method: str, attention: dict, shared: bool) -> tuple[float, float]:
    """(model FLOPs per token fed, the mean attended pairs per token used) for full fine-tuning: 6N plus 12 * layers
    * hidden * pairs/token (forward: QK^T and AV, 2 FLOPs per multiply-add, 2 products -> 4 * hidden per pair;
    training x3); DPO adds the reference forward (2N + 4 * layers * hidden * pairs/token)."""
    if method == "dpo" and not shared:
        tokens, pairs = attention["tokens_unshared"], attention["pairs_unshared"]
    else:
        tokens, pairs = attention["tokens"], attention["pairs"]
    per_token = pairs / max(tokens, 1)
    n = shape.matmul_params()
    attn = 4 * shape.layers * shape.hidden * per_token
    f = 6 * n + 3 * attn
    if method == "dpo":
        f += 2 * n + attn
    return f, per_token


def run_case(case: Case, plan: Plan, work: str, tokenizer_dir: Optional[str], timeout: float) -> dict:
    """Run one case in its own process group; its result, or why there is none (error/oom/timeout + log tail)."""
    spec = os.path.join(work, f"{case.name}.spec.json")
    result = os.path.join(work, f"{case.name}.result.json")
    log = os.path.join(work, f"{case.name}.log")
    with open(spec, "w") as fh:
        json.dump({"case": asdict(case), "plan": asdict(plan), "work": work, "result": result,
                   "tokenizer_dir": tokenizer_dir}, fh)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": os.path.join(work, "hf_datasets_cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([REPO, HERE, os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    with open(log, "w") as fh:  # own session: a timeout kills the case and anything it started (a server)
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
    elapsed = time.time() - t0
    with open(log, errors="replace") as fh:
        text = fh.read()
    tail = "\n".join(text.strip().splitlines()[-15:])[-2000:]
    if rc is None:
        return {"status": "timeout", "reason": f"over its budget of {timeout:.0f} s", "case_s": elapsed,
                "log_tail": tail}
    if rc != 0 or not os.path.exists(result):
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        return {"status": "oom" if oom else "error", "reason": f"exit {rc}", "case_s": elapsed, "log_tail": tail}
    with open(result) as fh:
        res = json.load(fh)
    return {"status": "ok", "case_s": elapsed, **res, "_log": text}


def skip_reason(case: Case, env: dict) -> Optional[str]:
    for module in case.needs:
        info = env.get("optional", {}).get(module, {})
        if "version" not in info:
            err = info.get("error", "")
            installed = "No module named" not in err and err
            return (f"{OPTIONAL[module]} does not import ({err})" if installed else
                    f"{OPTIONAL[module]} not installed")
    if case.cuda_only and not env.get("cuda_available"):
        return f"{', '.join(OPTIONAL[m] for m in case.needs)} needs a CUDA GPU"
    return None


def finish_case(case: Case, plan: Plan, env: dict, res: dict) -> dict:
    """Add the derived numbers (MFU) and drop the raw log."""
    log = res.pop("_log", "")
    if res.get("status") != "ok":
        return res
    if case.kind == "train":
        shared = case.method == "dpo" and "each pair runs as one sequence" in log
        f, per_token = flops_per_token(plan.small, case.method, res.pop("attention"), shared)
        res["prefix_shared"] = shared if case.method == "dpo" else None
        res["model_flops_per_token"] = f
        res["attended_pairs_per_token"] = per_token
        peak = env.get("peak_tflops")
        res["achieved_tflops"] = res["tokens_per_s"] * f / 1e12 if res.get("tokens_per_s") else None
        res["mfu"] = res["achieved_tflops"] / peak if peak and res["achieved_tflops"] is not None else None
    return res


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# tunesmith GPU check{' (dry run: CPU, tiny shapes)' if report['dry_run'] else ''}", "",
             f"{report['date']}; device {env.get('device')}; torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}, peft {env.get('peft')}; optional: " +
             ", ".join(f"{OPTIONAL[m]} {v['version']}" if "version" in v else f"{OPTIONAL[m]} no"
                       for m, v in env.get("optional", {}).items()) + f". Peak used for MFU: {env.get('peak_source')}"
             f" ({env.get('peak_tflops') or 0:.3g} TFLOPS). Whole check {report['total_s']:.0f} s.", "",
             "| case | status | tokens/s (steady) | tokens/s (loop) | MFU | peak memory GiB | notes |",
             "|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for name, r in report["cases"].items():
        st = r["status"]
        if st == "skipped" or st in ("error", "oom", "timeout"):
            lines.append(f"| {name} | {st} | | | | | {r.get('reason', '')} |")
            continue
        if "tok_s" in r:  # serving
            lines.append(f"| {name} | ok | {f(r['tok_s'], '.1f')} completion | | | {f(r['peak_rss_gib'], '.2f')} "
                         f"RSS | {r['req_s']:.2f} req/s, p50 {f(r['p50_s'], '.2f')} s, p95 {f(r['p95_s'], '.2f')} s, "
                         f"{r['failures']} failures, start-up {r['startup_s']:.1f} s |")
            continue
        mem = f(r.get("peak_memory_gib"), ".2f")
        if r.get("peak_reserved_gib") is not None:
            mem += f" ({r['peak_reserved_gib']:.2f} reserved)"
        notes = f"{r.get('steps')} steps, loss {f(r.get('loss_first'), '.4g')} -> {f(r.get('loss_last'), '.4g')}"
        if r.get("prefix_shared") is not None:
            notes += ", prefix-shared" if r["prefix_shared"] else ", two sequences per pair"
        mfu = r.get("mfu")
        lines.append(f"| {name} | ok | {f(r.get('tokens_per_s'), '.0f')} | {f(r.get('tokens_per_s_loop'), '.0f')} | "
                     f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {mem} | {notes} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps: checks the code path")
    ap.add_argument("--out", default=os.path.join(HERE, "gpu_check.json"),
                    help="the JSON (the markdown table goes next to it, .md)")
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of: {', '.join(c.name for c in CASES)}")
    ap.add_argument("--tokenizer", default=None, help="a Qwen2.5 tokenizer directory (default: "
                                                      "bench/peers/qwen_tokenizer.py's cache, if built)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (models, data, logs)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)

    started = time.time()
    plan = DRY_PLAN if a.dry_run else GPU_PLAN
    deadline = started + plan.total_budget_s
    work = a.work or tempfile.mkdtemp(prefix="tunesmith-gpu-check-")
    os.makedirs(os.path.join(work, "runs"), exist_ok=True)
    tokenizer_dir = a.tokenizer
    if tokenizer_dir is None and not a.dry_run:  # the dry run's tiny vocabularies cannot hold Qwen's tokenizer
        from peers.qwen_tokenizer import CACHE
        tokenizer_dir = os.path.join(CACHE, "qwen25-tokenizer")
    report = {"dry_run": a.dry_run, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([os.path.relpath(__file__, REPO) if __file__.startswith(REPO) else __file__,
                                   *(argv if argv is not None else sys.argv[1:])]),
              "plan": asdict(plan), "environment": {}, "cases": {}}
    env_res = run_case(Case("environment", "env"), plan, work, tokenizer_dir, 120)
    env_res.pop("_log", None)
    env = env_res if env_res.get("status") == "ok" else {"error": env_res}
    if a.peak_tflops:
        env["peak_tflops"], env["peak_source"] = a.peak_tflops, f"--peak-tflops {a.peak_tflops}"
    report["environment"] = env
    wanted = [c for c in CASES if a.cases is None or c.name in a.cases.split(",")]
    for case in wanted:
        reason = skip_reason(case, env)
        left = deadline - time.time()
        if reason is None and left < min(30.0, plan.budgets_s[case.kind] / 3):
            reason = f"the check's {plan.total_budget_s:.0f} s budget was used up"
        if reason:
            res = {"status": "skipped", "reason": reason}
        else:
            res = finish_case(case, plan, env, run_case(case, plan, work, tokenizer_dir,
                                                        min(plan.budgets_s[case.kind], left)))
        report["cases"][case.name] = res
        shown = {k: v for k, v in res.items() if k in ("status", "reason", "tokens_per_s", "mfu", "peak_memory_gib",
                                                       "tok_s", "case_s")}
        print(f"{case.name}: {json.dumps(shown, default=str)}", flush=True)
        if res["status"] in ("error", "oom", "timeout"):
            print(res.get("log_tail", ""), file=sys.stderr)
    report["total_s"] = time.time() - started
    if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")) and not a.dry_run:
        report["tokenizer"] = f"the real Qwen2.5 tokenizer ({tokenizer_dir})"
    else:
        report["tokenizer"] = "tunesmith.testing's 2,048-token BPE (data generated to token counts)"
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    md_path = os.path.splitext(a.out)[0] + ".md"
    table = markdown(report)
    with open(md_path, "w") as fh:
        fh.write(table)
    print("\n" + table)
    print(f"written: {a.out}, {md_path}")
    if a.keep or a.work:
        print(f"work directory: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
