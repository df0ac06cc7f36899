"""Training throughput and memory: tunesmith against TRL (and ms-swift when its venv exists), in one run.

    python bench/train_speed.py --method sft --rows 256 --repeats 2
    python bench/train_speed.py --method dpo --rows 128 --repeats 2

The same random Qwen2-shaped model (7.1M parameters, 16,384-row vocabulary), the same data with a long-tailed length
distribution (tens to ~1000 tokens), the same LoRA config (r 8, all-linear), the same effective batch (4 x 4) and
one epoch. Each system runs in its own process, alternating (A B A B ...), so drift hits all alike. Every system is
credited with the same token count: the dataset's tokens as tunesmith encodes them. Peak RSS is the process tree's,
sampled every 50 ms. Prints a table and the ratios tunesmith/peer; RESULTS.md records them with the command.

Settings (each system at its best on a CPU):
- tunesmith: --packing true (exact: position_ids restart per row), chunked log-probs (default); also run padded
  with the peers' exact batch ("tunesmith-padded") to show what packing adds.
- TRL 1.16: SFTTrainer/DPOTrainer, padded (its padding-free/packing need flash attention; TRL itself disables DPO
  padding_free on CPU), completion-only loss, the same LoRA.
- ms-swift 4.6: `swift sft|rlhf` from bench/.venv-swift (created by --make-swift-venv; it pins older
  transformers/trl/peft), padded (its --packing refuses to run without flash attention).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SWIFT_VENV = os.path.join(HERE, ".venv-swift")
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "not but one all their new first two been after who its also they other more time years into only over "
         "city world state school during such many most three some when where these there used made can would "
         "river north south east west king music film team game house line side water life power party war").split()


def make_data(path: str, rows: int, method: str, seed: int = 0, prompt_words: int = 0) -> None:
    """Chat rows whose reply lengths follow a log-normal (median ~60 words, long tail capped near ~700 words).
    Prompts are 5-40 words, or with prompt_words a log-normal of that median (multi-turn context, system prompts,
    retrieved documents: where DPO prefix sharing matters)."""
    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            q = text(min(700, max(5, int(rng.lognormvariate(math.log(prompt_words), 0.7))))
                     if prompt_words else rng.randint(5, 40))
            n = min(700, max(8, int(rng.lognormvariate(math.log(60), 0.9))))
            if method == "sft":
                row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": text(n)}]}
            else:
                m = min(700, max(8, int(n * rng.uniform(0.6, 1.4))))
                row = {"prompt": q, "chosen": text(n), "rejected": text(m)}
            fh.write(json.dumps(row) + "\n")


def dataset_tokens(model: str, data: str, method: str) -> int:
    """The tokens every system is credited with: the dataset as tunesmith's encoder renders it."""
    from transformers import AutoTokenizer

    from tunesmith.data.encode import ChatEncoder
    from tunesmith.data.load import load_datasets

    enc = ChatEncoder(AutoTokenizer.from_pretrained(model), loss_scale="last_round")
    total = 0
    for rec in load_datasets([data]).records:
        if method == "sft":
            total += len(enc.encode(rec).input_ids)
        else:
            c, r = enc.encode_pair(rec)
            total += len(c.input_ids) + len(r.input_ids)
    return total


def run_measured(cmd: list[str], env: dict, log: str) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GiB of the process tree, exit code)."""
    import psutil

    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
    return time.time() - t0, peak / 2 ** 30, proc.returncode


def tunesmith_cmd(method, model, data, out, packed=True, shared=None):
    """Packed: one packed row per micro-batch, accumulation chosen so that a step holds about as many rows as the
    peers' 4 x 4 (SFT: 2 packs of 1024 tokens, about 14 rows; DPO: 3 packs of 2048, about 18 pairs). Padded: the
    peers' exact batch (4 x 4), for an apples-to-apples view of what packing adds."""
    common = ["--model", model, "--dataset", data, "--train_type", "lora", "--lora_rank", "8", "--lora_alpha", "32",
              "--target_modules", "all-linear", "--num_train_epochs", "1", "--max_length", "1024",
              "--learning_rate", "1e-4", "--gradient_checkpointing", "false", "--logging_steps", "10",
              "--save_strategy", "no", "--report_to", "none", "--output_dir", out, "--dataloader_num_workers", "0"]
    if packed:
        common += ["--packing", "true", "--per_device_train_batch_size", "1", "--packing_length",
                   "1024" if method == "sft" else "2048", "--gradient_accumulation_steps", "2" if method == "sft" else "3"]
    else:
        common += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4"]
    if method == "sft":
        return ["tunesmith", "sft", *common]
    sharing = [] if shared is None else ["--prefix_sharing", str(shared).lower()]
    return ["tunesmith", "rlhf", "--rlhf_type", "dpo", *common, *sharing]


def tunesmith_padded_cmd(method, model, data, out):
    return tunesmith_cmd(method, model, data, out, packed=False)


