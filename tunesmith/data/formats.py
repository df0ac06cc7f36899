"""Detect a row's format and normalise it to tunesmith's one canonical record.

Canonical record (what every loader produces, what `tunesmith data convert` writes, what the encoder reads)::

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                   "reasoning_content": str (assistant, optional), "loss": bool (assistant, optional),
                   "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}, ...]
                                 (assistant, optional; content may then be "")}, ...],
     "rejected_messages": [...]   # preference rows: the same conversation ending in the rejected reply
     "label": bool                # KTO rows
     "tools": [{"type": "function", "function": {...}}, ...]   # passed to the chat template when present
     "images": [str, ...]         # rows with pictures: one reference per <image> tag in the messages, in order
     "rejected_images": [str, ...]  # pairs whose rejected conversation has pictures of its own
    }

Rows with pictures (`tunesmith.data.images`: ms-swift's `<image>` tags with `images`/`image` columns, OpenAI
`image_url` parts, TRL/Hugging Face `{"type": "image"}` parts) keep message contents as strings with `<image>` tags;
a row without pictures has no "images" key. Videos and audio are refused (not supported yet).

Accepted inputs follow ms-swift's auto-detection (messages/conversation(s), sharegpt from/value, alpaca,
query/response aliases, system columns, `rejected_response`, `rejected_messages`, KTO `label`) and, unlike
ms-swift, also `prompt`/`chosen`/`rejected` without any --columns mapping (TRL's and LLaMA-Factory's layout),
TRL's conversational forms (explicit `prompt` messages, or implicit: `chosen`/`rejected`/`completion` holding the
whole conversation) and both tool-call forms: ms-swift's `tool_call`/`tool_response` roles (consecutive calls are
one turn with parallel calls) and OpenAI's assistant `tool_calls` + `tool` messages. Either way the calls reach
the chat template as `tool_calls`, so what is trained is what the model's own template renders.

What lives here: `normalise_row` (one decoded row in; its canonical record, or a DataError saying why not), the
checks of the conversation as a whole, `extra_columns` and `row_kind`. It reads a row through
`tunesmith.data.layouts` (which columns hold what), `tunesmith.data.messages` (the messages themselves, tool calls
included), `tunesmith.data.images` (pictures: references read, files checked with PIL) and `tunesmith.data.row`
(the column names, the row's view and its errors): checks and rewrites of one decoded row at a time. What must
not: file or hub reading (`tunesmith.data.load`), tokenizers and chat templates (`tunesmith.data.encode`), torch
(not imported at all).
"""
from __future__ import annotations

from typing import Any, Optional

from tunesmith.data.images import IMAGE_COLUMNS, attach_images, refuse_other_media
from tunesmith.data.layouts import (read_channel, read_conversation, read_label, read_margin, read_tools,
                                    rejected_columns, shared_prefix)
from tunesmith.data.row import MESSAGE_KEYS, QUERY_KEYS, RESPONSE_KEYS, SYSTEM_KEYS, Row, rename_columns, short
from tunesmith.errors import DataError


def normalise_row(row: Any, source: str = "<data>", line=None, columns: Optional[dict] = None,
                  need_reply: bool = True) -> dict:
    """Normalise one row of any supported format to the canonical record, or raise DataError saying why not.

    row: one decoded JSON object (a dict); source, line: where it came from (file and 1-based line, or row number),
    quoted in errors. columns: renames {"their column": "ours"}, matched case-insensitively. need_reply: the
    conversation must end with an assistant reply (False for `tunesmith infer`, which generates it).
    Returns the canonical record (see the module docstring): "messages", plus "rejected_messages", "label", "tools",
    "images", "rejected_images" when present.
    Raises:
        DataError: not a dict, no known format, a malformed field, bad message order, a rejected reply identical
            to the chosen one, a bad picture, <image> tags and pictures that do not match, videos or audio (the
            message names the field and the fix).
    """
    if not isinstance(row, dict):
        raise DataError(source, line, "", f"expected a JSON object per row, got {type(row).__name__} ({short(row)}).",
                        "write one {\"messages\": [...]} object per line.")
    r = Row(rename_columns(row, columns), source, line)
    refuse_other_media(r)
    out: dict[str, Any] = {}
    msg_key = next((r.keys[k] for k in MESSAGE_KEYS if k in r.keys), None)
    messages, rejected = read_conversation(r, msg_key)
    rejected = rejected_columns(r, messages, rejected)
    if rejected is None and r.has("rejected_images") and r.row[r.keys["rejected_images"]] not in ([], ""):
        rejected = messages  # ms-swift: the same conversation, with other pictures
    field = msg_key or "messages"
    messages = _check_structure(r, field, messages, need_reply)
    if rejected is not None:
        rejected = _check_structure(r, "rejected", rejected, True)
    messages, rejected, media = attach_images(r, field, messages, rejected)
    out["messages"] = messages
    if rejected is not None:
        if rejected == messages and media.get("rejected_images", media.get("images")) == media.get("images"):
            raise r.err("rejected", "is identical to the chosen reply, so the pair carries no preference.",
                        "give a different rejected reply, or drop the row.")
        messages, rejected = _whole_completions(messages, rejected)
        out["messages"] = messages
        out["rejected_messages"] = rejected
        margin = read_margin(r)
        if margin is not None:
            out["margin"] = margin
    label = read_label(r)
    if label is not None:
        out["label"] = label
    channel = read_channel(r)
    if channel is not None:  # --enable_channel_loss
        out["channel"] = channel
    key, tools = r.get("tools")
    tools = read_tools(r, key, tools) if tools else None
    conversations = [messages] + ([rejected] if rejected is not None else [])
    if tools:
        _check_called_tools(r, key, tools, conversations)
        out["tools"] = tools
    elif any(m.get("tool_calls") for conv in conversations for m in conv):
        raise r.err(key or "tools", "is missing or empty, but the conversation calls tools: the model would learn "
                    "to call functions its prompt never shows.",
                    "add the functions it may call: \"tools\": [{\"type\": \"function\", \"function\": "
                    "{\"name\": ..., \"description\": ..., \"parameters\": {...}}}].")
    out.update(media)
    return out


