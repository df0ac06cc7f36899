"""GRPO speed and memory: tunesmith against TRL's GRPOTrainer and ms-swift's `swift rlhf --rlhf_type grpo`, same
model, data, reward and settings, in one run.

    python bench/grpo_speed.py                       # full: 6 steps, hidden 512, 2 layers, 32 prompts
    python bench/grpo_speed.py --steps 6 --hidden 512 --layers 2 --prompts 32 --repeats 2
    python bench/grpo_speed.py --smoke               # 2 steps, hidden 256, 2 layers, 16 prompts: checks all run
    python bench/grpo_speed.py --smoke --systems tunesmith   # tunesmith alone

What it measures, per system: the training part's wall time (each trainer's own `train_runtime`: from its loop's
start to its end, generation included, model loading excluded), the seconds per step after the first (the first
pays one-time warm-up), completion tokens generated per second of training (every completion token of every
rollout / train_runtime), the generation engine's own rate (completion tokens / the time spent inside generation:
tunesmith's `Rollouts._generate`, TRL's profiled `transformers.generate` block, ms-swift's `_engine_infer` — the
block it profiles as 'generate'), tokens trained per second (prompt + completion tokens of every trained sequence,
unpadded, each system's own count: tunesmith's per-step `tokens`, TRL's `num_tokens`; ms-swift logs no such count,
so its column is empty), and the peak RSS and PSS of the process tree (sampled every 100 ms). Then the ratios
tunesmith / each peer, and the mean reward of the first and last steps and the last step's KL, as a check that both really sample and train
(tunesmith logs the KL rounded to 6 decimals). Each run also reports the share of the CPUs other processes took while
it ran ("other CPU"): on a shared 2-core machine torch's 2-thread ops slow down several-fold as soon as another
process holds a core, so compare only runs where it is near 0.

How:
- The model: random Qwen2 weights with Qwen2.5-0.5B's layer shape scaled down (head_dim 64, 2 KV heads, MLP 5.4 x
  hidden, tied embeddings, rope_theta 1e6, fp32) and Qwen2.5's real vocabulary of 151,936 rows, so the output layer
  and the [tokens x 151,936] logits cost what they cost in small real models. The tokenizer is the real Qwen2.5 one
  (bench/peers/qwen_tokenizer.py, cached in ~/.cache/tunesmith-bench) when it can be built, else tunesmith.testing's
  2,048-token BPE; the output says which. Built once, saved to one directory both systems load.
- The data: --prompts chat rows {"messages": [{"role": "user", ...}]} (8-30 seeded random words).
- The reward: bench/peers/grpo_reward.py `e_share` (the share of a completion's characters that are 'e'), the same
  function in all three (tunesmith: `--reward_funcs grpo_reward.e_share` with bench/peers on PYTHONPATH; ms-swift:
  the ORM plugin bench/peers/swift_grpo_plugin.py, `--external_plugins … --reward_funcs e_share`).
- The same settings in all: LoRA r 8 / alpha 32 / dropout 0 on all-linear, num_generations 4,
  per_device_train_batch_size 8 completions (2 prompts a step), gradient_accumulation_steps 1, max_completion_length
  32, temperature 0.9, top_p 1, top_k off, beta 0.04 (the reference is the model with the adapter off, in both),
  loss_type grpo (TRL's default is dapo), learning rate 1e-4 linear without warm-up, weight decay 0, max_grad_norm 1,
  no gradient checkpointing, dropout off, seed 42, --steps optimiser steps, no checkpoints, no eval, fp32 on CPU.
  (ms-swift spells top_k off as -1; TRL and tunesmith take 0.)
- tunesmith: `python -m tunesmith rlhf --rlhf_type grpo ...` (through bench/peers/tunesmith_timed.py, which only adds
  a timer around rollout generation), from bench/.venv-tunesmith (its own install only, as the README installs it;
  bench/installs.py says why; this interpreter when that venv is missing, and the output says so); metrics from its
  run directory's logging.jsonl.
- TRL 0.29.1: bench/peers/trl_grpo.py in bench/.venv-swift (ms-swift 4.6's venv, which pins TRL 0.29.1 with
  transformers 5.19), `use_vllm=False`, `use_cpu=True`, `bf16=False`; metrics from its log history.
- ms-swift 4.6: `swift rlhf --rlhf_type grpo` with its documented GRPO flags (--reward_funcs from --external_plugins,
  --num_generations, --max_completion_length, --use_vllm false, --beta, --loss_type grpo, --temperature, the LoRA
  flags; --model_type qwen2 --template qwen2_5 for the local model), in bench/.venv-swift, through
  bench/peers/swift_grpo.py, which runs ms-swift's `rlhf_main` with a timer around generation added; metrics (each
  step's `step_time`, the rewards, the KL, `train_runtime`) from its run directory's logging.jsonl. Skipped, with a
  message, when bench/.venv-swift has no `swift` (python bench/train_speed.py --make-swift-venv makes it; ms-swift
  4.6's RL trainers also need msgspec, which its requirements leave out: `bench/.venv-swift/bin/pip install
  msgspec` in an older venv).
- Each system runs in its own process, alternating over --repeats (A B A B), so machine drift hits both alike; the
  table keeps each system's fastest run (by train_runtime) and the highest peak memory.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import installs  # bench/installs.py: each system from its own install

PEERS = os.path.join(HERE, "peers")
SWIFT_VENV = os.path.join(HERE, ".venv-swift")
TRL_PYTHON = os.path.join(SWIFT_VENV, "bin", "python")  # TRL 0.29.1 comes with ms-swift 4.6 in the same venv
SWIFT = os.path.join(SWIFT_VENV, "bin", "swift")
VOCAB = 151936  # Qwen2.5's embedding rows (151,665 tokens padded to a multiple of 128)
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "not but one all their new first two been after who its also they other more time years into only over "
         "city world state school during such many most three some when where these there used made can would "
         "river north south east west king music film team game house line side water life power party war").split()


def build_model(out: str, hidden: int, layers: int) -> str:
    """Random Qwen2 weights (Qwen2.5-0.5B's shape scaled to `hidden`/`layers`, vocabulary 151,936) and a tokenizer
    saved to `out`; returns which tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tunesmith.testing import build_config, build_tokenizer

    try:
        sys.path.insert(0, PEERS)
        from qwen_tokenizer import CACHE, build_qwen25_tokenizer
        cached = os.path.join(CACHE, "qwen25-tokenizer")
        if not os.path.isfile(os.path.join(cached, "tokenizer.json")):
            build_qwen25_tokenizer(cached)
        for name in os.listdir(cached):
            shutil.copy(os.path.join(cached, name), out)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(out)
        which = "real Qwen2.5 tokenizer (151,643 BPE ranks + 22 added tokens, its chat template)"
    except Exception as e:  # noqa: BLE001  (the benchmark still runs; the output says which tokenizer)
        print(f"real Qwen tokenizer unavailable ({type(e).__name__}: {e}); using tunesmith.testing's", file=sys.stderr)
        tok = build_tokenizer("qwen2")
        tok.save_pretrained(out)
        which = "tunesmith.testing qwen2 tokenizer (2,048-token BPE, ChatML), model vocabulary widened to 151,936"
    heads = max(1, hidden // 64)
    intermediate = 64 * round(hidden * 4864 / 896 / 64)  # Qwen2.5-0.5B: hidden 896, MLP 4864
    cfg = build_config("qwen2", VOCAB, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                       max_positions=32768)
    cfg.num_key_value_heads = 2 if heads % 2 == 0 else 1
    cfg.rope_theta = 1e6
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = eos, pad, None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # neutral: no sampling defaults, no repetition penalty; both systems pass their own sampling settings
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    return (f"{n / 1e6:.1f}M params (hidden {hidden}, {layers} layers, {heads} heads / {cfg.num_key_value_heads} KV, "
            f"MLP {intermediate}, vocab {VOCAB}); {which}")


def make_data(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"Write about {q}."}]}) + "\n")


