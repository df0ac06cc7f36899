"""`tunesmith rollout`: the rollout protocol of ms-swift's `swift rollout` served from tunesmith's own engine, for
GRPO's `--vllm_mode server` (tunesmith.train.rl.rollout_client is the trainer's side).

Endpoints (ms-swift 4.6's names and shapes, swift/pipelines/infer/rollout.py): GET /health(/), GET
/get_world_size/, POST /get_engine_type/, GET /get_model_info/ (tunesmith's: the base model's identity — config
fields and a weight fingerprint, tunesmith.models.identity — that a trainer checks against its own), POST /infer/
(RolloutInferRequest list + RequestConfig → one RolloutOutput per request, its ChatCompletionResponse choices carrying the token ids), GET /get_model_state_keys/,
and the cache resets (no-ops: the engine keeps no prefix cache between requests). Weights arrive over HTTP, with
no NCCL: POST /update_adapter/ (tunesmith's) takes the policy's LoRA adapter as one safetensors body
(tunesmith.inference.live_adapters' format), installs it as the next adapter version between two decoding steps,
and every /infer/ after it samples that version (a request keeps the version it started with); POST /update_params/
takes full weights the same way (one safetensors body of named parameters, copied in between two steps; a
full-weight run sends them in several bodies). The NCCL endpoints
(/init_communicator/, /update_named_param/, /update_adapter_flattened_param/, /update_adapter_param/,
/update_flattened_params/) answer 501 saying what to use: they broadcast tensors between GPUs, which only a vLLM
server (`swift rollout`) can take.

Requests never wait on each other: prompts render in worker threads, sequences join the engine's running batch,
an adapter upload is read and unpacked off the event loop, and a client that disconnects cancels its sequences.
Errors use deploy's body (tunesmith.serve.app). The route handlers carry no docstrings on purpose (FastAPI would
publish them). No torch or fastapi import at module level.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional

from starlette.requests import Request

from tunesmith.serve.protocol import ApiError
from tunesmith.serve.rollout_protocol import (InferBody, RequestConfig, check_infer_request, check_request_config,
                                              choice, rollout_output)

SERVER_NAME = "tunesmith"  # /get_engine_type/'s "server": how a trainer tells this server from a vLLM one
WEIGHT_PATHS = ("/update_adapter/", "/update_params/")  # bodies larger than --max_request_bytes (create_app's `unlimited`)
NCCL_ENDPOINTS = ("/init_communicator/", "/update_named_param/", "/update_adapter_flattened_param/",
                  "/update_adapter_param/", "/update_flattened_params/")


@dataclass
class Rollout:
    """What the rollout handlers share: the deploy Server (engine, prompt rendering, request checks), the adapter
    versions pushed so far, the model's name (responses' `model`) and its vocabulary size (token ids)."""
    server: object          # tunesmith.serve.routes.Server
    adapters: object        # tunesmith.inference.live_adapters.LiveAdapters
    model_name: str
    vocab_size: int
    identity: Optional[dict] = None  # the base model's identity (tunesmith.models.identity), None where unknown


def create_rollout_app(engine, model_name: str, api_key: Optional[str] = None, max_logprobs: int = 20,
                       max_request_bytes: int = 8 << 20, max_lora_rank: int = 16):
    """The FastAPI app of `tunesmith rollout` over a ChatEngine (tunesmith.inference.chat): tunesmith's own engine,
    or vLLM (pushed adapters become vLLM LoRA requests; max_lora_rank: its --vllm_max_lora_rank). api_key: every
    path but /health needs `Authorization: Bearer KEY` (as `swift rollout`). max_request_bytes: the largest
    /infer/ body (weight uploads are not limited). The app does not close the engine."""
    from tunesmith.inference.live_adapters import LiveAdapters, VllmAdapters
    from tunesmith.models.identity import model_identity
    from tunesmith.serve.app import create_app

    app = create_app(engine, {model_name: None}, api_key=api_key, max_logprobs=max_logprobs,
                     max_request_bytes=max_request_bytes, routes=ROUTES, guarded="/", unlimited=WEIGHT_PATHS)
    inner = engine.engine
    adapters = VllmAdapters(inner, max_lora_rank) if getattr(inner, "name", None) == "vllm" else LiveAdapters(inner)
    model = getattr(inner, "model", None)  # vLLM's weights are its own: no identity
    identity = model_identity(model) if model is not None else None
    app.state.rollout = Rollout(app.state.server, adapters, model_name, len(engine.tok), identity)
    return app


def _gen_config(rollout: Rollout, cfg: RequestConfig, seed: Optional[int]):
    """A request's GenConfig: request_config over the server's defaults (top_k -1: no top-k, as vLLM); its
    log-probs are those of the distribution sampled from (after temperature, top-k, top-p), as `swift rollout`
    starts vLLM with logprobs_mode processed_logprobs — what GRPO's rollout correction compares with."""
    return rollout.server.engine.defaults.merged(
        max_new_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=0 if cfg.top_k == -1 else cfg.top_k, repetition_penalty=cfg.repetition_penalty, seed=seed,
        stop=list(cfg.stop or []) or None, n=cfg.n, logprobs=cfg.logprobs or bool(cfg.top_logprobs),
        top_logprobs=cfg.top_logprobs or 0, processed_logprobs=True)


