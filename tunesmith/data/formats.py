"""Detect a row's format and normalise it to tunesmith's one canonical record.

Canonical record (what every loader produces, what `tunesmith data convert` writes, what the encoder reads)::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                   "reasoning_content": str (assistant, optional), "loss": bool (assistant, optional)}, ...],
     "rejected_messages": [...]   # preference rows: the same conversation ending in the rejected reply
     "label": bool                # KTO rows
     "tools": ...                 # passed to the chat template when present
    }

Accepted inputs follow ms-swift's auto-detection (messages/conversation(s), sharegpt from/value, alpaca,
query/response aliases, system columns, `rejected_response`, `rejected_messages`, KTO `label`) and, unlike
ms-swift, also `prompt`/`chosen`/`rejected` without any --columns mapping (TRL's and LLaMA-Factory's layout).

What lives here: pure-Python checks and rewrites of one decoded row at a time. What must not: file or hub reading
(`tunesmith.data.load`), tokenizers and chat templates (`tunesmith.data.encode`), torch (not imported at all).
"""
from __future__ import annotations

import ast
from typing import Any, Optional

from tunesmith.errors import DataError

ROLE_MAP = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
    "tool": "tool", "tool_response": "tool", "function_response": "tool", "observation": "tool", "observations": "tool",
    "tool_call": "assistant", "function_call": "assistant",
}
QUERY_KEYS = ("query", "prompt", "input", "instruction", "question", "problem")
RESPONSE_KEYS = ("response", "answer", "output", "targets", "target", "answer_key", "answers", "solution", "text",
                 "completion", "content")
SYSTEM_KEYS = ("system", "system_prompt")
MESSAGE_KEYS = ("messages", "conversation", "conversations")
THINK_KEYS = ("reasoning_content", "thinking", "reasoning")

_FIX_ROLES = "use role user/assistant/system/tool (or sharegpt from: human/gpt/system)."


def _rename_columns(row: dict, columns: Optional[dict]) -> dict:
    if not columns:
        return row
    lower = {k.lower(): k for k in row}
    out = dict(row)
    for src, dst in columns.items():
        key = lower.get(str(src).lower())
        if key is not None and key != dst:
            out[dst] = out.pop(key)
    return out


def _ci(row: dict) -> dict:
    """Case-insensitive view: lower-case key -> original key (first one wins)."""
    out: dict[str, str] = {}
    for k in row:
        out.setdefault(str(k).lower(), k)
    return out


class _Row:
    """One row being normalised, with where it came from for error messages."""

    def __init__(self, row: dict, source: str, line):
        self.row, self.source, self.line, self.keys = row, source, line, _ci(row)

    def err(self, field: str, problem: str, fix: str = "") -> DataError:
        """A DataError for `field` of this row (returned, not raised: callers `raise r.err(...)`)."""
        return DataError(self.source, self.line, field, problem, fix)

    def get(self, *names: str):
        """(original key, value) of the first of `names` (lower-case) the row has, else (None, None)."""
        for n in names:
            if n in self.keys:
                return self.keys[n], self.row[self.keys[n]]
        return None, None

    def has(self, name: str) -> bool:
        """Whether the row has column `name` (lower-case) with a non-null value."""
        return name in self.keys and self.row[self.keys[name]] is not None


def _as_text(r: _Row, field: str, value: Any, allow_empty: bool = True) -> str:
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise r.err(field, "is empty.", "give it text, or drop the row.")
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts, text only
    if value is None:
        raise r.err(field, "is null; expected a string.", "give it text, or drop the row.")
    raise r.err(field, f"expected a string, got {type(value).__name__} ({_short(value)}).",
                "write the text as a JSON string.")


def _short(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _parse_maybe_literal(r: _Row, field: str, value: Any):
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)  # ms-swift accepts messages written as a Python/JSON string
        except (ValueError, SyntaxError):
            raise r.err(field, "is a string that is not a list of messages.",
                        "write it as a JSON list of {\"role\", \"content\"} objects.") from None
    return value


