"""Serving under concurrent load: `tunesmith deploy` against ms-swift and `transformers serve`, in one run.

    python bench/serve_load.py --clients 64 --requests 2 --max-tokens 32
    python bench/serve_load.py --clients 64,256 ...       # one load after the other, a table for each
    python bench/serve_load.py --systems tunesmith --clients 8 --requests 1 --max-tokens 8   # a quick smoke run
    python bench/serve_load.py --make-swift-venv ...      # first creates bench/.venv-swift (ms-swift 4.6)

Measures what a user of an OpenAI-compatible endpoint sees when many clients call it at once: C concurrent clients
(threads, closed loop) each send R chat requests one after the other, every request a distinct prompt ("Question
{i}: " + seeded random words), greedy (temperature 0), max_tokens N, non-streaming unless --stream-fraction > 0.
Per system: requests/s and completion tokens/s over the load's wall time, p50/p95 request latency, failures (non-200,
exceptions, timeouts), peak RSS of the server's process tree (sampled every 100 ms), the share of the CPUs that
other processes took during the load (on a shared 2-core machine a little of it slows a server several-fold: distrust
runs where it is not near 0), and the ratios tunesmith ÷ best peer (tokens/s, p95). Completion tokens are the
servers' own `usage` counts. No `ignore_eos` is sent: tunesmith's and ms-swift's request schemas have none and
transformers serve rejects unknown fields (422), so a reply may end early at <|im_end|> (the random model rarely
emits it); the table shows tokens per request so an early stop is visible. One untimed warm-up request precedes each
load. Streams ask for usage (stream_options.include_usage) and count content chunks when none comes.

The model: random Qwen2 weights (hidden 128, 2 layers, tied embeddings, fp32) with Qwen2.5's real vocabulary of
151,936 rows and its real tokenizer and chat template (bench/peers/qwen_tokenizer.py), so the output layer (19.4M of
the 19.7M parameters) and the [batch x 151,936] logits dominate, as they do for small served models. Its
generation_config is neutral (eos 151645/151643, no sampling defaults, no repetition penalty) so that every server
does the same work per token. Built once per run in a temp dir and served by all systems.

Systems (each a subprocess on 127.0.0.1, started, polled on /v1/models until ready, loaded, then SIGTERM/SIGKILL;
runs alternate A B C A B C over --repeats and the table reports each system's best run by tokens/s):
- tunesmith: `python -m tunesmith deploy --model DIR --host 127.0.0.1 --port P --max_new_tokens N --temperature 0`
  (main venv), with its default `--max_batch_size auto` (the rows in flight sized from the memory left after
  loading; the table's note quotes the server's own start-up line saying what it chose), or `--max_batch_size B`
  with `--max-batch-size B`.
- ms-swift 4.6: `bench/.venv-swift/bin/swift deploy --model DIR --model_type qwen2 --template qwen2_5
  --infer_backend transformers --max_batch_size S --max_new_tokens N --temperature 0 --torch_dtype float32
  --host 127.0.0.1 --port P` (its own venv, made by bench/train_speed.py's make_swift_venv: it pins older libraries).
  S is `--swift-max-batch-size`, 64 unless given: ms-swift's own default, 1, would serve one request at a time.
- transformers serve: `transformers serve DIR --continuous-batching --device cpu --host 127.0.0.1 --port P`
  (main venv: its `[serving]` extra is fastapi/uvicorn/openai/pydantic/rich, all already there). Pinned to DIR,
  it answers only requests naming the model by that path.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_speed import SWIFT_VENV, WORDS, make_swift_venv  # noqa: E402  (one way to make the ms-swift venv)

VOCAB = 151936  # Qwen2.5's embedding rows (151,665 tokens padded to a multiple of 128)


def build_model(out: str, hidden: int, layers: int) -> str:
    """Random Qwen2 weights + the real Qwen2.5 tokenizer; falls back to tunesmith's test tokenizer when the
    dashscope wheel (which carries Qwen's BPE ranks) cannot be fetched."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    try:
        from peers.qwen_tokenizer import build_qwen25_tokenizer
        tok, which = build_qwen25_tokenizer(out), "Qwen2.5 (151,643 BPE ranks + 22 added tokens)"
    except Exception as e:  # noqa: BLE001  (the benchmark still runs; the table header says which tokenizer)
        from tunesmith.testing import build_tokenizer
        print(f"real Qwen tokenizer unavailable ({e}); using tunesmith.testing's", file=sys.stderr)
        tok, which = build_tokenizer("qwen2"), "tunesmith.testing qwen2 (2,048-token BPE)"
        tok.save_pretrained(out)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_theta=1e6, tie_word_embeddings=True, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out)
    return which


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "?"
            for i in range(n)]