def _check_structure(r: Row, field: str, messages: list[dict], need_reply: bool) -> list[dict]:
    roles = [m["role"] for m in messages]
    start = 1 if roles and roles[0] == "system" else 0
    if "system" in roles[start:]:
        raise r.err(f"{field}[{roles.index('system', start)}].role", "a system message may only come first.",
                    "move it to the start or merge it into the first system message.")
    if start < len(messages) and messages[start]["role"] == "assistant":
        if not need_reply:  # a prompt to generate from (infer, GRPO): an invented empty one would be answered
            raise r.err(f"{field}[{start}].role", "the conversation starts with an assistant message, so there is "
                        "no user turn to generate a reply to.", "put the user's message before it (a final "
                        "assistant reply is read as the expected answer), or drop the row.")
        # ms-swift's pretraining form (training): a leading assistant message gets an empty user turn.
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


def _call_names(calls: list[dict]) -> str:
    return ", ".join(repr(c["function"]["name"]) for c in calls)


def _no_reply(r: Row, field: str) -> DataError:
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


def _whole_completions(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict]]:
    """A pair whose completion (what follows the messages both sides share) holds several turns — a tool call,
    its result, then the answer — trains every assistant turn of that completion on each side (`"loss": true`),
    so that both sides' trained tokens start where the shared prompt ends (with last_round only the turn after
    the last tool result would be trained, and the two "prompts" would differ). An explicit per-message loss is
    kept; single-reply completions are left as they are."""
    n = shared_prefix(chosen, rejected)

    def marked(conv: list[dict]) -> list[dict]:
        tail = conv[n:]
        if sum(m["role"] == "assistant" for m in tail) < 2 and not any(m["role"] == "tool" for m in tail):
            return conv
        return conv[:n] + [{**m, "loss": True} if m["role"] == "assistant" and "loss" not in m else m for m in tail]
    return marked(chosen), marked(rejected)


def _check_called_tools(r: Row, key: str, tools: list, conversations: list[list[dict]]) -> None:
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
    "chosen", "rejected", "rejected_response", "rejected_messages", "tools", "label", "margin", "channel",
    *IMAGE_COLUMNS, "rejected_images"}


def extra_columns(row: Any, columns: Optional[dict] = None) -> dict:
    """The row's columns that its format does not read (ids, metadata, a GRPO `solution` next to `messages`, …):
    `tunesmith infer` writes them back unchanged, GRPO hands them to the reward functions.

    row: a decoded row (anything else gives {}); columns: the same --columns renames as normalise_row.
    Returns {column name (after renames): value}."""
    if not isinstance(row, dict):
        return {}
    row = rename_columns(row, columns)
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
        "history", "chosen", "rejected", "rejected_response", "rejected_messages", "tools", "label", "margin",
        "channel", *IMAGE_COLUMNS, "rejected_images"}


def row_kind(record: dict) -> str:
    """The training kind of a canonical record: "preference" (has rejected_messages), "kto" (has label) or "sft"."""
    if "rejected_messages" in record:
        return "preference"
    if "label" in record:
        return "kto"
    return "sft"
