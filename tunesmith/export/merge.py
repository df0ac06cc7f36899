"""Merged Hugging Face folders: LoRA adapters folded into the unquantised base weights and written as a normal model
directory (sharded safetensors, or PyTorch .bin shards), config, generation config, tokenizer with its chat
template, and an args.json that keeps the run's prompt settings.

The folder appears only when complete: it is written under a temporary name and renamed (tunesmith.files.atomic_dir);
a disk that fills or refuses the write meanwhile is one message (`write_refused`).
"""
from __future__ import annotations

import contextlib
import errno
import inspect
import json
import os
import re
import shutil
from typing import Optional

from tunesmith.errors import TunesmithError
from tunesmith.files import FULL_BELOW, atomic_dir, existing_ancestor, failed_write, write_json_atomic


def write_model_folder(model, tokenizer, out: str, *, safe_serialization: bool = True, max_shard_size: str = "5GB",
                       extra_files=None, what: str = "the merged model", processor_dir: Optional[str] = None) -> None:
    """Write `model` (a plain transformers model, adapters merged) and `tokenizer` as a Hugging Face folder at out,
    atomically. extra_files(tmp_dir), if given, adds files (args.json) before the rename. processor_dir: the base
    model's folder, whose image-processor files a vision-language model needs beside its weights.

    Raises TunesmithError (one message; nothing left half-written) when the disk refuses the write."""
    with atomic_output(out, what) as tmp:
        save_weights(model, tmp, safe_serialization, max_shard_size)
        tokenizer.save_pretrained(tmp)
        if processor_dir:
            from tunesmith.models.vision import copy_processor_files

            copy_processor_files(processor_dir, tmp)
        if extra_files is not None:
            extra_files(tmp)


@contextlib.contextmanager
def atomic_output(out: str, what: str):
    """Yield a temporary folder that becomes out when the block succeeds (tunesmith.files.atomic_dir), for every
    export: a write the disk refused meanwhile — however torch, safetensors or llama.cpp word it — is one
    TunesmithError naming `what` and out, and the partial folder is removed."""
    with write_refused(out, what), atomic_dir(out) as tmp:
        try:
            yield tmp
        except Exception as e:  # noqa: BLE001 - torch / safetensors word a full disk their own way
            failed = failed_write(e, out, tmp)  # the free space read before the partial folder is removed
            if failed is None:
                raise
            raise failed from e


def remove_stale_temporaries(out: str) -> list[str]:
    """Remove the temporary folders an export to out left when it was killed outright (SIGKILL, a power cut):
    `.tmp-<name>-<pid>` (atomic_dir) and `.merging-<name>-<pid>` next to out, whose process is gone. Folders of a
    live process (an export running now) are kept. Returns the paths removed."""
    parent, name = os.path.split(os.path.abspath(out))
    pattern = re.compile(rf"^\.(?:tmp|merging)-{re.escape(name)}-(\d+)$")
    removed = []
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        m = pattern.match(entry)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(os.path.join(parent, entry))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM (`kill`, `timeout`, a scheduler) unwinds like Ctrl-C, so every atomic output's
    temporary folder is removed on the way out: SystemExit(143) after one line on stderr. The previous handler is
    restored after. Main thread only (signal handlers); elsewhere the block runs unchanged."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        print("tunesmith export: terminated (SIGTERM); nothing was left half-written", file=sys.stderr)
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def write_refused(out: str, what: str = "the merged model"):
    """A write the disk refused while `what` is written to out becomes one TunesmithError (nothing half-written is
    left: outputs are renamed into place only when complete)."""
    try:
        yield
    except OSError as e:
        why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EIO: "the disk refused the write"}.get(e.errno, e.strerror)
        if why is None:  # an OSError without errno (numpy's tofile: "N requested and M written")
            free = shutil.disk_usage(existing_ancestor(out)).free
            why = "the disk is full" if free < FULL_BELOW else (str(e) or "the disk refused the write")
        raise TunesmithError(f"could not write {what} ({out}): {why}; nothing was left half-written. "
                             f"Free some space (or fix the permissions) or choose another --output_dir, and "
                             f"export again") from None


def save_weights(model, out_dir: str, safe_serialization: bool, max_shard_size: str) -> None:
    """The model's weights into out_dir as safetensors shards, or PyTorch .bin shards (pytorch_model*.bin and
    pytorch_model.bin.index.json, what transformers 4.x writes with safe_serialization=False).

    transformers 5 dropped save_pretrained's safe_serialization (it writes safetensors only, and still loads .bin),
    so there the safetensors shards it writes are rewritten as .bin, one shard in memory at a time."""
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:  # transformers 4.x
        model.save_pretrained(out_dir, safe_serialization=safe_serialization, max_shard_size=max_shard_size)
        return
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if not safe_serialization:
        safetensors_to_bin(out_dir)


def safetensors_to_bin(folder: str) -> None:
    """Rewrite save_pretrained's model*.safetensors (and its index) in folder as pytorch_model*.bin (and
    pytorch_model.bin.index.json), tensor names and shard boundaries unchanged."""
    import torch
    from safetensors.torch import load_file
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    index = None
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
        shards = sorted(set(index["weight_map"].values()))
    else:
        shards = [SAFE_WEIGHTS_NAME]
    safe_stem, bin_stem = SAFE_WEIGHTS_NAME[:-len(".safetensors")], WEIGHTS_NAME[:-len(".bin")]  # model, pytorch_model
    renamed = {}
    for shard in shards:
        # model-00001-of-00003.safetensors -> pytorch_model-00001-of-00003.bin
        renamed[shard] = bin_stem + shard[len(safe_stem):-len(".safetensors")] + ".bin"
        torch.save(load_file(os.path.join(folder, shard)), os.path.join(folder, renamed[shard]))
        os.remove(os.path.join(folder, shard))
    if index is not None:
        index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
        write_json_atomic(os.path.join(folder, WEIGHTS_INDEX_NAME), index)
        os.remove(index_path)
