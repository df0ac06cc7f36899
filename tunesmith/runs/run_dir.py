"""Run directories (ms-swift layout), args.json with secrets redacted, and checkpoints written atomically.

Shared by training, export, infer, deploy and report, so none of them imports train/.

    output_dir/vN-YYYYMMDD-HHMMSS/
        args.json  logging.jsonl  val_dataset.jsonl  runs/ (TensorBoard)
        checkpoint-STEP/  (adapter or full model, args.json, trainer_state.json, optimizer.pt, scheduler.pt,
                           rng_state.pth)
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import shutil
from typing import Optional

from tunesmith.config.parser import to_record
from tunesmith.files import write_json_atomic

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# atomic_dir's unfinished saves: `.tmp-<name>-<pid>` (being written) and `<name>.old-<pid>` (being replaced)
LEFTOVER_RE = re.compile(r"\.tmp-.+-(\d+)|.+\.old-(\d+)")


def next_version_dir(output_dir: str, now: Optional[_dt.datetime] = None) -> str:
    """output_dir/v{N}-{YYYYMMDD-HHMMSS}, N = 1 + the largest existing vN (first run: v0)."""
    os.makedirs(output_dir, exist_ok=True)
    versions = [int(m.group(1)) for d in os.listdir(output_dir) if (m := re.match(r"^v(\d+)-", d))]
    n = max(versions) + 1 if versions else 0
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return os.path.join(output_dir, f"v{n}-{stamp}")


def make_run_dir(output_dir: str, add_version: bool = True) -> str:
    path = next_version_dir(output_dir) if add_version else output_dir
    os.makedirs(path, exist_ok=True)
    return os.path.abspath(path)


# The flags naming models and adapters that later commands open from args.json (infer/export/deploy --adapters CKPT
# load the base model it records): a local folder is recorded absolute, so that the record works from any directory.
MODEL_PATH_KEYS = ("model", "ref_model", "adapters", "ref_adapters", "reward_model")


def save_args(path_dir: str, args, extra: Optional[dict] = None) -> dict:
    """Write args.json: every resolved argument, secrets replaced by '<redacted>', plus record-only extras, with the
    local folders of MODEL_PATH_KEYS made absolute and the directory it was written from (`working_dir`, for the
    paths kept as given: data files). Returns the record."""
    record = to_record(args)
    record.update(extra or {})
    record.update(absolute_model_paths(record), working_dir=os.getcwd())
    write_json_atomic(os.path.join(path_dir, "args.json"), record)
    return record


def absolute_model_paths(record: dict) -> dict:
    """{key: value} for the MODEL_PATH_KEYS of a record that name existing local paths, those made absolute (a
    hub id, which is no local path, is kept as it is)."""

    def absolute(value):
        return os.path.abspath(value) if isinstance(value, str) and value and os.path.exists(value) else value

    out = {}
    for key in MODEL_PATH_KEYS:
        value = record.get(key)
        if isinstance(value, list):
            out[key] = [absolute(v) for v in value]
        elif isinstance(value, str):
            out[key] = absolute(value)
    return out


def remove_leftovers(folders: list[str]) -> list[str]:
    """Remove the unfinished saves (`.tmp-<name>-<pid>`, `<name>.old-<pid>`: atomic_dir's) that processes no
    longer running left in these folders and in their run directories (one level down); a folder whose process
    is alive is another run's save in progress and is kept. Returns the paths removed."""
    removed = []
    places = {os.path.abspath(f) for f in folders if f and os.path.isdir(f)}
    # one level down, but never into a leftover itself: it may be removed below before its turn comes (a run killed
    # during a save leaves `.tmp-checkpoint-N-PID` in the run directory that its resume names)
    places |= {os.path.join(p, d) for p in list(places) for d in _names(p)
               if os.path.isdir(os.path.join(p, d)) and not LEFTOVER_RE.fullmatch(d)}
    for place in sorted(places):
        for name in _names(place):
            m = LEFTOVER_RE.fullmatch(name)
            if not m or not os.path.isdir(os.path.join(place, name)) or _alive(int(m.group(1) or m.group(2))):
                continue
            shutil.rmtree(os.path.join(place, name), ignore_errors=True)
            removed.append(os.path.join(place, name))
    return removed


def _names(folder: str) -> list[str]:
    """The entries of a folder, or none when it is gone (another process's cleanup removed it meanwhile)."""
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints in a run directory, oldest step first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, d)) for d in os.listdir(run_dir)
             if (m := CHECKPOINT_RE.match(d)) and os.path.isdir(os.path.join(run_dir, d))]
    return [p for _, p in sorted(found)]


def rotate_checkpoints(run_dir: str, limit: Optional[int], best: Optional[str] = None) -> list[str]:
    """Keep the `limit` newest checkpoints plus the best one; return the removed paths."""
    if not limit or limit <= 0:
        return []
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-limit:])
    if best:
        keep.add(os.path.abspath(best))
    removed = []
    for c in ckpts:
        if os.path.abspath(c) not in {os.path.abspath(k) for k in keep}:
            shutil.rmtree(c, ignore_errors=True)
            removed.append(c)
    return removed


def update_symlink(link: str, target: str) -> None:
    tmp = link + f".tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    os.symlink(os.path.relpath(target, os.path.dirname(link)), tmp)
    os.replace(tmp, link)


