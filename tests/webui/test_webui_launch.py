"""Detached starts, their records and Stop: a started process outlives the process that started it, its pid is
recorded (whole) in the output folder and found again by another process, which can stop it; a pid the system
reused is never signalled; a second start into a busy folder is refused."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from tunesmith.errors import ConfigError
from tunesmith.webui import launch as L

# a stand-in for a training process: says it started, and on SIGTERM ends with training's one-line message
CHILD = textwrap.dedent("""
    import signal, sys, time
    def stop(*_):
        print("tunesmith sft: stopped by SIGTERM at step 3 of 10; ... the last: out/v0/checkpoint-2.", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print("training", flush=True)
    time.sleep(60)
""")


def _child_argv():
    return [sys.executable, "-c", CHILD]


def _wait(pred, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_start_records_stop_and_refuse(tmp_path):
    out = tmp_path / "out"
    launch = L.start(_child_argv(), ["sft", "--max_steps", "10"], "tunesmith sft --max_steps 10", str(out))
    try:
        rec = json.loads((out / L.RECORD_DIR / L.LAUNCH).read_text())
        assert rec["pid"] == launch.pid and rec["argv"] == ["sft", "--max_steps", "10"] and rec["start_ticks"]
        assert not [p for p in (out / L.RECORD_DIR).iterdir() if ".tmp" in p.name]  # written whole
        assert os.getpgid(launch.pid) == launch.pid  # its own process group (a new session)
        assert L.alive(L.read_launch(str(out / L.RECORD_DIR / L.LAUNCH)))
        assert _wait(lambda: "training" in open(launch.log).read())
        with pytest.raises(ConfigError, match="already training into"):
            L.start(_child_argv(), ["sft"], "tunesmith sft", str(out))
        said = L.stop(L.read_launch(L.launch_path(str(out))))
        assert said.startswith(f"sent SIGTERM to pid {launch.pid}")
        assert _wait(lambda: not L.alive(launch))
        # the page that started it saw it end: the exit code is recorded
        assert _wait(lambda: (L.read_launch(L.launch_path(str(out))) or launch).exit_code == 143)
        assert "stopped by SIGTERM at step 3" in open(launch.log).read()
        assert L.stop(launch).endswith("nothing to stop")
    finally:
        if L.alive(launch):
            os.kill(launch.pid, signal.SIGKILL)
    # a start after the first ended is allowed
    again = L.start([sys.executable, "-c", "pass"], ["sft"], "tunesmith sft", str(out))
    assert _wait(lambda: not L.alive(again))


def test_a_new_process_stops_what_another_started(tmp_path):
    """The starting process exits (a killed page); the child keeps running in its own session, and a fresh reader
    of the record stops it."""
    out = tmp_path / "out"
    starter = (f"import sys; sys.path.insert(0, {REPO!r}); from tunesmith.webui.launch import start; "
               f"l = start([sys.executable, '-c', {CHILD!r}], ['sft'], 'tunesmith sft', {str(out)!r}); print(l.pid)")
    p = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, timeout=60)
    pid = int(p.stdout.strip())
    launch = L.read_launch(L.launch_path(str(out)))
    try:
        assert launch.pid == pid and L.alive(launch)  # outlived its starter
        assert _wait(lambda: "training" in open(launch.log).read())
        L.stop(launch)
        assert _wait(lambda: not L.alive(launch))
        assert "stopped by SIGTERM" in open(launch.log).read()
    finally:
        if L.alive(launch):
            os.kill(pid, signal.SIGKILL)


def test_a_reused_pid_is_never_signalled(tmp_path):
    """A record naming this very process but with another start time (the pid was reused): not alive, and Stop
    sends nothing (this test would be killed otherwise)."""
    ticks = L._stat(os.getpid())[1]
    stale = L.Launch(os.getpid(), ["sft"], "tunesmith sft", str(tmp_path), str(tmp_path), "x.log", time.time(),
                     start_ticks=ticks + 1000)
    assert not L.alive(stale)
    assert "not running" in L.stop(stale)
    assert L.alive(L.Launch(os.getpid(), ["sft"], "", "", "", "", 0.0, start_ticks=ticks))


def test_a_run_started_elsewhere_keeps_its_folder(tmp_path):
    """A run started from a terminal (no record) that is writing its log makes the folder busy too."""
    run = tmp_path / "out" / "v0-20260101-000000"
    run.mkdir(parents=True)
    (run / "logging.jsonl").write_text(json.dumps({"loss": 1.0, "global_step": 1}) + "\n")
    problem = L.busy_problem(str(tmp_path / "out"))
    assert problem and "is training" in problem and "v0-20260101-000000" in problem
    (run / "logging.jsonl").write_text(json.dumps({"global_step": 1, "train_runtime": 1.0}) + "\n")
    assert L.busy_problem(str(tmp_path / "out")) is None  # finished


def test_two_pages_starting_at_once(tmp_path):
    folder = tmp_path / "out" / L.RECORD_DIR
    folder.mkdir(parents=True)
    (folder / "start.lock").write_text("")
    with pytest.raises(ConfigError, match="another page is starting a run"):
        L.start(_child_argv(), ["sft"], "tunesmith sft", str(tmp_path / "out"))
    os.utime(folder / "start.lock", (time.time() - 120, time.time() - 120))  # a crashed page's lock
    launch = L.start([sys.executable, "-c", "pass"], ["sft"], "tunesmith sft", str(tmp_path / "out"))
    assert _wait(lambda: not L.alive(launch))


def test_run_cli_reports_the_exit_code():
    code, out = L.run_cli([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"])
    assert (code, out.strip()) == (3, "hi")
    code, out = L.run_cli([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.5)
    assert code == 124 and "stopped after" in out


def test_started_commands_do_not_get_the_page_s_password(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNESMITH_API_KEY", "page-password")
    monkeypatch.setenv("HF_TOKEN", "hub-token")
    code, out = L.run_cli([sys.executable, "-c", "import os; print(os.environ.get('TUNESMITH_API_KEY'), "
                                                 "os.environ.get('HF_TOKEN'), os.environ.get('NPROC_PER_NODE'))"])
    assert out.split() == ["None", "hub-token", "None"]
    env = L.child_env({"NPROC_PER_NODE": "2"})
    assert "TUNESMITH_API_KEY" not in env and env["NPROC_PER_NODE"] == "2" and env["PYTHONUNBUFFERED"] == "1"
