"""The OpenAI API's wire format for `tunesmith deploy`: request schemas, their validation, error and response bodies.

Requests: pydantic models (`ChatRequest`, `CompletionRequest`, over the shared `Sampling` fields) with JSON number
checks OpenAI makes (no "3" or true where a number belongs), plus the checks pydantic cannot express
(`check_unicode`, `chat_messages`). A user message's `image_url` content parts become ms-swift's `<image>` tags in
its text, where the part was, and `image_urls` lists their URLs in the same order (tunesmith.serve.images reads
them). Errors: `ApiError`, answered with `error_body` — OpenAI's shape `{"error": {"message", "type", "param",
"code"}}` with ms-swift's `"object": "error"` alongside. Responses: the assistant message, streaming chunks and usage
of `chat.completion` / `text_completion` bodies.

A new endpoint's request model goes here, its handler in `tunesmith.serve.routes`. No torch or fastapi import
(pydantic only, for the schemas). The request models carry no docstrings on purpose: FastAPI would publish them in
/openapi.json.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

# The request schemas live at module level so FastAPI can resolve the handlers' annotations. This module is
# imported only by `tunesmith deploy`, so pydantic never slows the CLI's start-up.


def _json_number(what: str):
    """A validator that refuses a string or a boolean where a JSON number belongs (pydantic's lax mode would read
    "3" as 3 and true as 1; OpenAI answers 400). An int is a fine float, as in OpenAI; a float with no fraction is
    a fine int (1e12)."""
    def check(value):
        if isinstance(value, (str, bool)):
            from pydantic_core import PydanticCustomError
            raise PydanticCustomError(f"{what}_type", "expected {expected}, got {got}",
                                      {"expected": "an integer" if what == "int" else "a number",
                                       "got": "a boolean" if isinstance(value, bool) else "a string"})
        return value
    return BeforeValidator(check)


Int = Annotated[int, _json_number("int")]
Float = Annotated[float, _json_number("float")]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(system|developer|user|assistant|tool)$")
    content: Optional[Union[str, list]] = None
    tool_calls: Optional[list] = None
    tool_call_id: Optional[str] = None
    name: Optional[str] = None


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[Int] = Field(None, ge=1)
    max_completion_tokens: Optional[Int] = Field(None, ge=1)
    temperature: Optional[Float] = Field(None, ge=0, le=2)
    top_p: Optional[Float] = Field(None, gt=0, le=1)
    top_k: Optional[Int] = Field(None, ge=-1)
    repetition_penalty: Optional[Float] = Field(None, gt=0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[Int] = None
    n: Int = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: Optional[dict] = None
    top_logprobs: Optional[Int] = Field(None, ge=0)
    response_format: Optional[dict] = None
    chat_template_kwargs: Optional[dict] = None
    enable_thinking: Optional[StrictBool] = None   # also accepted top-level, as Qwen's own servers take it
    user: Optional[str] = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: Optional[StrictBool] = None
    tools: Optional[list] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict]] = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]
    logprobs: Optional[Union[StrictBool, Int]] = None  # the legacy endpoint's int (top alternatives); refused


# Fields of OpenAI's requests (and vLLM's, ms-swift's) that this server does not act on, with the values that
# change nothing (null always does): accepted at those values, refused by name otherwise (`Server.config`), never
# silently ignored; the hint says what to do instead.
UNSUPPORTED = {
    "presence_penalty": ((0,), "repetition_penalty is supported"),
    "frequency_penalty": ((0,), "repetition_penalty is supported"),
    "logit_bias": (({},), ""), "echo": ((False,), ""), "best_of": ((1,), ""), "suffix": (("",), ""),
    "min_tokens": ((0,), ""), "min_p": ((0,), "top_p and top_k are supported"), "length_penalty": ((1,), ""),
    "num_beams": ((1,), "serve with --num_beams instead"), "ignore_eos": ((False,), ""),
    "parallel_tool_calls": ((True,), "the model decides how many calls it makes"), "store": ((False,), ""),
    "modalities": ((["text"],), "this server answers in text"), "audio": ((), "this server answers in text"),
    "prediction": ((), ""), "web_search_options": ((), ""), "functions": (([],), "use tools"),
    "function_call": ((), "use tool_choice"), "verbosity": ((), ""),
    "reasoning_effort": ((), 'pass chat_template_kwargs {"reasoning_effort": ...} to a template that reads it '
                             '(gpt-oss), or enable_thinking'),
}
# Fields that only label a request for the caller's own bookkeeping: accepted and ignored, as vLLM does.
LABELS = ("metadata", "service_tier", "prompt_cache_key", "safety_identifier")


class ApiError(Exception):
    """An error answered with HTTP `status` and OpenAI's error body; code and param fill its fields."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str, param: Optional[str] = None) -> dict:
    """OpenAI's error body (with ms-swift's `"object": "error"`); its type follows the status: authentication_error
    for 401, invalid_request_error below 500, server_error from 500."""
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    return {"object": "error", "message": message,
            "error": {"message": message, "type": kind, "param": param, "code": code}}