def tunesmith_unshared_cmd(method, model, data, out):
    """Packed DPO without prefix sharing (chosen and rejected as two sequences): what sharing the prompt adds."""
    return tunesmith_cmd(method, model, data, out, shared=False)


def trl_cmd(method, model, data, out):
    return [sys.executable, os.path.join(HERE, "peers", "trl_train.py"), method, model, data, out]


def swift_cmd(method, model, data, out):
    swift = os.path.join(SWIFT_VENV, "bin", "swift")
    common = ["--model", model, "--model_type", "qwen2", "--template", "qwen2_5", "--dataset", data,
              "--tuner_type", "lora",  # ms-swift 4.x's name for --train_type "--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4", "--num_train_epochs", "1",
              "--max_length", "1024", "--learning_rate", "1e-4", "--gradient_checkpointing", "false",
              "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none", "--output_dir", out,
              "--dataloader_num_workers", "0", "--torch_dtype", "float32", "--split_dataset_ratio", "0"]
    if method == "sft":
        return [swift, "sft", *common]
    return [swift, "rlhf", "--rlhf_type", "dpo", *common,
            "--columns", json.dumps({"chosen": "response", "rejected": "rejected_response"})]


def make_swift_venv() -> None:
    if os.path.exists(os.path.join(SWIFT_VENV, "bin", "swift")):
        return
    subprocess.run([sys.executable, "-m", "venv", SWIFT_VENV], check=True)
    pip = os.path.join(SWIFT_VENV, "bin", "pip")
    subprocess.run([pip, "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([pip, "install", "-q", "ms-swift==4.6.0"], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peers", default="trl,ms-swift", help="comma-separated: trl, ms-swift")
    ap.add_argument("--make-swift-venv", action="store_true", help="create bench/.venv-swift (ms-swift 4.6)")
    ap.add_argument("--prompt-words", type=int, default=0, help="median prompt length in words (default: 5-40)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()

    if a.make_swift_venv:
        make_swift_venv()
    work = tempfile.mkdtemp(prefix="tunesmith-bench-")
    from tunesmith.testing import build_model

    model = build_model(os.path.join(work, "model"), "qwen2", hidden=256, layers=4, heads=4, intermediate=704,
                        model_vocab=16384)
    data = os.path.join(work, "data.jsonl")
    make_data(data, a.rows, a.method, prompt_words=a.prompt_words)
    tokens = dataset_tokens(model, data, a.method)
    systems = {"tunesmith": tunesmith_cmd, "tunesmith-padded": tunesmith_padded_cmd}
    if a.method == "dpo":
        systems["tunesmith-unshared"] = tunesmith_unshared_cmd
    peers = [p.strip() for p in a.peers.split(",") if p.strip()]
    if "trl" in peers:
        systems["trl"] = trl_cmd
    if "ms-swift" in peers:
        if os.path.exists(os.path.join(SWIFT_VENV, "bin", "swift")):
            systems["ms-swift"] = swift_cmd
        else:
            print("ms-swift: bench/.venv-swift does not exist (run with --make-swift-venv); skipped", file=sys.stderr)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    results: dict[str, list] = {name: [] for name in systems}
    for rep in range(a.repeats):
        for name, make_cmd in systems.items():
            out = os.path.join(work, f"{name}-{rep}")
            wall, rss, rc = run_measured(make_cmd(a.method, model, data, out), env, out + ".log")
            if rc != 0:
                print(f"{name} failed (exit {rc}); log: {out}.log", file=sys.stderr)
                print(open(out + ".log").read()[-3000:], file=sys.stderr)
                results[name].append(None)
                continue
            results[name].append((wall, rss))
            print(f"  {name:17s} run {rep + 1}: {wall:7.1f} s  {tokens / wall:8.0f} tok/s  peak RSS {rss:.2f} GiB",
                  flush=True)
    print(f"\n{a.method}: {a.rows} rows, {tokens} dataset tokens, 1 epoch, LoRA r8 all-linear, batch 4x4, "
          f"model 7.1M params / vocab 16384, {os.cpu_count()} CPUs")
    print(f"{'system':17s} {'wall s (best)':>14s} {'tok/s':>8s} {'peak RSS GiB':>13s}")
    best = {}
    for name, runs in results.items():
        ok = [r for r in runs if r]
        if not ok:
            print(f"{name:17s} failed")
            continue
        wall, rss = min(r[0] for r in ok), max(r[1] for r in ok)
        best[name] = (wall, rss)
        print(f"{name:17s} {wall:14.1f} {tokens / wall:8.0f} {rss:13.2f}")
    if "tunesmith" in best:
        tw, tr = best["tunesmith"]
        for name, (w, r) in best.items():
            if not name.startswith("tunesmith"):
                print(f"tunesmith/{name}: throughput x{w / tw:.2f}, peak RSS x{tr / r:.2f}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work directory: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
