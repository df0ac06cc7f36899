"""Detached `tunesmith` processes: start one (a run survives the page and its server), record it, tell whether it
still runs, stop it.

A start runs `[python, -m, tunesmith, command, *flags]` (an argv list: no shell ever reads it) in a new session
(its own process group, so a page's Ctrl-C or exit never reaches it), stdin closed, stdout and stderr into a log
file. What was started is recorded in the run's output folder, written whole or not at all:

    <output_dir>/.tunesmith-webui/launch.json     the last start into this folder: pid, its start time, argv, log
    <output_dir>/.tunesmith-webui/<time>.log      the process's output (the one-line stop or error message included)
    <output_dir>/vN-.../webui.json                the same record, once the run folder exists (runs.link_launches)

so a page started later — after a refresh, a restart, or the first page killed — finds the run, its log and its
process, and can stop it. A pid is only trusted together with its start time (/proc/<pid>/stat), so a pid the
system reused for another process is never signalled. A second start into a folder while its last start still
runs is refused; so is a start into a folder where a run started elsewhere (a terminal) is writing its log.

Stop sends SIGTERM to the process that was started, the leader of its process group: training stops at the next
step boundary and names the checkpoint to resume from; under NPROC_PER_NODE the launcher passes the signal on to
every rank (tunesmith.cli). The group as a whole is not signalled: the data-loader workers of a rank would die at
once and turn a clean stop into a crash.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from tunesmith.errors import ConfigError
from tunesmith.files import write_json_atomic

RECORD_DIR = ".tunesmith-webui"
LAUNCH = "launch.json"
RUN_RECORD = "webui.json"
ACTIVE_S = 90  # a run whose logging.jsonl changed this recently, and that has not finished, counts as training
LOCK_STALE_S = 60


@dataclass(frozen=True)
class Launch:
    """One started process. argv: after `tunesmith`; line: as shown on the page; start_ticks: its start time in
    clock ticks since boot (/proc/<pid>/stat field 22; None where /proc is missing); exit_code: set once it ended
    and the page that started it saw it end (negative: killed by that signal)."""
    pid: int
    argv: list
    line: str
    output_dir: str
    cwd: str
    log: str
    started: float
    start_ticks: Optional[int] = None
    env: dict = field(default_factory=dict)
    exit_code: Optional[int] = None

    @classmethod
    def from_json(cls, data: dict) -> "Launch":
        """From a record's JSON (unknown keys ignored). Raises KeyError/TypeError for a damaged record."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def read_launch(path: str) -> Optional[Launch]:
    """The record at `path` (launch.json or a run's webui.json), or None when missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            return Launch.from_json(json.load(fh))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stat(pid: int) -> Optional[tuple[str, int]]:
    """(state letter, start time in clock ticks) of a process from /proc/<pid>/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()  # fields 3.. (the command name may hold spaces and parentheses)
    return rest[0], int(rest[19])