def settings(a) -> dict:
    return {"steps": a.steps, "learning_rate": a.lr, "num_generations": 4, "batch": 8, "max_completion_length": 32,
            "temperature": 0.9, "beta": 0.04, "seed": 42, "lora_rank": 8, "lora_alpha": 32}


def tunesmith_cmd(model, data, out, s) -> list[str]:
    return [installs.python_for("tunesmith"), os.path.join(PEERS, "tunesmith_timed.py"), "rlhf", "--rlhf_type",
            "grpo", "--model", model, "--dataset", data, "--train_type", "lora", "--lora_rank", str(s["lora_rank"]),
            "--lora_alpha", str(s["lora_alpha"]), "--lora_dropout", "0", "--target_modules", "all-linear",
            "--reward_funcs", "grpo_reward.e_share", "--num_generations", str(s["num_generations"]),
            "--per_device_train_batch_size", str(s["batch"]), "--gradient_accumulation_steps", "1",
            "--max_completion_length", str(s["max_completion_length"]), "--temperature", str(s["temperature"]),
            "--top_p", "1.0", "--top_k", "0", "--repetition_penalty", "1.0", "--beta", str(s["beta"]),
            "--loss_type", "grpo", "--learning_rate", str(s["learning_rate"]),
            "--lr_scheduler_type", "linear", "--warmup_ratio", "0", "--weight_decay", "0", "--max_grad_norm", "1",
            "--max_steps", str(s["steps"]), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--gradient_checkpointing", "false", "--torch_dtype", "float32", "--seed", str(s["seed"]),
            "--dataloader_num_workers", "0", "--output_dir", out]