def _text(content, where: str, role: str) -> str:
    """OpenAI content: a string or a list of parts; text parts are joined, an image part (a user message's) becomes
    an `<image>` tag where it stands. where: the content's param (messages[i].content). Raises ApiError 400 naming
    the field (`_part`) for a part that is not an object, without a type or of another type, a text part whose text
    is missing or not a string, an image outside a user message, or an image part without its URL (`_image_url`)."""
    from tunesmith.data.encode import IMAGE_TAG

    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for k, p in enumerate(content):
        at = f"{where}[{k}]"
        if _part(p, at) == "text":
            parts.append(p["text"])
        else:
            if role != "user":
                raise ApiError(400, f"{at}: only a user message may carry images (this is a {role} message)",
                               param=at)
            parts.append(IMAGE_TAG)
    return "".join(parts)


def _part(p, at: str) -> str:
    """A content part's type, "text" or "image_url", once its fields are as OpenAI requires: an object with a
    string `type`; a text part's `text` a string; an image part's URL a non-empty string (`_image_url`). at: the
    part's param (messages[i].content[k]). Raises ApiError 400 naming the field (param at.type, at.text, ...)."""
    if not isinstance(p, dict):
        raise ApiError(400, f"Invalid type for '{at}': expected an object (a content part such as {{\"type\": "
                            f"\"text\", \"text\": \"...\"}}), but got {_json_type(p)}.", param=at)
    kind = p.get("type")
    if kind is None:
        raise ApiError(400, f"Missing required parameter: '{at}.type' ('text' or 'image_url').", param=f"{at}.type")
    if kind == "text":
        if "text" not in p:
            raise ApiError(400, f"Missing required parameter: '{at}.text'.", param=f"{at}.text")
        if not isinstance(p["text"], str):
            raise ApiError(400, f"Invalid type for '{at}.text': expected a string, but got {_json_type(p['text'])}.",
                           param=f"{at}.text")
        return kind
    if kind == "image_url":
        _image_url(p, at)
        return kind
    shown = repr(kind) if isinstance(kind, str) else f"a {_json_type(kind)}"
    raise ApiError(400, f"Invalid value for '{at}.type': content parts of type {shown} are not supported; this "
                        f"server takes 'text' and 'image_url' parts.", param=f"{at}.type")


