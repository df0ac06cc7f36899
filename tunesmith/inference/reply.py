"""Template-aware output: split what a model generated into reasoning, answer and tool calls, the same way for a
finished reply and for a stream in progress.

What lives here: the text conventions of the chat templates we serve (Qwen3/DeepSeek-R1 `<think>…</think>`,
gpt-oss Harmony channels, Hermes/Qwen `<tool_call>` JSON, Llama 3.1 JSON calls) and the stream bookkeeping that
turns successive parses into OpenAI deltas. What must not: token ids, sampling, HTTP. No torch import.

The one rule that keeps stream and non-stream equal: a stream only ever sends text that is a prefix of what the
finished parse will return (leading/trailing whitespace, partial markers and partial stop strings are held back),
and its last delta is the finished parse minus what was sent.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional

_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>")


@dataclass
class Parsed:
    """A parse of generated text: reasoning (None when the template has none), the visible answer, and the
    completed tool calls in OpenAI's shape ({"id", "type": "function", "function": {"name", "arguments"}})."""
    content: str
    reasoning: Optional[str] = None
    tool_calls: list = field(default_factory=list)


def template_style(tokenizer) -> tuple[str, Optional[str]]:
    """(reasoning style, tool-call style) read from the chat template and vocabulary:
    reasoning "harmony" | "think" | "none"; tools "harmony" | "hermes" | "llama3_json" | None.

    tokenizer: a transformers tokenizer; `chat_template` may be a string or a dict of named templates."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    if "<|channel|>" in template:
        return "harmony", "harmony"
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    # only a template that renders think blocks makes `</think>` mean "end of reasoning": a vocabulary that merely
    # holds the token (many do) must not split an ordinary reply, or a stream would send text twice
    reasoning = "think" if "<think>" in template else "none"
    if "<tool_call>" in template:
        tools = "hermes"
    elif "<|python_tag|>" in template or '"parameters"' in template:
        tools = "llama3_json"
    else:
        tools = "hermes" if "<tool_call>" in vocab else None
    return reasoning, tools


class OutputParser:
    """Parses one template's generated text. `specials` are the tokenizer's special-token strings, removed from
    the visible text; `stops` are a request's stop strings (held back while they may still complete)."""

    def __init__(self, tokenizer):
        self.reasoning_style, self.tool_style = template_style(tokenizer)
        self.specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)

    def parse(self, raw: str, *, tools: bool, final: bool, in_think: bool = False,
              stops: tuple = ()) -> Parsed:
        """Split raw generated text (special tokens kept). tools: parse tool calls (the request offered tools).
        final: the generation ended; otherwise hold back what may still change. in_think: the prompt already
        opened a `<think>` block (DeepSeek-R1 style), so the output starts inside the reasoning.

        stops: the request's stop strings; the text from the first one on is dropped. Returns a Parsed; invalid
        tool-call JSON stays in the content. Never raises on model output."""
        hits = [raw.find(s) for s in stops if s and s in raw]
        if hits:  # the engine stops at a stop string one step after a reader may see it: never show it
            raw = raw[:min(hits)]
        if self.reasoning_style == "harmony":
            return self._harmony(raw, tools, final, stops)
        reasoning = None
        text = raw
        if self.reasoning_style == "think":
            reasoning, text = _split_think(raw, in_think, final)
        calls: list = []
        if tools and self.tool_style == "hermes":
            calls, text = _hermes_calls(text, final)
        elif tools and self.tool_style == "llama3_json":
            calls, text = _llama_calls(self._clean(text), final)
        content = self._visible(text, final, stops + (("<tool_call>",) if tools else ()) + ("<think>", "</think>"))
        if reasoning is not None:
            reasoning = self._visible(reasoning, final, ("</think>",) + stops)
        return Parsed(content, reasoning, calls)

    def _harmony(self, raw: str, tools: bool, final: bool, stops: tuple) -> Parsed:
        """gpt-oss Harmony: messages `[<|start|>assistant]<|channel|>C[ to=R]<|message|>BODY<|end|>`; analysis →
        reasoning, final (and commentary to the user) → content, `to=functions.NAME` → a tool call."""
        reasoning, content, calls = [], [], []
        for chunk in raw.split("<|start|>"):
            header, sep, body = chunk.partition("<|message|>")
            if not sep:
                continue  # a header still being generated
            ends = [body.find(e) for e in _HARMONY_ENDS if e in body]
            complete = bool(ends)
            body = body[:min(ends)] if ends else body
            channel = re.search(r"<\|channel\|>\s*(\w+)", header)
            recipient = re.search(r"to=([^\s<]+)", header)
            if recipient and recipient.group(1).startswith("functions."):
                if tools and (complete or final):
                    calls.append(_call(recipient.group(1)[len("functions."):], body.strip()))
            elif channel and channel.group(1) == "analysis":
                reasoning.append(body)
            else:
                content.append(body)
        joined = "".join(content)
        return Parsed(self._visible(joined, final, stops),
                      self._visible("".join(reasoning), final, stops) if reasoning else None, calls)

    def _clean(self, text: str) -> str:
        for s in self.specials:
            text = text.replace(s, "")
        return text

    def _visible(self, text: str, final: bool, holds: tuple) -> str:
        """The text a reader sees: specials removed, stripped; mid-generation also without a tail that may still
        become a marker or stop string, and without trailing whitespace (the finished reply is stripped)."""
        text = self._clean(text).lstrip()
        if final:
            return text.strip()
        cut = max((k for s in holds if s for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[:len(text) - cut].rstrip()


def _split_think(raw: str, in_think: bool, final: bool) -> tuple[Optional[str], str]:
    """(reasoning, rest) for `<think>…</think>` templates; reasoning None when the reply has no think block."""
    head = raw.lstrip()
    opened = head.startswith("<think>")
    if not (opened or in_think):
        if not final and head and "<think>".startswith(head):
            return None, ""                 # maybe the start of `<think>`: wait
        return None, raw                    # no think block: a stray `</think>` later is just text
    body = head[len("<think>"):] if opened else raw
    if "</think>" in body:
        before, _, after = body.partition("</think>")
        return before.strip(), after
    return body, ""                         # still thinking (or cut off while thinking)


def _hermes_calls(text: str, final: bool) -> tuple[list, str]:
    """Complete `<tool_call>{json}</tool_call>` blocks become calls; invalid JSON stays text. Mid-generation, an
    open block is held back."""
    calls, kept, last = [], [], 0
    for m in _HERMES_BLOCK.finditer(text):
        call = _json_call(m.group(1))
        if call is None:
            continue
        kept.append(text[last:m.start()])
        calls.append(call)
        last = m.end()
    rest = text[last:]
    if not final and "<tool_call>" in rest:
        rest = rest[:rest.find("<tool_call>")]
    return calls, "".join(kept) + rest


def _llama_calls(text: str, final: bool) -> tuple[list, str]:
    """Llama 3.1: the whole reply is `{"name": …, "parameters": {…}}` (several separated by `;`)."""
    body = text.strip()
    if not body.startswith("{"):
        return [], text
    if not final:
        return [], ""  # may be a call being written: show nothing yet
    calls = [_json_call(part) for part in body.split(";") if part.strip()] if body.count("{") else []
    if calls and all(c is not None for c in calls):
        return calls, ""
    return [], text


def _json_call(text: str) -> Optional[dict]:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return _call(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class StreamDeltas:
    """Turns successive parses of a growing output into OpenAI delta fields (`reasoning_content`, `content`,
    `tool_calls`), each sent once and in order."""

    def __init__(self):
        self.sent_reasoning, self.sent_content, self.sent_calls = "", "", 0

    def delta(self, parsed: Parsed) -> dict:
        """What `parsed` adds to what was already sent: {"reasoning_content": str, "content": str, "tool_calls":
        [{"index", "id", "type", "function"}]}, only the keys with something new (often {}); records it as sent.
        A field whose new text does not extend what was sent contributes nothing."""
        out: dict = {}
        r = parsed.reasoning or ""
        if r.startswith(self.sent_reasoning) and len(r) > len(self.sent_reasoning):
            out["reasoning_content"] = r[len(self.sent_reasoning):]
            self.sent_reasoning = r
        c = parsed.content
        if c.startswith(self.sent_content) and len(c) > len(self.sent_content):
            out["content"] = c[len(self.sent_content):]
            self.sent_content = c
        if len(parsed.tool_calls) > self.sent_calls:
            out["tool_calls"] = [{"index": i, **call} for i, call in enumerate(parsed.tool_calls)
                                 if i >= self.sent_calls]
            self.sent_calls = len(parsed.tool_calls)
        return out


def to_template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages → what chat templates expect: `tool_calls[].function.arguments` as a mapping (the
    templates apply `tojson` to it; a JSON string would be quoted twice), null content as "", None-valued keys
    dropped (templates test `'tool_calls' in message`).

    Returns new dicts; the input is not modified. Arguments that are not valid JSON are passed on as the string."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass  # not JSON: rendered as given
                c["function"] = fn
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out
