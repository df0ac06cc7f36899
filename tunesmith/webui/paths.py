"""The folders the pages may touch, given when `tunesmith web-ui` starts: runs are started in and listed from the
output folders (--output_dir), and models, datasets and checkpoints are read from those and the allowed folders
(--allowed_paths). A local path outside them is refused before anything starts; a hub id is not a local path.

Paths are compared after resolving symlinks (os.path.realpath), so a link inside an allowed folder that points
outside it is refused too. Also here: the data files and model folders the page offers in its drop-downs (found by
walking the allowed folders, never from a registry file), and uploads kept under the first output folder.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv", ".cache", ".tunesmith-webui"}
HUB_PREFIXES = ("hf::", "ms::")


@dataclass(frozen=True)
class Folders:
    """outputs: where runs start and are listed (absolute, symlinks resolved); readable: outputs and the allowed
    folders."""
    outputs: tuple
    readable: tuple

    @classmethod
    def of(cls, output_dirs, allowed_paths) -> "Folders":
        """From the command's --output_dir and --allowed_paths (the output folders are made when missing)."""
        outs = []
        for d in output_dirs:
            os.makedirs(d, exist_ok=True)
            outs.append(os.path.realpath(d))
        readable = tuple(dict.fromkeys(outs + [os.path.realpath(p) for p in allowed_paths]))
        return cls(tuple(dict.fromkeys(outs)), readable)


def within(path: str, roots) -> bool:
    """Whether `path` (symlinks resolved) is one of `roots` or inside one."""
    real = os.path.realpath(os.path.expanduser(path))
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def is_local(value: str) -> bool:
    """Whether a --model/--dataset/... value names a local path (it exists, or is written as one: absolute, ./, ../
    or ~) rather than a hub id; `path#N` sampling and hf::/ms:: hub prefixes are understood."""
    v = str(value).strip()
    if not v or v.startswith(HUB_PREFIXES):
        return False
    v = re.sub(r"#\d+$", "", v)
    return os.path.exists(os.path.expanduser(v)) or v.startswith(("/", "./", "../", "~"))


def _strip(value: str) -> str:
    """A dataset value without its `#N` sample count, or an adapter without deploy's `name=`."""
    v = re.sub(r"#\d+$", "", str(value).strip())
    return v.split("=", 1)[1] if "=" in v and not os.path.exists(v) else v


# the flags of the launched commands that name files or folders to read (training, export, eval)
READ_FLAGS = ("model", "adapters", "ref_model", "ref_adapters", "reward_model", "reward_adapters", "dataset",
              "val_dataset", "resume_from_checkpoint", "external_plugins", "deepspeed", "fsdp_config", "ckpt_dir",
              "base_model")
WRITE_FLAGS = ("output_dir", "eval_output_dir")


def path_problems(values: dict, folders: Folders) -> list[str]:
    """Each local path among a parsed command's flag values that lies outside the folders, as one problem (what,
    where it may be, how to fix). values: {flag: value} (tunesmith.config.slices.flag_values of the parsed
    command). Output folders must be inside an output folder; read paths inside any of them."""
    out = []
    for flag in READ_FLAGS + WRITE_FLAGS:
        value = values.get(flag)
        items = value if isinstance(value, (list, tuple)) else ([] if value is None else [value])
        roots = folders.outputs if flag in WRITE_FLAGS else folders.readable
        for item in items:
            path = _strip(item)
            if flag in ("deepspeed", "fsdp_config") and not os.path.exists(path):
                continue  # a preset name (zero2) or inline JSON
            if (flag in WRITE_FLAGS or is_local(path)) and not within(path, roots):
                where = "an output folder" if flag in WRITE_FLAGS else "a folder this page may read"
                out.append(f"--{flag} {item}: outside {where} ({', '.join(roots)}); choose a path inside, or "
                           f"restart `tunesmith web-ui` with that folder in "
                           f"{'--output_dir' if flag in WRITE_FLAGS else '--allowed_paths'}")
    return out


def _walk(roots, limit: int, depth: int = 4):
    """(folder, subfolders, files) under each root, breadth-limited to `depth` levels, hidden and virtual-env
    folders skipped; stops after `limit` folders."""
    seen = 0
    for root in roots:
        base = root.rstrip(os.sep).count(os.sep)
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            if folder.count(os.sep) - base >= depth:
                dirs[:] = []
            seen += 1
            if seen > limit:
                return
            yield folder, dirs, files


def data_files(folders: Folders, limit: int = 500) -> list[str]:
    """The data files (.jsonl, .json, .csv, .parquet, .txt) under the readable folders, at most `limit`, for the
    dataset drop-down; a run folder's own files (args.json, logging.jsonl, ...) are left out."""
    out = []
    for folder, _, files in _walk(folders.readable, 2000):
        if "args.json" in files:  # a run or checkpoint folder
            continue
        out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(DATA_SUFFIXES)]
        if len(out) >= limit:
            break
    return out[:limit]


def model_folders(folders: Folders, limit: int = 200) -> list[str]:
    """The model folders (config.json and weights or an index) under the readable folders, at most `limit`, for the
    model drop-down; training checkpoints are offered on the Runs and Chat pages instead."""
    out = []
    for folder, _, files in _walk(folders.readable, 2000):
        if "config.json" in files and "trainer_state.json" not in files and \
                any(f.endswith((".safetensors", ".bin", ".index.json")) for f in files):
            out.append(folder)
            if len(out) >= limit:
                break
    return out


def keep_upload(tmp_path: str, folders: Folders) -> str:
    """Copy an uploaded file (gradio's temporary copy) to <first output folder>/uploads/<time>-<name>, written
    under a temporary name and renamed, so the run that reads it keeps it after gradio's cache is cleared. Returns
    the kept path."""
    dest_dir = os.path.join(folders.outputs[0], "uploads")
    os.makedirs(dest_dir, exist_ok=True)
    name = re.sub(r"[^\w.\-]+", "_", os.path.basename(tmp_path)) or "upload"
    dest = os.path.join(dest_dir, f"{time.strftime('%Y%m%d-%H%M%S')}-{name}")
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.copyfile(tmp_path, tmp)
    os.replace(tmp, dest)
    return dest