def trl_cmd(model, data, out, s) -> list[str]:
    path = out + ".settings.json"
    with open(path, "w") as fh:
        json.dump(s, fh)
    return [TRL_PYTHON, os.path.join(PEERS, "trl_grpo.py"), model, data, out, path]


def swift_cmd(model, data, out, s) -> list[str]:
    """`swift rlhf --rlhf_type grpo` (through bench/peers/swift_grpo.py: the same call, timed) with the settings."""
    return [TRL_PYTHON, os.path.join(PEERS, "swift_grpo.py"), out + ".times.json", "--rlhf_type", "grpo",
            "--model", model, "--model_type", "qwen2", "--template", "qwen2_5", "--dataset", data,
            "--split_dataset_ratio", "0", "--tuner_type", "lora",  # ms-swift 4.x's name for --train_type
            "--lora_rank", str(s["lora_rank"]), "--lora_alpha", str(s["lora_alpha"]), "--lora_dropout", "0",
            "--target_modules", "all-linear", "--external_plugins", os.path.join(PEERS, "swift_grpo_plugin.py"),
            "--reward_funcs", "e_share", "--num_generations", str(s["num_generations"]),
            "--per_device_train_batch_size", str(s["batch"]), "--gradient_accumulation_steps", "1",
            "--max_completion_length", str(s["max_completion_length"]), "--use_vllm", "false",
            "--temperature", str(s["temperature"]), "--top_p", "1.0", "--top_k", "-1", "--repetition_penalty", "1.0",
            "--beta", str(s["beta"]), "--loss_type", "grpo", "--learning_rate", str(s["learning_rate"]),
            "--lr_scheduler_type", "linear", "--warmup_ratio", "0", "--weight_decay", "0", "--max_grad_norm", "1",
            "--max_steps", str(s["steps"]), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--gradient_checkpointing", "false", "--torch_dtype", "float32", "--seed", str(s["seed"]),
            "--dataloader_num_workers", "0", "--output_dir", out]


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        return sum(int(line.split()[1]) * 1024 for line in fh if line.startswith("Pss:"))


def _busy() -> float:
    """CPU seconds the whole machine has been busy."""
    import psutil
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def run_measured(cmd: list[str], env: dict, log: str) -> dict:
    """wall seconds, peak RSS and PSS (GiB) of the process tree sampled every 100 ms, the exit code, and the share
    of the machine's CPUs that other processes took meanwhile ("other_cpu": on a shared 2-core machine a little
    of it slows torch's 2-thread ops several-fold; distrust runs where it is not near 0)."""
    import psutil

    t0, busy0 = time.time(), _busy()
    peak_rss = peak_pss = 0
    cpu: dict[int, float] = {}  # pid -> last seen user + system seconds (children's included once they end)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [ps, *ps.children(recursive=True)]
                peak_rss = max(peak_rss, sum(p.memory_info().rss for p in tree))
                peak_pss = max(peak_pss, sum(_pss(p.pid) for p in tree))
                for p in tree:
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system + t.children_user + t.children_system
            except (psutil.Error, OSError):
                pass
            time.sleep(0.1)
    wall = time.time() - t0
    ours = sum(cpu.values())
    other = max(0.0, _busy() - busy0 - ours) / max(wall * (os.cpu_count() or 1), 1e-9)
    return {"wall": wall, "rss": peak_rss / 2 ** 30, "pss": peak_pss / 2 ** 30, "rc": proc.returncode,
            "other_cpu": other, "cpu_s": ours}


def parse_tunesmith(out: str, batch: int) -> dict:
    runs = glob.glob(os.path.join(out, "**", "logging.jsonl"), recursive=True)
    if not runs:
        raise RuntimeError(f"no logging.jsonl under {out}")
    recs = [json.loads(line) for line in open(runs[0], encoding="utf-8") if line.strip()]
    steps = [r for r in recs if "loss" in r and "global_step" in r]
    summary = next(r for r in recs if "train_runtime" in r)
    step_s = [1 / r["train_speed(iter/s)"] for r in steps]  # logging_steps 1: each record's window is one step
    with open(out + ".times.json") as fh:
        times = json.load(fh)
    return {"train_s": summary["train_runtime"], "step_s": step_s,
            "completion_tokens": sum(r["completions/mean_length"] * batch for r in steps),
            "tokens": sum(r["tokens_per_second"] * s for r, s in zip(steps, step_s)),
            "generate_s": times["generate_s"] or 0.0, "rewards": [r["reward"] for r in steps],
            "kl": steps[-1].get("kl"), "steps": len(steps)}