def _normalise_messages(r: _Row, field: str, value: Any, require_role: bool = True) -> list[dict]:
    value = _parse_maybe_literal(r, field, value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise r.err(field, f"expected a list of messages, got {type(value).__name__}.",
                    "write [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", \"content\": ...}].")
    out: list[dict] = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise r.err(f, f"expected a message object, got {type(m).__name__} ({_short(m)}).",
                        "each message is {\"role\": ..., \"content\": ...}.")
        keys = _ci(m)
        role_key = keys.get("role") or keys.get("from")
        content_key = keys.get("content") if "content" in keys else keys.get("value")
        if role_key is None and content_key is None:
            # legacy swift pair form: {"human": q, "assistant": a}
            q = next((m[keys[k]] for k in ("user", "human") if k in keys), None)
            a = next((m[keys[k]] for k in ("assistant", "gpt", "bot") if k in keys), None)
            if q is None and a is None:
                raise r.err(f, f"has neither 'role' nor 'content' (keys: {', '.join(map(str, m)) or 'none'}).",
                            "each message is {\"role\": ..., \"content\": ...} (or sharegpt {\"from\", \"value\"}).")
            if q is not None:
                out.append({"role": "user", "content": _as_text(r, f + ".human", q)})
            if a is not None:
                out.append({"role": "assistant", "content": _as_text(r, f + ".assistant", a)})
            continue
        if role_key is None:
            raise r.err(f + ".role", "is missing.", _FIX_ROLES)
        raw_role = m[role_key]
        if not isinstance(raw_role, str) or raw_role.lower() not in ROLE_MAP:
            raise r.err(f + ".role", f"unknown role {_short(raw_role)}.", _FIX_ROLES)
        role = ROLE_MAP[raw_role.lower()]
        msg: dict[str, Any] = {"role": role}
        think = next((m[keys[k]] for k in THINK_KEYS if k in keys and m[keys[k]] is not None), None)
        if content_key is None:
            if role == "assistant" and think is not None:
                msg["content"] = ""
            else:
                raise r.err(f + ".content", "is missing.", "give every message a \"content\" string.")
        else:
            msg["content"] = _as_text(r, f + ".content", m[content_key])
        if role == "assistant":
            if think is not None:
                msg["reasoning_content"] = _as_text(r, f + ".reasoning_content", think)
            if not msg["content"].strip() and not msg.get("reasoning_content", "").strip():
                raise r.err(f + ".content", "is empty: an assistant reply must have text to train on.",
                            "fill in the reply, drop the message, or drop the row.")
            if "tool_calls" in keys:
                msg["tool_calls"] = m[keys["tool_calls"]]
        if "loss" in keys and m[keys["loss"]] is not None:
            loss = m[keys["loss"]]
            if not isinstance(loss, bool):
                raise r.err(f + ".loss", f"expected true or false, got {_short(loss)}.",
                            "use \"loss\": false to exclude a reply from training.")
            msg["loss"] = loss
        if role == "tool" and "name" in keys:
            msg["name"] = m[keys["name"]]
        out.append(msg)
    if not out:
        raise r.err(field, "is an empty list.", "give at least a user message and an assistant reply.")
    return out


def _reply(r: _Row, field: str, value: Any) -> list[dict]:
    """A chosen/rejected/response value: a string, one message, or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _as_text(r, field, value, allow_empty=False)}]
    msgs = _normalise_messages(r, field, value)
    for i, m in enumerate(msgs):
        if m["role"] not in ("assistant", "tool"):
            raise r.err(f"{field}[{i}].role", f"a reply may hold only assistant/tool messages, got {m['role']!r}.",
                        "put the prompt's messages in 'prompt' (or 'messages') and only the reply here.")
    return msgs


def _prepend_system(r: _Row, messages: list[dict]) -> list[dict]:
    key, system = r.get(*SYSTEM_KEYS)
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": _as_text(r, key, system)}] + messages


def _history(r: _Row) -> list[dict]:
    key, hist = r.get("history")
    if hist is None or hist == "":
        return []
    hist = _parse_maybe_literal(r, key, hist)
    if not isinstance(hist, list):
        raise r.err(key, "expected a list of [query, response] pairs.", "write [[\"q1\", \"a1\"], [\"q2\", \"a2\"]].")
    out = []
    for i, pair in enumerate(hist):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise r.err(f"{key}[{i}]", f"expected a [query, response] pair, got {_short(pair)}.",
                        "write [[\"q1\", \"a1\"], [\"q2\", \"a2\"]].")
        out.append({"role": "user", "content": _as_text(r, f"{key}[{i}][0]", pair[0])})
        out.append({"role": "assistant", "content": _as_text(r, f"{key}[{i}][1]", pair[1], allow_empty=False)})
    return out


def _check_structure(r: _Row, field: str, messages: list[dict], need_reply: bool) -> list[dict]:
    roles = [m["role"] for m in messages]
    start = 1 if roles and roles[0] == "system" else 0
    if "system" in roles[start:]:
        raise r.err(f"{field}[{roles.index('system', start)}].role", "a system message may only come first.",
                    "move it to the start or merge it into the first system message.")
    if start < len(messages) and messages[start]["role"] == "assistant":
        # ms-swift's pretraining form: a leading assistant message gets an empty user turn.
        messages = messages[:start] + [{"role": "user", "content": ""}] + messages[start:]
        roles = [m["role"] for m in messages]
    for i in range(1, len(roles)):
        if roles[i] == "assistant" and roles[i - 1] == "assistant":
            raise r.err(f"{field}[{i}]", "two assistant messages in a row.", "merge them into one reply.")
    if need_reply:
        if "assistant" not in roles:
            raise r.err(field, "has no assistant message, so there is nothing to train on.",
                        "end each conversation with {\"role\": \"assistant\", \"content\": ...}.")
        if roles[-1] != "assistant":
            raise r.err(f"{field}[{len(roles) - 1}].role",
                        f"the conversation ends with a {roles[-1]} message; the last message must be the reply.",
                        "end it with the assistant's reply, or drop the trailing message.")
    return messages


def _label(r: _Row) -> Optional[bool]:
    key, v = r.get("label")
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    raise r.err(key, f"expected true or false (KTO: is the reply desirable?), got {_short(v)}.",
                "write \"label\": true or \"label\": false.")


def _chosen_and_rejected(r: _Row, prompt: list[dict]) -> tuple[list[dict], list[dict]]:
    """(prompt + chosen reply, prompt + rejected reply) from the row's `chosen`/`rejected` columns."""
    messages = prompt + _reply(r, r.keys["chosen"], r.row[r.keys["chosen"]])
    rejected = prompt + _reply(r, r.keys["rejected"], r.row[r.keys["rejected"]])
    return messages, rejected


def _preference_prompt(r: _Row) -> list[dict]:
    """The prompt of a `prompt`/`chosen`/`rejected` row (TRL, LLaMA-Factory): a string or messages, plus system."""
    pkey, prompt_v = r.get("prompt", "query", "question", "instruction", "input")
    if prompt_v is None:
        raise r.err("prompt", "is missing: a chosen/rejected row needs the prompt they answer.",
                    "add \"prompt\": \"...\" (a string or a list of messages).")
    if isinstance(prompt_v, str):
        prompt = [{"role": "user", "content": prompt_v}]
    else:
        prompt = _normalise_messages(r, pkey, prompt_v)
    return _prepend_system(r, prompt)


def _query_and_reply(r: _Row) -> list[dict]:
    """Messages of an alpaca (instruction/input/output) or query/response row, after its `history` and system."""
    if "instruction" in r.keys and "input" in r.keys:  # alpaca
        ins = _as_text(r, r.keys["instruction"], r.row[r.keys["instruction"]] or "")
        inp = _as_text(r, r.keys["input"], r.row[r.keys["input"]] or "")
        qkey, query = r.keys["instruction"], "\n".join(x for x in (ins, inp) if x)
    else:
        qkey, query = r.get(*QUERY_KEYS)
        if query is not None:
            query = _as_text(r, qkey, query)
    rkey, resp = r.get(*[k for k in RESPONSE_KEYS if k != (qkey or "").lower()])
    if isinstance(resp, list) and resp and all(isinstance(x, str) for x in resp):
        resp = resp[0]  # ms-swift: a list of answers trains on the first
    if query is None and resp is None:
        known = ", ".join(sorted(MESSAGE_KEYS + ("instruction/input/output", "query/response",
                                                 "prompt/chosen/rejected")))
        raise r.err("", f"no known format: columns are {', '.join(map(str, r.row)) or 'none'}.",
                    f"use one of: {known}; or map your columns with --columns '{{\"yours\": \"query\"}}'.")
    messages = _history(r)
    if query is not None:
        messages.append({"role": "user", "content": query})
    if resp is not None:
        messages.append({"role": "assistant", "content": _as_text(r, rkey, resp, allow_empty=False)})
    return _prepend_system(r, messages)


def _conversation(r: _Row, msg_key: Optional[str]) -> tuple[list[dict], Optional[list[dict]]]:
    """(messages, rejected messages or None) from whichever layout the row uses."""
    if msg_key is not None and r.has("chosen") and r.has("rejected"):
        # sharegpt preference (LLaMA-Factory): conversations = prompt, chosen/rejected = reply messages
        return _chosen_and_rejected(r, _prepend_system(r, _normalise_messages(r, msg_key, r.row[msg_key])))
    if msg_key is not None:
        return _prepend_system(r, _normalise_messages(r, msg_key, r.row[msg_key])), None
    if r.has("chosen") and r.has("rejected"):
        return _chosen_and_rejected(r, _preference_prompt(r))
    return _query_and_reply(r), None


def _rejected_columns(r: _Row, messages: list[dict], rejected: Optional[list[dict]]) -> Optional[list[dict]]:
    """`rejected` unless already set, else from ms-swift's `rejected_response` (the reply to the last user turn)
    or `rejected_messages` (a whole conversation) column; None when the row has neither."""
    key, rej = r.get("rejected_response")
    if rej is not None and rejected is None:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        rejected = messages[: last_user + 1] + _reply(r, key, rej)
    key, rej_msgs = r.get("rejected_messages")
    if rej_msgs is not None and rejected is None:
        rejected = _prepend_system(r, _normalise_messages(r, key, rej_msgs))
    return rejected


def _tools(r: _Row, key: str, tools: Any) -> Any:
    """The `tools` column, decoded from JSON when it is a string."""
    if isinstance(tools, str):
        try:
            import json
            tools = json.loads(tools)
        except ValueError:
            raise r.err(key, "is a string that is not JSON.", "write the tools as a JSON list.") from None
    return tools


def normalise_row(row: Any, source: str = "<data>", line=None, columns: Optional[dict] = None,
                  need_reply: bool = True) -> dict:
    """Normalise one row of any supported format to the canonical record, or raise DataError saying why not.

    row: one decoded JSON object (a dict); source, line: where it came from (file and 1-based line, or row number),
    quoted in errors. columns: renames {"their column": "ours"}, matched case-insensitively. need_reply: the
    conversation must end with an assistant reply (False for `tunesmith infer`, which generates it).
    Returns the canonical record (see the module docstring): "messages", plus "rejected_messages", "label", "tools"
    when present.
    Raises:
        DataError: not a dict, no known format, a malformed field, bad message order, or a rejected reply
            identical to the chosen one (the message names the field and the fix).
    """
    if not isinstance(row, dict):
        raise DataError(source, line, "", f"expected a JSON object per row, got {type(row).__name__} ({_short(row)}).",
                        "write one {\"messages\": [...]} object per line.")
    r = _Row(_rename_columns(row, columns), source, line)
    out: dict[str, Any] = {}
    msg_key = next((r.keys[k] for k in MESSAGE_KEYS if k in r.keys), None)
    messages, rejected = _conversation(r, msg_key)
    rejected = _rejected_columns(r, messages, rejected)
    field = msg_key or "messages"
    messages = _check_structure(r, field, messages, need_reply)
    out["messages"] = messages
    if rejected is not None:
        rejected = _check_structure(r, "rejected", rejected, True)
        if rejected == messages:
            raise r.err("rejected", "is identical to the chosen reply, so the pair carries no preference.",
                        "give a different rejected reply, or drop the row.")
        out["rejected_messages"] = rejected
    label = _label(r)
    if label is not None:
        out["label"] = label
    key, tools = r.get("tools")
    if tools:
        out["tools"] = _tools(r, key, tools)
    return out


_FORMAT_COLUMNS = {k.lower() for k in MESSAGE_KEYS + QUERY_KEYS + RESPONSE_KEYS + SYSTEM_KEYS} | {
    "history", "chosen", "rejected", "rejected_response", "rejected_messages", "tools", "label"}


def extra_columns(row: Any, columns: Optional[dict] = None) -> dict:
    """The row's columns that no format reads (ids, metadata, …): `tunesmith infer` writes them back unchanged.

    row: a decoded row (anything else gives {}); columns: the same --columns renames as normalise_row.
    Returns {column name (after renames): value}."""
    if not isinstance(row, dict):
        return {}
    return {k: v for k, v in _rename_columns(row, columns).items() if str(k).lower() not in _FORMAT_COLUMNS}


def row_kind(record: dict) -> str:
    """The training kind of a canonical record: "preference" (has rejected_messages), "kto" (has label) or "sft"."""
    if "rejected_messages" in record:
        return "preference"
    if "label" in record:
        return "kto"
    return "sft"
