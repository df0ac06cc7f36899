"""The runs the Runs page lists: every run folder under the output folders, found again on each refresh (so a page
reload or a new `tunesmith web-ui` process sees the same runs), with its state, progress, checkpoints, log and the
one-line message a run ends with.

A run folder is one with a logging.jsonl, or an args.json in a vN-YYYYMMDD-HHMMSS folder (training's layout,
tunesmith.runs.run_dir; a run that is still loading has no log yet). Folders are searched up to MAX_DEPTH levels
down, not inside run folders. A start recorded by a page (tunesmith.webui.launch) is linked to the run folder it
made — the first run folder of its output folder whose args.json was written after the start — by writing the
record into the run folder (webui.json), so the pid is found there from then on.

logging.jsonl is read incrementally: each refresh reads only the lines appended since the last one (the size and
position are kept per file), so listing 20 runs costs a few stat calls.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from tunesmith.files import write_json_atomic
from tunesmith.runs.run_dir import CHECKPOINT_RE, list_checkpoints
from tunesmith.webui.launch import ACTIVE_S, RECORD_DIR, RUN_RECORD, Launch, alive, launch_path, read_launch

MAX_DEPTH = 4
RUN_NAME = re.compile(r"^v\d+-\d{8}-\d{6}$")
MESSAGE = re.compile(r"^tunesmith [\w-]+(?: \(rank \d+\))?: .*")


class _Log:
    """One logging.jsonl read so far: its records, the byte offset of the first unread line, the file's inode."""

    def __init__(self):
        self.records: list[dict] = []
        self.offset = 0
        self.inode = None


_LOGS: dict[str, _Log] = {}
_LOCK = threading.Lock()


def read_records(path: str) -> list[dict]:
    """The records of a logging.jsonl, reading only what was appended since the last call (a file replaced or
    shortened is read again from the start). A line being written (no newline yet) waits for the next call; a
    line that is not JSON is skipped. Returns the cached list (do not modify it)."""
    with _LOCK:
        log = _LOGS.setdefault(path, _Log())
        try:
            st = os.stat(path)
        except OSError:
            return []
        if st.st_ino != log.inode or st.st_size < log.offset:
            log.records, log.offset, log.inode = [], 0, st.st_ino
        if st.st_size == log.offset:
            return log.records
        with open(path, "rb") as fh:
            fh.seek(log.offset)
            chunk = fh.read(st.st_size - log.offset)
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                log.records.append(rec)
        log.offset += end
        return log.records


@dataclass(frozen=True)
class RunView:
    """A run as the page shows it. status: starting (loading, no run folder yet), training, finished, stopped,
    failed, diverged, ended (stopped without a message: killed?), active (started elsewhere, its log changing),
    incomplete (no summary and no process known)."""
    path: str
    name: str
    method: str
    status: str
    step: int = 0
    max_steps: int = 0
    elapsed: str = ""
    remaining: str = ""
    last: dict = field(default_factory=dict)
    checkpoints: list = field(default_factory=list)
    launch: Optional[Launch] = None
    message: str = ""
    started: float = 0.0

    @property
    def live(self) -> bool:
        """Whether a process of this run is known to be running."""
        return self.status in ("starting", "training")


def _is_run(folder: str, names: list) -> bool:
    if CHECKPOINT_RE.match(os.path.basename(folder)):
        return False
    return "logging.jsonl" in names or ("args.json" in names and RUN_NAME.match(os.path.basename(folder)) is not None)


def run_folders(roots) -> list[str]:
    """Every run folder under the roots (MAX_DEPTH levels down), not looking inside run folders or hidden ones."""
    out = []
    for root in roots:
        base = os.path.abspath(root).rstrip(os.sep).count(os.sep)
        for folder, dirs, files in os.walk(root):
            if _is_run(folder, files):
                out.append(os.path.abspath(folder))
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not CHECKPOINT_RE.match(d))
            if folder.count(os.sep) - base >= MAX_DEPTH:
                dirs[:] = []
    return out


def link_launches(output_dir: str) -> Optional[Launch]:
    """Link the output folder's last start to the run folder it made (write webui.json there, whole), once that
    folder exists. Returns the start when no run folder is linked to it yet (still loading), else None."""
    launch = read_launch(launch_path(output_dir))
    if launch is None:
        return None
    candidates = []
    for name in sorted(os.listdir(output_dir)):
        run = os.path.join(output_dir, name)
        rec = read_launch(os.path.join(run, RUN_RECORD))
        if rec is not None and rec.pid == launch.pid and rec.started == launch.started:
            return None  # linked already
        try:
            written = os.path.getmtime(os.path.join(run, "args.json"))
        except OSError:
            continue
        if rec is None and written >= launch.started - 1:
            candidates.append((written, run))
    if not candidates:
        return launch
    write_json_atomic(os.path.join(min(candidates)[1], RUN_RECORD), dataclasses.asdict(launch))
    return None


