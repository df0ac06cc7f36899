"""Which columns of a row hold its conversation, by layout, and the columns beside it (`tunesmith.data.formats`).

Layouts (ms-swift's auto-detection, and more): a messages column (with LLaMA-Factory's sharegpt `chosen`/`rejected`
replies next to it); alpaca's instruction/input/output and the query/response aliases, after `history`;
`prompt`/`chosen`/`rejected` (TRL, LLaMA-Factory; the prompt a string or messages); TRL's conversational forms
(explicit prompt messages, or implicit: `chosen`/`rejected`/`completion` holding the whole conversation);
ms-swift's `rejected_response` and `rejected_messages`. Beside the conversation: `tools` (OpenAI tool objects, Arrow
padding dropped), a pair's `margin` and KTO's `label` (images and the other media: `tunesmith.data.images`).
"""
from __future__ import annotations

import json
from typing import Any, Optional

from tunesmith.data.messages import history_messages, normalise_messages, prepend_system, reply_messages
from tunesmith.data.row import MESSAGE_KEYS, QUERY_KEYS, RESPONSE_KEYS, ROLE_MAP, Row, as_text, lower_keys, short


def read_conversation(r: Row, msg_key: Optional[str]) -> tuple[list[dict], Optional[list[dict]]]:
    """(messages, rejected messages or None) from whichever layout the row uses."""
    if r.has("chosen") and r.has("rejected") and _has_prompt_turn(r.row[r.keys["chosen"]]):
        return _implicit_pair(r)
    if msg_key is not None and r.has("chosen") and r.has("rejected"):
        # sharegpt preference (LLaMA-Factory): conversations = prompt, chosen/rejected = reply messages
        return _chosen_and_rejected(r, prepend_system(r, normalise_messages(r, msg_key, r.row[msg_key])))
    if msg_key is not None:
        return prepend_system(r, normalise_messages(r, msg_key, r.row[msg_key])), None
    if r.has("chosen") and r.has("rejected"):
        return _chosen_and_rejected(r, _preference_prompt(r))
    return _query_and_reply(r), None


def _implicit_pair(r: Row) -> tuple[list[dict], list[dict]]:
    """TRL's implicit-prompt pair: `chosen` and `rejected` are whole conversations (HuggingFaceH4/
    ultrafeedback_binarized); the messages they share before the first differing reply are the prompt. A `prompt`
    or `messages` column next to them is not read. After the shared prompt each side may hold only its reply
    (assistant and tool messages)."""
    ck, rk = r.keys["chosen"], r.keys["rejected"]
    chosen = prepend_system(r, normalise_messages(r, ck, r.row[ck]))
    rejected = prepend_system(r, normalise_messages(r, rk, r.row[rk]))
    n = shared_prefix(chosen, rejected)
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


def shared_prefix(a: list, b: list) -> int:
    """How many leading messages two conversations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _has_prompt_turn(value: Any) -> bool:
    """Whether a chosen/rejected/completion value (a message or a list of them) holds a user or system message:
    a whole conversation rather than only the reply."""
    for m in [value] if isinstance(value, dict) else value if isinstance(value, list) else []:
        if isinstance(m, dict):
            keys = lower_keys(m)
            role = m.get(keys.get("role") or keys.get("from") or "role")
            if isinstance(role, str) and ROLE_MAP.get(role.lower()) in ("user", "system"):
                return True
    return False


def _chosen_and_rejected(r: Row, prompt: list[dict]) -> tuple[list[dict], list[dict]]:
    """(prompt + chosen reply, prompt + rejected reply) from the row's `chosen`/`rejected` columns."""
    messages = prompt + reply_messages(r, r.keys["chosen"], r.row[r.keys["chosen"]])
    rejected = prompt + reply_messages(r, r.keys["rejected"], r.row[r.keys["rejected"]])
    return messages, rejected


def _preference_prompt(r: Row) -> list[dict]:
    """The prompt of a `prompt`/`chosen`/`rejected` row (TRL, LLaMA-Factory): a string or messages, plus system."""
    pkey, prompt_v = r.get("prompt", "query", "question", "instruction", "input")
    if prompt_v is None:
        raise r.err("prompt", "is missing: a chosen/rejected row needs the prompt they answer.",
                    "add \"prompt\": \"...\" (a string or a list of messages), or give chosen and rejected as "
                    "whole conversations (with the user turn) that differ only in the final reply.")
    if isinstance(prompt_v, str):
        prompt = [{"role": "user", "content": prompt_v}]
    else:
        prompt = normalise_messages(r, pkey, prompt_v)
    return prepend_system(r, prompt)


