"""The OpenAI API's wire format for `tunesmith deploy`: request schemas, their validation, error and response bodies.

Requests: pydantic models (`ChatRequest`, `CompletionRequest`, over the shared `Sampling` fields) with JSON number
checks OpenAI makes (no "3" or true where a number belongs), plus the checks pydantic cannot express
(`check_unicode`, `chat_messages`). Errors: `ApiError`, answered with `error_body` — OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with ms-swift's `"object": "error"` alongside. Responses: the
assistant message, streaming chunks and usage of `chat.completion` / `text_completion` bodies.

A new endpoint's request model goes here, its handler in `tunesmith.serve.routes`. No torch or fastapi import
(pydantic only, for the schemas). The request models carry no docstrings on purpose: FastAPI would publish them in
/openapi.json.
"""
from __future__ import annotations

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


def _text(content) -> str:
    """OpenAI content: a string or a list of parts; text parts are joined."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for p in content:
        if not isinstance(p, dict) or p.get("type") != "text":
            raise ApiError(400, "only text content parts are supported", param="messages")
        parts.append(p.get("text", ""))
    return "".join(parts)


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
    """The request's messages as plain dicts for the template: text content, assistant `tool_calls` and
    `reasoning_content`, tool messages' `tool_call_id`/`name` (`developer` is the system role of newer clients).

    Raises ApiError 400: a message without content (only an assistant message with tool_calls may leave it null, as
    in OpenAI's API), a non-text content part, or a tool_calls entry without function.name."""
    out = []
    for i, m in enumerate(req.messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"messages[{i}].content is missing: a {m.role} message needs content (a string or a "
                                f"list of text parts)" + ("; only an assistant message with tool_calls may leave it "
                                                          "null" if m.role == "assistant" else ""),
                           param=f"messages[{i}].content")
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
        if m.tool_calls:
            for c in m.tool_calls:
                if not isinstance(c, dict) or not isinstance(c.get("function"), dict) or \
                        not isinstance(c["function"].get("name"), str):
                    raise ApiError(400, "each tool_calls entry needs function.name (and function.arguments)",
                                   param="messages")
            msg["tool_calls"] = m.tool_calls
        for key in ("tool_call_id", "name"):
            if getattr(m, key):
                msg[key] = getattr(m, key)
        extra = m.model_extra or {}
        if extra.get("reasoning_content"):
            msg["reasoning_content"] = extra["reasoning_content"]
        out.append(msg)
    return out


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
