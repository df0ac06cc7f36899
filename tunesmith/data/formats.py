"""Detect a row's format and normalise it to tunesmith's one canonical record.

Canonical record (what every loader produces, what `tunesmith data convert` writes, what the encoder reads)::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                   "reasoning_content": str (assistant, optional), "loss": bool (assistant, optional),
                   "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}, ...]
                                 (assistant, optional; content may then be "")}, ...],
     "rejected_messages": [...]   # preference rows: the same conversation ending in the rejected reply
     "label": bool                # KTO rows
     "tools": [{"type": "function", "function": {...}}, ...]   # passed to the chat template when present
    }

Accepted inputs follow ms-swift's auto-detection (messages/conversation(s), sharegpt from/value, alpaca,
query/response aliases, system columns, `rejected_response`, `rejected_messages`, KTO `label`) and, unlike
ms-swift, also `prompt`/`chosen`/`rejected` without any --columns mapping (TRL's and LLaMA-Factory's layout),
TRL's conversational forms (explicit `prompt` messages, or implicit: `chosen`/`rejected`/`completion` holding the
whole conversation) and both tool-call forms: ms-swift's `tool_call`/`tool_response` roles (consecutive calls are
one turn with parallel calls) and OpenAI's assistant `tool_calls` + `tool` messages. Either way the calls reach
the chat template as `tool_calls`, so what is trained is what the model's own template renders.

What lives here: pure-Python checks and rewrites of one decoded row at a time. What must not: file or hub reading
(`tunesmith.data.load`), tokenizers and chat templates (`tunesmith.data.encode`), torch (not imported at all).
"""
from __future__ import annotations

import ast
import json
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

TOOL_CALL_ROLES = ("tool_call", "function_call")

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


def _message(r: _Row, f: str, m: Any) -> list[dict]:
    """One input message `m` (field name `f`) as canonical messages: usually one, two for the legacy swift
    {"human": q, "assistant": a} pair. ms-swift's `tool_call` comes back as an assistant message with `tool_calls`,
    for _normalise_messages to merge into the reply before it."""
    if not isinstance(m, dict):
        raise r.err(f, f"expected a message object, got {type(m).__name__} ({_short(m)}).",
                    "each message is {\"role\": ..., \"content\": ...}.")
    keys = _ci(m)
    role_key = keys.get("role") or keys.get("from")
    content_key = keys.get("content") if "content" in keys else keys.get("value")
    if role_key is None and content_key is None:
        return _legacy_pair(r, f, m, keys)
    if role_key is None:
        raise r.err(f + ".role", "is missing.", _FIX_ROLES)
    raw_role = m[role_key]
    if not isinstance(raw_role, str) or raw_role.lower() not in ROLE_MAP:
        raise r.err(f + ".role", f"unknown role {_short(raw_role)}.", _FIX_ROLES)
    if raw_role.lower() in TOOL_CALL_ROLES:  # ms-swift: the content is one call {"name", "arguments"}
        if content_key is None:
            raise r.err(f + ".content", "is missing.", "give the call as {\"name\": ..., \"arguments\": {...}}.")
        msg = {"role": "assistant", "content": "", "tool_calls": [_tool_call(r, f + ".content", m[content_key])]}
        return [_with_loss(r, f, m, keys, msg)]
    role = ROLE_MAP[raw_role.lower()]
    msg: dict[str, Any] = {"role": role}
    if role == "assistant":
        _assistant_fields(r, f, m, keys, content_key, msg)
    elif content_key is None:
        raise r.err(f + ".content", "is missing.", "give every message a \"content\" string.")
    elif role == "tool" and isinstance(m[content_key], (dict, list)) and not _is_text_parts(m[content_key]):
        msg["content"] = json.dumps(m[content_key], ensure_ascii=False)  # a structured tool result, as ms-swift
    else:
        msg["content"] = _as_text(r, f + ".content", m[content_key])
    if role == "tool" and "name" in keys and m[keys["name"]] is not None:
        msg["name"] = m[keys["name"]]
    return [_with_loss(r, f, m, keys, msg)]


