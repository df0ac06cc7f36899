"""The route handlers of `tunesmith deploy`'s OpenAI-compatible server, and `Server`, the state they share.

Handlers are async and never hold a lock: each request renders its prompt (in a worker thread), submits its
sequences to the engine's scheduler (continuous batching across requests) and awaits its tokens on the event loop.
A request's pictures (`image_url` parts) are fetched (on tunesmith.serve.images' own fetch threads, with a
deadline) and checked, then decoded into pixel inputs with the prompt in worker threads, so one client's pictures
never hold up another's request; requests with and without pictures share the engine's batches.
A client that disconnects cancels its sequences (their batch slots are freed at the next decoding step): a stream
when its events can no longer be sent, a non-streamed request as soon as the disconnect arrives (`_wait`). Streams
are SSE events ending in `data: [DONE]`.

A new endpoint is one handler here, taking the request model (`tunesmith.serve.protocol`) and `request`
(`request.app.state.server` is the Server), and its row in ROUTES; `create_app` registers every row. What must not
live here: token scheduling (`tunesmith.inference.engine`), template rendering or reply parsing
(`tunesmith.inference.chat`, `tunesmith.inference.reply`), app wiring, auth and error handlers
(`tunesmith.serve.app`). No torch or fastapi import at module level (starlette for `Request`, so that FastAPI
resolves the handlers' annotations). The route handlers carry no docstrings on purpose: FastAPI would publish them
in /openapi.json.
"""
from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import uuid
from typing import Optional

from starlette.requests import Request

from tunesmith.serve.protocol import (UNSUPPORTED, ApiError, ChatRequest, CompletionRequest, Sampling,
                                      assistant_message, chat_chunk, chat_messages, check_fields, check_tools,
                                      check_unicode, error_body, image_urls, text_chunk, usage)


