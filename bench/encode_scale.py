"""Encoding at scale: peak memory and time to get a dataset ready for training, Python lists vs Arrow, and a second
run from the cache — with the real Qwen2.5 tokenizer and chat template (151,643 BPE ranks + special tokens).

    python bench/encode_scale.py --rows 50000 [--num_proc 2] [--skip_lists]

Each measurement runs in its own process and reports its wall time and peak memory (PSS of the process and its
workers):
- lists:  what tunesmith did before the Arrow store — every row encoded into Python lists held in memory
          (`ChatEncoder.encode` over the loaded records), the path the issue measured (56 s, 683 MB for 50k rows);
- arrow:  `train.setup.prepare_data` with --load_from_cache_file false: load, encode through datasets.map into
          memory-mapped Arrow, open the rows;
- cached: the same with --load_from_cache_file true after the arrow run: the rows are reopened, nothing is loaded.
Rows are synthetic chats of about 260 tokens (the issue's 13M tokens / 50k rows). Prints the table and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "peers"))
WORDS = ("the model reads every token of the prompt before it answers and a longer context costs more memory "
         "training data comes in many shapes chat pairs tool calls and plain text 北京 上海 数据 训练 模型").split()


def make_rows(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(120, 260)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {q}"},
                                              {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n")



def pss_parts(pid: int) -> tuple[int, int]:
    """(anonymous PSS, file-backed PSS) of one process in bytes, from /proc/PID/smaps_rollup. File-backed pages
    (the memory-mapped Arrow files, shared libraries) are page cache the kernel can reclaim; anonymous ones are not."""
    parts = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Pss_Anon", "Pss_File", "Pss_Shmem"):
                parts[key] = int(rest.split()[0]) * 1024
    return parts.get("Pss_Anon", 0) + parts.get("Pss_Shmem", 0), parts.get("Pss_File", 0)


def run_measured_pss(cmd: list[str], env: dict, log: str) -> tuple[float, float, int]:
    """(peak memory of the process tree in GiB, peak anonymous memory in GiB, exit code). Memory is PSS — each page
    shared between the parent and its forked encoding workers counted once, split between them — sampled every
    0.2 s: RSS would count a shared page once per process and overstate a forked pool."""
    import subprocess

    import psutil

    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        ps, peak, peak_anon = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            try:
                parts = [pss_parts(p.pid) for p in [ps, *ps.children(recursive=True)]]
                peak = max(peak, sum(a + f for a, f in parts))
                peak_anon = max(peak_anon, sum(a for a, _ in parts))
            except (psutil.Error, OSError):
                pass
            time.sleep(0.2)
    return peak / 2 ** 30, peak_anon / 2 ** 30, proc.returncode


def child(mode: str, tok_dir: str, data: str, num_proc: int) -> dict:
    t0 = time.time()
    if mode == "lists":
        from transformers import AutoTokenizer

        from tunesmith.data.encode import ChatEncoder, encode_one
        from tunesmith.data.load import load_datasets

        enc = ChatEncoder(AutoTokenizer.from_pretrained(tok_dir), max_length=4096)
        loaded = load_datasets([data])
        rows = [v for s, v in (encode_one(enc, r, "sft") for r in loaded.records) if s == "ok"]
        n = len(rows)
    else:
        from tunesmith.config.parser import parse_args
        from tunesmith.train import recipe
        from tunesmith.train.setup import prepare_data

        args = parse_args("sft", ["--model", tok_dir, "--dataset", data, "--max_length", "4096",
                                  "--dataset_num_proc", str(num_proc),
                                  "--load_from_cache_file", "true" if mode == "cached" else "false"])
        cfg, method = recipe.configure(args)
        prepared = prepare_data(cfg.data, cfg.model, method)
        n = len(prepared.train_rows)
        sum(len(prepared.train_rows[i].input_ids) for i in range(0, n, max(n // 100, 1)))  # touch some rows
    return {"mode": mode, "rows": n, "seconds": round(time.time() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--num_proc", type=int, default=2)
    ap.add_argument("--skip_lists", action="store_true", help="skip the lists baseline (it needs ~14 KB per row)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "TOKENIZER", "DATA"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a.num_proc)))
        return 0
    from qwen_tokenizer import CACHE, build_qwen25_tokenizer

    tok_dir = os.path.join(CACHE, "qwen25-tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        build_qwen25_tokenizer(tok_dir)
    work = tempfile.mkdtemp(prefix="encode_scale-")
    data = os.path.join(work, "chat.jsonl")
    make_rows(data, a.rows)
    env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(work, "hf_cache")}
    results = {}
    for mode in (["arrow", "cached"] if a.skip_lists else ["lists", "arrow", "cached"]):
        log = os.path.join(work, f"{mode}.log")
        peak_gib, anon_gib, rc = run_measured_pss([sys.executable, __file__, "--num_proc", str(a.num_proc), "--child", mode,
                                         tok_dir, data], env, log)
        text = open(log, encoding="utf-8").read()
        if rc:
            print(text[-3000:], file=sys.stderr)
            return 1
        results[mode] = {**json.loads(text.strip().splitlines()[-1]), "peak_rss_mb": round(peak_gib * 1024, 1),
                         "peak_anon_mb": round(anon_gib * 1024, 1)}
    print(f"{a.rows} rows ({os.path.getsize(data) / 2 ** 20:.0f} MiB of jsonl), real Qwen2.5 tokenizer, "
          f"--dataset_num_proc {a.num_proc}")
    print(f"{'mode':<8} {'rows':>9} {'seconds':>9} {'peak PSS MiB':>13} {'of it anon':>11} {'KiB per row':>12}")
    for r in results.values():
        print(f"{r['mode']:<8} {r['rows']:>9} {r['seconds']:>9} {r['peak_rss_mb']:>13} {r['peak_anon_mb']:>11} "
              f"{1024 * r['peak_rss_mb'] / max(r['rows'], 1):>12.2f}")
    if "lists" in results:
        print(f"peak memory arrow / lists: {results['arrow']['peak_rss_mb'] / results['lists']['peak_rss_mb']:.2f}")
    print(f"time cached / arrow encoding: {results['cached']['seconds'] / results['arrow']['seconds']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