def _legacy_pair(r: _Row, f: str, m: dict, keys: dict) -> list[dict]:
    """The legacy swift pair form {"human": q, "assistant": a} as a user and an assistant message."""
    q = next((m[keys[k]] for k in ("user", "human") if k in keys), None)
    a = next((m[keys[k]] for k in ("assistant", "gpt", "bot") if k in keys), None)
    if q is None and a is None:
        raise r.err(f, f"has neither 'role' nor 'content' (keys: {', '.join(map(str, m)) or 'none'}).",
                    "each message is {\"role\": ..., \"content\": ...} (or sharegpt {\"from\", \"value\"}).")
    out = []
    if q is not None:
        out.append({"role": "user", "content": _as_text(r, f + ".human", q)})
    if a is not None:
        out.append({"role": "assistant", "content": _as_text(r, f + ".assistant", a)})
    return out


def _assistant_fields(r: _Row, f: str, m: dict, keys: dict, content_key: Optional[str], msg: dict) -> None:
    """Fill an assistant message's content, reasoning and OpenAI `tool_calls` (content may then be null)."""
    think = next((m[keys[k]] for k in THINK_KEYS if k in keys and m[keys[k]] is not None), None)
    calls = m[keys["tool_calls"]] if "tool_calls" in keys else None
    calls = _parse_maybe_json(r, f + ".tool_calls", calls)
    if calls is not None and not isinstance(calls, list):
        calls = [calls]
    content = m[content_key] if content_key is not None else None
    if content is None and content_key is not None and not calls:
        raise r.err(f + ".content", "is null; expected a string.", "give it text, or drop the row.")
    if content_key is None and think is None and not calls:
        raise r.err(f + ".content", "is missing.", "give every message a \"content\" string.")
    msg["content"] = "" if content is None else _as_text(r, f + ".content", content)
    if think is not None:
        msg["reasoning_content"] = _as_text(r, f + ".reasoning_content", think)
    if calls:
        msg["tool_calls"] = [_tool_call(r, f"{f}.tool_calls[{k}]", c) for k, c in enumerate(calls)]
    elif not msg["content"].strip() and not msg.get("reasoning_content", "").strip():
        raise r.err(f + ".content", "is empty: an assistant reply must have text to train on.",
                    "fill in the reply, drop the message, or drop the row.")


def _with_loss(r: _Row, f: str, m: dict, keys: dict, msg: dict) -> dict:
    """msg with the message's optional per-reply `"loss": true|false` copied over (checked)."""
    if "loss" in keys and m[keys["loss"]] is not None:
        loss = m[keys["loss"]]
        if not isinstance(loss, bool):
            raise r.err(f + ".loss", f"expected true or false, got {_short(loss)}.",
                        "use \"loss\": false to exclude a reply from training.")
        msg["loss"] = loss
    return msg


def _is_text_parts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, dict) and p.get("type") == "text"
                                                           for p in value)


