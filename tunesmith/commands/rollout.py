"""`tunesmith rollout`: serve a model for GRPO's `--vllm_mode server` with ms-swift's rollout protocol (the app is
tunesmith.serve.rollout), on tunesmith's own engine; the trainer pushes its LoRA adapter over HTTP every round.
Start-up and shutdown are deploy's (tunesmith.commands.deploy)."""
from __future__ import annotations

import os
import sys

from tunesmith.errors import ConfigError


def refuse_backend(args) -> None:
    """Raise ConfigError for an engine the rollout server cannot hand the policy to: SGLang and LMDeploy, and vLLM
    without --vllm_enable_lora true (each pushed adapter becomes a vLLM LoRA request)."""
    if args.infer_backend in ("transformers", "pt"):
        return
    if args.infer_backend == "vllm":
        if not args.vllm_enable_lora:
            raise ConfigError("--infer_backend vllm: pass --vllm_enable_lora true (the policy's LoRA adapter is "
                              "served as a vLLM LoRA request each round; full weights reach vLLM only over NCCL, "
                              "ms-swift's `swift rollout`), or serve with --infer_backend transformers")
        return
    raise ConfigError(f"--infer_backend {args.infer_backend}: tunesmith rollout serves from tunesmith's own engine "
                      f"(--infer_backend transformers, the default) or vLLM (--infer_backend vllm "
                      f"--vllm_enable_lora true), which take the policy's LoRA adapter over HTTP each round")


def build(args):
    """(the ChatEngine, the rollout app, the served model name) for a parsed `rollout` command: the engine is
    deploy's (`tunesmith.inference.chat.build_engine`), checked for finite output. Raises ConfigError as deploy."""
    from tunesmith.commands.deploy import check_finite, served_models
    from tunesmith.inference.chat import build_engine
    from tunesmith.inference.flags import check_inference_flags
    from tunesmith.serve.app import API_KEY_ENV
    from tunesmith.serve.rollout import create_rollout_app

    check_inference_flags(args)
    refuse_backend(args)
    engine, args, ckpt, named = build_engine(args)
    check_finite(engine, args, ckpt)
    name = next(iter(served_models(args, named, ckpt)))
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_rollout_app(engine, name, api_key=api_key, max_logprobs=args.max_logprobs,
                             max_request_bytes=args.max_request_bytes, max_lora_rank=args.vllm_max_lora_rank)
    return engine, app, name


def main(args):
    """`tunesmith rollout`: build the engine and serve the rollout protocol until SIGTERM / Ctrl-C. Returns 0.

    Raises ConfigError: fastapi or uvicorn missing, an accelerated --infer_backend, the port taken, the engine
    cannot be built here, or the model's output is NaN/inf."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("tunesmith rollout needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    from tunesmith.commands.deploy import GRACEFUL_SHUTDOWN_S, _check_port, serve_then_close
    from tunesmith.serve.app import openai_http_protocol

    refuse_backend(args)
    _check_port(args.host, args.port)
    engine, app, name = build(args)
    where = "reachable from the network" if args.host in ("0.0.0.0", "::") else \
        "local only; --host 0.0.0.0 exposes it to the network"
    keyed = app.state.api_key is not None
    if not keyed and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[tunesmith] rollout: warning: listening on {args.host}:{args.port} without an API key: anyone who "
              f"reaches this port can replace the served weights or run inference; pass --api_key (or set "
              f"TUNESMITH_API_KEY), or --host 127.0.0.1", file=sys.stderr, flush=True)
    print(f"[tunesmith] rollout: serving {name} at http://{args.host}:{args.port} ({where})"
          + ("; API key required" if keyed else "") + f"; train with --use_vllm true --vllm_mode server "
          f"--vllm_server_host {args.host} --vllm_server_port {args.port}", file=sys.stderr, flush=True)
    serve_then_close(engine, lambda: uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning" if not args.verbose else "info",
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, http=openai_http_protocol(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    return 0
