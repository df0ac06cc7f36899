"""A row's messages in the canonical form (`tunesmith.data.formats`).

Message lists as OpenAI and ms-swift write them (`messages`, `conversation(s)`), sharegpt's `from`/`value`, the
legacy swift {"human": q, "assistant": a} pair; an assistant's reasoning (`reasoning_content`, `thinking`,
`reasoning`) and per-reply `loss`; both tool-call forms — ms-swift's `tool_call`/`tool_response` roles
(consecutive calls are one turn with parallel calls) and OpenAI's assistant `tool_calls` + `tool` messages (results
put in the order of the calls they answer, by `tool_call_id`); replies, the system column and alpaca's `history`.
Contents written as typed parts with pictures (OpenAI `image_url`, TRL/Hugging Face `image`) become strings with
`<image>` tags, the parts' pictures kept on the message (`images.PARTS_KEY`) until `images.attach_images` matches
them to the row's tags.

What must not live here: which columns of a row hold what (`tunesmith.data.layouts`), the checks of the whole
conversation (`tunesmith.data.formats`), pictures themselves (`tunesmith.data.images`).
"""
from __future__ import annotations

import json
from typing import Any, Optional

from tunesmith.data.images import PARTS_KEY, ImageParts, has_media_parts, read_content
from tunesmith.data.row import (ROLE_MAP, SYSTEM_KEYS, THINK_KEYS, TOOL_CALL_ROLES, Row, as_text, lower_keys,
                                parse_maybe_literal, short)

_FIX_ROLES = "use role user/assistant/system/tool (or sharegpt from: human/gpt/system)."


def normalise_messages(r: Row, field: str, value: Any, require_role: bool = True) -> list[dict]:
    """A messages value (a list, one message, or that written as a string) as canonical messages: consecutive tool
    calls merged into one assistant turn, tool results in the order of their calls. Raises DataError when empty or
    malformed."""
    value = parse_maybe_literal(r, field, value)
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


def _message(r: Row, f: str, m: Any) -> list[dict]:
    """One input message `m` (field name `f`) as canonical messages: usually one, two for the legacy swift
    {"human": q, "assistant": a} pair. ms-swift's `tool_call` comes back as an assistant message with `tool_calls`,
    for normalise_messages to merge into the reply before it."""
    if not isinstance(m, dict):
        raise r.err(f, f"expected a message object, got {type(m).__name__} ({short(m)}).",
                    "each message is {\"role\": ..., \"content\": ...}.")
    keys = lower_keys(m)
    role_key = keys.get("role") or keys.get("from")
    content_key = keys.get("content") if "content" in keys else keys.get("value")
    if role_key is None and content_key is None:
        return _legacy_pair(r, f, m, keys)
    if role_key is None:
        raise r.err(f + ".role", "is missing.", _FIX_ROLES)
    raw_role = m[role_key]
    if not isinstance(raw_role, str) or raw_role.lower() not in ROLE_MAP:
        raise r.err(f + ".role", f"unknown role {short(raw_role)}.", _FIX_ROLES)
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
    elif role == "tool" and isinstance(m[content_key], (dict, list)) and not _is_text_parts(m[content_key]) \
            and not has_media_parts(m[content_key]):
        msg["content"] = json.dumps(m[content_key], ensure_ascii=False)  # a structured tool result, as ms-swift
    else:
        _content(r, f + ".content", m[content_key], msg)
    if role == "tool" and "name" in keys and m[keys["name"]] is not None:
        msg["name"] = m[keys["name"]]
    return [_with_loss(r, f, m, keys, msg)]


def _legacy_pair(r: Row, f: str, m: dict, keys: dict) -> list[dict]:
    """The legacy swift pair form {"human": q, "assistant": a} as a user and an assistant message."""
    q = next((m[keys[k]] for k in ("user", "human") if k in keys), None)
    a = next((m[keys[k]] for k in ("assistant", "gpt", "bot") if k in keys), None)
    if q is None and a is None:
        raise r.err(f, f"has neither 'role' nor 'content' (keys: {', '.join(map(str, m)) or 'none'}).",
                    "each message is {\"role\": ..., \"content\": ...} (or sharegpt {\"from\", \"value\"}).")
    out = []
    if q is not None:
        out.append({"role": "user", "content": as_text(r, f + ".human", q)})
    if a is not None:
        out.append({"role": "assistant", "content": as_text(r, f + ".assistant", a)})
    return out


def _assistant_fields(r: Row, f: str, m: dict, keys: dict, content_key: Optional[str], msg: dict) -> None:
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
    if content is None:
        msg["content"] = ""
    else:
        _content(r, f + ".content", content, msg)
    if think is not None:
        msg["reasoning_content"] = as_text(r, f + ".reasoning_content", think)
    if calls:
        msg["tool_calls"] = [_tool_call(r, f"{f}.tool_calls[{k}]", c) for k, c in enumerate(calls)]
    elif not msg["content"].strip() and not msg.get("reasoning_content", "").strip():
        raise r.err(f + ".content", "is empty: an assistant reply must have text to train on.",
                    "fill in the reply, drop the message, or drop the row.")


def _content(r: Row, f: str, value: Any, msg: dict) -> None:
    """Set msg's content from a message's content value: a string, or typed parts — images become <image> tags,
    their pictures kept under PARTS_KEY until `images.attach_images` matches them to the row's tags."""
    msg["content"], parts = read_content(r, f, value)
    if parts:
        msg[PARTS_KEY] = parts