def _parse_maybe_json(r: _Row, field: str, value: Any):
    """A JSON-encoded string decoded (tool_calls written as a string, as some exports do); anything else as is."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError as e:
            raise r.err(field, f"is a string that is not valid JSON ({e}).", "write it as a JSON list.") from None
    return value


# the fields a call may carry: ms-swift's {"name", "arguments"}, OpenAI's function object, and what some exports add
_CALL_KEYS = {"name", "arguments", "parameters", "id", "type", "index", "description"}


def _tool_call(r: _Row, field: str, value: Any) -> dict:
    """One tool call — ms-swift's `tool_call` content ({"name", "arguments"}, as a dict or JSON string) or an
    OpenAI `tool_calls` item ({"type": "function", "function": {...}, "id"}) — in the canonical shape
    {"type": "function", "function": {"name": str, "arguments": dict}}. Arguments given as a JSON string are
    decoded (templates apply `tojson` to them); the call id is dropped (tool results are matched by position)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise r.err(field, f"is not valid JSON ({e}): {_short(value)}.",
                        "write the call as {\"name\": \"fn\", \"arguments\": {...}}.") from None
    if not isinstance(value, dict):
        raise r.err(field, f"expected a tool call object, got {type(value).__name__} ({_short(value)}).",
                    "write the call as {\"name\": \"fn\", \"arguments\": {...}}.")
    keys = _ci(value)
    if isinstance(value.get(keys.get("function", "function")), dict):  # OpenAI wraps the call in "function"
        field, value = field + ".function", value[keys["function"]]
        keys = _ci(value)
    name = value.get(keys.get("name", "name"))
    if not isinstance(name, str) or not name.strip():
        raise r.err(field + ".name", f"expected the function's name, got {_short(name)}.",
                    "give every call a \"name\" (a tool from the row's \"tools\").")
    akey = keys.get("arguments") or keys.get("parameters")
    unknown = sorted(str(k) for k in value if str(k).lower() not in _CALL_KEYS)
    if unknown:  # e.g. "args" or "argument": silently empty arguments would be trained otherwise
        raise r.err(f"{field}.{unknown[0]}", "is not a field of a tool call (a call has \"name\" and "
                    "\"arguments\").", "rename it to \"arguments\" (an object of the function's parameters).")
    args = value[akey] if akey is not None else None
    field = f"{field}.{akey or 'arguments'}"
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            raise r.err(field, f"is not valid JSON ({e}): {_short(args)}.",
                        "write the arguments as a JSON object such as {\"city\": \"Paris\"} (or as that text).") \
                from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise r.err(field, f"expected a JSON object of arguments, got {type(args).__name__} ({_short(args)}).",
                    "write the arguments as an object: {\"name of the parameter\": value, ...}.")
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _normalise_messages(r: _Row, field: str, value: Any, require_role: bool = True) -> list[dict]:
    value = _parse_maybe_literal(r, field, value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise r.err(field, f"expected a list of messages, got {type(value).__name__}.",
                    "write [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", \"content\": ...}].")
    out: list[dict] = []
    for i, m in _order_tool_results(r, field, value):
        for msg in _message(r, f"{field}[{i}]", m):
            prev = out[-1] if out else None
            if msg.get("tool_calls") and prev is not None and prev["role"] == "assistant":
                _merge_calls(prev, msg)  # consecutive calls, or a reply's text then its calls: one turn
            else:
                out.append(msg)
    if not out:
        raise r.err(field, "is an empty list.", "give at least a user message and an assistant reply.")
    return out


def _order_tool_results(r: _Row, field: str, value: list) -> list[tuple[int, Any]]:
    """(index, message) pairs with OpenAI tool results put in the order of the calls they answer (matched by
    `tool_call_id`, as ms-swift does: templates pair calls and results by position). Results without ids keep
    their order; a result whose id names none of the calls before it is an error (it answers a call that is not
    there)."""
    out = list(enumerate(value))
    for i, (_, m) in enumerate(out):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            continue
        order = {c.get("id"): k for k, c in enumerate(calls)}
        end = i + 1
        while end < len(out) and isinstance(out[end][1], dict) and out[end][1].get("role") in ("tool", "tool_response"):
            end += 1
        ids = [x.get("tool_call_id") for _, x in out[i + 1:end]]
        for (j, _), rid in zip(out[i + 1:end], ids):
            if rid is not None and None not in order and rid not in order:
                raise r.err(f"{field}[{j}].tool_call_id", f"{_short(rid)} answers none of the calls before it "
                            f"(their ids: {', '.join(map(repr, order))}).",
                            "give each tool result the id of the call it answers.")
        if None not in order and len(order) == len(calls) == len(ids) and set(order) == set(ids):
            out[i + 1:end] = sorted(out[i + 1:end], key=lambda x: order[x[1]["tool_call_id"]])
    return out


def _merge_calls(prev: dict, msg: dict) -> None:
    """Append msg's tool calls (and text, if any) to the assistant turn prev; prev's `loss` wins (ms-swift)."""
    if msg["content"]:
        prev["content"] = prev["content"] + msg["content"]
    if msg.get("reasoning_content") and not prev.get("reasoning_content"):
        prev["reasoning_content"] = msg["reasoning_content"]
    prev["tool_calls"] = prev.get("tool_calls", []) + msg["tool_calls"]
    if "loss" in msg and "loss" not in prev:
        prev["loss"] = msg["loss"]


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


def _call_names(calls: list[dict]) -> str:
    return ", ".join(repr(c["function"]["name"]) for c in calls)


def _no_reply(r: _Row, field: str) -> DataError:
    """The error for a row without a reply, naming the column its layout reads the reply from."""
    for side, other in (("chosen", "rejected"), ("rejected", "chosen")):
        if side in r.keys and not r.has(side) or (r.has(other) and side not in r.keys):
            return r.err(r.keys.get(side, side), "is missing or null: a chosen/rejected row needs both replies.",
                         f"give \"{side}\" a reply (a string or assistant messages), or drop the row.")
    if "instruction" in r.keys:
        key = r.keys.get("output", "output")
        return r.err(key, "is missing or null: an instruction row (alpaca: instruction/input/output) needs its reply "
                     "in output.", "add \"output\": \"...\" (or drop the row).")
    qkey, _ = r.get(*QUERY_KEYS)
    if qkey is not None:
        rkey = next((r.keys[k] for k in RESPONSE_KEYS if k in r.keys and r.keys[k] != qkey), "response")
        return r.err(rkey, f"is missing or null: the row has a {qkey!r} but no reply to it.",
                     "add \"response\": \"...\" (or answer/output/completion), or drop the row.")
    return r.err(field, "has no assistant message, so there is nothing to train on.",
                 "end each conversation with {\"role\": \"assistant\", \"content\": ...}.")


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
            calls = messages[i - 1].get("tool_calls")
            if calls:  # ms-swift's tool_call straight before a reply: the tool's result is missing
                raise r.err(field, f"the call to {_call_names(calls)} is followed by an assistant reply without "
                            f"the tool's result.", "put the result between them: {\"role\": \"tool_response\", "
                            "\"content\": ...} (or {\"role\": \"tool\", ...}).")
            raise r.err(f"{field}[{i}]", "two assistant messages in a row.", "merge them into one reply.")
        if roles[i] == "tool" and roles[i - 1] in ("user", "system"):
            raise r.err(field, f"a tool result follows a {roles[i - 1]} message: no tool call comes before it.",
                        "put the assistant's call before it (role tool_call, or assistant with tool_calls), or "
                        "drop the result.")
    if roles and roles[0] == "tool":
        raise r.err(field, "the conversation starts with a tool result: no tool call comes before it.",
                    "put the user's request and the assistant's call before it.")
    if need_reply:
        if "assistant" not in roles:
            raise _no_reply(r, field)
        if roles[-1] != "assistant":
            raise r.err(f"{field}[{len(roles) - 1}].role",
                        f"the conversation ends with a {roles[-1]} message; the last message must be the reply.",
                        "end it with the assistant's reply, or drop the trailing message.")
    return messages


MEDIA_KEYS = ("images", "videos", "audios", "image", "video", "audio")  # ms-swift's multimodal columns


def _no_media(r: _Row) -> None:
    """A row with images, videos or audio (ms-swift's multimodal columns) is refused: tunesmith trains text models,
    and the `<image>` tags would be trained as plain text while the picture is silently left out."""
    for k in MEDIA_KEYS:
        key, v = r.get(k)
        if v not in (None, [], "", {}):
            raise r.err(key, "holds media, and multimodal training is not supported yet: tunesmith trains text "
                             "models, so the row would be trained without them.",
                        f"drop the {key!r} column (and the <image>/<video>/<audio> tags) to train on the text only, "
                        "or train this model with ms-swift.")


def _margin(r: _Row) -> Optional[float]:
    """A pair's `margin` (ms-swift's and TRL's reward-model column: how far the chosen reply's reward should
    exceed the rejected one's), a finite number or absent."""
    import math

    key, v = r.get("margin")
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise r.err(key, f"expected a finite number (the reward margin of the pair), got {_short(v)}.",
                    "write e.g. \"margin\": 1.5, or drop the column.")
    return float(v)


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
                    "add \"prompt\": \"...\" (a string or a list of messages), or give chosen and rejected as "
                    "whole conversations (with the user turn) that differ only in the final reply.")
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
    rkey, resp = r.get(*[k for k in RESPONSE_KEYS if k != (qkey or "").lower()])
    if isinstance(resp, list) and resp and all(isinstance(x, str) for x in resp):
        resp = resp[0]  # ms-swift: a list of answers trains on the first
    if isinstance(query, (list, dict)) or isinstance(resp, (list, dict)):
        return _conversational_prompt_completion(r, qkey, query, rkey, resp)
    if query is not None:
        query = _as_text(r, qkey, query)
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


