"""The forms of the pages, read from the flag declarations themselves (tunesmith.config.groups, composed into a
command's class in tunesmith.config.commands): each flag's name, kind, default, choices, help text and group, and
back from what a form holds to the command line's flags.

A form shows every flag a command really reads: the compatibility-only ones (tunesmith.config.swift_compat, which
change nothing) and the secrets (tokens, keys: set them in the environment the page was started from, never in a
form, so that they are never shown, logged or put on a process's command line) are left out. A value left at its
default, or emptied, adds no flag, so the command line shown is the short one a user would type.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import typing
from dataclasses import dataclass
from typing import Any, Optional

from tunesmith.config.commands import COMMAND_ARGS
from tunesmith.config.parser import secret_fields
from tunesmith.config.swift_compat import COMPATIBILITY_ONLY, COMPATIBILITY_ONLY_IN

@dataclass(frozen=True)
class FlagSpec:
    """One flag as a form field. kind: bool (a checkbox), tristate (unset/true/false: an Optional[bool]), choice
    (a drop-down of `choices`; "" is unset when the default is None), text (one value: numbers, names, paths),
    list (space-separated values, quoted as in a shell), dict (a JSON object). default_text: the default as the
    form shows it ("" for None; "auto" for a flag whose None means tunesmith chooses)."""
    name: str
    kind: str
    default: Any
    default_text: str
    choices: tuple
    help: str
    group: str


def _kind(hint, default, choices) -> str:
    """The form kind of a field from its type hint (Optional[X], List[X], X)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = origin is typing.Union and type(None) in args
    inner = next((a for a in args if a is not type(None)), hint) if optional else hint
    if typing.get_origin(inner) in (list, typing.List):
        return "list"
    if inner in (dict, typing.Dict) or typing.get_origin(inner) in (dict, typing.Dict):
        return "dict"
    if inner is bool:
        return "tristate" if optional or default is None else "bool"
    return "choice" if choices else "text"


def as_text(value) -> str:
    """A value as a form's text field shows it: '' for None, lists space-separated (quoted where needed), dicts as
    JSON, booleans as true/false."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return shlex.join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _owner(cls, name: str):
    """The class of cls's MRO whose own declaration of `name` wins (the first base listed, as dataclasses say)."""
    return next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))


def command_flags(command: str, fixed: tuple = ()) -> list[FlagSpec]:
    """The form fields of `tunesmith COMMAND`, grouped by the flag group that declares each (groups in the order
    the command's class composes them). Left out: compatibility-only flags, secrets, and `fixed` (flags the page
    sets itself, e.g. rlhf_type for a method's tab). Raises KeyError for an unknown command."""
    cls = COMMAND_ARGS[command]
    hints = typing.get_type_hints(cls)
    secrets = secret_fields(cls)
    scoped = COMPATIBILITY_ONLY_IN.get(command, {})
    order = {k: i for i, k in enumerate(cls.__mro__)}
    out = []
    for f in dataclasses.fields(cls):
        owner = _owner(cls, f.name)
        if (f.name in secrets or f.name in fixed or f.name in COMPATIBILITY_ONLY or f.name in scoped
                or owner.__module__.endswith("swift_compat")):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = tuple(f.metadata.get("choices", ()))
        kind = _kind(hints[f.name], default, choices)
        # a flag that takes `auto` (None: tunesmith chooses) shows the word, which adds no flag when left as it is
        shown = "auto" if f.metadata.get("auto") and default is None else as_text(default)
        out.append(FlagSpec(f.name, kind, default, shown, choices, f.metadata.get("help", ""), owner.__name__))
    return sorted(out, key=lambda s: order[next(k for k in cls.__mro__ if k.__name__ == s.group)])


def group_title(command: str, group: str) -> str:
    """The first sentence of a flag group's docstring (what the group is for), for its section heading."""
    klass = next(k for k in COMMAND_ARGS[command].__mro__ if k.__name__ == group)
    doc = " ".join((klass.__doc__ or group).split())
    return doc.split(": ")[0].split(". ")[0].rstrip(".")


def _values(spec: FlagSpec, value) -> Optional[list[str]]:
    """The command-line values of one field's form value, or None when it adds no flag (the default, or empty)."""
    if spec.kind == "bool":
        return None if bool(value) == bool(spec.default) else ["true" if value else "false"]
    if isinstance(value, (list, tuple)):  # a multi-select drop-down
        items = [str(v).strip() for v in value if str(v).strip()]
        return None if not items or items == [as_text(d) for d in spec.default or []] else items
    text = "" if value is None else str(value).strip()
    if not text or text == spec.default_text:
        return None
    if spec.kind == "list":
        return shlex.split(text)
    return [text]


def form_argv(specs: list[FlagSpec], values: dict) -> tuple[list[str], list[str]]:
    """(the flags of a filled form, in the form's order, problems). values: {flag name: the form's value}; a flag
    missing from values adds nothing. A value that begins with -- is a problem (the command line would read it as
    a flag); a list that cannot be split (an unclosed quote) too. Everything else goes to the command's own parser,
    whose messages are the CLI's."""
    argv, problems = [], []
    for spec in specs:
        if spec.name not in values:
            continue
        try:
            vals = _values(spec, values[spec.name])
        except ValueError as e:  # shlex: an unclosed quote
            problems.append(f"--{spec.name}: {e} (quote values that hold spaces, as in a shell)")
            continue
        if vals is None:
            continue
        bad = [v for v in vals if v.startswith("--")]
        if bad:
            problems.append(f"--{spec.name} {bad[0]}: a value cannot begin with -- (the command line would read it "
                            f"as a flag)")
            continue
        argv += [f"--{spec.name}", *vals]
    return argv, problems
