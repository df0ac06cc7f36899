"""`tunesmith deploy`: an OpenAI-compatible server (FastAPI + uvicorn) over the same `Engine` as `tunesmith infer`.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as SSE ending
in `data: [DONE]`). Requests are queued: one generation runs at a time (a lock around the engine), so concurrent
requests never share or mix state; FastAPI's thread pool holds the waiting ones. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` (with ms-swift's `"object": "error"` alongside).
"""
from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.errors import ConfigError

# The request schemas live at module level so FastAPI can resolve the handlers' annotations. This module is imported
# only by `tunesmith deploy`, so pydantic never slows the CLI's start-up.


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(system|user|assistant|tool)$")
    content: Optional[Union[str, list]] = None


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: Optional[dict] = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    tools: Optional[list] = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]


class ApiError(Exception):
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


def create_app(engine, served: dict[str, Optional[str]], api_key: Optional[str] = None,
               owned_by: str = "tunesmith"):
    """served: model id -> adapter name to activate (None = the model as loaded, "" = the base without adapters)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    from tunesmith.infer import PromptTooLong, Reply

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None)
    lock = threading.Lock()
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(_error_body(e.status, e.message, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, where = "the request body is not valid JSON", ""
        return JSONResponse(_error_body(400, msg, "invalid_request_error", where or None), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(_error_body(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                                "invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": owned_by}
                                           for name in served]}

    def require(name: str) -> None:
        if name not in served:
            raise ApiError(404, f"the model '{name}' does not exist; available: {', '.join(served)}",
                           code="model_not_found", param="model")

    @contextlib.contextmanager
    def use_model(name: str):
        """Hold the engine for one request, with the requested adapter active."""
        require(name)
        adapter = served[name]
        with lock:
            m = engine.model
            if adapter is None:
                yield
            elif adapter == "":
                with m.disable_adapter():
                    yield
            else:
                m.set_adapter(adapter)
                yield

    def config(req):
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return engine.defaults.merged(max_new_tokens=req.max_completion_tokens or req.max_tokens,
                                      temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                      repetition_penalty=req.repetition_penalty, seed=req.seed, stop=stop or None)

    def usage(r: Reply) -> dict:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    def run(name: str, messages: list[dict], cfg, tools=None) -> Reply:
        with use_model(name):
            try:
                return engine.generate([messages], cfg, tools=tools)[0]
            except PromptTooLong as e:
                raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None

    def sse(name: str, messages: list[dict], cfg, chunk, include_usage: bool, tools=None):
        """Check the model and the prompt before the stream starts (so errors are real HTTP errors), then
        stream under the engine lock."""
        require(name)
        try:
            engine.check_prompt(messages, cfg, tools=tools)
        except PromptTooLong as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None

        def events():
            with use_model(name):
                yield f"data: {json.dumps(chunk(None, first=True))}\n\n"
                final = None
                for piece in engine.stream(messages, cfg, tools=tools):
                    if isinstance(piece, Reply):
                        final = piece
                    elif piece:
                        yield f"data: {json.dumps(chunk(piece))}\n\n"
                yield f"data: {json.dumps(chunk(None, finish=final.finish_reason))}\n\n"
                if include_usage:
                    yield f"data: {json.dumps({**chunk(None), 'choices': [], 'usage': usage(final)})}\n\n"
                yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        messages = []
        for m in req.messages:
            msg: dict[str, Any] = {"role": m.role, "content": _text(m.content)}
            extra = m.model_extra or {}
            if extra.get("reasoning_content"):
                msg["reasoning_content"] = extra["reasoning_content"]
            messages.append(msg)
        cfg = config(req)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(text, first=False, finish=None):
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": req.model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            include = bool((req.stream_options or {}).get("include_usage"))
            return sse(req.model, messages, cfg, chunk, include, tools=req.tools)
        r = run(req.model, messages, cfg, tools=req.tools)
        message = {"role": "assistant", "content": r.content}
        if r.reasoning is not None:
            message["reasoning_content"] = r.reasoning
        return {"id": rid, "object": "chat.completion", "created": now, "model": req.model,
                "choices": [{"index": 0, "message": message, "finish_reason": r.finish_reason, "logprobs": None}],
                "usage": usage(r)}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request", param="prompt")
        messages = [{"role": "user", "content": prompts[0]}]  # ms-swift: the prompt is one user message
        cfg = config(req)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(text, first=False, finish=None):
                return {"id": rid, "object": "text_completion", "created": now, "model": req.model,
                        "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}
            include = bool((req.stream_options or {}).get("include_usage"))
            return sse(req.model, messages, cfg, chunk, include)
        r = run(req.model, messages, cfg)
        return {"id": rid, "object": "text_completion", "created": now, "model": req.model,
                "choices": [{"index": 0, "text": r.content, "finish_reason": r.finish_reason, "logprobs": None}],
                "usage": usage(r)}

    return app


def served_models(args, named: dict, ckpt: Optional[str]) -> dict[str, Optional[str]]:
    """The model ids /v1/models lists: the loaded model (with its plain adapters) and one per named adapter."""
    from tunesmith.runs import model_suffix

    base = args.served_model_name or model_suffix(ckpt if (ckpt and args.adapters and not named) else args.model)
    if not named:
        return {base: None}
    return {base: "", **{name: name for name in named}}


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); another server is using the port? "
                              f"Pass --port with a free one") from None


def main(args):
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ConfigError("tunesmith deploy needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    from tunesmith.infer import build_engine

    _check_port(args.host, args.port)
    engine, ckpt, named = build_engine(args)
    served = served_models(args, named, ckpt)
    app = create_app(engine, served, api_key=args.api_key, owned_by=args.owned_by)
    where = "reachable from the network" if args.host in ("0.0.0.0", "::") else \
        "local only; --host 0.0.0.0 exposes it to the network"
    print(f"[tunesmith] deploy: serving {', '.join(served)} at http://{args.host}:{args.port}/v1 ({where})"
          + ("; API key required" if args.api_key else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if not args.verbose else "info",
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    return 0
