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
from tunesmith.config.parser import given_flags, looks_like_system_file
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


# Keys a checkpoint's args.json fills when the command line (or a config file) did not give them (ms-swift's
# load_args, §2): the base model and how it loads, and every setting that shapes the prompt (template, system,
# enable_thinking, ...), so that a model is served as it was trained. Flags given win, even when they equal the default.
INHERITED_KEYS = ("model", "model_revision", "torch_dtype", "attn_impl", "system", "max_model_len", "quant_method",
                  "quant_bits", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
                  "template", "enable_thinking", "use_chat_template", "truncation_strategy")


def _is_named(adapter: str) -> bool:
    """Whether an --adapters value is a `name=path` pair (an existing path with "=" in it stays a path)."""
    return "=" in adapter and not os.path.exists(adapter)


def split_named_adapters(adapters: list[str]) -> tuple[list[str], dict[str, str]]:
    """deploy's `name=path` pairs -> (plain paths, {name: path}). named_adapter_problems finds the pairs this
    cannot split faithfully (an empty name or path, a name given twice)."""
    plain, named = [], {}
    for a in adapters:
        if _is_named(a):
            name, _, path = a.partition("=")
            named[name] = path
        else:
            plain.append(a)
    return plain, named


def named_adapter_problems(adapters: list[str], base_name: Optional[str] = None) -> list[str]:
    """The problems of deploy's `--adapters name=path` pairs, one line each, found before anything loads: an
    empty name or path, a name given twice (the later pair would silently replace the earlier), a name equal to
    base_name (the base model's served name, when it is known: the pair would hide the base model)."""
    out, seen = [], {}
    for a in adapters:
        if not _is_named(a):
            continue
        name, _, path = a.partition("=")
        if not name.strip():
            out.append(f"--adapters {a}: the adapter's name is empty; write NAME=PATH (e.g. sql={path or 'CKPT'})")
        elif not path:
            out.append(f"--adapters {a}: no path after the name; write {name}=PATH (the adapter's checkpoint)")
        elif name in seen:
            out.append(f"--adapters {seen[name]} {a}: the name {name!r} is given twice; give each adapter its own "
                       f"name (a request chooses the adapter by this name)")
        elif base_name is not None and name == base_name:
            out.append(f"--adapters {a}: {name!r} is also the base model's served name; rename the adapter "
                       f"(or pass --served_model_name with another name for the base)")
        seen.setdefault(name, a)
    return out


# the peft_type in adapter_config.json of each --train_type saved as a peft adapter (peft 0.17 renamed Bone to
# MiSS; ms-swift's `from peft import BoneConfig` fails on peft 0.21)
PEFT_TYPES = {"lora": "LORA", "adalora": "ADALORA", "vera": "VERA", "boft": "BOFT", "fourierft": "FOURIERFT",
              "bone": "MISS"}
# peft adapters that add virtual tokens or prompts rather than a weight update: peft cannot merge them
_PROMPT_TYPES = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT"}


def adapter_config(path: str) -> dict:
    """The adapter_config.json of an adapter folder (or of its default/ subfolder); {} when unreadable."""
    for where in (path, os.path.join(path, "default")):
        try:
            with open(os.path.join(where, "adapter_config.json"), encoding="utf-8") as fh:
                config = json.load(fh)
            return config if isinstance(config, dict) else {}
        except (OSError, ValueError):
            continue
    return {}


def adapter_problem(path: str, flag: str = "--adapters", train_type: Optional[str] = None,
                    merge: bool = False) -> Optional[str]:
    """Why the adapter folder `path` cannot be used as asked, or None: an ms-swift adapter in its own format (LLaMA-Pro,
    Adapter, ReFT: `swift_type`), which peft cannot load; with train_type, an adapter of another tuner than
    --train_type (training continues the adapter's own tuner); with merge, a prompt-learning adapter, which peft
    cannot merge into the weights."""
    config = adapter_config(path)
    swift = config.get("swift_type")
    if swift:
        return (f"{flag} {path}: an ms-swift {swift} adapter, saved in ms-swift's own format, which peft cannot load; "
                f"merge it with ms-swift (swift export --adapters {path} --merge_lora true) and pass the merged "
                f"folder with --model")
    kind = config.get("peft_type")
    if train_type and kind and PEFT_TYPES.get(train_type) != kind:
        ours = next((t for t, k in PEFT_TYPES.items() if k == kind), None)
        return (f"{flag} {path}: a {kind} adapter, but --train_type is {train_type}; training continues an adapter "
                f"with its own tuner" + (f": pass --train_type {ours}" if ours else ", which tunesmith does not train"))
    if merge and kind in _PROMPT_TYPES:
        return (f"{flag} {path}: a {kind} adapter, which adds virtual tokens rather than a weight update, so peft "
                f"cannot merge it into the model; serve it unmerged (tunesmith infer/deploy --adapters {path})")
    return None