def _query_and_reply(r: Row) -> list[dict]:
    """Messages of an alpaca (instruction/input/output) or query/response row, after its `history` and system."""
    if "instruction" in r.keys and "input" in r.keys:  # alpaca
        ins = as_text(r, r.keys["instruction"], r.row[r.keys["instruction"]] or "")
        inp = as_text(r, r.keys["input"], r.row[r.keys["input"]] or "")
        qkey, query = r.keys["instruction"], "\n".join(x for x in (ins, inp) if x)
    else:
        qkey, query = r.get(*QUERY_KEYS)
    rkey, resp = r.get(*[k for k in RESPONSE_KEYS if k != (qkey or "").lower()])
    if isinstance(resp, list) and resp and all(isinstance(x, str) for x in resp):
        resp = resp[0]  # ms-swift: a list of answers trains on the first
    if isinstance(query, (list, dict)) or isinstance(resp, (list, dict)):
        return _conversational_prompt_completion(r, qkey, query, rkey, resp)
    if query is not None:
        query = as_text(r, qkey, query)
    if query is None and resp is None:
        known = ", ".join(sorted(MESSAGE_KEYS + ("instruction/input/output", "query/response",
                                                 "prompt/chosen/rejected", "text (plain text: tunesmith pt)")))
        raise r.err("", f"no known format: columns are {', '.join(map(str, r.row)) or 'none'}.",
                    f"use one of: {known}; or map your columns with --columns '{{\"yours\": \"query\"}}'.")
    messages = history_messages(r)
    if query is not None:
        messages.append({"role": "user", "content": query})
    if resp is not None:
        messages.append({"role": "assistant", "content": as_text(r, rkey, resp, allow_empty=False)})
    return prepend_system(r, messages)


def _conversational_prompt_completion(r: Row, qkey: Optional[str], query: Any, rkey: Optional[str],
                                      resp: Any) -> list[dict]:
    """TRL's conversational prompt/completion row (KTO's unpaired form with `label`, or SFT): the prompt (a string
    or messages) followed by the completion's reply messages. A completion that holds the whole conversation (a
    user message in it: TRL's implicit prompt) is used as is, and a prompt column next to it is not read."""
    if resp is not None and _has_prompt_turn(resp):
        return prepend_system(r, normalise_messages(r, rkey, resp))
    if query is None:
        prompt = []
    elif isinstance(query, str):
        prompt = [{"role": "user", "content": query}]
    else:
        prompt = normalise_messages(r, qkey, query)
    return prepend_system(r, prompt + (reply_messages(r, rkey, resp) if resp is not None else []))


def rejected_columns(r: Row, messages: list[dict], rejected: Optional[list[dict]]) -> Optional[list[dict]]:
    """`rejected` unless already set, else from ms-swift's `rejected_response` (the reply to the last user turn)
    or `rejected_messages` (a whole conversation) column; None when the row has neither."""
    key, rej = r.get("rejected_response")
    if rej is not None and rejected is None:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        rejected = messages[: last_user + 1] + reply_messages(r, key, rej)
    key, rej_msgs = r.get("rejected_messages")
    if rej_msgs is not None and rejected is None:
        rejected = prepend_system(r, normalise_messages(r, key, rej_msgs))
    return rejected


def read_margin(r: Row) -> Optional[float]:
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
        raise r.err(key, f"expected a finite number (the reward margin of the pair), got {short(v)}.",
                    "write e.g. \"margin\": 1.5, or drop the column.")
    return float(v)


def read_channel(r: Row) -> Optional[str]:
    """ms-swift's `channel` column (--enable_channel_loss: the loss is logged per channel) as text, or None when
    absent or null."""
    key, v = r.get("channel")
    if v is None:
        return None
    if isinstance(v, (dict, list)):
        raise r.err(key, f"expected a channel name (text or a number), got {short(v)}.",
                    "write e.g. \"channel\": \"math\", or drop the column.")
    return str(v)


def read_label(r: Row) -> Optional[bool]:
    """KTO's `label` (true/false, 1/0, or those as strings) as a bool, or None when absent."""
    key, v = r.get("label")
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    raise r.err(key, f"expected true or false (KTO: is the reply desirable?), got {short(v)}.",
                "write \"label\": true or \"label\": false.")


def read_tools(r: Row, key: str, tools: Any) -> list:
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
            raise r.err(f"{key}[{i}]", f"expected a tool object, got {type(tool).__name__} ({short(tool)}).",
                        "write {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}.")
        tool = _drop_padding(tool)
        tool = tool if "type" in tool or "function" in tool else {"type": "function", "function": tool}
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise r.err(f"{key}[{i}]", f"has no function name ({short(tool)}).",
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