class Server:
    """The request handlers' shared state: the engine, the served model ids (what /v1/models lists: `owned_by`, and
    `created`, the server's start in Unix seconds), the request log, the largest picture (decoded bytes)."""

    def __init__(self, engine, served: dict[str, Optional[str]], result_path: Optional[str] = None,
                 max_logprobs: int = 20, owned_by: str = "tunesmith", max_image_bytes: int = 8 << 20):
        self.engine, self.served, self.max_logprobs = engine, served, max_logprobs
        self.max_image_bytes = max_image_bytes
        self.result_path, self.owned_by, self.created = result_path, owned_by, int(time.time())
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

        Returns an `inference.chat.GenConfig`. top_logprobs: alternatives per token asked for. Raises ApiError 400 for an
        unsupported field with a value that would change the reply (protocol.UNSUPPORTED: penalties, logit_bias,
        echo, best_of, ...), reserved chat_template_kwargs, a non-text response_format, or top_logprobs over
        --max_logprobs."""
        extra = req.model_extra or {}
        for name, (inert, hint) in UNSUPPORTED.items():
            if extra.get(name) is not None and extra[name] not in inert:
                raise ApiError(400, f"{name} is not supported by this server; leave it out"
                                    + (f" ({hint})" if hint else ""), param=name)
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

    async def pictures(self, req: ChatRequest) -> tuple[list[str], list[tuple[str, str]]]:
        """The request's pictures (its image_url parts, in order) as `data:` URLs the engine reads, fetched and
        checked off the event loop (tunesmith.serve.images), and their [(param, url as given)]; ([], []) without
        any. Raises ApiError 400 before anything is fetched when the model takes no pictures (or not that many),
        else as `images.resolve_images`."""
        from tunesmith.serve.images import resolve_images

        urls = image_urls(req)
        if not urls:
            return [], []
        problem = self.engine.image_problem(len(urls))
        if problem:
            raise ApiError(400, problem, code="invalid_image", param=urls[0][0])
        return await resolve_images(urls, self.max_image_bytes), urls

    async def prompt(self, messages: list[dict], tools, template_kwargs: dict, images: Optional[list] = None,
                     urls: Optional[list] = None):
        """Render and tokenise in a worker thread, with the pictures' pixels: a long prompt or a large picture never
        stalls the event loop.

        images: references from `pictures`, urls its [(param, url)] (named in errors). Returns an
        `inference.chat.Prompt` (ids [T]). Raises ApiError 400: code context_length_exceeded when the prompt fills
        the context, invalid_image when the pictures cannot be used (inference.chat.ImageInputError; a picture that
        does not decode is named by its part), or the template's own refusal of these messages."""
        from starlette.concurrency import run_in_threadpool

        from tunesmith.inference.chat import ImageInputError, PromptTooLong
        try:
            if images:
                return await run_in_threadpool(self.engine.prompt, messages, tools, template_kwargs, images)
            return await run_in_threadpool(self.engine.prompt, messages, tools, template_kwargs)
        except PromptTooLong as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages") from None
        except ImageInputError as e:
            if e.picture is not None and urls and e.picture < len(urls):
                from tunesmith.serve.images import shown

                param, url = urls[e.picture]
                raise ApiError(400, f"{param}: the picture {shown(url)} cannot be decoded: {e.reason} Send the "
                                    f"complete picture (PNG, JPEG, WebP, GIF or BMP)", code="invalid_image",
                               param=param) from None
            raise ApiError(400, str(e), code="invalid_image", param="messages") from None
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
    """All completions; if the client goes away first, cancel the sequences (their slots free at the next step).

    The disconnect is awaited (`_gone`), not polled with `request.is_disconnected()`: behind a `BaseHTTPMiddleware`
    (the API-key check) that poll never sees the client leave, and a non-streamed request would generate to its
    end for nobody."""
    result = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))
    gone = asyncio.ensure_future(_gone(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not result.done():
            for h in handles:
                h.cancel()
        return await result
    finally:
        gone.cancel()
        if not result.done():
            for h in handles:
                h.cancel()


async def _gone(request) -> None:
    """Returns once the client of a request whose body was read has gone away (ASGI's http.disconnect; a receive
    channel that fails counts as gone)."""
    try:
        while (await request.receive()).get("type") != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - the server tore the connection down
        return


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
                yield _sse(error_body(e.status, e.message, e.code))
                yield "data: [DONE]\n\n"
                return
            yield _sse(chunk(index, last or None, finish=reply.finish_reason,
                             logprobs=logprobs_json(server.engine.tok, reply.logprobs)))
            replies.append(reply)
        if include_usage:
            yield _sse({**chunk(0, None), "choices": [], "usage": usage(len(prompt.ids), replies)})
        yield "data: [DONE]\n\n"
        on_done(replies)
    finally:
        for h in handles:
            h.cancel()  # no-op for finished sequences; frees the rest when the client went away


async def chat_completion(server: Server, req: ChatRequest, request: Request):
    """POST /v1/chat/completions: render, submit req.n sequences, then a JSON body or an SSE stream.

    Returns the `chat.completion` dict, or a StreamingResponse of `chat.completion.chunk` events. Raises ApiError:
    400 a field OpenAI does not define, bad tools, tool_choice "required"/named, bad messages or settings, prompt
    too long, pictures that cannot be used (a text model, a bad data URL or fetch, over the size limit); 404 unknown model; 503 engine closed; 500 a failed generation (non-streaming; a stream sends an error
    event instead)."""
    from functools import partial

    from starlette.responses import StreamingResponse

    from tunesmith.inference.chat import logprobs_json

    check_fields(req)
    check_tools(req.tools)
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
    images, urls = await server.pictures(req)
    prompt = await server.prompt(messages, req.tools, kwargs, images, urls)
    server.check_room(prompt, req, "messages")
    prompt.tools = bool(req.tools) and req.tool_choice != "none"
    handles = server.submit(prompt, cfg, adapter)
    rid, now, logged = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model_dump(exclude_none=True)
    if req.stream:
        def done(replies):
            """After the stream's last event: --result_path line with the replies (id, usage, choices)."""
            server.log(logged, {"id": rid, "usage": usage(len(prompt.ids), replies),
                                "choices": [{"index": i, "message": assistant_message(r),
                                             "finish_reason": r.finish_reason} for i, r in enumerate(replies)]})
        include = bool((req.stream_options or {}).get("include_usage"))
        chunk = partial(chat_chunk, rid, now, req.model)
        return StreamingResponse(_stream(server, handles, prompt, cfg, chunk, include, done),
                                 media_type="text/event-stream")
    replies = [server.engine.reply(c, prompt, cfg) for c in await _wait(handles, request)]
    _check(replies)
    body = {"id": rid, "object": "chat.completion", "created": now, "model": req.model,
            "choices": [{"index": i, "message": assistant_message(r), "finish_reason": r.finish_reason,
                         "logprobs": logprobs_json(server.engine.tok, r.logprobs)} for i, r in enumerate(replies)],
            "usage": usage(len(prompt.ids), replies)}
    server.log(logged, body)
    return body


async def text_completion(server: Server, req: CompletionRequest, request: Request):
    """POST /v1/completions: as ms-swift, the prompt is one user message rendered with the chat template.

    Returns the `text_completion` dict, or a StreamingResponse of its chunks. Raises ApiError: 404 unknown model;
    400 a field OpenAI does not define, more than one prompt, logprobs asked for, bad settings, prompt too long; 503 engine closed; 500 a failed
    generation (non-streaming)."""
    from functools import partial

    from starlette.responses import StreamingResponse

    check_fields(req)
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
        chunk = partial(text_chunk, rid, now, req.model)
        return StreamingResponse(_stream(server, handles, prompt, cfg, chunk, include, lambda r: None),
                                 media_type="text/event-stream")
    replies = [server.engine.reply(c, prompt, cfg) for c in await _wait(handles, request)]
    _check(replies)
    body = {"id": rid, "object": "text_completion", "created": now, "model": req.model,
            "choices": [{"index": i, "text": r.content, "finish_reason": r.finish_reason, "logprobs": None}
                        for i, r in enumerate(replies)],
            "usage": usage(len(prompt.ids), replies)}
    server.log(logged, body)
    return body


# ------------------------------------------------------------------ routes

async def health():
    return {"status": "ok"}


async def models(request: Request):
    server = request.app.state.server
    tok = _tokenizer_identity(server.engine.tok)  # tunesmith's: a distillation trainer checks it is its own
    return {"object": "list", "data": [{"id": name, "object": "model", "created": server.created,
                                        "owned_by": server.owned_by, **tok} for name in server.served]}


@functools.lru_cache(maxsize=4)
def _tokenizer_identity(tok) -> dict:
    from tunesmith.models.identity import tokenizer_identity

    return tokenizer_identity(tok)


async def chat_completions(req: ChatRequest, request: Request):
    return await chat_completion(request.app.state.server, req, request)


async def completions(req: CompletionRequest, request: Request):
    return await text_completion(request.app.state.server, req, request)


# (method, path, handler), registered in this order by create_app
ROUTES = (("GET", "/health", health),
          ("GET", "/v1/models", models),
          ("POST", "/v1/chat/completions", chat_completions),
          ("POST", "/v1/completions", completions))
