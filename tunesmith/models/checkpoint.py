"""Checkpoints as models: which folders are adapters, named adapters (`name=path`), the settings a checkpoint passes
on to inference (args.json; `resolve_checkpoint` returns a new frozen command with them), and whether a checkpoint
diverged."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional, TypeVar

from tunesmith.config.commands import EvalArguments, ExportArguments, InferArguments
from tunesmith.config.parser import looks_like_system_file
from tunesmith.config.slices import flag_values

# a parsed infer (deploy's is one), export or eval command: each has the checkpoint, model, quantisation and
# template flags that resolve_checkpoint reads and fills
Checkpointed = TypeVar("Checkpointed", InferArguments, ExportArguments, EvalArguments)


def model_suffix(model: str) -> str:
    """ms-swift's get_model_name: the last path component; HF cache dirs unwrapped; '___' -> '.'."""
    name = os.path.basename(os.path.normpath(model))
    if name.startswith("models--"):
        name = name.split("--")[-1]
    if re.fullmatch(r"[0-9a-f]{40}", name):  # a snapshots/<sha> directory
        parts = os.path.normpath(model).split(os.sep)
        for p in reversed(parts):
            if p.startswith("models--"):
                name = p.split("--")[-1]
                break
    return name.replace("___", ".")


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json")) or \
        os.path.isfile(os.path.join(path, "default", "adapter_config.json"))


# Keys a checkpoint's args.json fills when the command line left them empty (ms-swift's load_args, §2); flags win.
INHERITED_KEYS = ("model", "model_revision", "torch_dtype", "attn_impl", "system", "max_model_len", "quant_method",
                  "quant_bits", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
                  "use_chat_template", "truncation_strategy")


def split_named_adapters(adapters: list[str]) -> tuple[list[str], dict[str, str]]:
    """deploy's `name=path` pairs -> (plain paths, {name: path})."""
    plain, named = [], {}
    for a in adapters:
        name, sep, path = a.partition("=")
        if sep and name and not os.path.exists(a):
            named[name] = path
        else:
            plain.append(a)
    return plain, named


def _saved_system(value: str, ckpt: str) -> str:
    """The system prompt an args.json holds. tunesmith saves the text; an args.json from before it did may hold the
    --system file's path, relative to wherever training ran. Read it if it is there, else raise ConfigError: the
    path itself must not become the system prompt."""
    if not looks_like_system_file(value):
        return value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            return fh.read()
    from tunesmith.errors import ConfigError

    raise ConfigError(f"{os.path.join(ckpt, 'args.json')}: system is the path of the training run's --system file "
                      f"({value!r}, saved by an older tunesmith) and it does not exist from {os.getcwd()}; pass "
                      f"--system with that file or the prompt text")


