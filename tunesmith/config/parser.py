"""The parser: command lines, YAML/JSON config files and a saved args.json into a command's frozen dataclass
(tunesmith.config.commands); `tunesmith COMMAND --help`; and back to the record args.json holds (`to_record`).

Parsing follows the semantics of transformers' HfArgumentParser that ms-swift scripts rely on (`--flag
true|false`, a bare `--flag` meaning true, space-separated lists, JSON dicts, unique prefixes), but is implemented
here on the standard library only: this module must import in milliseconds so that `tunesmith --help` and argument
errors answer at once. ms-swift's flags that tunesmith lacks are errors with the reason tunesmith.config.swift_compat
gives.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from tunesmith.config.commands import COMMAND_ARGS
from tunesmith.config.swift_compat import (COMPATIBILITY_ONLY, COMPATIBILITY_ONLY_IN, NOT_SUPPORTED_ELSEWHERE,
                                           NOT_SUPPORTED_VALUES, NOT_SUPPORTED_YET, VALUE_ALIASES)


class ArgError(ValueError):
    """A bad command line or config file. The CLI prints it as one line and exits with status 2."""


# ---------------------------------------------------------------- type handling

_TRUE = {"true", "yes", "1", "y", "on"}
_FALSE = {"false", "no", "0", "n", "off"}


def _unwrap(tp) -> tuple[Any, bool]:
    """(inner type, is_list) for Optional[X], List[X], X."""
    origin = typing.get_origin(tp)
    if origin is Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _unwrap(inner[0])
    if origin in (list, List):
        return (typing.get_args(tp) or (str,))[0], True
    return tp, False


def _convert(name: str, inner, raw: Any, source: str):
    if raw is None:
        return None
    if inner is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ArgError(f"{source}--{name}: expected true or false, got {raw!r}")
    if inner is int:
        if isinstance(raw, bool):
            raise ArgError(f"{source}--{name}: expected an integer, got {raw!r}")
        try:
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            return int(str(raw).strip())
        except ValueError:
            try:
                f = float(str(raw))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
            raise ArgError(f"{source}--{name}: expected an integer, got {raw!r}") from None
    if inner is float:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ArgError(f"{source}--{name}: expected a number, got {raw!r}") from None
    if inner in (dict, Dict) or typing.get_origin(inner) in (dict, Dict):
        if isinstance(raw, dict):
            return raw
        try:
            value = json.loads(raw)
        except (TypeError, json.JSONDecodeError) as e:
            raise ArgError(f"{source}--{name}: expected a JSON object such as '{{\"key\": 1}}', got {raw!r} ({e})") from None
        if not isinstance(value, dict):
            raise ArgError(f"{source}--{name}: expected a JSON object, got {raw!r}")
        return value
    return str(raw) if not isinstance(raw, str) else raw


@dataclass(frozen=True)
class _Field:
    name: str
    inner: Any
    is_list: bool
    choices: tuple
    help: str
    default: Any
    auto: bool = False  # the word `auto` is accepted and means None (tunesmith chooses)


@functools.lru_cache(maxsize=None)
def _fields(cls) -> dict[str, _Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        inner, is_list = _unwrap(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = _Field(f.name, inner, is_list, tuple(f.metadata.get("choices", ())), f.metadata.get("help", ""),
                             default, bool(f.metadata.get("auto")))
    return out


@functools.lru_cache(maxsize=None)
def _aliases(cls) -> dict[str, str]:
    out = {}
    for f in dataclasses.fields(cls):
        for a in f.metadata.get("aliases", ()):
            out[a] = f.name
    return out


def secret_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("secret")}


_OFF_VALUES = {"false", "0", "none", "null", ""}


def _turns_off_unsupported(cls, raw_name: str, vals: list) -> bool:
    """An ms-swift flag tunesmith lacks, set to its off value (`--dynamic_sample false`, `--sleep_level 0`), as
    ms-swift scripts often spell out defaults: it asks for nothing tunesmith does not do, so it is accepted."""
    name = raw_name.replace("-", "_")
    # only features no tunesmith command has: elsewhere "false" can be a real request (--safe_serialization false)
    if name in _fields(cls) or name not in NOT_SUPPORTED_YET:
        return False
    return len(vals) == 1 and (vals[0] is None or vals[0] is False or vals[0] == 0 or
                               (isinstance(vals[0], str) and vals[0].strip().lower() in _OFF_VALUES))


def _resolve_name(cls, command: str, raw_name: str, source: str) -> str:
    name = raw_name.replace("-", "_")
    fields = _fields(cls)
    if name in fields:
        return name
    aliases = _aliases(cls)
    if name in aliases:
        return aliases[name]
    reason = NOT_SUPPORTED_YET.get(name) or NOT_SUPPORTED_ELSEWHERE.get(name)
    if reason:
        where = "" if name in NOT_SUPPORTED_YET else f" in '{command}'"
        raise ArgError(f"{source}--{name} is an ms-swift flag that tunesmith does not support{where} yet: {reason}.")
    # argparse's allow_abbrev, which ms-swift inherits: a unique prefix of a flag name is accepted.
    candidates = [n for n in list(fields) + list(aliases) if n.startswith(name)]
    targets = {aliases.get(c, c) for c in candidates}
    if len(targets) == 1 and len(name) >= 3:
        return targets.pop()
    known = list(fields) + list(aliases)
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" Did you mean --{near[0]}?" if near else ""
    if len(targets) > 1:
        hint = f" It is a prefix of several flags: {', '.join('--' + t for t in sorted(targets))}."
    raise ArgError(f"{source}unknown flag --{name} for 'tunesmith {command}'.{hint} "
                   f"See 'tunesmith {command} --help'.")


def _set_value(cls, values: dict, name: str, raw: Any, source: str):
    spec = _fields(cls)[name]
    if spec.is_list:
        items = raw if isinstance(raw, list) else [raw]
        converted = [_convert(name, spec.inner, v, source) for v in items]
    else:
        if isinstance(raw, list):
            if len(raw) != 1:
                raise ArgError(f"{source}--{name} takes one value, got {len(raw)}: {' '.join(map(str, raw))}")
            raw = raw[0]
        if spec.auto and isinstance(raw, str) and raw.strip().lower() == "auto":
            values[name] = None  # tunesmith chooses (the flag's help says how)
            return
        try:
            converted = _convert(name, spec.inner, raw, source)
        except ArgError:
            if not spec.auto:
                raise
            raise ArgError(f"{source}--{name}: expected auto or an integer, got {raw!r}") from None
        converted = VALUE_ALIASES.get((name, converted), converted) if isinstance(converted, str) else converted
    if spec.choices:
        for v in (converted if spec.is_list else [converted]):
            if v is not None and v not in spec.choices:
                hint = NOT_SUPPORTED_VALUES.get((name, v), "")
                raise ArgError(f"{source}--{name}: {v!r} is not one of {', '.join(map(str, spec.choices))}"
                               + (f" ({hint})" if hint else ""))
    values[name] = converted


# Keys that tunesmith writes into args.json for the record but that are not inputs.
RECORD_ONLY_KEYS = {"tunesmith_version", "model_dir", "output_run_dir", "world_size", "library_versions",
                    "command", "rlhf_type_resolved", "data_stats", "model_parameter_info", "merged_from",
                    "working_dir"}
REDACTED = "<redacted>"


def load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ArgError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml  # small, only needed for YAML configs
            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - re-raised as one clear line
        raise ArgError(f"{path}: cannot parse config file: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgError(f"{path}: a config file must hold a mapping of flag names to values")
    env = data.pop("ENV", None) or data.pop("env", None)
    if env:  # ms-swift 4.x YAML may carry an ENV block; set what is not already set by the caller.
        for k, v in env.items():
            os.environ.setdefault(str(k), str(v))
    return data


def looks_like_system_file(value: Optional[str]) -> bool:
    """ms-swift's rule: a --system value ending in .txt names a file (only one line: a prompt text is never one)."""
    return bool(value) and value.endswith(".txt") and "\n" not in value