def parse_trl(out: str, batch: int) -> dict:
    with open(os.path.join(out, "trl_result.json")) as fh:
        res = json.load(fh)
    steps = [r for r in res["log_history"] if "reward" in r]
    ends = [res["train_begin"], *res["step_ends"]]
    return {"train_s": res["train_runtime"], "step_s": [b - a for a, b in zip(ends, ends[1:])],
            "completion_tokens": sum(r["completions/mean_length"] * batch for r in steps),
            "tokens": steps[-1]["num_tokens"], "rewards": [r["reward"] for r in steps],
            "generate_s": sum(v for k, v in res["profiled"].items() if k.endswith(".generate")),
            "kl": steps[-1].get("kl"), "steps": len(steps)}


def parse_swift(out: str, batch: int) -> dict:
    runs = glob.glob(os.path.join(out, "**", "logging.jsonl"), recursive=True)
    if not runs:
        raise RuntimeError(f"no logging.jsonl under {out}")
    recs = [json.loads(line) for line in open(runs[0], encoding="utf-8") if line.strip()]
    steps = [r for r in recs if "reward" in r and "loss" in r]
    summary = next(r for r in recs if "train_runtime" in r)
    with open(out + ".times.json") as fh:
        times = json.load(fh)
    return {"train_s": summary["train_runtime"], "step_s": [r["step_time"] for r in steps],
            "completion_tokens": sum(r["completions/mean_length"] * batch for r in steps), "tokens": None,
            "rewards": [r["reward"] for r in steps], "generate_s": times["generate_s"] or 0.0,
            "kl": steps[-1].get("kl"), "steps": len(steps)}


def ratios(t: dict, p: dict, name: str) -> str:
    """One line of tunesmith / peer ratios (time, speeds, memory)."""
    trained = f"trained tok/s x{t['tps'] / p['tps']:.2f}, " if p["tps"] == p["tps"] else ""
    return (f"tunesmith / {name}: train time x{t['train_s'] / p['train_s']:.2f} "
            f"(speed-up x{p['train_s'] / t['train_s']:.2f}), s/step after the first x{t['later'] / p['later']:.2f}, "
            f"completion tok/s x{t['compl_tps'] / p['compl_tps']:.2f}, "
            f"generation tok/s x{t['gen_tps'] / p['gen_tps']:.2f}, {trained}"
            f"peak RSS x{t['rss'] / p['rss']:.2f}, peak PSS x{t['pss'] / p['pss']:.2f}")