def _conversational_prompt_completion(r: _Row, qkey: Optional[str], query: Any, rkey: Optional[str],
                                      resp: Any) -> list[dict]:
    """TRL's conversational prompt/completion row (KTO's unpaired form with `label`, or SFT): the prompt (a string
    or messages) followed by the completion's reply messages. A completion that holds the whole conversation (a
    user message in it: TRL's implicit prompt) is used as is, and a prompt column next to it is not read."""
    if resp is not None and _has_prompt_turn(resp):
        return _prepend_system(r, _normalise_messages(r, rkey, resp))
    if query is None:
        prompt = []
    elif isinstance(query, str):
        prompt = [{"role": "user", "content": query}]
    else:
        prompt = _normalise_messages(r, qkey, query)
    return _prepend_system(r, prompt + (_reply(r, rkey, resp) if resp is not None else []))


def _has_prompt_turn(value: Any) -> bool:
    """Whether a chosen/rejected/completion value (a message or a list of them) holds a user or system message:
    a whole conversation rather than only the reply."""
    for m in [value] if isinstance(value, dict) else value if isinstance(value, list) else []:
        if isinstance(m, dict):
            keys = _ci(m)
            role = m.get(keys.get("role") or keys.get("from") or "role")
            if isinstance(role, str) and ROLE_MAP.get(role.lower()) in ("user", "system"):
                return True
    return False