def _with_loss(r: Row, f: str, m: dict, keys: dict, msg: dict) -> dict:
    """msg with the message's optional per-reply `"loss": true|false` copied over (checked)."""
    if "loss" in keys and m[keys["loss"]] is not None:
        loss = m[keys["loss"]]
        if not isinstance(loss, bool):
            raise r.err(f + ".loss", f"expected true or false, got {short(loss)}.",
                        "use \"loss\": false to exclude a reply from training.")
        msg["loss"] = loss
    return msg


def _is_text_parts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, dict) and p.get("type") == "text"
                                                           for p in value)


def _parse_maybe_json(r: Row, field: str, value: Any):
    """A JSON-encoded string decoded (tool_calls written as a string, as some exports do); anything else as is."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError as e:
            raise r.err(field, f"is a string that is not valid JSON ({e}).", "write it as a JSON list.") from None
    return value


# the fields a call may carry: ms-swift's {"name", "arguments"}, OpenAI's function object, and what some exports add
_CALL_KEYS = {"name", "arguments", "parameters", "id", "type", "index", "description"}


def _tool_call(r: Row, field: str, value: Any) -> dict:
    """One tool call — ms-swift's `tool_call` content ({"name", "arguments"}, as a dict or JSON string) or an
    OpenAI `tool_calls` item ({"type": "function", "function": {...}, "id"}) — in the canonical shape
    {"type": "function", "function": {"name": str, "arguments": dict}}. Arguments given as a JSON string are
    decoded (templates apply `tojson` to them); the call id is dropped (tool results are matched by position)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise r.err(field, f"is not valid JSON ({e}): {short(value)}.",
                        "write the call as {\"name\": \"fn\", \"arguments\": {...}}.") from None
    if not isinstance(value, dict):
        raise r.err(field, f"expected a tool call object, got {type(value).__name__} ({short(value)}).",
                    "write the call as {\"name\": \"fn\", \"arguments\": {...}}.")
    keys = lower_keys(value)
    if isinstance(value.get(keys.get("function", "function")), dict):  # OpenAI wraps the call in "function"
        field, value = field + ".function", value[keys["function"]]
        keys = lower_keys(value)
    name = value.get(keys.get("name", "name"))
    if not isinstance(name, str) or not name.strip():
        raise r.err(field + ".name", f"expected the function's name, got {short(name)}.",
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
            raise r.err(field, f"is not valid JSON ({e}): {short(args)}.",
                        "write the arguments as a JSON object such as {\"city\": \"Paris\"} (or as that text).") \
                from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise r.err(field, f"expected a JSON object of arguments, got {type(args).__name__} ({short(args)}).",
                    "write the arguments as an object: {\"name of the parameter\": value, ...}.")
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _order_tool_results(r: Row, field: str, value: list) -> list[tuple[int, Any]]:
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
                raise r.err(f"{field}[{j}].tool_call_id", f"{short(rid)} answers none of the calls before it "
                            f"(their ids: {', '.join(map(repr, order))}).",
                            "give each tool result the id of the call it answers.")
        if None not in order and len(order) == len(calls) == len(ids) and set(order) == set(ids):
            out[i + 1:end] = sorted(out[i + 1:end], key=lambda x: order[x[1]["tool_call_id"]])
    return out


def _merge_calls(prev: dict, msg: dict) -> None:
    """Append msg's tool calls (and text, if any) to the assistant turn prev; prev's `loss` wins (ms-swift)."""
    if msg["content"]:
        prev["content"] = prev["content"] + msg["content"]
    if msg.get(PARTS_KEY):
        prev[PARTS_KEY] = ImageParts([*prev.get(PARTS_KEY, ()), *msg[PARTS_KEY]])
    if msg.get("reasoning_content") and not prev.get("reasoning_content"):
        prev["reasoning_content"] = msg["reasoning_content"]
    prev["tool_calls"] = prev.get("tool_calls", []) + msg["tool_calls"]
    if "loss" in msg and "loss" not in prev:
        prev["loss"] = msg["loss"]


def reply_messages(r: Row, field: str, value: Any) -> list[dict]:
    """A chosen/rejected/response value: a string, one message, or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": as_text(r, field, value, allow_empty=False)}]
    msgs = normalise_messages(r, field, value)
    for i, m in enumerate(msgs):
        if m["role"] not in ("assistant", "tool"):
            raise r.err(f"{field}[{i}].role", f"a reply may hold only assistant/tool messages, got {m['role']!r}.",
                        "put the prompt's messages in 'prompt' (or 'messages') and only the reply here.")
    return msgs


def prepend_system(r: Row, messages: list[dict]) -> list[dict]:
    """messages with the row's system column (system, system_prompt) put first, unless they start with one."""
    key, system = r.get(*SYSTEM_KEYS)
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": as_text(r, key, system)}] + messages


def history_messages(r: Row) -> list[dict]:
    """The user/assistant turns of an alpaca/ms-swift `history` column ([[query, response], ...]); [] without it."""
    key, hist = r.get("history")
    if hist is None or hist == "":
        return []
    hist = parse_maybe_literal(r, key, hist)
    if not isinstance(hist, list):
        raise r.err(key, "expected a list of [query, response] pairs.", "write [[\"q1\", \"a1\"], [\"q2\", \"a2\"]].")
    out = []
    for i, pair in enumerate(hist):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise r.err(f"{key}[{i}]", f"expected a [query, response] pair, got {short(pair)}.",
                        "write [[\"q1\", \"a1\"], [\"q2\", \"a2\"]].")
        out.append({"role": "user", "content": as_text(r, f"{key}[{i}][0]", pair[0])})
        out.append({"role": "assistant", "content": as_text(r, f"{key}[{i}][1]", pair[1], allow_empty=False)})
    return out
