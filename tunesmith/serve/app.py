"""`tunesmith deploy`: an OpenAI-compatible server (FastAPI + uvicorn) over the same `ChatEngine` as `tunesmith infer`.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as SSE ending
in `data: [DONE]`). Handlers are async and never hold a lock: each request renders its prompt (in a worker
thread), submits its sequences to the engine's scheduler (continuous batching across requests) and awaits its
tokens on the event loop. A client that disconnects cancels its sequences (their batch slots are freed at the next
decoding step). Errors of every origin use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` (with
ms-swift's `"object": "error"` alongside). SIGTERM stops accepting, lets in-flight requests finish (up to
GRACEFUL_SHUTDOWN_S) and then closes the engine.

What lives here: request schemas, validation, OpenAI/ms-swift response shapes, SSE, auth, the request log. What
must not: token scheduling (`tunesmith.inference.engine`), template rendering or reply parsing (`tunesmith.inference.chat`,
`tunesmith.inference.reply`), model loading (`tunesmith.inference.chat.build_engine`). No torch import; fastapi and uvicorn are
imported inside `create_app`/`main` (pydantic and starlette at module level, for the schemas). Route handlers
and the request models carry no docstrings on purpose: FastAPI would publish them in /openapi.json.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool
from starlette.requests import Request



# The request schemas live at module level so FastAPI can resolve the handlers' annotations. This module is imported
# only by `tunesmith deploy`, so pydantic never slows the CLI's start-up.


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


def _error_body(status: int, message: str, code: str, param: Optional[str] = None) -> dict:
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


class Server:
    """The request handlers' shared state: the engine, the served model ids, the request log."""

    def __init__(self, engine, served: dict[str, Optional[str]], result_path: Optional[str] = None,
                 max_logprobs: int = 20):
        self.engine, self.served, self.max_logprobs = engine, served, max_logprobs
        self.result_path = result_path
        self._log_lock = threading.Lock()

    def adapter(self, name: str) -> Optional[str]:
        """The adapter that serves model id `name` (None, "" or a name; see create_app).

        Raises ApiError 404 (code model_not_found) for an id that is not served."""
        if name not in self.served:
            raise ApiError(404, f"the model '{name}' does not exist; available: {', '.join(self.served)}",
                           code="model_not_found", param="model")
        return self.served[name]

    def config(self, req: Sampling, top_logprobs: int = 0):
        """The request's sampling settings over the server's defaults; refuses what would be silently ignored.

        Returns an `infer.GenConfig`. top_logprobs: alternatives per token asked for. Raises ApiError 400 for an
        unsupported field with a non-default value (penalties, logit_bias, echo, best_of, suffix, min_tokens),
        reserved chat_template_kwargs, a non-text response_format, or top_logprobs over --max_logprobs."""
        extra = req.model_extra or {}
        for name, inert in (("presence_penalty", (None, 0, 0.0)), ("frequency_penalty", (None, 0, 0.0)),
                            ("logit_bias", (None, {})), ("echo", (None, False)), ("best_of", (None, 1)),
                            ("suffix", (None, "")), ("min_tokens", (None, 0))):
            if extra.get(name) not in inert:
                raise ApiError(400, f"{name} is not supported by this server; leave it out (repetition_penalty "
                                    f"is supported)" if "penalty" in name else f"{name} is not supported by this "
                                    f"server; leave it out", param=name)
        reserved = {"add_generation_prompt", "tokenize", "tools", "messages", "chat_template", "documents"}
        bad = reserved & set(req.chat_template_kwargs or {})
        if bad:
            raise ApiError(400, f"chat_template_kwargs may not set {', '.join(sorted(bad))}: the server sets them",
                           param="chat_template_kwargs")
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise ApiError(400, f"response_format {fmt!r} is not supported (no constrained decoding); "
                                "ask for JSON in the prompt, or serve with --infer_backend vllm", param="response_format")
        if top_logprobs > self.max_logprobs:
            raise ApiError(400, f"top_logprobs {top_logprobs} is above this server's limit {self.max_logprobs} "
                                "(--max_logprobs)", param="top_logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return self.engine.defaults.merged(
            max_new_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature,
            top_p=req.top_p, top_k=None if req.top_k in (None, -1) else req.top_k,
            repetition_penalty=req.repetition_penalty, seed=req.seed, stop=stop or None, n=req.n,
            logprobs=bool(req.logprobs) or top_logprobs > 0, top_logprobs=top_logprobs)

    def check_room(self, prompt, req: Sampling, where: str) -> None:
        """max_tokens / max_completion_tokens must fit in the context with the prompt (vLLM's rule and message);
        without them the reply gets the room left. where: "messages" or "prompt". Raises ApiError 400."""
        limit = getattr(self.engine, "max_model_len", None)
        for name in ("max_completion_tokens", "max_tokens"):
            asked = getattr(req, name)
            if limit and asked is not None and len(prompt.ids) + asked > limit:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                    f"{len(prompt.ids) + asked} tokens ({len(prompt.ids)} in the {where}, {asked} in "
                                    f"the completion). Please reduce the length of the {where} or {name}.",
                               code="context_length_exceeded", param=name)

    async def prompt(self, messages: list[dict], tools, template_kwargs: dict):
        """Render and tokenise in a worker thread: a long prompt never stalls the event loop.

        Returns an `infer.Prompt` (ids [T]). Raises ApiError 400: code context_length_exceeded when the prompt
        fills the context, or the template's own refusal of these messages."""
        from starlette.concurrency import run_in_threadpool

        from tunesmith.inference.chat import PromptTooLong
        try:
            return await run_in_threadpool(self.engine.prompt, messages, tools, template_kwargs)
        except PromptTooLong as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None
        except Exception as e:  # noqa: BLE001 - the template refused these messages (raise_exception in Jinja)
            raise ApiError(400, f"the chat template cannot render these messages: {e}", param="messages") from None

    def submit(self, prompt, cfg, adapter):
        """Queue cfg.n sequences, delivering tokens to the running event loop: their engine Handles.

        Raises ApiError 400 for the engine's ValueError (no room left, unknown adapter), 503 once it is closed."""
        try:
            return self.engine.submit(prompt, cfg, adapter, loop=asyncio.get_running_loop())
        except (ValueError, RuntimeError) as e:
            raise ApiError(503 if isinstance(e, RuntimeError) else 400, str(e)) from None

    def log(self, request: dict, response: dict) -> None:
        """--result_path: one line per finished request, as ms-swift writes it (request fields + response)."""
        if not self.result_path:
            return
        line = json.dumps({**request, "response": response}, ensure_ascii=False)
        with self._log_lock, open(self.result_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


async def _wait(handles: list, request) -> list:
    """All completions; if the client goes away first, cancel the sequences (their slots free at the next step)."""
    task = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                for h in handles:
                    h.cancel()
                return await task
    finally:
        if not task.done():
            for h in handles:
                h.cancel()


def _generation_error(error: BaseException) -> ApiError:
    """The OpenAI-shaped 500 for a sequence the engine ended with an error (NaN/inf output has its own code)."""
    from tunesmith.inference.engine import NonFiniteOutput

    if isinstance(error, NonFiniteOutput):
        return ApiError(500, f"generation failed: {error}", code="model_output_not_finite")
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", code="server_error")


def _check(replies: list) -> None:
    for r in replies:
        if r.error is not None:
            raise _generation_error(r.error)


def _usage(prompt_tokens: int, replies: list) -> dict:
    done = sum(r.completion_tokens for r in replies)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(server: Server, handles: list, prompt, cfg, chunk, include_usage: bool, on_done):
    """SSE events for each choice in turn (all generate concurrently); the client going away cancels them all."""
    from tunesmith.inference.chat import logprobs_json
    try:
        yield _sse(chunk(0, None, first=True))
        replies = []
        for index, handle in enumerate(handles):
            state = server.engine.stream_state(prompt, cfg)
            async for token in handle:
                delta = state.feed(token)
                if delta:
                    yield _sse(chunk(index, delta))
            reply, last = state.finish(handle.completion)
            if reply.error is not None:
                e = _generation_error(reply.error)
                yield _sse(_error_body(e.status, e.message, e.code))
                yield "data: [DONE]\n\n"
                return
            yield _sse(chunk(index, last or None, finish=reply.finish_reason,
                             logprobs=logprobs_json(server.engine.tok, reply.logprobs)))
            replies.append(reply)
        if include_usage:
            yield _sse({**chunk(0, None), "choices": [], "usage": _usage(len(prompt.ids), replies)})
        yield "data: [DONE]\n\n"
        on_done(replies)
    finally:
        for h in handles:
            h.cancel()  # no-op for finished sequences; frees the rest when the client went away


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 (OpenAI's error shape) — at once from
    its Content-Length, or as soon as a chunked body passes the limit — before the app reads, parses or tokenises
    it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.limit:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, int(length))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > self.limit:
                from starlette.exceptions import HTTPException
                raise HTTPException(413, self._message(seen, exact=False))
            return message

        return await self.app(scope, limited, send)

    def _message(self, size: int, exact: bool = True) -> str:
        told = f"{size} bytes" if exact else f"over {self.limit} bytes (a chunked body, read up to {size})"
        return f"the request body is {told}; this server takes at most {self.limit} (--max_request_bytes)"

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps(_error_body(413, self._message(size), "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


API_KEY_ENV = "TUNESMITH_API_KEY"  # deploy's key from the environment (as OpenAI clients read OPENAI_API_KEY)


def create_app(engine, served: dict[str, Optional[str]], api_key: Optional[str] = None,
               owned_by: str = "tunesmith", result_path: Optional[str] = None, max_logprobs: int = 20,
               max_request_bytes: int = 8 << 20):
    """The FastAPI app. served: model id -> adapter to use (None = the model as loaded, "" = the base without
    adapters, or a named adapter). api_key: when set, /v1/* needs `Authorization: Bearer KEY` (else 401).
    Every error (400 validation, 404 route, 500 unexpected) answers OpenAI's error body; shutdown closes the engine."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    server = Server(engine, served, result_path, max_logprobs)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_):
        """Close the engine when the app shuts down."""
        yield
        engine.close()  # after uvicorn drained in-flight requests: anything left ends with "abort"

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_request_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(_error_body(e.status, e.message, e.code, e.param), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        code = {404: "not_found", 413: "request_too_large"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(_error_body(e.status_code, str(e.detail), code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):
        return JSONResponse(_error_body(500, f"internal error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        code = "invalid_type" if str(first.get("type", "")).endswith("_type") else "invalid_request_error"
        if first.get("type") == "json_invalid":
            msg, where = "the request body is not valid JSON", ""
        return JSONResponse(_error_body(400, msg, code, where or None), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token.strip() != api_key:
                return JSONResponse(_error_body(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                                "invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": owned_by}
                                           for name in served]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await chat_completion(server, req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await text_completion(server, req, request)

    return app


def _message(r) -> dict:
    """A Reply as an OpenAI assistant message (content null when the reply is only tool calls)."""
    msg: dict[str, Any] = {"role": "assistant", "content": r.content if (r.content or not r.tool_calls) else None}
    if r.reasoning is not None:
        msg["reasoning_content"] = r.reasoning
    if r.tool_calls:
        msg["tool_calls"] = r.tool_calls
    return msg


def _chat_chunk(rid: str, now: int, model: str, index: int, delta, first=False, finish=None, logprobs=None) -> dict:
    d = {"role": "assistant", "content": ""} if first else (delta or {})
    return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
            "choices": [{"index": index, "delta": d, "finish_reason": finish, "logprobs": logprobs}]}


def _text_chunk(rid: str, now: int, model: str, index: int, delta, first=False, finish=None, logprobs=None) -> dict:
    return {"id": rid, "object": "text_completion", "created": now, "model": model,
            "choices": [{"index": index, "text": (delta or {}).get("content", ""), "finish_reason": finish,
                         "logprobs": None}]}


async def chat_completion(server: Server, req: ChatRequest, request: Request):
    """POST /v1/chat/completions: render, submit req.n sequences, then a JSON body or an SSE stream.

    Returns the `chat.completion` dict, or a StreamingResponse of `chat.completion.chunk` events. Raises ApiError:
    404 unknown model; 400 tool_choice "required"/named, bad messages or settings, prompt too long; 503 engine
    closed; 500 a failed generation (non-streaming; a stream sends an error event instead)."""
    from functools import partial

    from starlette.responses import StreamingResponse

    from tunesmith.inference.chat import logprobs_json

    adapter = server.adapter(req.model)
    if isinstance(req.tool_choice, dict) or req.tool_choice == "required":
        raise ApiError(400, "tool_choice 'required' or a named function is not supported (no constrained "
                            "decoding); use 'auto' or 'none'", param="tool_choice")
    if req.top_logprobs is not None and req.logprobs is not True:
        raise ApiError(400, "top_logprobs needs logprobs: true (it is the number of alternatives listed with each "
                            "token's log-probability)", param="top_logprobs")
    check_unicode(req)
    messages = chat_messages(req)
    cfg = server.config(req, req.top_logprobs or 0)
    kwargs = dict(req.chat_template_kwargs or {})
    if req.enable_thinking is not None:
        kwargs.setdefault("enable_thinking", req.enable_thinking)
    prompt = await server.prompt(messages, req.tools, kwargs)
    server.check_room(prompt, req, "messages")
    prompt.tools = bool(req.tools) and req.tool_choice != "none"
    handles = server.submit(prompt, cfg, adapter)
    rid, now, logged = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model_dump(exclude_none=True)
    if req.stream:
        def done(replies):
            """After the stream's last event: --result_path line with the replies (id, usage, choices)."""
            server.log(logged, {"id": rid, "usage": _usage(len(prompt.ids), replies),
                                "choices": [{"index": i, "message": _message(r), "finish_reason": r.finish_reason}
                                            for i, r in enumerate(replies)]})
        include = bool((req.stream_options or {}).get("include_usage"))
        chunk = partial(_chat_chunk, rid, now, req.model)
        return StreamingResponse(_stream(server, handles, prompt, cfg, chunk, include, done),
                                 media_type="text/event-stream")
    replies = [server.engine.reply(c, prompt, cfg) for c in await _wait(handles, request)]
    _check(replies)
    body = {"id": rid, "object": "chat.completion", "created": now, "model": req.model,
            "choices": [{"index": i, "message": _message(r), "finish_reason": r.finish_reason,
                         "logprobs": logprobs_json(server.engine.tok, r.logprobs)} for i, r in enumerate(replies)],
            "usage": _usage(len(prompt.ids), replies)}
    server.log(logged, body)
    return body


async def text_completion(server: Server, req: CompletionRequest, request: Request):
    """POST /v1/completions: as ms-swift, the prompt is one user message rendered with the chat template.

    Returns the `text_completion` dict, or a StreamingResponse of its chunks. Raises ApiError: 404 unknown model;
    400 more than one prompt, logprobs asked for, bad settings, prompt too long; 503 engine closed; 500 a failed
    generation (non-streaming)."""
    from functools import partial

    from starlette.responses import StreamingResponse

    adapter = server.adapter(req.model)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ApiError(400, "send one prompt per request", param="prompt")
    if req.logprobs not in (None, False) or req.top_logprobs:
        raise ApiError(400, "logprobs are returned by /v1/chat/completions; /v1/completions does not return them",
                       param="logprobs")
    check_unicode(req)
    cfg = server.config(req)
    prompt = await server.prompt([{"role": "user", "content": prompts[0]}], None, dict(req.chat_template_kwargs or {}))
    server.check_room(prompt, req, "prompt")
    handles = server.submit(prompt, cfg, adapter)
    rid, now, logged = f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.model_dump(exclude_none=True)
    if req.stream:
        include = bool((req.stream_options or {}).get("include_usage"))
        chunk = partial(_text_chunk, rid, now, req.model)
        return StreamingResponse(_stream(server, handles, prompt, cfg, chunk, include, lambda r: None),
                                 media_type="text/event-stream")
    replies = [server.engine.reply(c, prompt, cfg) for c in await _wait(handles, request)]
    _check(replies)
    body = {"id": rid, "object": "text_completion", "created": now, "model": req.model,
            "choices": [{"index": i, "text": r.content, "finish_reason": r.finish_reason, "logprobs": None}
                        for i, r in enumerate(replies)],
            "usage": _usage(len(prompt.ids), replies)}
    server.log(logged, body)
    return body


def openai_http_protocol(http: str = "auto"):
    """uvicorn's HTTP protocol class (`auto`: httptools when installed, else h11) answering a request it cannot
    parse (a bad Content-Length, a broken request line) with OpenAI's JSON error body instead of its plain-text 400;
    both implementations send those from `send_400_response`. Returns the name unchanged when the class lacks it."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    base = import_from_string(HTTP_PROTOCOLS.get(http, http))
    if not callable(getattr(base, "send_400_response", None)):
        return http

    class OpenAIErrors(base):
        def send_400_response(self, msg: str) -> None:
            """The 400 as OpenAI's error body; the connection is closed after it, as uvicorn does."""
            body = json.dumps(_error_body(400, f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}): check its "
                                               f"Content-Length and headers", "invalid_http_request")).encode()
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in getattr(self.server_state, "default_headers", []):
                head.append(name + b": " + value + b"\r\n")
            head.append(b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode() +
                        b"\r\nconnection: close\r\n\r\n")
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return OpenAIErrors