def resolve_system(value: Optional[str], source: str = "") -> Optional[str]:
    """--system as every stage uses it: a .txt file's content (verbatim, as ms-swift reads it), else the text with
    literal \\n turned into newlines (shell scripts write it so). A relative path is relative to the working
    directory. Raises ArgError when a .txt value is not an existing file: ms-swift stops there too, and a mistyped
    path must not silently become the system prompt."""
    if value is None:
        return None
    if looks_like_system_file(value):
        if not os.path.isfile(value):
            raise ArgError(f"{source}--system {value}: no such file (from {os.getcwd()}). A value ending in .txt is "
                           f"read as a file: fix the path (or give an absolute one), or pass the prompt text itself")
        with open(value, encoding="utf-8") as fh:
            return fh.read()
    return value.replace("\\n", "\n")


def _split_argv(argv: list[str]) -> tuple[list[tuple[str, list[str], bool]], list[str]]:
    """(flags as (name as written, values, had '=')), positionals) of a command line."""
    flags: list[tuple[str, list[str], bool]] = []
    positionals = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and len(tok) > 2:
            body = tok[2:]
            if "=" in body:
                name, val = body.split("=", 1)
                flags.append((name, [val], True))
                i += 1
                continue
            vals = []
            i += 1
            while i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2):
                vals.append(argv[i])
                i += 1
            flags.append((body, vals, False))
        else:
            positionals.append(tok)
            i += 1
    return flags, positionals