def alive(launch: Launch) -> bool:
    """Whether the started process still runs: the same pid with the same start time, and not a zombie."""
    if launch.exit_code is not None:
        return False
    if not os.path.isdir("/proc"):  # no /proc: the pid alone
        try:
            os.kill(launch.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    st = _stat(launch.pid)
    return st is not None and st[0] != "Z" and (launch.start_ticks is None or st[1] == launch.start_ticks)


def launch_path(output_dir: str) -> str:
    """Where an output folder's last start is recorded."""
    return os.path.join(output_dir, RECORD_DIR, LAUNCH)


def _recently_active(output_dir: str) -> Optional[str]:
    """A run folder directly inside output_dir whose logging.jsonl changed within ACTIVE_S seconds and that has
    not finished (no summary line), or None."""
    try:
        names = os.listdir(output_dir)
    except OSError:
        return None
    for name in names:
        log = os.path.join(output_dir, name, "logging.jsonl")
        try:
            if time.time() - os.path.getmtime(log) > ACTIVE_S:
                continue
            with open(log, "rb") as fh:
                fh.seek(max(0, os.path.getsize(log) - 4096))
                last = fh.read().decode("utf-8", "replace").strip().splitlines()[-1:]
        except OSError:
            continue
        if not last or "train_runtime" not in last[0]:
            return os.path.join(output_dir, name)
    return None


def busy_problem(output_dir: str) -> Optional[str]:
    """Why nothing may start into output_dir now (a start recorded there still runs, or a run there is writing
    its log), or None."""
    last = read_launch(launch_path(output_dir))
    if last is not None and alive(last):
        return (f"a run is already training into {output_dir} (pid {last.pid}, started "
                f"{time.strftime('%H:%M:%S', time.localtime(last.started))}: {last.line}); stop it on the Runs page, "
                f"or choose another --output_dir")
    active = _recently_active(output_dir)
    if active and (last is None or not _is_linked(active, last)):
        return (f"{active} is training (its logging.jsonl changed within the last {ACTIVE_S} s and has no final "
                f"summary yet; started outside this page?); wait for it, stop it where it was started, or choose "
                f"another --output_dir")
    return None


def _is_linked(run_dir: str, launch: Launch) -> bool:
    rec = read_launch(os.path.join(run_dir, RUN_RECORD))
    return rec is not None and rec.pid == launch.pid and rec.started == launch.started


@contextlib.contextmanager
def _start_lock(folder: str):
    """An O_EXCL lock file in the record folder while a start checks and records (two pages starting into the
    same folder at once: one wins, the other is refused with ConfigError). A lock older than LOCK_STALE_S is a
    crashed page's and is taken over."""
    path = os.path.join(folder, "start.lock")
    try:
        if time.time() - os.path.getmtime(path) > LOCK_STALE_S:
            os.remove(path)
    except OSError:
        pass
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise ConfigError(f"another page is starting a run into {os.path.dirname(folder)} right now; try again in "
                          f"a moment") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def child_env(extra: Optional[dict] = None) -> dict:
    """The environment of a started command: this process's (hub tokens and tracker keys pass on, as in a
    terminal), `extra` over it, unbuffered output, and without the page's own password (TUNESMITH_API_KEY): a
    command started from the page never needs it."""
    from tunesmith.serve.app import API_KEY_ENV

    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    return {**env, **(extra or {}), "PYTHONUNBUFFERED": "1"}


def start(process_argv: list, argv: list, line: str, output_dir: str, env: Optional[dict] = None,
          cwd: Optional[str] = None) -> Launch:
    """Start `process_argv` detached, its output going to a log file in <output_dir>/.tunesmith-webui/, and record
    it (launch.json). argv/line: the command as the page shows it. env: extra variables (NPROC_PER_NODE), over this
    process's environment. Raises ConfigError when output_dir is busy (busy_problem) or another page is starting
    into it; OSError when the folder cannot be written."""
    output_dir = os.path.abspath(output_dir)
    folder = os.path.join(output_dir, RECORD_DIR)
    os.makedirs(folder, exist_ok=True)
    with _start_lock(folder):
        problem = busy_problem(output_dir)
        if problem:
            raise ConfigError(problem)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        log = os.path.join(folder, f"{stamp}.log")
        n = 1
        while os.path.exists(log):
            log, n = os.path.join(folder, f"{stamp}-{n}.log"), n + 1
        with open(log, "ab") as out:
            proc = subprocess.Popen(process_argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=cwd or os.getcwd(), env=child_env(env), start_new_session=True)
        st = _stat(proc.pid)
        launch = Launch(proc.pid, list(argv), line, output_dir, cwd or os.getcwd(), log, time.time(),
                        st[1] if st else None, dict(env or {}))
        write_json_atomic(launch_path(output_dir), dataclasses.asdict(launch))
    threading.Thread(target=_reap, args=(proc, launch), daemon=True, name=f"reap-{proc.pid}").start()
    return launch


def _reap(proc: subprocess.Popen, launch: Launch) -> None:
    """Wait for a started process (no zombie is left while this page runs) and record its exit code where its
    records still name it: launch.json, and the run folder's webui.json once linked."""
    code = proc.wait()
    paths = [launch_path(launch.output_dir)]
    try:
        paths += [os.path.join(launch.output_dir, d, RUN_RECORD) for d in os.listdir(launch.output_dir)]
    except OSError:
        pass
    for path in paths:
        rec = read_launch(path)
        if rec is not None and rec.pid == launch.pid and rec.started == launch.started:
            try:
                write_json_atomic(path, {**dataclasses.asdict(rec), "exit_code": code})
            except OSError:
                pass


def stop(launch: Launch) -> str:
    """Send SIGTERM to a started process that still runs (see the module's docstring for why only to it); returns
    what was done, as a sentence for the page."""
    if not alive(launch):
        return f"pid {launch.pid} is not running any more; nothing to stop"
    try:
        os.kill(launch.pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"pid {launch.pid} ended meanwhile; nothing to stop"
    except PermissionError:
        return f"pid {launch.pid} belongs to another user; stop it as that user"
    return (f"sent SIGTERM to pid {launch.pid}: training stops at the next step boundary and names the checkpoint "
            f"to resume from (shown here once it has stopped)")


def run_cli(process_argv: list, timeout: float = 300, cwd: Optional[str] = None) -> tuple[int, str]:
    """A short `tunesmith` command (data inspect, data stats) to its end: (exit code, stdout and stderr). A command
    that runs past `timeout` seconds is killed and reported as exit code 124."""
    try:
        p = subprocess.run(process_argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                           cwd=cwd or os.getcwd(), env=child_env())
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n(stopped after {timeout:.0f} s)"
    return p.returncode, (p.stdout or "") + (p.stderr or "")