def _shared_prefix(a: list, b: list) -> int:
    """How many leading messages two conversations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _implicit_pair(r: _Row) -> tuple[list[dict], list[dict]]:
    """TRL's implicit-prompt pair: `chosen` and `rejected` are whole conversations (HuggingFaceH4/
    ultrafeedback_binarized); the messages they share before the first differing reply are the prompt. A `prompt`
    or `messages` column next to them is not read. After the shared prompt each side may hold only its reply
    (assistant and tool messages)."""
    ck, rk = r.keys["chosen"], r.keys["rejected"]
    chosen = _prepend_system(r, _normalise_messages(r, ck, r.row[ck]))
    rejected = _prepend_system(r, _normalise_messages(r, rk, r.row[rk]))
    n = _shared_prefix(chosen, rejected)
    if n == len(chosen) == len(rejected):
        return chosen, rejected  # identical: normalise_row says so
    fix = ("give both the same messages up to the final reply, or put the prompt in \"prompt\" and only the replies "
           "in chosen/rejected.")
    for key, conv in ((ck, chosen), (rk, rejected)):
        if n == len(conv):
            raise r.err(key, "has no reply of its own: it ends where the other conversation goes on.", fix)
        bad = next((k for k in range(n, len(conv)) if conv[k]["role"] not in ("assistant", "tool")), None)
        if conv[n]["role"] != "assistant" or bad is not None:
            k = n if conv[n]["role"] != "assistant" else bad
            raise r.err(f"{key}[{k}]", f"the two conversations differ from this {conv[k]['role']} message on; as "
                        f"whole conversations (no separate prompt) they may differ only in the final reply.", fix)
    return chosen, rejected


def _conversation(r: _Row, msg_key: Optional[str]) -> tuple[list[dict], Optional[list[dict]]]:
    """(messages, rejected messages or None) from whichever layout the row uses."""
    if r.has("chosen") and r.has("rejected") and _has_prompt_turn(r.row[r.keys["chosen"]]):
        return _implicit_pair(r)
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


def _tools(r: _Row, key: str, tools: Any) -> list:
    """The `tools` column (a JSON string or a list; each tool a dict or a JSON string) as a list of OpenAI tool
    objects: a bare function schema {"name", "description", "parameters"} is wrapped as
    {"type": "function", "function": ...} (ms-swift's wrap_tool; gpt-oss's template reads `tool.function`)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise r.err(key, "is a string that is not JSON.", "write the tools as a JSON list.") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise r.err(key, f"expected a list of tools, got {type(tools).__name__}.",
                    "write [{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}].")
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, str):
            try:
                tool = json.loads(tool)
            except ValueError:
                raise r.err(f"{key}[{i}]", "is a string that is not JSON.", "write each tool as a JSON object.") \
                    from None
        if not isinstance(tool, dict):
            raise r.err(f"{key}[{i}]", f"expected a tool object, got {type(tool).__name__} ({_short(tool)}).",
                        "write {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}.")
        tool = _drop_padding(tool)
        tool = tool if "type" in tool or "function" in tool else {"type": "function", "function": tool}
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise r.err(f"{key}[{i}]", f"has no function name ({_short(tool)}).",
                        "write {\"type\": \"function\", \"function\": {\"name\": ..., \"description\": ..., "
                        "\"parameters\": {...}}}.")
        out.append(tool)
    return out


_NULL_MEANINGFUL = ("default", "const", "enum", "examples")


