"""`tunesmith deploy`: load a model or checkpoint, check it gives finite output, and serve it behind the OpenAI-compatible app of tunesmith.serve.app (uvicorn)."""
from __future__ import annotations

import os
import socket
import sys
from typing import Optional
from tunesmith.errors import ConfigError
from tunesmith.serve.app import (API_KEY_ENV, create_app, openai_http_protocol)


GRACEFUL_SHUTDOWN_S = 15


def served_models(args, named: dict, ckpt: Optional[str]) -> dict[str, Optional[str]]:
    """The model ids /v1/models lists: the loaded model (with its plain adapters) and one per named adapter.

    named: deploy's named adapters {name: path}; ckpt: the checkpoint build_engine resolved. Returns {model id:
    adapter} for create_app: {base: None} without named adapters, else {base: "" (adapters off), name: name, ...}."""
    from tunesmith.models.checkpoint import model_suffix

    base = args.served_model_name or model_suffix(ckpt if (ckpt and args.adapters and not named) else args.model)
    if not named:
        return {base: None}
    return {base: "", **{name: name for name in named}}


def _check_port(host: str, port: int) -> None:
    """Refuse, before the model loads, a port the server could not listen on: bound as uvicorn binds it (with
    SO_REUSEADDR on POSIX), so a port whose last connections linger in TIME_WAIT after a server stopped is taken
    while one that a live server listens on is not. Raises ConfigError."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        if os.name == "posix":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); another server is using the port? "
                              f"Pass --port with a free one") from None


def check_finite(engine, args, ckpt: Optional[str]) -> None:
    """Refuse to serve a model whose output is NaN/inf (engine.non_finite_problem): every answer would be an error
    (or, greedy, silent garbage). Names the checkpoint, and its diverged.json when training marked it.

    Raises ConfigError; closes the engine first."""
    from tunesmith.models.checkpoint import diverged_problem

    problem = engine.non_finite_problem()
    if problem is None:
        return
    engine.close()
    where = ckpt or (args.adapters[-1] if args.adapters else args.model)
    marked = next((m for m in (diverged_problem(p, "") for p in dict.fromkeys([where, args.model, *(args.adapters or [])]))
                   if m), None)
    raise ConfigError(f"{where}: {problem}, so every request would fail; nothing was served. "
                      + (f"Training marked it diverged ({marked.strip()})." if marked else
                         "Serve an earlier checkpoint (or one whose training loss stayed finite)."))


class _Terminated(BaseException):
    """SIGTERM, as an exception (serve_then_close): it unwinds to where the engine is closed."""


def _terminated(_signum, _frame):
    raise _Terminated


def serve_then_close(engine, serve) -> None:
    """serve() (uvicorn: on SIGTERM or Ctrl-C it stops accepting and drains in-flight requests), then close the
    engine, which this command built: the app never closes an engine it was given. uvicorn raises the signal that
    stopped it again once it has shut down; SIGTERM's default action would end the process before the engine is
    closed, so it comes back here as an exception and is raised with its default action after the close (the
    process still ends as killed by SIGTERM, the POSIX convention; a SIGTERM before uvicorn listens does the same).
    Ctrl-C arrives as KeyboardInterrupt, after the engine is closed."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()  # signals are the main thread's only
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    terminated = False
    try:
        serve()
    except _Terminated:
        terminated = True
    finally:
        engine.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if terminated:
        signal.raise_signal(signal.SIGTERM)


def main(args):
    """`tunesmith deploy`: build the engine and serve it until SIGTERM / Ctrl-C. Returns 0.

    Raises ConfigError: fastapi or uvicorn missing, the port taken, the engine cannot be built here, or the model's
    output is NaN/inf (check_finite)."""
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise ConfigError("tunesmith deploy needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    del fastapi  # imported only to check that it is installed; create_app imports what it uses
    from tunesmith.inference.chat import build_engine
    from tunesmith.inference.flags import check_inference_flags

    check_inference_flags(args)
    _check_port(args.host, args.port)
    engine, args, ckpt, named = build_engine(args)
    check_finite(engine, args, ckpt)
    served = served_models(args, named, ckpt)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(engine, served, api_key=api_key, owned_by=args.owned_by, result_path=args.result_path,
                     max_logprobs=args.max_logprobs, max_request_bytes=args.max_request_bytes)
    where = "reachable from the network" if args.host in ("0.0.0.0", "::") else \
        "local only; --host 0.0.0.0 exposes it to the network"
    print(f"[tunesmith] deploy: serving {', '.join(served)} at http://{args.host}:{args.port}/v1 ({where})"
          + ("; API key required" if api_key else ""), file=sys.stderr, flush=True)
    serve_then_close(engine, lambda: uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning" if not args.verbose else "info",
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, http=openai_http_protocol(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    return 0
