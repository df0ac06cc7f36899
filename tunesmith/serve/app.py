"""`tunesmith deploy`: an OpenAI-compatible server (FastAPI + uvicorn) over the same `ChatEngine` as `tunesmith infer`.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as SSE ending
in `data: [DONE]`). Errors of every origin use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`
(with ms-swift's `"object": "error"` alongside). SIGTERM stops accepting and lets in-flight requests finish (up to
GRACEFUL_SHUTDOWN_S); the app never closes the engine it is given: whoever built it closes it (`tunesmith deploy`
after uvicorn returns), so other users of the same engine keep it when a server over it stops.

What lives here: the app's wiring — `create_app` registers the handlers of `tunesmith.serve.routes` (ROUTES), the
error handlers, API-key auth and the body limit (`BodyLimit`) — and uvicorn's HTTP protocol answering unparseable
requests in OpenAI's shape (`openai_http_protocol`). What must not: request schemas and validation
(`tunesmith.serve.protocol`), the handlers and the request log (`tunesmith.serve.routes`), token scheduling
(`tunesmith.inference.engine`), model loading (`tunesmith.inference.chat.build_engine`). No torch import; fastapi
and uvicorn are imported inside `create_app`/`openai_http_protocol` (starlette at module level).
"""
from __future__ import annotations

import json
from typing import Optional, Union

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from tunesmith.serve.protocol import ApiError, error_body
from tunesmith.serve.routes import ROUTES, Server
from tunesmith.serve.teacher import infer as teacher_infer

# deploy's routes: the OpenAI ones and ms-swift deploy's /infer/ (prompt log-probs for a GKD/OPD-RL teacher client)
DEPLOY_ROUTES = ROUTES + (("POST", "/infer/", teacher_infer),)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 (OpenAI's error shape) — at once from
    its Content-Length, or as soon as a chunked body passes the limit — before the app reads, parses or tokenises
    it."""

    def __init__(self, app, limit: int, exempt: tuple = ()):
        """exempt: paths whose bodies have no limit (a rollout server's weight uploads, larger than any request)."""
        self.app, self.limit, self.exempt = app, limit, frozenset(exempt)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.limit or scope.get("path") in self.exempt:
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
                raise HTTPException(413, self._message(seen, exact=False))
            return message

        return await self.app(scope, limited, send)

    def _message(self, size: int, exact: bool = True) -> str:
        told = f"{size} bytes" if exact else f"over {self.limit} bytes (a chunked body, read up to {size})"
        return f"the request body is {told}; this server takes at most {self.limit} (--max_request_bytes)"

    async def _refuse(self, send, size: int) -> None:
        body = json.dumps(error_body(413, self._message(size), "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


API_KEY_ENV = "TUNESMITH_API_KEY"  # deploy's key from the environment (as OpenAI clients read OPENAI_API_KEY)


def create_app(engine, served: dict[str, Optional[str]], api_key: Optional[str] = None,
               owned_by: str = "tunesmith", result_path: Optional[str] = None, max_logprobs: int = 20,
               max_request_bytes: int = 8 << 20, max_image_bytes: Optional[int] = None, routes: tuple = DEPLOY_ROUTES,
               guarded: Union[str, tuple] = ("/v1/", "/infer/"), unlimited: tuple = ()):
    """The FastAPI app. served: model id -> adapter to use (None = the model as loaded, "" = the base without
    adapters, or a named adapter). api_key: when set, /v1/* and /infer/ need `Authorization: Bearer KEY` (else 401).
    max_request_bytes: the largest request body (413 past it); max_image_bytes: the largest picture, decoded (a
    data URL's, or one fetched from an http(s) URL; 400 past it), None: max_request_bytes.
    Every error (400 validation, 404 route, 500 unexpected) answers OpenAI's error body. The app does not close
    the engine when it shuts down: the caller built it and closes it (other users may share it). The handlers reach the Server (engine, served ids, request log) as `request.app.state.server`.
    routes: (method, path, handler) rows (default deploy's: routes.ROUTES and /infer/; `tunesmith rollout` passes its
    own); guarded: the path prefix (or prefixes) the API key guards ("/" guards every path but /health);
    unlimited: paths exempt from max_request_bytes."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None)
    app.state.server = Server(engine, served, result_path, max_logprobs, owned_by,
                              max_image_bytes or max_request_bytes)
    app.state.api_key, app.state.guarded = api_key, guarded
    app.add_middleware(BodyLimit, limit=max_request_bytes, exempt=unlimited)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.middleware("http")(_auth)
    for method, path, handler in routes:
        app.add_api_route(path, handler, methods=[method])
    return app


async def _api_error(_, e: ApiError):
    return JSONResponse(error_body(e.status, e.message, e.code, e.param), status_code=e.status)


async def _http_error(_, e: HTTPException):
    code = {404: "not_found", 413: "request_too_large"}.get(e.status_code, "invalid_request_error")
    return JSONResponse(error_body(e.status_code, str(e.detail), code), status_code=e.status_code)


async def _unexpected(_, e: Exception):
    return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}", "server_error"),
                        status_code=500)


async def _bad_request(_, e):
    """A RequestValidationError (pydantic's, or a body that is not JSON) as a 400 naming the first bad field."""
    errs = e.errors()
    first = errs[0] if errs else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
    code = "invalid_type" if str(first.get("type", "")).endswith("_type") else "invalid_request_error"
    if first.get("type") == "json_invalid":
        msg, where = "the request body is not valid JSON", ""
    return JSONResponse(error_body(400, msg, code, where or None), status_code=400)


async def _auth(request: Request, call_next):
    """With create_app's api_key: the guarded paths (deploy's /v1/* and /infer/; a rollout server's all but /health) need
    `Authorization: Bearer KEY`, else 401. The key is compared in constant time and never logged."""
    import hmac

    api_key, path = request.app.state.api_key, request.url.path
    if api_key and path.startswith(request.app.state.guarded) and path.rstrip("/") != "/health":
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            return JSONResponse(error_body(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                           "invalid_api_key"), status_code=401)
    return await call_next(request)


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
            body = json.dumps(error_body(400, f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}): check its "
                                               f"Content-Length and headers", "invalid_http_request")).encode()
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in getattr(self.server_state, "default_headers", []):
                head.append(name + b": " + value + b"\r\n")
            head.append(b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode() +
                        b"\r\nconnection: close\r\n\r\n")
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return OpenAIErrors