def _drop_padding(schema: Any) -> Any:
    """A copy of a tool schema without null-valued keys: Arrow (parquet, hub datasets) aligns every row's tools to
    the union of all their fields and reads the missing ones back as null (ms-swift's remove_arrow_padding). Nulls
    under `default`/`const`/`enum`/`examples` are data and kept."""
    if isinstance(schema, list):
        return [_drop_padding(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: (v if k in _NULL_MEANINGFUL else _drop_padding(v)) for k, v in schema.items()
            if v is not None or k in _NULL_MEANINGFUL}


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
    _no_media(r)
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
        messages, rejected = _whole_completions(messages, rejected)
        out["messages"] = messages
        out["rejected_messages"] = rejected
        margin = _margin(r)
        if margin is not None:
            out["margin"] = margin
    label = _label(r)
    if label is not None:
        out["label"] = label
    key, tools = r.get("tools")
    tools = _tools(r, key, tools) if tools else None
    conversations = [messages] + ([rejected] if rejected is not None else [])
    if tools:
        _check_called_tools(r, key, tools, conversations)
        out["tools"] = tools
    elif any(m.get("tool_calls") for conv in conversations for m in conv):
        raise r.err(key or "tools", "is missing or empty, but the conversation calls tools: the model would learn "
                    "to call functions its prompt never shows.",
                    "add the functions it may call: \"tools\": [{\"type\": \"function\", \"function\": "
                    "{\"name\": ..., \"description\": ..., \"parameters\": {...}}}].")
    return out


def _whole_completions(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict]]:
    """A pair whose completion (what follows the messages both sides share) holds several turns — a tool call,
    its result, then the answer — trains every assistant turn of that completion on each side (`"loss": true`),
    so that both sides' trained tokens start where the shared prompt ends (with last_round only the turn after
    the last tool result would be trained, and the two "prompts" would differ). An explicit per-message loss is
    kept; single-reply completions are left as they are."""
    n = _shared_prefix(chosen, rejected)

    def marked(conv: list[dict]) -> list[dict]:
        tail = conv[n:]
        if sum(m["role"] == "assistant" for m in tail) < 2 and not any(m["role"] == "tool" for m in tail):
            return conv
        return conv[:n] + [{**m, "loss": True} if m["role"] == "assistant" and "loss" not in m else m for m in tail]
    return marked(chosen), marked(rejected)


def _check_called_tools(r: _Row, key: str, tools: list, conversations: list[list[dict]]) -> None:
    """Every tool call names a function of the row's `tools` (the model is shown only those)."""
    names = {t["function"].get("name") if isinstance(t.get("function"), dict) else t.get("name") for t in tools}
    for messages in conversations:
        for m in messages:
            for c in m.get("tool_calls") or []:
                if c["function"]["name"] not in names:
                    raise r.err(key, f"has no function {c['function']['name']!r}, which the conversation calls "
                                f"(the tools: {', '.join(map(repr, sorted(map(str, names))))}).",
                                "add the function to tools, or correct the call's name.")



# what a row with a messages column reads: its query/response-style columns (e.g. GRPO's `solution`) are its own
_MESSAGE_ROW_COLUMNS = {k.lower() for k in MESSAGE_KEYS + SYSTEM_KEYS} | {
    "chosen", "rejected", "rejected_response", "rejected_messages", "tools", "label", "margin"}


def extra_columns(row: Any, columns: Optional[dict] = None) -> dict:
    """The row's columns that its format does not read (ids, metadata, a GRPO `solution` next to `messages`, …):
    `tunesmith infer` writes them back unchanged, GRPO hands them to the reward functions.

    row: a decoded row (anything else gives {}); columns: the same --columns renames as normalise_row.
    Returns {column name (after renames): value}."""
    if not isinstance(row, dict):
        return {}
    row = _rename_columns(row, columns)
    read = _MESSAGE_ROW_COLUMNS if any(str(k).lower() in MESSAGE_KEYS for k in row) else _query_row_columns(row)
    return {k: v for k, v in row.items() if str(k).lower() not in read}


def _query_row_columns(row: dict) -> set:
    """The columns a query/response-style row's format reads: its query (or alpaca's instruction and input), the
    first reply column after it, the system and pair columns — so a second reply-like column (a GRPO `solution`
    next to `response`) stays the row's own."""
    present = [str(k).lower() for k, v in row.items() if v is not None]
    if "instruction" in present and "input" in present:
        used = {"instruction", "input"}
    else:
        used = {next((k for k in QUERY_KEYS if k in present), None)}
    used.add(next((k for k in RESPONSE_KEYS if k in present and k not in used), None))
    return (used - {None}) | {k.lower() for k in SYSTEM_KEYS} | {
        "history", "chosen", "rejected", "rejected_response", "rejected_messages", "tools", "label", "margin"}


def row_kind(record: dict) -> str:
    """The training kind of a canonical record: "preference" (has rejected_messages), "kto" (has label) or "sft"."""
    if "rejected_messages" in record:
        return "preference"
    if "label" in record:
        return "kto"
    return "sft"