def _trained_on(path: str, config: dict) -> Optional[str]:
    """The base model an adapter was trained on: its args.json's model, else peft's base_model_name_or_path."""
    try:
        with open(os.path.join(path, "args.json"), encoding="utf-8") as fh:
            model = json.load(fh).get("model")
    except (OSError, ValueError, AttributeError):
        model = None
    return model or config.get("base_model_name_or_path") or None


def _same_model(a: str, b: str) -> bool:
    """Whether two model references name the same model: the same folder, or (a hub id and its download, or two
    hub ids) the same model name."""
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return model_suffix(a) == model_suffix(b)


def side_by_side_problems(named: dict[str, str]) -> list[str]:
    """Why deploy's named adapters {name: path} cannot be served side by side in one model, one line each (empty
    when they can). Each request picks its adapter per row of a shared batch (peft's adapter_names), so every
    adapter must be a causal-LM LoRA on the same base, must not change weights the others share (LoRA bias
    training writes the base model's own biases), and must be neither DoRA, LoRA on raw parameters nor another peft
    tuner (AdaLoRA, VeRA, ...: peft chooses none of them per row). Different ranks, alphas, target modules and
    modules_to_save are fine."""
    out, bases = [], {}
    alone = "serve it on its own: --adapters {path} (no name=)"
    for name, path in named.items():
        config, pair = adapter_config(path), f"--adapters {name}={path}"
        if config.get("task_type") == "SEQ_CLS":
            out.append(f"{pair}: a reward model (--rlhf_type rm, a score head): it scores text and cannot "
                       f"generate; deploy serves generation adapters only")
        elif config.get("peft_type", "LORA") != "LORA":
            out.append(f"{pair}: an adapter of peft type {config['peft_type']}; peft chooses only LoRA adapters "
                       f"per request beside other adapters, so " + alone.format(path=path) + ", or merge it with "
                       f"export --merge_lora true")
        elif config.get("use_dora"):
            out.append(f"{pair}: a DoRA adapter (--use_dora true), which peft cannot choose per request beside "
                       f"other adapters; " + alone.format(path=path) + ", or merge it with export --merge_lora true")
        elif config.get("target_parameters"):
            out.append(f"{pair}: LoRA on raw parameters (--target_parameters, MoE experts), which peft cannot "
                       f"choose per request beside other adapters; " + alone.format(path=path))
        elif config.get("bias", "none") != "none":
            out.append(f"{pair}: trained with --lora_bias {config['bias']}, which changes the base model's own "
                       f"biases, so every other model served beside it would change too; " + alone.format(path=path))
        base = _trained_on(path, config)
        if base:
            bases.setdefault(base, name)
    if len(bases) > 1:
        first, *rest = bases
        other = next((b for b in rest if not _same_model(first, b)), None)
        if other is not None:
            out.append(f"--adapters: {bases[first]} was trained on {first} but {bases[other]} on {other}; adapters "
                       f"served together must share their base model (deploy each base on its own server)")
    return out


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
            f"or in Python AutoModelForSequenceClassification.from_pretrained({value!r}, num_labels=1) (a "
            f"vision-language one through tunesmith.models.vision.sequence_classifier: docs/vision.md)")