def problems_message(found: list[str]) -> str:
    """One message for every problem found, each once (a single problem is its own message)."""
    found = list(dict.fromkeys(found))  # two checks of one file (a plugin file read for two registries) say it once
    if len(found) == 1:
        return found[0]
    return f"{len(found)} problems with the flags:\n  - " + "\n  - ".join(found)


def deferred_problems(args) -> list[str]:
    """The flag problems `parse_args(..., defer_problems=True)` found (each flag left at its default), for the
    command's own value checks to report together with theirs."""
    return list(getattr(args, "_deferred_problems", ()))


def _set_config_values(cls, command: str, config_path: str, values: dict, found: list) -> None:
    """The config file's values into `values`; each bad key or value appended to `found`."""
    src = f"{config_path}: "
    secrets = secret_fields(cls)
    for key, raw in load_config_file(config_path).items():
        if key in RECORD_ONLY_KEYS or _turns_off_unsupported(cls, str(key), [raw]):
            continue
        try:
            name = _resolve_name(cls, command, str(key), src)
            if name in secrets and raw == REDACTED:
                continue
            _set_value(cls, values, name, raw, src)
        except ArgError as e:
            found.append(str(e))


def _set_flag_values(cls, command: str, flags: list, values: dict, found: list) -> bool:
    """The command line's flags into `values` (over the config file's); each bad flag or value appended to
    `found`. Returns whether --system was given on the command line."""
    system_here = False
    for raw_name, vals, _ in (f for f in flags if not _turns_off_unsupported(cls, f[0], f[1])):
        try:
            name = _resolve_name(cls, command, raw_name, "")
            spec = _fields(cls)[name]
            if not vals:
                if spec.inner is bool and not spec.is_list:
                    vals = ["true"]
                elif not spec.is_list:
                    raise ArgError(f"--{name} needs a value")
            _set_value(cls, values, name, vals, "")
            system_here = system_here or name == "system"
        except ArgError as e:
            found.append(str(e))
    return system_here


