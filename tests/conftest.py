"""Fixtures and helpers shared by the test folders (tests/<package>/ mirrors tunesmith/<package>/; e2e/ runs whole
paths, regression/ holds the golden and pinned numbers). Test files import the plain helpers from here
(`from conftest import ...`: pytest puts this folder on sys.path); the shared test doubles are in fakes.py."""
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples", "data")
# the capitals rows in two formats: the data of the multi-process runs (tests/e2e/test_distributed.py and the DDP cases
# of the streaming and GRPO tests)
CAPITALS_DATA = [os.path.join(EXAMPLES, "capitals_messages.jsonl"), os.path.join(EXAMPLES, "capitals_sharegpt.jsonl")]


@pytest.fixture(autouse=True, scope="session")
def _encoded_data_cache(tmp_path_factory):
    """Encoded datasets (tunesmith.data.store) go to a session folder, never the user's ~/.cache; subprocesses
    started by tests inherit it."""
    old = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    yield
    if old is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old


@pytest.fixture
def no_charts(monkeypatch):
    """Training runs without the run report's charts: the runs of a test file that compares logged numbers only
    (use it with `pytestmark = pytest.mark.usefixtures("no_charts")`); drawing them would only cost time."""
    import tunesmith.runs.report

    monkeypatch.setattr(tunesmith.runs.report, "write_run_report", lambda run_dir: "not written (test)")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random models for each family, built once per test session (a few seconds)."""
    from tunesmith.testing import build_model

    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(family="qwen2", **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_model(str(root / f"{family}-{len(cache)}"), family, **kw)
        return cache[key]

    return get


# ------------------------------------------------------------------ vision-language models and pictures

def picture(path, size=(100, 60), colour=(200, 30, 40)):
    """A PNG with a stripe (so pictures differ in content, not only in colour) at path; returns the path."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, colour)
    ImageDraw.Draw(im).rectangle([size[0] // 4, 0, size[0] // 2, size[1]], fill=(colour[2], colour[0], 255))
    im.save(path)
    return str(path)


def data_url(path) -> str:
    """The file at path as a data:image/png;base64 URL."""
    with open(path, "rb") as fh:
        return "data:image/png;base64," + base64.b64encode(fh.read()).decode()


@pytest.fixture(scope="session")
def vl_models(tmp_path_factory):
    """Tiny vision-language models (tunesmith.testing.build_vl_model), built once per session: get(family) -> the
    folder. Their weights are drawn wide (std 0.3), so that their greedy output depends on every input — a rope
    delta of 0 instead of the right one changes the tokens (tests/inference/test_vision_infer.py checks it)."""
    import torch
    from transformers import AutoModelForImageTextToText
    from tunesmith.testing import build_vl_model

    root, cache = tmp_path_factory.mktemp("vl"), {}

    def get(family):
        if family not in cache:
            path = build_vl_model(str(root / family), family)
            model = AutoModelForImageTextToText.from_pretrained(path)
            torch.manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.normal_(0, 0.3)
            model.save_pretrained(path)
            cache[family] = path
        return cache[family]

    return get


@pytest.fixture(scope="session")
def pictures(tmp_path_factory):
    """Three small PNGs of different sizes and colours (4 to 16 image tokens each for the tiny models): paths."""
    root = tmp_path_factory.mktemp("pictures")
    return [picture(root / "a.png"), picture(root / "b.png", (60, 90), (20, 180, 60)),
            picture(root / "c.png", (130, 130), (10, 10, 200))]


def vl_chat(model_dir, **kw):
    """A ChatEngine over the vision-language model at model_dir with its ImageTokens (kw: ChatEngine's)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from tunesmith.inference.chat import ChatEngine
    from tunesmith.models.vision import image_tokens

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return ChatEngine(model, tok, images=image_tokens(model_dir, model.config, tok), **kw)


def write_jsonl(path, rows):
    """Rows (dicts, or strings written as they are) as a JSON-lines file; returns its path as a string."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def read_jsonl(path):
    """The records of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def seed_gpt_oss_dpo_argv(model, data, out, accumulation="4", logging="5"):
    """../shared/seeds/000's DPO command line, flags verbatim except the paths and the step counts."""
    return ["rlhf", "--rlhf_type", "dpo", "--model", model, "--dataset", data,
            "--train_type", "lora", "--torch_dtype", "bfloat16", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1", "--learning_rate", "4e-4",
            "--lora_rank", "8", "--lora_alpha", "32", "--target_modules", "all-linear",
            "--gradient_accumulation_steps", accumulation, "--save_strategy", "epoch", "--save_total_limit", "5",
            "--logging_steps", logging, "--max_length", "8192", "--output_dir", str(out), "--warmup_ratio", "0.05",
            "--dataloader_num_workers", "4", "--use_liger_kernel", "true", "--load_from_cache_file", "false",
            "--loss_scale", "ignore_empty_think", "--save_strategy", "epoch", "--model_author", "gxb",
            "--model_name", "gxb-gpt-oss-20b-dpo", "--report_to", "swanlab", "--swanlab_project", "swift-robot"]


# ------------------------------------------------------------------ training runs

def train(command, *argv):
    """`tunesmith <command> ARGV` (sft or rlhf) in this process, as the command line runs it: parse_args, then
    recipe.main. Returns recipe.main's result (run_dir, state, model, ...). Later flags win, as on a command line."""
    from tunesmith.config.parser import parse_args
    from tunesmith.train import recipe

    return recipe.main(parse_args(command, [str(a) for a in argv]))


def step_losses(run_dir):
    """The logged loss of each optimiser step of a run (the records of logging.jsonl with a grad_norm), in order."""
    return [r["loss"] for r in read_jsonl(os.path.join(run_dir, "logging.jsonl")) if "grad_norm" in r]


def losses_by_step(run_dir):
    """{global_step: loss} of every record of a run's logging.jsonl that has a loss."""
    return {r["global_step"]: r["loss"] for r in read_jsonl(os.path.join(run_dir, "logging.jsonl")) if "loss" in r}


def run_dir_of(out):
    """The run folder (v<N>-<time>) that a run wrote under its --output_dir."""
    return os.path.join(out, next(d for d in os.listdir(out) if d.startswith("v")))


def launch(argv, nproc=2, timeout=300, **env):
    """`tunesmith ARGV` in a fresh process with ms-swift's launch variables (NPROC_PER_NODE=nproc, a free
    MASTER_PORT; env adds or overrides variables); asserts it exits 0 and returns the CompletedProcess."""
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    e.update({"NPROC_PER_NODE": str(nproc), "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", **env})
    p = subprocess.run([sys.executable, "-m", "tunesmith", *argv], env=e, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


# ------------------------------------------------------------------ paths this user cannot read or write

@pytest.fixture
def shared_dir():
    """A folder every user can enter (tmp_path is private to its owner): for what another user must reach."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="tunesmith-shared-")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_other_user(argv, timeout=120, **env):
    """`tunesmith ARGV` in a fresh process as a user without root's right to read everything: nobody (65534) via
    setpriv when this is root, else this user. Skips the test, with the reason, where that cannot be done. Returns
    the CompletedProcess (not checked)."""
    import shutil

    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root and setpriv is missing: cannot run as a user that lacks read permission")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    e = {**os.environ, "PYTHONPATH": REPO, "HOME": "/tmp", **env}
    p = subprocess.run([*prefix, sys.executable, "-m", "tunesmith", *map(str, argv)], env=e, capture_output=True,
                       text=True, timeout=timeout)
    if prefix and "Operation not permitted" in p.stderr and "setpriv" in p.stderr:
        pytest.skip(f"setpriv is not permitted here ({p.stderr.strip()[:200]})")
    return p


@contextlib.contextmanager
def mounted_tmpfs(mnt, options: str, what: str):
    """A tmpfs mounted at the folder `mnt` with `options` (root only: skipped, naming `what` and the reason, where
    mounting is not permitted); unmounted afterwards."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount {what} here ({r.stderr.strip() or r.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a file system mounted read-only (a 1 MiB tmpfs)."""
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m", "a read-only tmpfs") as mnt:
        yield mnt


# ------------------------------------------------------------------ servers on loopback

def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method, url, body=None, headers=None, raw=None):
    """(status, parsed JSON body) of one HTTP request, with the standard library only; body is sent as JSON, raw as
    bytes as they are."""
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


# how long a server or subprocess may take to reach the state a test waits for before the wait counts as a hang:
# the waits end on the condition (a port answering, a file appearing, a process exiting), this only bounds a hang,
# and it is generous because two test suites on a busy 2-core machine make a start take minutes
HANG_S = 600


def start_deploy(*argv):
    """`tunesmith deploy ARGV --port <free port>` in a subprocess (stdout and stderr merged, as text), returned once
    /health answers 200: (process, port). The caller stops it. A port another process took between our pick and
    the server's bind is replaced by a fresh one (twice at most). Raises RuntimeError with the server's output if
    it exits first, or when it does not answer within HANG_S."""
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "deploy", *argv, "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if _wait_for_health(proc, port):
            return proc, port
        out = proc.stdout.read()
        taken = f":{port} (" in out and "cannot listen on" in out or "address already in use" in out.lower()
        if not taken:  # deploy's own port check, or uvicorn's bind after it
            raise RuntimeError(out)
    raise RuntimeError(out)


def _wait_for_health(proc, port) -> bool:
    """True once /health answers 200, False when the process has exited; kills it after HANG_S."""
    deadline = time.time() + HANG_S
    while proc.poll() is None:
        try:
            if http_json("GET", f"http://127.0.0.1:{port}/health")[0] == 200:
                return True
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not answer /health within {HANG_S} s: {proc.communicate()[0]}")
        time.sleep(0.2)
    return False


@contextlib.contextmanager
def serve_on_a_thread(app, **config):
    """An ASGI app served by uvicorn on a daemon thread, on a free loopback port: yields the port once the server has
    started (another port when the one picked was taken meanwhile), and on exit stops it and waits for it to end.
    config: more uvicorn.Config arguments (log_level: warning). Raises RuntimeError when it cannot start."""
    import uvicorn

    for _ in range(3):
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **{"log_level": "warning", **config}))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        deadline = time.time() + HANG_S
        while not srv.started and thread.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        if srv.started:
            break
        srv.should_exit = True
        thread.join(HANG_S)
    else:
        raise RuntimeError("uvicorn did not start (three free ports tried); see its log above")
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(HANG_S)
        assert not thread.is_alive(), f"the server did not stop within {HANG_S} s"


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of `tunesmith ARGV` in this process; never a traceback."""
    from tunesmith.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return rc, out, err


def error_line(err: str, command: str) -> str:
    """The one `tunesmith COMMAND: error:` line of stderr."""
    lines = [line for line in err.splitlines() if line.startswith(f"tunesmith {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def cli_error(capsys, command, *argv):
    """(exit code, the one error line) of `tunesmith COMMAND ARGV`, which must fail with one message."""
    rc, _, err = cli(capsys, command, *argv)
    return rc, error_line(err, command)


@pytest.fixture(scope="session")
def tiny_vl_models(tmp_path_factory):
    """Tiny random vision-language models (tunesmith.testing.build_vl_model: qwen2_vl, qwen2_5_vl, qwen3_vl), built
    once per test session."""
    from tunesmith.testing import build_vl_model

    root = tmp_path_factory.mktemp("vl_models")
    cache = {}

    def get(family="qwen2_5_vl"):
        if family not in cache:
            cache[family] = build_vl_model(str(root / family), family)
        return cache[family]

    return get


COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220)}


def colour_rows(folder, n, seed=0, sizes=((56, 56), (84, 56), (112, 84), (56, 112))):
    """n rows "what colour is this?" over solid-colour pictures written (PNG) into `folder`: ms-swift's form, a
    `<image>` tag in the user message and the picture's path in `images`. Returns the rows (dicts)."""
    import random
    from PIL import Image

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        colour = rng.choice(sorted(COLOURS))
        rgb = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
        path = os.path.join(str(folder), f"{colour}-{seed}-{i}.png")
        Image.new("RGB", rng.choice(sizes), rgb).save(path)
        rows.append({"messages": [{"role": "user", "content": "<image>What colour is this?"},
                                  {"role": "assistant", "content": colour}], "images": [path]})
    return rows