def diverged_problem(path: Optional[str], flag: str) -> Optional[str]:
    """The refusal for a checkpoint that training marked diverged.json (its weights gave a non-finite loss), or
    None: merging, serving or training from it would carry the NaN on."""
    marker = os.path.join(path, "diverged.json") if path and os.path.isdir(path) else None
    if not marker or not os.path.isfile(marker):
        return None
    try:
        with open(marker, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        info = {}
    good = info.get("last_good_checkpoint")
    return (f"{flag} {path}: its weights gave a non-finite loss at step {info.get('step', '?')} (diverged.json); "
            f"use " + (good if good else "an earlier checkpoint") + " instead")


def _reward_model_kind(folder: str) -> Optional[str]:
    """What makes `folder` a reward model (a score head, no text generation), or None: a peft SEQ_CLS adapter
    (--rlhf_type rm with LoRA), or a model whose config.json names a *ForSequenceClassification architecture
    (--rlhf_type rm with --train_type full, or a hub reward model). Unreadable files are left to the loader."""
    for name in ("adapter_config.json", os.path.join("default", "adapter_config.json"), "config.json"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                config = json.load(fh)
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict):
            continue
        if config.get("task_type") == "SEQ_CLS":
            return "a LoRA adapter with a score head: peft task SEQ_CLS, as --rlhf_type rm saves it"
        arch = next((a for a in config.get("architectures") or [] if str(a).endswith("ForSequenceClassification")),
                    None)
        if arch:
            return f"its config.json names {arch}"
    return None


def reward_model_problem(flag: str, value: str, folder: Optional[str] = None) -> Optional[str]:
    """The refusal of a reward model given to infer, deploy, eval or export as `flag value` (folder: where it lies,
    when that is not `value` itself, e.g. a hub id's download), or None. Every one of them would load it as a
    causal LM, dropping the trained score head and generating text from the bare backbone."""
    folder = folder or value
    kind = _reward_model_kind(folder) if folder and os.path.isdir(folder) else None
    if kind is None:
        return None
    return (f"{flag} {value} is a reward model ({kind}): it scores replies and does not generate text, and "
            f"loading it as a causal LM (to generate from, or to merge) would drop its trained score head, so it is "
            f"not loaded. Use it where rewards are scored: `tunesmith rlhf --rlhf_type grpo --reward_model {value}`, "
            f"or in Python AutoModelForSequenceClassification.from_pretrained({value!r}, num_labels=1)")


def resolve_checkpoint(args: Checkpointed) -> tuple[Checkpointed, Optional[str]]:
    """Find the base model and settings of `--adapters CKPT` / `--model CKPT` (or ms-swift's `--ckpt_dir CKPT`)
    from the checkpoint's args.json.

    args: a parsed infer, deploy, export or eval command (frozen). Returns (a new frozen command of the same class
    with --ckpt_dir folded into --adapters or --model and the inherited settings filled in, the checkpoint directory
    whose args.json was read or None); args is not changed. Flags always win: a key is inherited only when the
    command line left it empty, and what was inherited is printed. Raises ConfigError for adapters that are not
    adapter folders, a diverged checkpoint, a reward model (reward_model_problem), or no base model."""
    import sys

    from tunesmith.errors import ConfigError

    if args.ckpt_dir:
        if is_adapter_dir(args.ckpt_dir):
            args = dataclasses.replace(args, adapters=[args.ckpt_dir] + list(args.adapters))
        elif not args.model:
            args = dataclasses.replace(args, model=args.ckpt_dir)
    plain, named = split_named_adapters(list(args.adapters))
    for path in plain + list(named.values()):
        if not os.path.isdir(path):
            raise ConfigError(f"--adapters {path}: no such directory")
        if not is_adapter_dir(path):
            raise ConfigError(f"--adapters {path}: this is a full model checkpoint, not a LoRA adapter (no "
                              f"adapter_config.json); pass it with --model {path}")
    for flag, path in [("--adapters", p) for p in plain + list(named.values())] + [("--model", args.model)]:
        problem = diverged_problem(path, flag) or reward_model_problem(flag, path)
        if problem:
            raise ConfigError(problem)
    if args.model and os.path.isdir(args.model) and is_adapter_dir(args.model):
        raise ConfigError(f"--model {args.model}: this is a LoRA adapter, not a model; pass it with "
                          f"--adapters {args.model} (the base model is read from its args.json)")
    candidates = plain + list(named.values()) + ([args.model] if args.model else [])
    ckpt = next((c for c in candidates if os.path.isfile(os.path.join(c, "args.json"))), None)
    if ckpt is None or not args.load_args:
        if not args.model:
            raise ConfigError("pass the model with --model, or a checkpoint with --adapters (its args.json names "
                              "the base model)")
        return args, ckpt
    with open(os.path.join(ckpt, "args.json"), encoding="utf-8") as fh:
        saved = json.load(fh)
    given = flag_values(args)
    inherited = {key: _saved_system(saved[key], ckpt) if key == "system" else saved[key] for key in INHERITED_KEYS
                 if key in saved and given[key] in (None, [], "") and saved[key] not in (None, [], "", "<redacted>")}
    if inherited:
        said = [f"{key}={saved[key]!r}" if key != "system" else "system" for key in inherited]
        print(f"[tunesmith] from {os.path.join(ckpt, 'args.json')}: {', '.join(said)}", file=sys.stderr)
        args = dataclasses.replace(args, **inherited)
    if not args.model:
        raise ConfigError(f"{ckpt}/args.json names no base model; pass it with --model")
    return args, ckpt