def parse_args(command: str, argv: list[str], cls=None, defer_problems: bool = False):
    """Parse `argv` (flags after the subcommand) into the command's dataclass.

    Precedence: dataclass defaults < config file (positional .yaml/.yml/.json or --config) < flags. Every flag
    problem (an unknown flag, a value of the wrong type or not among the flag's choices) is found, and all are raised
    as one ArgError; with `defer_problems` they are kept on the returned arguments instead (`deferred_problems`,
    the flags left at their defaults) so that the command reports them together with its value checks.
    """
    cls = cls or COMMAND_ARGS[command]
    values: dict[str, Any] = {}
    found: list[str] = []
    flags, positionals = _split_argv(list(argv))
    # positional config file (ms-swift: `swift sft x.yaml`)
    k = next((i for i, p in enumerate(positionals) if p.lower().endswith((".yaml", ".yml", ".json"))), None)
    config_path = None if k is None else positionals[k]
    rest_pos = [p for i, p in enumerate(positionals) if i != k]
    cfg_flags = [f for f in flags if f[0].replace("-", "_") == "config"]
    if cfg_flags:
        if not cfg_flags[-1][1]:
            raise ArgError("--config needs a file path")
        config_path = cfg_flags[-1][1][0]
        flags = [f for f in flags if f[0].replace("-", "_") != "config"]
    if config_path:
        _set_config_values(cls, command, config_path, values, found)
    system_src = f"{config_path}: " if "system" in values else ""  # where --system came from, for its error
    if rest_pos:
        if command == "data" and "action" not in values:
            try:
                _set_value(cls, values, "action", rest_pos.pop(0), "")
            except ArgError as e:
                found.append(str(e))
        if rest_pos:
            raise ArgError(f"unexpected argument {rest_pos[0]!r} for 'tunesmith {command}' "
                           f"(flags start with --; a config file ends in .yaml, .yml or .json)")
    if _set_flag_values(cls, command, flags, values, found):
        system_src = ""
    if values.get("system") is not None:
        # read once here, so that no stage (and no args.json) ever sees the path: a checkpoint used from another
        # directory keeps the prompt
        try:
            values["system"] = resolve_system(values["system"], system_src)
        except ArgError as e:
            found.append(str(e))
            del values["system"]
    if found and not defer_problems:
        raise ArgError(problems_message(found))
    try:
        args = cls(**values)
    except TypeError as e:  # pragma: no cover - a programming error, not a user one
        raise ArgError(str(e)) from None
    # the attributes set after construction, here, before anyone sees the object (it is frozen): the flags the
    # user gave (config file or command line), and the problems deferred to the command's own checks
    object.__setattr__(args, "_given_flags", frozenset(values))
    if found:
        object.__setattr__(args, "_deferred_problems", tuple(found))
    return args


def given_flags(args) -> frozenset:
    """The flag names the user set, on the command line or in a config file (ms-swift's rule: what was given wins
    over what a checkpoint's args.json holds), even when the value given equals the default. For arguments that
    did not come from `parse_args` (built directly, or a `dataclasses.replace` copy) the flags whose values differ
    from their defaults."""
    given = getattr(args, "_given_flags", None)
    if given is not None:
        return given
    return frozenset(name for name, spec in _fields(type(args)).items() if getattr(args, name) != spec.default)


def to_record(args) -> dict:
    """The arguments as a JSON-ready dict with every secret redacted (what args.json holds)."""
    secrets = secret_fields(type(args))
    out = {}
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if f.name in secrets and v:
            v = REDACTED
        out[f.name] = v
    return out


def format_help(command: str) -> str:
    """`tunesmith COMMAND --help`: every flag with its type, choices, other names, default and help, then the
    command's compatibility-only flags with why each changes nothing. Raises KeyError for an unknown command."""
    cls = COMMAND_ARGS[command]
    lines = [f"usage: tunesmith {command} [CONFIG.yaml|CONFIG.json] [--flag value ...]", ""]
    doc = (cls.__doc__ or "").strip()
    if doc:
        lines += [doc, ""]
    aliases: dict[str, list[str]] = {}
    for a, target in _aliases(cls).items():
        aliases.setdefault(target, []).append(a)
    scoped = COMPATIBILITY_ONLY_IN.get(command, {})
    for name, spec in _fields(cls).items():
        if name in scoped:  # listed only in the compatibility table below
            continue
        tname = getattr(spec.inner, "__name__", str(spec.inner))
        tname = f"{tname} ..." if spec.is_list else f"{tname}|auto" if spec.auto else tname
        al = f" (also --{', --'.join(aliases[name])})" if name in aliases else ""
        default = " [default: auto]" if spec.auto and spec.default is None else \
            "" if spec.default in (None, [], "") else f" [default: {spec.default}]"
        choices = f" {{{','.join(map(str, spec.choices))}}}" if spec.choices else ""
        lines.append(f"  --{name} {tname}{choices}{al}{default}")
        if spec.help:
            lines.append(f"      {spec.help}")
    compat = {name: scoped.get(name) or COMPATIBILITY_ONLY[name] for name in _fields(cls)
              if name in COMPATIBILITY_ONLY or name in scoped}
    if compat:
        lines += ["", "compatibility only: accepted so that ms-swift scripts run unchanged, but changing nothing:"]
        for name, why in compat.items():
            lines += [f"  --{name}", f"      {why}"]
    return "\n".join(lines)