def resolve_checkpoint(args: Checkpointed) -> tuple[Checkpointed, Optional[str]]:
    """Find the base model and settings of `--adapters CKPT` / `--model CKPT` (or ms-swift's `--ckpt_dir CKPT`)
    from the checkpoint's args.json.

    args: a parsed infer, deploy, export or eval command (frozen). Returns (a new frozen command of the same class
    with --ckpt_dir folded into --adapters or --model and the inherited settings filled in, the checkpoint directory
    whose args.json was read or None); args is not changed. Flags always win: a key is inherited only when neither
    the command line nor a config file gave it (config.parser.given_flags), and what was inherited is printed.
    Raises ConfigError for adapters that are not adapter folders, a diverged checkpoint, a reward model
    (reward_model_problem), no base model, or a base model folder the args.json records that no longer exists."""
    import sys

    from tunesmith.errors import ConfigError

    given = set(given_flags(args))
    if args.ckpt_dir:
        if is_adapter_dir(args.ckpt_dir):
            args = dataclasses.replace(args, adapters=[args.ckpt_dir] + list(args.adapters))
            given.add("adapters")
        elif not args.model:
            args = dataclasses.replace(args, model=args.ckpt_dir)
            given.add("model")
    plain, named = split_named_adapters(list(args.adapters))
    for path in plain + list(named.values()):
        if not os.path.isdir(path):
            raise ConfigError(f"--adapters {path}: no such directory")
        if not is_adapter_dir(path):
            raise ConfigError(f"--adapters {path}: this is a full model checkpoint, not a LoRA adapter (no "
                              f"adapter_config.json); pass it with --model {path}")
    for flag, path in [("--adapters", p) for p in plain + list(named.values())] + [("--model", args.model)]:
        problem = diverged_problem(path, flag) or reward_model_problem(flag, path) or \
            (adapter_problem(path, flag) if flag == "--adapters" else None)
        if problem:
            raise ConfigError(problem)
    if args.model and os.path.isdir(args.model) and is_adapter_dir(args.model):
        raise ConfigError(f"--model {args.model}: this is a LoRA adapter, not a model; pass it with "
                          f"--adapters {args.model} (the base model is read from its args.json)")
    candidates = plain + list(named.values()) + ([args.model] if args.model else [])
    ckpt = next((c for c in candidates if os.path.isfile(os.path.join(c, "args.json"))), None)
    if ckpt is None or not args.load_args:
        if not args.model and plain + list(named.values()):
            first = (plain + list(named.values()))[0]
            raise ConfigError(f"--adapters {first} has no args.json naming its base model (it was not saved by "
                              f"tunesmith or ms-swift training): pass the base model with --model BASE")
        if not args.model:
            raise ConfigError("pass the model with --model, or a checkpoint with --adapters (its args.json names "
                              "the base model)")
        return args, ckpt
    with open(os.path.join(ckpt, "args.json"), encoding="utf-8") as fh:
        saved = json.load(fh)
    current = flag_values(args)  # a value equal to the one this command has already changes nothing: not said
    inherited = {key: saved[key] for key in INHERITED_KEYS
                 if key in saved and key not in given and saved[key] not in (None, [], "", "<redacted>")
                 and saved[key] != current.get(key)}
    if "system" in inherited:
        inherited["system"] = _saved_system(saved["system"], ckpt)
    if "model" in inherited:
        inherited["model"] = _saved_model(saved, ckpt)
    if inherited:
        said = [f"{key}={value!r}" if key != "system" else "system" for key, value in inherited.items()]
        print(f"[tunesmith] from {os.path.join(ckpt, 'args.json')}: {', '.join(said)}", file=sys.stderr)
        args = dataclasses.replace(args, **inherited)
    if not args.model:
        raise ConfigError(f"{ckpt}/args.json names no base model; pass it with --model")
    return args, ckpt


def _saved_model(saved: dict, ckpt: str) -> str:
    """The base model an args.json names, as a path that opens from here. tunesmith records a local model folder
    absolute (and the directory training ran in, `working_dir`); an args.json from before it did may hold a path
    relative to wherever training ran: found again from `working_dir`, or from `model_dir` (the folder training
    resolved it to). A local folder that no longer exists raises ConfigError naming it and --model, rather than
    being taken for a hub id; a hub id is returned as it is."""
    model = saved["model"]
    if os.path.isdir(model):
        return model
    places = []
    if not os.path.isabs(model):
        if isinstance(saved.get("working_dir"), str):
            places.append(os.path.join(saved["working_dir"], model))
        if _resolved_from(saved.get("model_dir"), model):
            places.append(saved["model_dir"])
    found = next((p for p in places if os.path.isdir(p)), None)
    if found:
        return os.path.normpath(found)
    if _was_local(model, saved):
        from tunesmith.errors import ConfigError

        where = model if os.path.isabs(model) else f"{model} (relative to where training ran" + (
            f", {saved['working_dir']}" if isinstance(saved.get("working_dir"), str) else "") + ")"
        raise ConfigError(f"{os.path.join(ckpt, 'args.json')}: the base model folder it records, {where}, was not "
                          f"found (moved or deleted?); pass --model with the base model's folder or hub id")
    return model


def _resolved_from(model_dir, model: str) -> bool:
    """Whether an args.json's `model_dir` (the absolute folder training loaded) is the local path `model` resolved,
    and not a hub cache's folder for a hub id: a Hugging Face snapshot or ModelScope's cache."""
    if not isinstance(model_dir, str) or not os.path.isabs(model_dir):
        return False
    tail = os.sep + os.path.normpath(model).lstrip(os.sep)
    return os.path.normpath(model_dir).endswith(tail) and "models--" not in model_dir and \
        "modelscope" not in model_dir.lower()


def _was_local(model: str, saved: dict) -> bool:
    """Whether an args.json's `model` was a local folder when training ran (else a hub id): an absolute or ./ path,
    or, in an args.json from before local models were recorded absolute, one that `model_dir` says was resolved
    locally."""
    if os.path.isabs(model) or model.startswith((".", "~")):
        return True
    return "working_dir" not in saved and _resolved_from(saved.get("model_dir"), model)
