"""Files written whole or not at all: a JSON or text file replaced atomically, a folder built aside and renamed into place; and the nearest existing ancestor of a path (for disk and permission checks). Every layer may use these."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator


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