def table(results: dict) -> dict:
    """Print one row per system (its fastest run, the highest peak memory of its runs) and the ratios tunesmith /
    each peer; returns {system: that run's figures}."""
    cols = ("train s", "s/step", "s/step>1", "compl tok", "compl tok/s", "gen tok/s", "tok/s", "RSS GiB", "PSS GiB",
            "reward 1st", "reward last", "kl last", "other CPU")
    print(f"{'system':10s} " + " ".join(f"{c:>11s}" for c in cols))
    best = {}
    for name, runs in results.items():
        ok = [r for r in runs if r]
        if not ok:
            print(f"{name:10s} failed")
            continue
        r = min(ok, key=lambda x: x["train_s"])
        r["rss"], r["pss"] = max(x["rss"] for x in ok), max(x["pss"] for x in ok)
        later = r["step_s"][1:]
        r["later"] = sum(later) / len(later) if later else float("nan")
        r["compl_tps"] = r["completion_tokens"] / r["train_s"]
        r["gen_tps"] = r["completion_tokens"] / r["generate_s"] if r["generate_s"] else float("nan")
        r["tps"] = r["tokens"] / r["train_s"] if r["tokens"] is not None else float("nan")
        best[name] = r
        kl = f"{r['kl']:.2e}" if r["kl"] is not None else "-"
        vals = (f"{r['train_s']:.1f}", f"{r['train_s'] / r['steps']:.2f}", f"{r['later']:.2f}",
                f"{r['completion_tokens']:.0f}", f"{r['compl_tps']:.1f}", f"{r['gen_tps']:.1f}",
                f"{r['tps']:.0f}" if r["tps"] == r["tps"] else "-",
                f"{r['rss']:.2f}", f"{r['pss']:.2f}", f"{r['rewards'][0]:.4f}", f"{r['rewards'][-1]:.4f}", kl,
                f"{100 * r['other_cpu']:.0f}%")
        print(f"{name:10s} " + " ".join(f"{v:>11s}" for v in vals))
    for peer in ("trl", "ms-swift"):
        if "tunesmith" in best and peer in best:
            print(ratios(best["tunesmith"], best[peer], peer))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="2 steps, hidden 256, 2 layers, 16 prompts, 1 repeat")
    ap.add_argument("--systems", default="tunesmith,trl,ms-swift", help="comma-separated: tunesmith, trl, ms-swift")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS for every system (default: torch's own, one per core). On a busy shared "
                         "machine --threads 1 avoids 2-thread ops stalling on a core another process holds")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, run directories)")
    a = ap.parse_args()
    if a.smoke:
        a.steps, a.hidden, a.layers, a.prompts, a.repeats = 2, 256, 2, 16, 1
    names = [n.strip() for n in a.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("tunesmith", "trl", "ms-swift")]
    if unknown:
        ap.error(f"--systems: unknown {', '.join(unknown)} (tunesmith, trl, ms-swift)")
    if "trl" in names and not os.path.exists(TRL_PYTHON):
        print("trl: bench/.venv-swift does not exist (python bench/train_speed.py --make-swift-venv); skipped",
              file=sys.stderr)
        names.remove("trl")
    if "ms-swift" in names and not os.path.exists(SWIFT):
        print("ms-swift: bench/.venv-swift has no swift (python bench/train_speed.py --make-swift-venv); skipped",
              file=sys.stderr)
        names.remove("ms-swift")
    if not names:
        print("nothing left to run", file=sys.stderr)
        return 1

    work = tempfile.mkdtemp(prefix="tunesmith-grpo-bench-")
    model = os.path.join(work, "model")
    os.makedirs(model)
    described = build_model(model, a.hidden, a.layers)
    data = os.path.join(work, "prompts.jsonl")
    make_data(data, a.prompts)
    s = settings(a)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true",
           "PYTHONPATH": os.pathsep.join(p for p in (PEERS, os.environ.get("PYTHONPATH")) if p)}
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    makers = {"tunesmith": tunesmith_cmd, "trl": trl_cmd, "ms-swift": swift_cmd}
    parsers = {"tunesmith": parse_tunesmith, "trl": parse_trl, "ms-swift": parse_swift}

    results: dict[str, list] = {n: [] for n in names}
    for rep in range(a.repeats):
        for name in names:
            out = os.path.join(work, f"{name}-{rep}")
            run_env = {**env, "GRPO_BENCH_TIMES": out + ".times.json"}
            m = run_measured(makers[name](model, data, out, s), run_env, out + ".log")
            rc = m["rc"]
            r = None
            if rc == 0:
                try:
                    r = {**parsers[name](out, s["batch"]), **m}
                except Exception as e:  # noqa: BLE001
                    print(f"{name}: could not read its results ({type(e).__name__}: {e})", file=sys.stderr)
            if r is None:
                print(f"{name} failed (exit {rc}); log: {out}.log", file=sys.stderr)
                print(open(out + ".log").read()[-3000:], file=sys.stderr)
                a.keep = True
                results[name].append(None)
                continue
            results[name].append(r)
            print(f"  {name:10s} run {rep + 1}: train {r['train_s']:6.1f} s ({r['steps']} steps), process "
                  f"{r['wall']:6.1f} s ({r['cpu_s']:.0f} CPU s), peak RSS {r['rss']:.2f} GiB, PSS {r['pss']:.2f} GiB, "
                  f"other processes {100 * r['other_cpu']:.0f}% of the CPUs", flush=True)

    print(f"\nGRPO, {a.steps} steps x {s['batch']} completions ({s['batch'] // s['num_generations']} prompts x G "
          f"{s['num_generations']}), max_completion_length {s['max_completion_length']}, LoRA r8 all-linear, "
          f"beta {s['beta']}, loss grpo, lr {a.lr:g}, {a.prompts} prompts, {os.cpu_count()} CPUs, "
          f"{'OMP_NUM_THREADS ' + str(a.threads) if a.threads else 'default torch threads'}")
    print(f"model: {described}")
    print(installs.where("tunesmith"))
    best = table(results)
    if a.keep:
        print(f"work directory: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if best and all(best.get(n) for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
