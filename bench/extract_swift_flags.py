"""Write tests/fixtures/ms_swift_flags.json: every command-line flag of ms-swift, per command.

Run from the repository root with the ms-swift venv (ms-swift 4.6 installed there):

    bench/.venv-swift/bin/python bench/extract_swift_flags.py

The flags are read from ms-swift itself: each command's argument dataclass is turned into the
transformers.HfArgumentParser that `swift <command>` parses with (swift.utils.parse_args), and every option string
of that parser is a flag. Names are written with underscores (argparse also accepts the dashed spelling of each,
and so does tunesmith). Left out: `-h/--help` and the `--no_<flag>` negations that HfArgumentParser adds for each
boolean flag that defaults to true (argparse machinery, not flags of their own; `--flag false` says the same).
Kept: every `aliases` entry of a field's metadata (ms-swift 4.6 declares none) and the compatibility fields that
ms-swift keeps as ordinary fields (custom_register_path, response_length, rlhf's max_new_tokens, to_peft_format).

ms-swift 4.x dropped some 3.x names without a compatibility mapping; the 3.x names that the seed tutorials
(../shared/seeds) use with `swift <command>` are added from SWIFT3_SEED_FLAGS below. When the seeds folder exists,
every flag of every `swift <command>` line in it is checked to be in the table.

Output: {command: [flag, ...]}, keys and lists sorted, so that a re-run shows a reviewable diff.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

COMMANDS = {  # `swift <command>` -> its argument dataclass in swift.arguments (ms-swift 4.6 names)
    "sft": "SftArguments",
    "rlhf": "RLHFArguments",
    "infer": "InferArguments",
    "export": "ExportArguments",
    "deploy": "DeployArguments",
    "eval": "EvalArguments",
    "app": "AppArguments",
    "rollout": "RolloutArguments",
}

# ms-swift 3.x names the seed tutorials pass (ms-swift 3.7) that 4.6 no longer accepts: command -> names.
SWIFT3_SEED_FLAGS = {
    "sft": ["train_type"],        # 4.x: tuner_type
    "rlhf": ["train_type"],
    "export": ["ckpt_dir"],       # 2.x/3.x: the checkpoint (adapter or full model)
    "deploy": ["model_dir", "tp", "cache_max_entry_count", "session_len"],  # 3.x: the model; LMDeploy names
}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "ms_swift_flags.json")
SEEDS = os.path.join(os.path.dirname(REPO), "shared", "seeds")


def parser_flags(cls) -> set[str]:
    """The flag names (underscored, no leading --) that HfArgumentParser([cls]) accepts."""
    from transformers import HfArgumentParser

    try:  # ms-swift parses under this patch (string annotations); fall back to the plain parser without it
        from swift.utils.utils import _patch_get_type_hints
    except ImportError:  # pragma: no cover - other ms-swift layouts
        import contextlib
        _patch_get_type_hints = contextlib.nullcontext
    with _patch_get_type_hints():
        parser = HfArgumentParser([cls])
    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            if not option.startswith("--"):
                continue
            name = option[2:].replace("-", "_")
            if isinstance(action, argparse._StoreFalseAction) and name == f"no_{action.dest}":
                continue  # the --no_<flag> negation of a boolean flag that defaults to true
            names.add(name)
    return names


def seed_flags() -> dict[str, set[str]]:
    """{command: flags} of every `swift <command> ...` line (with its backslash continuations) in the seeds."""
    out: dict[str, set[str]] = {}
    for path in sorted(glob.glob(os.path.join(SEEDS, "*"))):
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        i = 0
        while i < len(lines):
            m = re.search(r"\bswift\s+([a-z][a-z_-]*)", lines[i])
            if not m or m.group(1) not in COMMANDS:
                i += 1
                continue
            command, block = m.group(1), [lines[i][m.end():]]
            while re.search(r"\\\s*(#.*)?$", lines[i]) and i + 1 < len(lines):
                i += 1
                block.append(lines[i])
            i += 1
            text = " ".join(re.sub(r"\s#\s.*$", "", b) for b in block)
            out.setdefault(command, set()).update(
                f.replace("-", "_") for f in re.findall(r"(?<![\w-])--([A-Za-z][\w-]*)", text))
    return out


def main() -> int:
    import swift
    import swift.arguments as arguments

    table: dict[str, list[str]] = {}
    for command, cls_name in COMMANDS.items():
        names = parser_flags(getattr(arguments, cls_name))
        names.update(SWIFT3_SEED_FLAGS.get(command, ()))
        table[command] = sorted(names)
    missing = {c: sorted(f - set(table.get(c, ()))) for c, f in seed_flags().items() if c in table}
    missing = {c: f for c, f in missing.items() if f}
    if missing:
        print(f"seed flags not in the table (add them to SWIFT3_SEED_FLAGS): {missing}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=1, sort_keys=True)
        fh.write("\n")
    counts = ", ".join(f"{c} {len(v)}" for c, v in table.items())
    print(f"ms-swift {swift.__version__}: wrote {OUT} ({counts}; "
          f"{len(set().union(*map(set, table.values())))} distinct)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