def commands(model: str, port, a) -> dict[str, tuple[list[str], str | None]]:
    """system -> (command, the model name requests must use; None = the first id of /v1/models)."""
    host = ["--host", "127.0.0.1", "--port", str(port)]
    n = str(a.max_tokens)
    # tunesmith with its default (auto) unless --max-batch-size is given; ms-swift with --swift-max-batch-size
    ours = [] if getattr(a, "max_batch_size", None) is None else ["--max_batch_size", str(a.max_batch_size)]
    swift = str(getattr(a, "swift_max_batch_size", 64))
    return {
        "tunesmith": ([sys.executable, "-m", "tunesmith", "deploy", "--model", model, *host, "--max_new_tokens", n,
                       "--temperature", "0", *ours], None),
        "ms-swift": ([os.path.join(SWIFT_VENV, "bin", "swift"), "deploy", "--model", model, "--model_type", "qwen2",
                      "--template", "qwen2_5", "--infer_backend", "transformers", "--max_batch_size", swift,
                      "--max_new_tokens", n, "--temperature", "0", "--torch_dtype", "float32", *host], None),
        "transformers": ([os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", model,
                          "--continuous-batching", "--device", "cpu", *host], model),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of the server's tree + this process). Their
    difference over a load is what other work on the machine took: on 2 cores, a little of it slows every server
    several-fold (torch's threads then wait on each other), so each run reports it."""
    import psutil
    busy = psutil.cpu_times()
    try:
        procs = [psutil.Process(), psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:  # the server died; the run is reported as failed anyway
        procs = [psutil.Process()]
    ours = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            ours += t.user + t.system
        except psutil.Error:
            pass
    return busy.user + busy.nice + busy.system + busy.irq + busy.softirq + busy.steal, ours


def tree_rss(pid: int) -> int:
    import psutil
    try:
        p = psutil.Process(pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
    except psutil.Error:
        return 0


def get(port: int, path: str, timeout: float = 5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def request(port: int, body: dict, timeout: float) -> tuple[float, int]:
    """One chat completion; (latency s, completion tokens). Raises on any failure."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
        if not body.get("stream"):
            return time.perf_counter() - t0, json.loads(r.read())["usage"]["completion_tokens"]
        tokens, usage, done = 0, None, False
        # SSE until [DONE] or EOF (transformers serve sends no [DONE]; a finish_reason marks a complete reply).
        # Tokens: the final usage chunk when sent, else the chunks that carry content.
        for line in r:
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError("stream exceeded the request timeout")
            line = line.strip()
            if line == b"data: [DONE]":
                done = True
                break
            if line.startswith(b"data: "):
                ev = json.loads(line[6:])
                usage = (ev.get("usage") or {}).get("completion_tokens", usage)
                tokens += sum(1 for c in ev.get("choices") or [] if (c.get("delta") or {}).get("content"))
                done = done or any(c.get("finish_reason") for c in ev.get("choices") or [])
        if not done:
            raise RuntimeError("stream ended without [DONE] or a finish_reason")
        return time.perf_counter() - t0, usage if usage is not None else tokens
    finally:
        conn.close()


def run_load(port: int, name: str, texts: list[str], a, stop_at: float) -> dict:
    rng = random.Random(1)
    streams = [rng.random() < a.stream_fraction for _ in texts]
    lat, toks, errors, lock = [], [], [], threading.Lock()

    def client(c: int):
        for k in range(a.requests):
            i = c * a.requests + k
            if time.time() > stop_at:
                with lock:
                    errors.append("overall deadline")
                continue
            body = {"model": name, "messages": [{"role": "user", "content": texts[i]}], "max_tokens": a.max_tokens,
                    "temperature": 0, "stream": streams[i]}
            if streams[i]:  # ask for usage in the last chunk; without it, content chunks are counted
                body["stream_options"] = {"include_usage": True}
            try:
                dt, n = request(port, body, a.timeout)
                with lock:
                    lat.append(dt)
                    toks.append(n)
            except Exception as e:  # noqa: BLE001  (every kind of failure is counted, the first few shown)
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, stop_at - time.time() + a.timeout))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else lat * 19
    return {"ok": len(lat), "failures": a.clients * a.requests - len(lat), "errors": errors[:5], "wall_s": wall,
            "req_s": len(lat) / wall, "tok_s": sum(toks) / wall, "tok_per_req": sum(toks) / max(1, len(toks)),
            "p50_s": statistics.median(lat) if lat else None, "p95_s": q[18] if lat else None}


def serve_and_load(system: str, model: str, texts: list[str], a, work: str, rep: int, stop_at: float,
                   command=None) -> dict:
    """Start `system`'s server, wait until it answers, send one warm-up request, run the load, stop it. command:
    port -> (argv, model name or None), for a server not in `commands` (bench/gpu_check.py's deploy on a GPU)."""
    port = free_port()
    cmd, name = command(port) if command else commands(model, port, a)[system]
    log = os.path.join(work, f"{system}-{rep}.log")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    t0, peak, ready_rss = time.time(), [0], 0
    with open(log, "w") as fh:  # own session: SIGTERM/SIGKILL reach the server's workers too
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss(proc.pid))

    threading.Thread(target=sample, daemon=True).start()
    try:
        ready_by = min(stop_at, t0 + a.ready_timeout)
        while True:
            if proc.poll() is not None or time.time() > ready_by:
                why = f"exited {proc.returncode}" if proc.poll() is not None else "not ready in time"
                return {"error": f"failed to start ({why})", "log_tail": open(log).read()[-3000:], "log": log}
            try:
                status, raw = get(port, "/v1/models")
                if status == 200:
                    name = name or json.loads(raw)["data"][0]["id"]
                    break
            except (OSError, ValueError, KeyError, IndexError):
                pass
            time.sleep(0.5)
        startup, ready_rss = time.time() - t0, tree_rss(proc.pid)
        try:  # warm-up: lazy initialisation (batching workers, caches) is not charged to the load
            request(port, {"model": name, "messages": [{"role": "user", "content": "Hello"}],
                           "max_tokens": a.max_tokens, "temperature": 0}, a.timeout)
        except Exception as e:  # noqa: BLE001
            return {"error": f"warm-up request failed: {e}", "log_tail": open(log).read()[-3000:], "log": log}
        busy0, ours0 = cpu_seconds(proc.pid)
        res = run_load(port, name, texts, a, stop_at)
        busy1, ours1 = cpu_seconds(proc.pid)
        other = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (res["wall_s"] * (os.cpu_count() or 1))
        return {**res, "other_cpu_pct": 100 * other, "startup_s": startup, "ready_rss_gib": ready_rss / 2 ** 30,
                "peak_rss_gib": peak[0] / 2 ** 30, "log": log, "batch": batch_line(log)}
    finally:
        done.set()
        stop(proc)


def batch_line(log: str):
    """What tunesmith's server said at start about its batch ("batch: up to N sequences in flight (...)"), or None
    (another system, or a log without the line)."""
    with open(log, errors="replace") as fh:
        for line in fh:
            if "batch: up to" in line:
                return line[line.index("batch: up to"):].strip()
    return None


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after the grace period (workers can outlive the
    leader, so the group is killed even when the leader exited in time)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def table(best: dict, a, which: str) -> str:
    out = [f"{a.clients} clients x {a.requests} requests, max_tokens {a.max_tokens}, greedy, stream fraction "
           f"{a.stream_fraction}; random Qwen2 hidden {a.hidden} x {a.layers} layers, vocabulary {VOCAB:,} (the output "
           f"layer dominates), tokenizer {which}; {os.cpu_count()} CPUs; best of {a.repeats} run(s) by tokens/s", "",
           "| system | requests/s | completion tok/s | tok/request | p50 s | p95 s | failures | startup s | "
           "peak RSS GiB | other CPU % |", "|---|---|---|---|---|---|---|---|---|---|"]
    def f(v, d=2):
        return "-" if v is None else f"{v:.{d}f}"

    for name, r in best.items():
        if "error" in r:
            out.append(f"| {name} | {r['error']} | | | | | | | | |")
            continue
        out.append(f"| {name} | {f(r['req_s'])} | {f(r['tok_s'], 1)} | {f(r['tok_per_req'], 1)} | {f(r['p50_s'])} | "
                   f"{f(r['p95_s'])} | {r['failures']} | {f(r['startup_s'], 1)} | {f(r['peak_rss_gib'])} | "
                   f"{f(r['other_cpu_pct'], 0)} |")
    said = best.get("tunesmith", {}).get("batch")
    if said:
        out += ["", f"tunesmith's start-up line: {said}"]
    return "\n".join(out)


def ratios_to_peers(best: dict) -> dict:
    """tunesmith ÷ the best peer: tokens/s (higher is better) and p95 latency (lower is better); {} without both."""
    t = best.get("tunesmith", {})
    peers = {s: r for s, r in best.items() if s != "tunesmith" and "error" not in r and r["ok"]}
    if "error" in t or not t.get("ok") or not peers:
        return {}
    top_tok = max(peers.items(), key=lambda kv: kv[1]["tok_s"])
    top_p95 = min(peers.items(), key=lambda kv: kv[1]["p95_s"])
    return {"tok_s": t["tok_s"] / top_tok[1]["tok_s"], "tok_s_peer": top_tok[0],
            "p95": t["p95_s"] / top_p95[1]["p95_s"], "p95_peer": top_p95[0]}


def run_load_for(clients: int, systems: list, model: str, a, work: str, stop_at: float) -> dict:
    """One load (`clients` clients × --requests requests) on every system, alternating over --repeats; each
    system's best run by tokens/s, and the ratios to the peers."""
    load = argparse.Namespace(**{**vars(a), "clients": clients})
    texts = prompts(clients * a.requests, seed=0)
    runs: dict[str, list] = {s: [] for s in systems}
    for rep in range(a.repeats):
        for s in systems:
            r = serve_and_load(s, model, texts, load, work, rep, stop_at)
            runs[s].append(r)
            if "error" in r:
                print(f"{s} run {rep + 1}: {r['error']}; log {r['log']}\n{r['log_tail']}", file=sys.stderr)
            else:
                print(f"  {clients:4d} clients  {s:12s} run {rep + 1}: {r['tok_s']:7.1f} tok/s  {r['req_s']:6.2f} "
                      f"req/s  p95 {r['p95_s'] or 0:.2f} s  failures {r['failures']}  peak RSS "
                      f"{r['peak_rss_gib']:.2f} GiB  (other processes used {r['other_cpu_pct']:.0f}% of the CPUs)"
                      + (f"  e.g. {r['errors'][0]}" if r["errors"] else ""), flush=True)
    best = {}
    for s, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        best[s] = max(ok, key=lambda r: r["tok_s"]) if ok else rs[0]
    return {"clients": clients, "runs": runs, "best": best, "ratios": ratios_to_peers(best), "args": load}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="64", help="concurrent clients; a comma list (64,256) runs one load after "
                                                    "the other and reports each")
    ap.add_argument("--requests", type=int, default=2, help="sequential requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=None,
                    help="tunesmith's --max_batch_size (default: none given, its auto sizing)")
    ap.add_argument("--swift-max-batch-size", type=int, default=64, help="ms-swift's --max_batch_size (its own "
                                                                         "default, 1, serves one request at a time)")
    ap.add_argument("--stream-fraction", type=float, default=0.0, help="share of requests sent with stream=true")
    ap.add_argument("--systems", default="tunesmith,ms-swift,transformers",
                    help="comma list of tunesmith, ms-swift, transformers")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="per server start, seconds")
    ap.add_argument("--deadline", type=float, default=3600.0, help="whole benchmark, seconds")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--make-swift-venv", action="store_true", help="create bench/.venv-swift (ms-swift 4.6) first")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (model, server logs)")
    a = ap.parse_args()
    try:
        loads = [int(c) for c in a.clients.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--clients {a.clients}: expected a number or a comma list of numbers, such as 64,256")
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in commands("DIR", "PORT", a)]
    if unknown or not loads or min(loads) < 1:
        ap.error(f"--systems {a.systems} / --clients {a.clients}: systems are tunesmith, ms-swift, transformers; "
                 f"clients at least 1")

    stop_at = time.time() + a.deadline
    if a.make_swift_venv:
        make_swift_venv()
    if "ms-swift" in systems and not os.path.exists(os.path.join(SWIFT_VENV, "bin", "swift")):
        print("ms-swift: bench/.venv-swift does not exist (run with --make-swift-venv); skipped", file=sys.stderr)
        systems.remove("ms-swift")
    work = tempfile.mkdtemp(prefix="tunesmith-serve-")
    model = os.path.join(work, "model")
    which = build_model(model, a.hidden, a.layers)
    results = [run_load_for(c, systems, model, a, work, stop_at) for c in loads]
    for res in results:
        print("\n" + table(res["best"], res["args"], which))
        r = res["ratios"]
        if r:
            print(f"\n{res['clients']} clients: tunesmith / best peer: tokens/s x{r['tok_s']:.2f} (vs "
                  f"{r['tok_s_peer']}), p95 latency x{r['p95']:.2f} (vs {r['p95_peer']}; lower is better)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "tokenizer": which, "cpus": os.cpu_count(), "platform": platform.platform(),
                       "commands": {s: commands("DIR", "PORT", a)[s][0] for s in systems}, "best_by": "tokens/s",
                       "loads": [{k: v for k, v in res.items() if k != "args"} for res in results]}, fh, indent=2)
    if a.keep:
        print(f"work directory: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
