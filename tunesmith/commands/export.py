"""`tunesmith export --adapters CKPT --merge_lora true`: merge LoRA adapters into the base weights and write a
normal Hugging Face model directory (sharded safetensors, or PyTorch .bin shards with --safe_serialization false;
config, generation config, tokenizer with its chat template, and an args.json so that infer/deploy on the merged
model keep the run's system prompt).

The merge always goes into the unquantised base (a QLoRA adapter is merged into the full-precision weights), and
the directory appears only when complete: it is written under a temporary name and renamed.
"""
from __future__ import annotations

import contextlib
import errno
import inspect
import json
import os
import re
import sys

from tunesmith.config.slices import ModelConfig, take
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.models.load import load_for_inference, note
from tunesmith.files import atomic_dir, failed_write, write_json_atomic
from tunesmith.models.checkpoint import resolve_checkpoint, split_named_adapters
from tunesmith.runs.run_dir import save_args


SHARD_SIZE = re.compile(r"^(\d+)(GiB|MiB|KiB|GB|MB|KB)$", re.I)  # what transformers' convert_file_size_to_int reads


def flag_problems(args) -> list[str]:
    """export's flag values, before anything loads: --max_shard_size (a whole number of at least 1 and a unit, as
    transformers reads it) and --output_dir (a folder that can be written)."""
    from tunesmith.files import unwritable

    out = []
    size = SHARD_SIZE.match(str(args.max_shard_size).strip())
    if not size or int(size.group(1)) < 1:
        out.append(f"--max_shard_size {args.max_shard_size}: expected a whole number of at least 1 and a unit, "
                   f"e.g. 5GB, 500MB or 2GiB")
    if args.output_dir is not None:
        why = unwritable(args.output_dir, folder=True)
        if why:
            out.append(f"--output_dir {args.output_dir}: {why}")
    return out


def main(args):
    """`tunesmith export`: merge --adapters into the base weights and write the model folder. Returns 0. Raises
    FlagError (flag values, before anything loads) or ConfigError (nothing to merge, a reward model, the output
    exists)."""
    from tunesmith.inference.flags import check_inference_flags

    check_inference_flags(args, flag_problems(args))
    if not args.merge_lora:
        raise ConfigError("tunesmith export merges LoRA adapters: pass --adapters CKPT --merge_lora true "
                          "(quantised export, ollama and mcore conversion are not supported yet)")
    args, _ = resolve_checkpoint(args)
    adapters, named = split_named_adapters(list(args.adapters))
    if named:
        raise ConfigError("--adapters name=path pairs are for deploy; export merges plain adapter paths")
    if not adapters:
        raise ConfigError("--merge_lora true needs --adapters CKPT (the LoRA checkpoint to merge)")
    out = os.path.abspath(args.output_dir or os.path.abspath(adapters[0]).rstrip(os.sep) + "-merged")
    if os.path.exists(out) and not args.exist_ok:
        raise ConfigError(f"{out} already exists; pass --exist_ok true to replace it or choose --output_dir")
    if args.quant_method:
        note(f"the adapter was trained on a {args.quant_method} {args.quant_bits}-bit base; it is merged into the "
             f"unquantised weights")
    model, tok, model_dir = load_for_inference(take(ModelConfig, args), adapters, merge=True, quantise=False)
    with _write_refused(out), atomic_dir(out) as tmp:
        try:
            save_weights(model, tmp, args.safe_serialization, args.max_shard_size)
            tok.save_pretrained(tmp)
            # the settings the adapter's args.json passed on (resolve_checkpoint: template, system, enable_thinking,
            # ...) stay with the merged model; local paths absolute, as training records them
            save_args(tmp, args, {"model": out, "adapters": [], "train_type": "full", "quant_method": None,
                                  "merged_from": {"model": args.model, "model_dir": model_dir,
                                                  "adapters": [os.path.abspath(a) for a in adapters]}})
        except Exception as e:  # noqa: BLE001 - torch / safetensors word a full disk their own way
            failed = failed_write(e, out, tmp)  # the free space read before the partial folder is removed
            if failed is None:
                raise
            raise failed from e
    print(f"[tunesmith] export: merged {', '.join(adapters)} into {args.model} -> {out}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _write_refused(out: str):
    """A write the disk refused while the merged model is written becomes one message (nothing half-written is
    left: the folder is renamed into place only when complete)."""
    try:
        yield
    except OSError as e:
        why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}.get(e.errno, e.strerror)
        raise TunesmithError(f"could not write the merged model ({out}): {why}; nothing was left half-written. "
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
