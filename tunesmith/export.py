"""`tunesmith export --adapters CKPT --merge_lora true`: merge LoRA adapters into the base weights and write a
normal Hugging Face model directory (sharded safetensors, config, generation config, tokenizer with its chat
template, and an args.json so that infer/deploy on the merged model keep the run's system prompt).

The merge always goes into the unquantised base (a QLoRA adapter is merged into the full-precision weights), and
the directory appears only when complete: it is written under a temporary name and renamed.
"""
from __future__ import annotations

import os
import sys

from tunesmith.args import to_record
from tunesmith.errors import ConfigError
from tunesmith.model import load_for_inference, note
from tunesmith.runs import atomic_dir, resolve_checkpoint, split_named_adapters, write_json_atomic


def main(args):
    if not args.merge_lora:
        raise ConfigError("tunesmith export merges LoRA adapters: pass --adapters CKPT --merge_lora true "
                          "(quantised export, ollama and mcore conversion are not supported yet)")
    resolve_checkpoint(args)
    adapters, named = split_named_adapters(list(args.adapters))
    if named:
        raise ConfigError("--adapters name=path pairs are for deploy; export merges plain adapter paths")
    if not adapters:
        raise ConfigError("--merge_lora true needs --adapters CKPT (the LoRA checkpoint to merge)")
    out = args.output_dir or os.path.abspath(adapters[0]).rstrip(os.sep) + "-merged"
    if os.path.exists(out) and not args.exist_ok:
        raise ConfigError(f"{out} already exists; pass --exist_ok true to replace it or choose --output_dir")
    if args.quant_method:
        note(f"the adapter was trained on a {args.quant_method} {args.quant_bits}-bit base; it is merged into the "
             f"unquantised weights")
    model, tok, model_dir = load_for_inference(args, adapters, merge=True, quantise=False)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=args.safe_serialization, max_shard_size=args.max_shard_size)
        tok.save_pretrained(tmp)
        record = to_record(args)
        record.update(model=out, adapters=[], train_type="full", quant_method=None, merged_from={
            "model": args.model, "model_dir": model_dir, "adapters": adapters})
        write_json_atomic(os.path.join(tmp, "args.json"), record)
    print(f"[tunesmith] export: merged {', '.join(adapters)} into {args.model} -> {out}", file=sys.stderr)
    return 0
