"""Files written whole or not at all: a JSON or text file replaced atomically, a folder built aside and renamed into
place; the nearest existing ancestor of a path and why a path cannot be written or read (`unwritable`,
`unreadable`: for the flag checks); and a failed write as the OSError it is (`failed_write`: torch's and safetensors'
wordings of a full disk). Every layer may use these."""
from __future__ import annotations

import contextlib
import json
import os
import errno
import re
import shutil
from typing import Iterator, Optional


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2, default=str)
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def existing_ancestor(path: str) -> str:
    """PATH made absolute, or the nearest folder above it that exists (where it would be created)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def read_only_fs(path: str) -> bool:
    """Whether PATH (which exists) lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def unwritable(path: str, folder: bool = False, example: str = "result.jsonl") -> Optional[str]:
    """Why PATH cannot be written — as a file, or with folder=True as a folder to create or write into — or None
    when it can, as a clause with its fix: a folder where a file is wanted (or the reverse), a file above it, a
    read-only file system, no write permission for this user. Checked on PATH when it exists, else on the nearest
    folder above it. example: the file name the fix suggests inside a folder given for a file."""
    path = os.path.abspath(path)
    if os.path.isdir(path) and not folder:
        return f"is a folder; give the file to write, e.g. {os.path.join(path, example)}"
    if os.path.exists(path) and not os.path.isdir(path) and folder:
        return "is a file, not a folder; give a folder"
    at = existing_ancestor(path)
    if at != path and not os.path.isdir(at):
        return f"{at} is a file, so nothing can be created under it; give a path outside it"
    if read_only_fs(at):
        return f"{at} is on a read-only file system; give a path on a writable disk (or remount it read-write)"
    if not os.access(at, os.W_OK | (os.X_OK if os.path.isdir(at) else 0)):
        return f"{at} is not writable by this user; fix its permissions, or give another path"
    return None


def unreadable(path: str) -> Optional[str]:
    """Why PATH (which exists) cannot be read by this user — a folder that cannot be listed, or a file, in it, that
    cannot be opened — or None when it can. Only the folder itself and the files directly in it are checked."""
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            return f"{path} cannot be read by this user (permission denied)"
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            return f"{path} cannot be read ({e.strerror})"
        files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    else:
        files = [path]
    bad = next((f for f in files if not os.access(f, os.R_OK)), None)
    return f"{bad} cannot be read by this user (permission denied)" if bad else None


# how torch (its zip writer and C++ streams) and safetensors word a write the disk refused; none sets errno
_WRITE_FAILED = re.compile(r"unexpected pos|basic_ios::clear|iostream error|failed writing|file write failed|"
                           r"I/O error|No space left|Disk quota|Read-only file system|os error \d+", re.I)
_OS_ERROR = re.compile(r"os error (\d+)")
FULL_BELOW = 16 << 20  # free bytes under which a write that failed without a reason is put down to a full disk


def failed_write(e: BaseException, path: str, where: Optional[str] = None) -> Optional[OSError]:
    """e as an OSError naming path (errno kept or found) when it is a write the disk refused, else None. torch's
    `unexpected pos` / `basic_ios::clear: iostream error` carry no errno: when one comes, the free space of where's
    disk (path's when None; check it before a partial write is removed) decides — under FULL_BELOW it is ENOSPC,
    else EIO with torch's words."""
    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, e.strerror, path)
    if not _WRITE_FAILED.search(str(e)):
        return None
    code = _OS_ERROR.search(str(e))
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), path)
    try:
        free = shutil.disk_usage(existing_ancestor(where or path)).free
    except OSError:
        free = None
    if free is not None and free < FULL_BELOW:
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free >> 10} KiB free; "
                                     f"{type(e).__name__}: {str(e).strip()})", path)
    return OSError(errno.EIO, f"{type(e).__name__}: {str(e).strip()}", path)


@contextlib.contextmanager
def atomic_dir(final_path: str) -> Iterator[str]:
    """Yield a temporary directory next to final_path; rename it into place only if the block succeeds.

    A crash mid-write leaves a `.tmp-` directory that no checkpoint search matches, never a checkpoint that
    looks complete but is not.
    """
    parent = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final_path)}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final_path):
        old = final_path + f".old-{os.getpid()}"
        os.replace(final_path, old)
        os.replace(tmp, final_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final_path)