def _seed(cfg: RequestConfig, i: int, own: Optional[int]) -> Optional[int]:
    """Request i's first seed: its own, else request_config.seed + i·n (so copies of a prompt differ), else None."""
    if own is not None:
        return own
    return None if cfg.seed is None else cfg.seed + i * cfg.n


async def _prompt(rollout: Rollout, i: int, req):
    """Request i as an engine Prompt: its prompt_token_ids as they are, or its messages rendered (with its
    pictures) in a worker thread. Raises ApiError 400 (deploy's prompt errors, or token ids that leave no room)."""
    from tunesmith.inference.chat import Prompt

    server = rollout.server
    if req.prompt_token_ids is not None:
        limit = server.engine.max_model_len
        if len(req.prompt_token_ids) >= limit:
            raise ApiError(400, f"infer_requests[{i}].prompt_token_ids: {len(req.prompt_token_ids)} tokens; the "
                                f"model's limit is {limit}", code="context_length_exceeded")
        return Prompt(list(req.prompt_token_ids), False, bool(req.tools))
    images = None
    if req.images:
        from tunesmith.serve.images import resolve_images

        problem = server.engine.image_problem(len(req.images))
        if problem:
            raise ApiError(400, problem, code="invalid_image", param=f"infer_requests[{i}].images")
        urls = [(f"infer_requests[{i}].images[{k}]", u) for k, u in enumerate(req.images)]
        images = await resolve_images(urls, server.max_image_bytes)
    return await server.prompt(req.messages, req.tools, dict(req.chat_template_kwargs or {}), images)


def _adapter(rollout: Rollout, adapter_request: Optional[dict]) -> Optional[str]:
    """The adapter /infer/ samples: adapter_request's name (a version pushed here), else the newest version, else
    None (the model as loaded). Raises ApiError 400 for a name that is not loaded."""
    name = (adapter_request or {}).get("name")
    if name is None:
        return rollout.adapters.current
    if name not in rollout.adapters.names():
        raise ApiError(400, f"adapter_request.name {name!r} is not loaded here (versions: "
                            f"{', '.join(rollout.adapters.names()) or 'none yet'}); push one with POST "
                            f"/update_adapter/", param="adapter_request")
    return name


async def infer(body: InferBody, request: Request):
    from tunesmith.inference.chat import logprobs_json
    from tunesmith.serve.routes import _check, _wait

    rollout: Rollout = request.app.state.rollout
    server = rollout.server
    cfg = body.request_config or RequestConfig()
    check_request_config(cfg, server.max_logprobs)
    for i, req in enumerate(body.infer_requests):
        check_infer_request(i, req, rollout.vocab_size)
    adapter = _adapter(rollout, body.adapter_request)
    prompts = await asyncio.gather(*(_prompt(rollout, i, r) for i, r in enumerate(body.infer_requests)))
    configs = [_gen_config(rollout, cfg, _seed(cfg, i, r.seed)) for i, r in enumerate(body.infer_requests)]
    handles = [server.submit(p, c, adapter) for p, c in zip(prompts, configs)]
    done = await _wait([h for hs in handles for h in hs], request)
    out, at = [], 0
    for prompt, gen, hs in zip(prompts, configs, handles):
        completions, at = done[at:at + len(hs)], at + len(hs)
        replies = [server.engine.reply(c, prompt, gen) for c in completions]
        _check(replies)
        choices = [choice(k, c, r, cfg.return_details, logprobs_json(server.engine.tok, r.logprobs))
                   for k, (c, r) in enumerate(zip(completions, replies))]
        out.append(rollout_output(rollout.model_name, prompt.ids, choices,
                                  sum(len(c.token_ids) for c in completions), cfg.return_details))
    return out


