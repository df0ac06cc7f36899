"""`tunesmith web-ui` under a realistic run list: how fast the page answers with 20 runs listed, and how much the
curve downsampling saves for a 10,000-step run.

    python bench/webui_load.py                 # 20 runs (one of 10,000 steps), 20 repeats
    python bench/webui_load.py --runs 50 --steps 10000 --repeats 10

Workspace: N run folders under one output folder (args.json and logging.jsonl as training writes them: one record
per step with loss, learning rate, grad norm, tokens/s, memory; an eval record every 500 steps; a summary line), the
first with --steps steps, the others 1,000 each, plus a checkpoint folder each. Nothing is trained: the page reads
files, so the files are what matters.

Measured:
1. The Runs page's refresh as the server computes it (tunesmith.webui.runs_page.refresh: find every run, its
   state, the table, and the selected run's charts), cold (first read of every logging.jsonl) and warm (the
   incremental reader: what every 2-second refresh costs), median of --repeats.
2. Curve downsampling of the 10,000-step run (tunesmith.webui.curves): records read, points per curve before and
   after LTTB, the JSON payload of the charts before and after, the time to downsample.
3. Over HTTP, against a real `tunesmith web-ui` process on 127.0.0.1: GET / (the page), median; and, when
   Playwright and chromium are installed, the time from opening the page in chromium to the Runs table filled with
   the runs (a fresh tab: every asset fetched; a reload: the browser's cache), next to a bare gradio page (a button
   and a table) measured the same way on the same machine — the floor that gradio and chromium set here.
Results go to stdout as a markdown table (copy into bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_run(folder: str, steps: int) -> None:
    """A finished run folder as training leaves it (args.json, logging.jsonl with one record per step, a
    checkpoint)."""
    os.makedirs(os.path.join(folder, f"checkpoint-{steps}"), exist_ok=True)
    with open(os.path.join(folder, "args.json"), "w") as fh:
        json.dump({"model": "Qwen/Qwen2.5-0.5B-Instruct", "max_steps": steps, "output_dir": os.path.dirname(folder)},
                  fh)
    with open(os.path.join(folder, "logging.jsonl"), "w") as fh:
        for s in range(1, steps + 1):
            rec = {"loss": 2.0 / (1 + s / 500) + 0.05 * ((s * 7919) % 13) / 13, "grad_norm": 1.0 + (s % 17) / 17,
                   "learning_rate": 1e-4 * (1 - s / steps), "token_acc": min(1.0, s / steps),
                   "epoch": s / steps, "global_step/max_steps": f"{s}/{steps}", "percentage": f"{100 * s / steps:.2f}%",
                   "elapsed_time": "0:10:00", "remaining_time": "0:00:00", "memory(GiB)": 3.2,
                   "tokens_per_second": 2000.0 + (s % 31), "train_speed(iter/s)": 3.1, "global_step": s}
            fh.write(json.dumps(rec) + "\n")
            if s % 500 == 0:
                fh.write(json.dumps({"eval_loss": 1.5 / (1 + s / 500), "global_step": s}) + "\n")
        fh.write(json.dumps({"last_model_checkpoint": f"{folder}/checkpoint-{steps}", "global_step": steps,
                             "train_runtime": 600.0}) + "\n")


def workspace(root: str, runs: int, steps: int) -> tuple[str, str]:
    """N runs under root/out/<model>/vK-...; returns (output folder, the long run's folder)."""
    out = os.path.join(root, "out")
    long_run = os.path.join(out, "qwen-long", "v0-20260101-000000")
    write_run(long_run, steps)
    for k in range(1, runs):
        write_run(os.path.join(out, f"qwen-{k % 4}", f"v{k}-20260101-{k:06d}"), 1000)
    return out, long_run


def timed(fn, repeats: int) -> tuple[float, object]:
    """(median seconds, the last result) of fn() over repeats."""
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def server_side(out: str, long_run: str, repeats: int) -> dict:
    """The refresh the page runs (cold and warm) and the downsampling of the long run."""
    import gradio as gr

    from tunesmith.webui import runs as R
    from tunesmith.webui.chat import ChatSession
    from tunesmith.webui.context import Context
    from tunesmith.webui.curves import charts, series
    from tunesmith.webui.labels import labels
    from tunesmith.webui.paths import Folders
    from tunesmith.webui.runs_page import refresh

    ctx = Context(Folders.of([out], [out]), lambda c, a: None, labels("en"), ChatSession())
    t = time.perf_counter()
    result = refresh(gr, ctx, long_run, None)
    cold = time.perf_counter() - t
    warm, result = timed(lambda: refresh(gr, ctx, long_run, None), repeats)  # the selected run's charts redrawn
    same, _ = timed(lambda: refresh(gr, ctx, long_run, result[-1]), repeats)  # the run did not move: no charts
    listed = len(result[0])
    records = R.read_records(os.path.join(long_run, "logging.jsonl"))
    full = series(records)
    t_ds, drawn = timed(lambda: charts(records), repeats)
    raw_points = sum(len(v) for k, v in full.items() if any(k in c for c in ("loss", "learning_rate", "grad_norm",
                                                                               "token_acc", "eval_loss",
                                                                               "tokens_per_second", "memory(GiB)")))
    raw_json = len(json.dumps({k: v for k, v in full.items()}))
    drawn_json = len(json.dumps([c.rows for c in drawn]))
    return {"listed": listed, "cold": cold, "warm": warm, "same": same, "records": len(records), "raw_points": raw_points,
            "drawn_points": sum(len(c.rows) for c in drawn), "loss_points": sum(1 for r in drawn[0].rows
                                                                                  if r[2] == "loss"),
            "raw_json": raw_json, "drawn_json": drawn_json, "downsample_s": t_ds, "charts": len(drawn)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BARE = """import sys, gradio as gr
with gr.Blocks() as demo:
    gr.Button("x", elem_id="start")
    with gr.Tab("Runs"):
        gr.Dataframe(value=[["run", "finished"]], elem_id="runs-table")
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), quiet=True)
"""


def _serve(argv: list, root: str, url: str):
    """Start a page server and wait until it answers; returns the process."""
    proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": REPO})
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{argv[:4]} did not answer at {url}")


def over_http(root: str, out: str, repeats: int) -> dict:
    """GET / of `tunesmith web-ui`, and in chromium (when installed) the time until the Runs table is filled:
    opened afresh (no cache) and reloaded (the browser's cache, as a user comes back), next to a bare gradio page
    (a button and a table) on the same machine."""
    port, bare_port = free_port(), free_port()
    url, bare_url = f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{bare_port}/"
    ui = _serve([sys.executable, "-m", "tunesmith", "web-ui", "--server_port", str(port), "--output_dir", out,
                 "--allowed_paths", root], root, url)
    bare = _serve([sys.executable, "-c", BARE, str(bare_port)], root, bare_url)
    try:
        get, _ = timed(lambda: urllib.request.urlopen(url, timeout=30).read(), repeats)
        return {"get": get, "fresh": browser_load(url, repeats, reload=False),
                "reload": browser_load(url, repeats, reload=True), "bare": browser_load(bare_url, repeats, False)}
    finally:
        for proc in (ui, bare):
            proc.terminate()
            proc.wait(30)


def browser_load(url: str, repeats: int, reload: bool):
    """Median seconds from opening (or, with `reload`, reloading) the page in chromium to the Runs table holding
    runs, or None without Playwright/chromium. A fresh browser context each time unless reloading."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not chromium:
        return None
    filled = ("document.querySelectorAll('#runs-table [role=row]').length > 1 && "
              "document.querySelector('#runs-table').innerText.includes('finished')")  # the table is virtualised
    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context()
        page = context.new_page()
        page.goto(url)  # warms chromium (and, for reloads, its cache); not counted
        for _ in range(repeats):
            if not reload:
                page.close()
                context.close()
                context = browser.new_context()
                page = context.new_page()
            t = time.perf_counter()
            page.reload() if reload else page.goto(url)
            page.get_by_role("tab", name="Runs").click()
            page.wait_for_function(filled, timeout=60_000)
            times.append(time.perf_counter() - t)
        browser.close()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="webui-bench-")
    try:
        out, long_run = workspace(root, a.runs, a.steps)
        s = server_side(out, long_run, a.repeats)
        h = over_http(root, out, max(3, a.repeats // 4))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"| measure | value |\n|---|---|")
    print(f"| runs listed | {s['listed']} (one of {a.steps:,} steps, the others 1,000) |")
    print(f"| Runs page refresh, server side, cold (every logging.jsonl read) | {s['cold'] * 1000:.0f} ms |")
    print(f"| Runs page refresh, server side, warm, the {a.steps:,}-step run selected and its charts redrawn "
          f"(median of {a.repeats}) | {s['warm'] * 1000:.1f} ms |")
    print(f"| the same when the selected run has not moved (charts kept; what most 2 s refreshes cost) | "
          f"{s['same'] * 1000:.1f} ms |")
    print(f"| GET / over HTTP (median) | {h['get'] * 1000:.1f} ms |")
    for key, what in (("fresh", "chromium, a fresh tab (no cache): open → Runs table filled"),
                      ("reload", "chromium, reload (cached assets): → Runs table filled"),
                      ("bare", "the same in chromium for a bare gradio page (a button, a table), fresh tab")):
        b = h[key]
        print(f"| {what} (median) | " + (f"{b:.2f} s |" if b is not None else "not measured (no chromium) |"))
    print(f"| {a.steps:,}-step run: records read | {s['records']:,} |")
    print(f"| its curves: points logged → drawn ({s['charts']} charts) | {s['raw_points']:,} → {s['drawn_points']:,} "
          f"(loss: {s['loss_points']}) |")
    print(f"| its curves: JSON payload logged → drawn | {s['raw_json'] / 1024:.0f} KiB → {s['drawn_json'] / 1024:.0f} "
          f"KiB ({s['raw_json'] / max(1, s['drawn_json']):.1f}x smaller) |")
    print(f"| downsampling its curves (LTTB, median) | {s['downsample_s'] * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
