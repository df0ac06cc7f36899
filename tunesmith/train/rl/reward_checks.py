"""Checks of GRPO's and PPO's --reward_model, --reward_adapters and --reward_model_type that read files only (no
model is loaded), so that a wrong path, an adapter trained on another model or an unknown model type is one clear
flag error before the policy loads (reward_models.spec_problems runs them), and again once a hub id is downloaded.

`missing_path_problem`: a --reward_model that is no local folder — a file, a path that looks local (./x, out/
checkpoint-100, a/b/c, a name ending .py/.json/…), or neither a path nor a hub id (org/name). `adapter_problems`:
a --reward_adapters folder that does not exist or holds no adapter_config.json. `adapter_fit_problem`: an adapter
whose adapter_config.json names a base model (readable here) of other dimensions than the reward model's.
`model_type_problem`: a --reward_model_type no family of ms-swift's or transformers' model types has.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from typing import Optional

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# file names a hub id never ends with: a path to a file, not a model
_FILE_SUFFIXES = (".py", ".json", ".jsonl", ".yaml", ".yml", ".txt", ".bin", ".pt", ".pth", ".safetensors", ".gguf",
                  ".csv", ".parquet", ".sh")
# the dimensions an adapter's weights are shaped by: a base that differs in one cannot take them
_DIMS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
         "num_key_value_heads", "vocab_size")


def read_json(path: str) -> dict:
    """The JSON object in `path`, or {} when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def looks_local(path: str) -> bool:
    """Whether `path` (not an existing folder) names a local path rather than a hub id (org/name): it starts with
    ., / or ~, has no / or more than one, its first part is a local folder, its last part is checkpoint-N, or it
    ends like a file (.py, .json, .safetensors, …)."""
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        return True
    first, name = path.split("/")
    return (os.path.isdir(first) or re.fullmatch(r"checkpoint-\d+", name) is not None
            or name.lower().endswith(_FILE_SUFFIXES))


def missing_path_problem(path: str, flag: str = "--reward_model") -> Optional[str]:
    """Why `path`, which is no local folder, cannot be a reward model, or None when it can be a hub id."""
    if os.path.isfile(path):
        return (f"{flag} {path}: a file, not a checkpoint directory; pass the folder that holds the model "
                f"(config.json, or adapter_config.json: a checkpoint-N of a --rlhf_type rm run), or a hub id "
                f"(org/name)")
    if looks_local(path) or not _HUB_ID.fullmatch(path):
        parent = os.path.dirname(path.rstrip("/"))
        where = f"; {parent} holds no folder of that name" if parent and os.path.isdir(parent) else ""
        return (f"{flag} {path}: not a local checkpoint directory (no such folder{where}), nor a hub id "
                f"(org/name); check the path (train one with --rlhf_type rm)")
    return None


def adapter_problems(adapters, flag: str = "--reward_adapters") -> list:
    """One message per adapter folder that does not exist or is not a LoRA adapter (no adapter_config.json)."""
    problems = []
    for adapter in adapters:
        if not os.path.exists(adapter):
            problems.append(f"{flag} {adapter}: no such directory; pass the checkpoint-N folder of a LoRA "
                            f"--rlhf_type rm run")
        elif not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            problems.append(f"{flag} {adapter}: no adapter_config.json in it, so it is not a LoRA adapter (pass a "
                            f"checkpoint-N folder of a LoRA run)")
    return problems


def _dims(folder: str) -> dict:
    """The shape-deciding entries of a local model folder's config.json (a vision-language model's text part
    included), or {} when there is none."""
    config = read_json(os.path.join(folder, "config.json"))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    merged = {**config, **text}
    return {k: merged[k] for k in _DIMS if k in merged}


def model_base(folder: str) -> str:
    """The folder whose weights a reward-model folder starts from: itself, or for a LoRA adapter folder (no
    config.json) the base_model_name_or_path of its adapter_config.json."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    base = read_json(os.path.join(folder, "adapter_config.json")).get("base_model_name_or_path")
    return base or folder


def adapter_fit_problem(adapter: str, model: str, shown: Optional[str] = None,
                        flag: str = "--reward_adapters") -> Optional[str]:
    """Why the LoRA adapter cannot go onto the reward model in the local folder `model` (shown as `shown`): its
    adapter_config.json names a base model, readable here, whose dimensions (hidden_size, layers, vocabulary, …)
    differ from the reward model's; None when they agree or cannot be read (the loader then says it)."""
    base = read_json(os.path.join(adapter, "adapter_config.json")).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        return None
    theirs, ours = _dims(base), _dims(model_base(model))
    diff = [(k, theirs[k], ours[k]) for k in _DIMS if k in theirs and k in ours and theirs[k] != ours[k]]
    if not diff:
        return None
    key, a, b = diff[0]
    shown = shown or model
    return (f"{flag} {adapter} was trained on {base}, not {shown} ({key} {a} there, {b} here): pass the model it "
            f"was trained on as --reward_model, or an adapter trained on {shown}")


def known_model_types() -> list:
    """ms-swift's model-type names tunesmith knows (its template names: qwen2_5, qwen3, llama3_1, …) and
    transformers' model types (config.json's model_type)."""
    from tunesmith.data.tiny_tokenizer import TEMPLATE_FAMILIES

    names = set(TEMPLATE_FAMILIES)
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        names |= set(CONFIG_MAPPING_NAMES)
    except ImportError:  # transformers is a dependency; without it only ms-swift's names are known
        pass
    return sorted(names)


def _family(name: str) -> str:
    """A model type's family: its leading letters (qwen2_5_vl → qwen, llama3_1 → llama)."""
    match = re.match(r"[a-z]+", name.lower())
    return match.group() if match else name.lower()


def model_type_problem(value: str, flag: str = "--reward_model_type") -> Optional[str]:
    """Why `value` is not a model type, as ms-swift refuses an unknown one, or None: a known name, or one of a
    known family (ms-swift has more types than tunesmith lists, e.g. qwen2_5_math, all of a known family)."""
    from tunesmith.data.tiny_tokenizer import TEMPLATE_FAMILIES

    known = known_model_types()
    if value.lower() in known or _family(value) in {_family(k) for k in known}:
        return None

    near = difflib.get_close_matches(value.lower(), known, n=3)
    shown = sorted(n for n in TEMPLATE_FAMILIES if n != "chatml" and "-" not in n)  # model types, not templates
    return (f"{flag} {value}: not a model type" + (f"; did you mean {', '.join(near)}?" if near else "")
            + f"; ms-swift's types include {', '.join(shown)} (and transformers' config.json model_type names); or "
              f"leave it out: the architecture is read from the reward model's config.json")