async def update_adapter(request: Request):
    from starlette.concurrency import run_in_threadpool

    from tunesmith.inference.live_adapters import unpack_adapter

    rollout: Rollout = request.app.state.rollout
    data = await request.body()
    try:
        config, tensors = await run_in_threadpool(unpack_adapter, data)
        future = asyncio.get_running_loop().run_in_executor(None, rollout.adapters.load, config, tensors)
        name = await future
    except ValueError as e:
        raise ApiError(400, f"the adapter cannot be loaded: {e}", code="invalid_adapter") from None
    except RuntimeError as e:
        raise ApiError(503, str(e)) from None
    return {"message": f"adapter loaded as {name}; /infer/ samples it from now on", "adapter": name,
            "tensors": len(tensors), "bytes": len(data)}


async def update_params(request: Request):
    from starlette.concurrency import run_in_threadpool

    from tunesmith.inference.live_adapters import read_safetensors

    rollout: Rollout = request.app.state.rollout
    data = await request.body()
    try:
        _, tensors = await run_in_threadpool(read_safetensors, data)
        n = await asyncio.get_running_loop().run_in_executor(None, rollout.adapters.update_params, tensors)
    except ValueError as e:
        raise ApiError(400, f"the weights cannot be loaded: {e}", code="invalid_weights") from None
    except RuntimeError as e:
        raise ApiError(503, str(e)) from None
    return {"message": f"{n} weight tensor(s) updated; /infer/ samples them from now on", "tensors": n,
            "bytes": len(data)}


async def health():
    return {"status": "ok"}


async def get_world_size():
    return {"world_size": 1}


async def get_engine_type(request: Request):
    rollout: Rollout = request.app.state.rollout
    return {"engine_type": "LLMEngine", "enable_multi_turn": False, "use_gym_env": False, "enable_lora": True,
            "server": SERVER_NAME, "weight_sync": "http_adapter", "model": rollout.model_name,
            "vocab_size": rollout.vocab_size, "adapter": rollout.adapters.current}


async def get_model_info(request: Request):
    rollout: Rollout = request.app.state.rollout
    return {"model": rollout.model_name, "vocab_size": rollout.vocab_size, **(rollout.identity or {})}


async def get_model_state_keys(request: Request):
    model = getattr(request.app.state.rollout.server.engine.engine, "model", None)  # vLLM's weights are its own
    return {"keys": [name for name, _ in model.named_parameters()] if model is not None else []}


async def nccl_only(request: Request):
    raise ApiError(501, f"{request.url.path} broadcasts weights over NCCL between GPUs, which a tunesmith rollout "
                        f"server does not take: its weights arrive over HTTP (POST /update_adapter/ with the policy's "
                        f"LoRA adapter, or /update_params/ with full weights; tunesmith's GRPO --vllm_mode server does "
                        f"this every round). A trainer that syncs over NCCL (ms-swift's) needs a `swift rollout` vLLM "
                        f"server", code="nccl_not_available")


async def nothing_cached(request: Request):
    return {"message": f"{request.url.path}: nothing to reset (the engine keeps no cache between requests)"}


# (method, path, handler), registered in this order by create_app
ROUTES = (("GET", "/health", health), ("GET", "/health/", health),
          ("GET", "/get_world_size/", get_world_size),
          ("POST", "/get_engine_type/", get_engine_type),
          ("GET", "/get_model_info/", get_model_info),
          ("GET", "/get_model_state_keys/", get_model_state_keys),
          ("POST", "/infer/", infer),
          ("POST", "/update_adapter/", update_adapter),
          ("POST", "/update_params/", update_params),
          *(("POST", path, nccl_only) for path in NCCL_ENDPOINTS),
          *(("POST", path, nothing_cached) for path in ("/reset_prefix_cache/", "/reset_encoder_cache/",
                                                        "/reset_mm_cache/", "/process_weights_after_loading/",
                                                        "/close_communicator/")))