def message_of(log_text: str) -> str:
    """The one-line message a command ends with (`tunesmith sft: stopped by SIGTERM at step …`, `… error: …`),
    with its continuation lines (a multi-problem message), or ""."""
    lines = log_text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if MESSAGE.match(lines[i]):
            tail = [ln for ln in lines[i + 1:] if ln.startswith("  ")]
            return "\n".join([lines[i], *tail])
    return ""


def log_tail(path: Optional[str], lines: int = 40, max_bytes: int = 64 << 10) -> str:
    """The last `lines` lines of a log file (at most max_bytes read), or "" when there is none."""
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - max_bytes))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def _method(args: dict) -> str:
    return str(args.get("rlhf_type") or "sft") if "rlhf_type" in args else "sft"


def _status(summary: bool, launch: Optional[Launch], message: str, log_mtime: float) -> str:
    if summary:
        return "finished"
    if launch is not None and alive(launch):
        return "training"
    if launch is not None:
        if "stopped by SIG" in message:
            return "stopped"
        if "diverged" in message or "became nan" in message or "became inf" in message:
            return "diverged"
        if " error: " in message or (launch.exit_code not in (None, 0) and message):
            return "failed"
        return "finished" if launch.exit_code == 0 else "ended"
    return "active" if time.time() - log_mtime < ACTIVE_S else "incomplete"


def view(path: str, root: str) -> RunView:
    """The RunView of one run folder (root: the output folder it was found under, for its short name)."""
    try:
        with open(os.path.join(path, "args.json"), encoding="utf-8") as fh:
            args = json.load(fh)
    except (OSError, ValueError):
        args = {}
    log_path = os.path.join(path, "logging.jsonl")
    records = read_records(log_path)
    steps = [r for r in records if "global_step" in r and "train_runtime" not in r]
    summary = any("train_runtime" in r for r in records[-3:])
    last = steps[-1] if steps else {}
    launch = read_launch(os.path.join(path, RUN_RECORD))
    message = message_of(log_tail(launch.log, 200)) if launch else ""
    try:
        mtime = os.path.getmtime(log_path)
    except OSError:
        mtime = 0.0
    step, _, total = str(last.get("global_step/max_steps", "")).partition("/")
    started = (launch.started if launch else 0.0) or _mtime(os.path.join(path, "args.json"))
    numbers = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return RunView(path, os.path.relpath(path, os.path.dirname(root)), _method(args),
                   _status(summary, launch, message, mtime), int(last.get("global_step", step or 0) or 0),
                   int(total) if total.isdigit() else int(args.get("max_steps") or 0),
                   str(last.get("elapsed_time", "")), str(last.get("remaining_time", "")), numbers,
                   list_checkpoints(path), launch, message, started)


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def find_runs(outputs) -> list[RunView]:
    """Every run under the output folders, newest first, plus one `starting` entry per start that has no run
    folder yet (the model and data still loading) or that ended before making one (a flag or data error: its
    message says why)."""
    out = []
    for root in outputs:
        for path in run_folders([root]):
            out.append(view(path, root))
        for folder in _launch_folders(root):
            pending = link_launches(folder)
            if pending is not None:
                out.append(_pending(pending, root))
    return sorted(out, key=lambda r: r.started, reverse=True)


def _launch_folders(root: str) -> list[str]:
    """The output folders under root that hold a page's start record (.tunesmith-webui/launch.json)."""
    found = []
    base = os.path.abspath(root).rstrip(os.sep).count(os.sep)
    for folder, dirs, _ in os.walk(root):
        if RECORD_DIR in dirs:
            found.append(os.path.abspath(folder))
        dirs[:] = [d for d in dirs if not d.startswith(".") and not CHECKPOINT_RE.match(d) and
                   not RUN_NAME.match(d)]
        if folder.count(os.sep) - base >= MAX_DEPTH:
            dirs[:] = []
    return found


def _pending(launch: Launch, root: str) -> RunView:
    """A start without a run folder: still loading (its process runs), or ended with its message."""
    message = message_of(log_tail(launch.log, 200))
    running = alive(launch)
    status = "starting" if running else ("failed" if message or launch.exit_code else "ended")
    name = os.path.relpath(launch.output_dir, os.path.dirname(root)) + " (no run folder yet)"
    method = next((launch.argv[i + 1] for i, a in enumerate(launch.argv[:-1]) if a == "--rlhf_type"),
                  launch.argv[0] if launch.argv else "")
    return RunView(launch.output_dir, name, method, status, launch=launch, message=message, started=launch.started)


def find(outputs, path: str) -> Optional[RunView]:
    """The RunView of the run (or start) at `path` among the outputs, or None."""
    return next((r for r in find_runs(outputs) if r.path == path), None)