def _json_type(value) -> str:
    """The JSON name of a value's type, for messages (a number, a string, an array...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _image_url(part: dict, where: str) -> str:
    """The URL of an `image_url` part: {"image_url": {"url": URL, "detail": ...}} or the plain {"image_url": URL}
    (detail is accepted and ignored: the picture is sized by --max_pixels). Raises ApiError 400 naming the field
    without one, or with one that is not a non-empty string."""
    value = part.get("image_url")
    if isinstance(value, dict):
        url, at = value.get("url"), f"{where}.image_url.url"
    else:
        url, at = value, f"{where}.image_url"
    if url is None:
        raise ApiError(400, f"Missing required parameter: '{at}' (expected {{\"url\": "
                            f"\"data:image/png;base64,...\"}}, or an http(s) URL).", param=at)
    if not isinstance(url, str):
        raise ApiError(400, f"Invalid type for '{at}': expected a string (a data: URL or an http(s) URL), but got "
                            f"{_json_type(url)}.", param=at)
    if not url.strip():
        raise ApiError(400, f"Invalid value for '{at}': an empty URL; expected a data: URL "
                            f"(data:image/png;base64,...) or an http(s) URL.", param=at)
    return url.strip()


def image_urls(req: "ChatRequest") -> list[tuple[str, str]]:
    """The pictures of a chat request's `image_url` parts, in the order their `<image>` tags stand in the rendered
    conversation: [(param, url)], param naming the part (messages[i].content[k].image_url). Run after
    `chat_messages`, which validates the parts."""
    out = []
    for i, m in enumerate(req.messages):
        for k, p in enumerate(m.content if isinstance(m.content, list) else []):
            if isinstance(p, dict) and p.get("type") == "image_url":
                where = f"messages[{i}].content[{k}]"
                out.append((f"{where}.image_url", _image_url(p, where)))
    return out


def check_fields(req: Sampling) -> None:
    """Refuse a field OpenAI's API does not define (nor vLLM's extras this server takes: top_k, repetition_penalty,
    chat_template_kwargs, enable_thinking), as OpenAI does: 400 "Unrecognized request argument supplied: NAME"
    naming it (the first one as param). Fields in UNSUPPORTED and LABELS are known; Server.config judges their
    values. Also refuses stream_options without stream, as OpenAI does."""
    unknown = [k for k in (req.model_extra or {}) if k not in UNSUPPORTED and k not in LABELS]
    if unknown:
        many = "s" if len(unknown) > 1 else ""
        raise ApiError(400, f"Unrecognized request argument{many} supplied: {', '.join(unknown)}", param=unknown[0])
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options")


def check_tools(tools: Optional[list]) -> None:
    """Each entry of a request's `tools` must be {"type": "function", "function": {"name": a non-empty string,
    "parameters": an object (optional), "description": a string (optional)}}, and the list not empty, as OpenAI
    requires. Raises ApiError 400 naming the first bad field (e.g. param tools[0].function.name)."""
    if tools is None:
        return
    if not tools:
        raise ApiError(400, "Invalid 'tools': empty array. Expected an array with minimum length 1; leave tools out "
                            "for a request without tools", param="tools")
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise ApiError(400, f"Invalid type for '{where}': expected an object, but got "
                                f"{type(tool).__name__}", param=where)
        if tool.get("type") != "function":
            raise ApiError(400, f"Invalid value for '{where}.type': {tool.get('type')!r}. Supported values are: "
                                f"'function'.", param=f"{where}.type")
        fn = tool.get("function")
        if fn is None:
            raise ApiError(400, f"Missing required parameter: '{where}.function'.", param=f"{where}.function")
        if not isinstance(fn, dict):
            raise ApiError(400, f"Invalid type for '{where}.function': expected an object", param=f"{where}.function")
        if not isinstance(fn.get("name"), str) or not fn["name"].strip():
            missing = "Missing required parameter" if fn.get("name") is None else "Invalid value (expected the " \
                                                                                   "function's name, a string)"
            raise ApiError(400, f"{missing}: '{where}.function.name'.", param=f"{where}.function.name")
        for key, kind in (("parameters", dict), ("description", str)):
            if fn.get(key) is not None and not isinstance(fn[key], kind):
                raise ApiError(400, f"Invalid type for '{where}.function.{key}': expected "
                                    f"{'an object (a JSON schema)' if kind is dict else 'a string'}",
                               param=f"{where}.function.{key}")


def check_unicode(req: BaseModel) -> None:
    """Every string of the request (keys too) must be valid Unicode: JSON's `\\ud800` escape without its other half
    decodes to a lone surrogate, which no tokenizer can take. Raises ApiError 400 naming the field."""
    stack: list = [("", req.model_dump(exclude_none=True))]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{path or 'the request'}: holds an unpaired surrogate (a \\ud800-style escape "
                                    f"without its other half, e.g. an emoji cut in two), which is not valid Unicode; "
                                    f"send the whole character", param=path or None) from None
        elif isinstance(value, dict):
            stack += [(f"{path}.{k}" if path else str(k), v) for k, v in reversed(value.items())]
            stack += [(path, str(k)) for k in value]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value)))]


def chat_messages(req: ChatRequest) -> list[dict]:
    """The request's messages as plain dicts for the template: text content (a user message's image parts as
    `<image>` tags; `image_urls` gives their pictures), assistant `tool_calls` and `reasoning_content`, tool
    messages' `tool_call_id`/`name` (`developer` is the system role of newer clients).

    Raises ApiError 400, as OpenAI's API: a message without content (only an assistant message with tool_calls may
    leave it null), a content part other than text and a user's image_url, a malformed tool call (`_check_calls`),
    or tool turns that do not match their calls (`ToolTurns`)."""
    out = []
    turns = ToolTurns()
    for i, m in enumerate(req.messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"messages[{i}].content is missing: a {m.role} message needs content (a string or a "
                                f"list of text parts)" + ("; only an assistant message with tool_calls may leave it "
                                                          "null" if m.role == "assistant" else ""),
                           param=f"messages[{i}].content")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": _text(m.content, f"messages[{i}].content", m.role)}
        if m.tool_calls is not None:
            _check_calls(i, m)
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
        turns.feed(i, m)
        for key in ("tool_call_id", "name"):
            if getattr(m, key):
                msg[key] = getattr(m, key)
        extra = m.model_extra or {}
        if extra.get("reasoning_content"):
            msg["reasoning_content"] = extra["reasoning_content"]
        out.append(msg)
    turns.end()
    return out


def _check_calls(i: int, m: Message) -> None:
    """An assistant message's tool_calls as OpenAI requires them: each {"id": a string, "type": "function",
    "function": {"name": a string, "arguments": a JSON object, as a string (or the object itself)}}. Raises
    ApiError 400 naming the field (param messages[i].tool_calls[k]...)."""
    where = f"messages[{i}].tool_calls"
    if m.role != "assistant":
        raise ApiError(400, f"{where}: only an assistant message may carry tool_calls (a {m.role} message does not; "
                            f"a tool's result is a tool message with tool_call_id)", param=where)
    for k, c in enumerate(m.tool_calls):
        at = f"{where}[{k}]"
        if not isinstance(c, dict) or not isinstance(c.get("function"), dict) or \
                not isinstance(c["function"].get("name"), str) or not c["function"]["name"]:
            raise ApiError(400, f"{at}: each tool_calls entry needs function.name (and function.arguments)",
                           param=f"{at}.function.name")
        if not isinstance(c.get("id"), str) or not c["id"]:
            raise ApiError(400, f"Missing required parameter: '{at}.id' (the call's id, which the tool message "
                                f"answering it names as tool_call_id).", param=f"{at}.id")
        if c.get("type", "function") != "function":
            raise ApiError(400, f"Invalid value for '{at}.type': {c['type']!r}. Supported values are: 'function'.",
                           param=f"{at}.type")
        args = c["function"].get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as e:
                raise ApiError(400, f"{at}.function.arguments is not valid JSON ({e}): send the call's arguments "
                                    "as a JSON object string, e.g. '{\"city\": \"Paris\"}'",
                               param=f"{at}.function.arguments") from None
        if not isinstance(args, dict):
            raise ApiError(400, f"{at}.function.arguments: expected a JSON object of arguments (as a string), got "
                                f"{type(args).__name__}", param=f"{at}.function.arguments")


class ToolTurns:
    """The order OpenAI's API requires of tool turns, fed one message at a time: a tool message names (tool_call_id)
    a call of the assistant message right before its run of tool messages, and every call is answered before the
    next other message (or the end of the conversation). Raises ApiError 400 naming the message."""

    def __init__(self):
        self.pending: dict = {}       # call id -> function name: calls not answered yet
        self.calls_at = None          # the index of the assistant message whose calls the tool messages answer

    def feed(self, i: int, m: Message) -> None:
        """Check message i against the calls before it; the calls of an assistant message open a new run."""
        if m.role == "tool":
            if not m.tool_call_id:
                raise ApiError(400, f"Missing required parameter: 'messages[{i}].tool_call_id' (the id of the call "
                                    f"this result answers).", param=f"messages[{i}].tool_call_id")
            if self.calls_at is None:
                raise ApiError(400, f"messages[{i}]: messages with role 'tool' must be a response to a preceding "
                                    f"message with 'tool_calls'", param=f"messages[{i}].role")
            if m.tool_call_id not in self.pending:
                raise ApiError(400, f"messages[{i}].tool_call_id {m.tool_call_id!r} answers none of the unanswered "
                                    f"calls of messages[{self.calls_at}]"
                               + (f" (their ids: {', '.join(map(repr, self.pending))})" if self.pending else ""),
                               param=f"messages[{i}].tool_call_id")
            del self.pending[m.tool_call_id]
            return
        self.end()
        self.calls_at = None
        if m.role == "assistant" and m.tool_calls:
            self.pending, self.calls_at = {c["id"]: c["function"]["name"] for c in m.tool_calls}, i

    def end(self) -> None:
        """Every call made so far must have its tool message by now."""
        if self.pending:
            raise ApiError(400, f"An assistant message with 'tool_calls' must be followed by tool messages "
                                f"responding to each 'tool_call_id'. The following tool_call_ids did not have "
                                f"response messages: {', '.join(self.pending)} (messages[{self.calls_at}])",
                           param=f"messages[{self.calls_at}].tool_calls")


# ------------------------------------------------------------------ response bodies

def assistant_message(r) -> dict:
    """A Reply as an OpenAI assistant message (content null when the reply is only tool calls)."""
    msg: dict[str, Any] = {"role": "assistant", "content": r.content if (r.content or not r.tool_calls) else None}
    if r.reasoning is not None:
        msg["reasoning_content"] = r.reasoning
    if r.tool_calls:
        msg["tool_calls"] = r.tool_calls
    return msg


def chat_chunk(rid: str, now: int, model: str, index: int, delta, first=False, finish=None, logprobs=None) -> dict:
    """One `chat.completion.chunk` event of choice `index`: delta (a Reply stream delta, or None), the role on the
    first event, finish_reason and logprobs on its last."""
    d = {"role": "assistant", "content": ""} if first else (delta or {})
    return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
            "choices": [{"index": index, "delta": d, "finish_reason": finish, "logprobs": logprobs}]}


def text_chunk(rid: str, now: int, model: str, index: int, delta, first=False, finish=None, logprobs=None) -> dict:
    """One streamed `text_completion` event of choice `index` (chat_chunk's arguments; logprobs always null)."""
    return {"id": rid, "object": "text_completion", "created": now, "model": model,
            "choices": [{"index": index, "text": (delta or {}).get("content", ""), "finish_reason": finish,
                         "logprobs": None}]}


def usage(prompt_tokens: int, replies: list) -> dict:
    """The `usage` body: prompt tokens, and the completion tokens of every reply (all n choices) together."""
    done = sum(r.completion_tokens for r in replies)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}
