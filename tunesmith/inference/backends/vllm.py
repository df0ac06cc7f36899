"""vLLM (`--infer_backend vllm`, GRPO's `--use_vllm`): the translation of the engine slice to
vllm.AsyncEngineArgs kwargs (`vllm_engine_args`), the per-adapter LoRARequest arguments (`vllm_lora_requests`), and
`VllmEngine`, vLLM's AsyncLLMEngine behind tunesmith's ChatEngine. vllm itself is imported only when an engine is
built (the module name shadows nothing: imports here are absolute)."""
from __future__ import annotations

from typing import Any, Optional

from tunesmith.config.slices import EngineConfig
from tunesmith.errors import ConfigError
from tunesmith.inference.backends.async_backend import _AsyncBackend, _maybe_await, _top
from tunesmith.inference.backends.common import _adapter_rank, _context_len, _dtype

def vllm_lora_requests(lora: dict[str, str]) -> dict[str, dict]:
    """{name: kwargs of vllm.lora.request.LoRARequest}: lora_name, lora_int_id (1, 2, ...: vLLM reserves 0 for
    'no adapter' and keys its adapter cache by the id), lora_path. A request for model NAME carries that one."""
    return {name: {"lora_name": name, "lora_int_id": i, "lora_path": path}
            for i, (name, path) in enumerate(lora.items(), start=1)}


def vllm_engine_args(cfg: EngineConfig, model_dir: str, lora: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """kwargs for vllm.AsyncEngineArgs (or EngineArgs), as ms-swift's VllmEngine builds them.

    Sizes: gpu_memory_utilization is a fraction (0-1) of each GPU's memory; max_model_len is in tokens. Keys whose
    value is vLLM's own default are left out, so vLLM versions that lack the key still accept the dict; the JSON
    --vllm_engine_kwargs is applied last and wins. trust_remote_code follows --trust_remote_code (ms-swift always
    passes True; tunesmith keeps its opt-in so serving does not run code shipped with a model by surprise).
    Raises ConfigError when an adapter's rank exceeds --vllm_max_lora_rank (vLLM would fail at load)."""
    lora = dict(lora or {})
    kw: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": model_dir,
        "dtype": _dtype(cfg),
        "gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
        "tensor_parallel_size": cfg.vllm_tensor_parallel_size,
        "pipeline_parallel_size": cfg.vllm_pipeline_parallel_size,
        "max_model_len": _context_len(cfg, cfg.vllm_max_model_len),
        "max_num_seqs": cfg.vllm_max_num_seqs,
        "disable_custom_all_reduce": cfg.vllm_disable_custom_all_reduce,
        "enforce_eager": cfg.vllm_enforce_eager,
        "trust_remote_code": bool(cfg.trust_remote_code),
        "disable_log_stats": True,  # ms-swift's default: no periodic stats lines interleaved with replies
    }
    if cfg.seed is not None:
        kw["seed"] = cfg.seed
    if cfg.model_revision:
        kw["revision"] = cfg.model_revision
    enable_lora = cfg.vllm_enable_lora if cfg.vllm_enable_lora is not None else bool(lora)
    if lora and not enable_lora:
        raise ConfigError(f"--vllm_enable_lora false with --adapters {', '.join(lora)}: drop one of them")
    if enable_lora:
        for name, path in lora.items():
            r = _adapter_rank(path)
            if r is not None and r > cfg.vllm_max_lora_rank:
                raise ConfigError(f"--adapters {name}: LoRA rank {r} is above --vllm_max_lora_rank "
                                  f"{cfg.vllm_max_lora_rank}; pass --vllm_max_lora_rank {r}")
        kw.update(enable_lora=True, max_loras=max(len(lora), 1), max_lora_rank=cfg.vllm_max_lora_rank)
    optional = {
        "enable_prefix_caching": cfg.vllm_enable_prefix_caching,
        "limit_mm_per_prompt": cfg.vllm_limit_mm_per_prompt or None,
        "enable_expert_parallel": cfg.vllm_enable_expert_parallel or None,
        "quantization": cfg.vllm_quantization,
        "disable_cascade_attn": cfg.vllm_disable_cascade_attn or None,
        "mm_processor_cache_gb": cfg.vllm_mm_processor_cache_gb,
        "speculative_config": cfg.vllm_speculative_config,
        "data_parallel_size": cfg.vllm_data_parallel_size if cfg.vllm_data_parallel_size != 1 else None,
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    kw.update(cfg.vllm_engine_kwargs or {})
    return kw


class VllmEngine(_AsyncBackend):
    """vLLM behind tunesmith's ChatEngine.

    API used (vLLM 0.5.1 - 0.11+, read from vllm/engine/async_llm_engine.py and vllm/v1/engine/async_llm.py;
    from 0.8 `AsyncLLMEngine` is the v1 `AsyncLLM`): `AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kw))`;
    `engine.generate({"prompt_token_ids": ids}, SamplingParams(...), request_id, lora_request=LoRARequest(name,
    int_id, path))` streams RequestOutputs whose `outputs[0]` has token_ids, logprobs ([{token_id: Logprob}]),
    finish_reason and stop_reason; `output_kind=RequestOutputKind.DELTA` (vLLM >= 0.6.3) makes them deltas, older
    versions send cumulative lists, which are diffed; `await engine.abort(request_id)`; `engine.shutdown()`.

    Args: cfg (the engine slice, for vllm_engine_args), model_dir, tokenizer (tunesmith's, for stop strings),
    stop_ids, adapters {name: path}, default_adapter (the plain --adapters one: used when adapter is None),
    max_model_len (tokens; used only when the engine does not report its own)."""

    name = "vllm"

    def __init__(self, cfg: EngineConfig, model_dir: str, tokenizer, stop_ids,
                 adapters: Optional[dict[str, str]] = None, default_adapter: Optional[str] = None,
                 max_model_len: Optional[int] = None):
        self._kwargs = vllm_engine_args(cfg, model_dir, adapters or {})
        self._lora = vllm_lora_requests(adapters or {})
        super().__init__(tokenizer, stop_ids, max_model_len or 4096, adapters, default_adapter)
        # the engine's own context length (flags, else the model's config) is the one it enforces
        self.max_model_len = _vllm_max_len(self.engine) or self.max_model_len

    def _create(self):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**self._kwargs))

    def sampling_params(self, p):
        """tunesmith SamplingParams -> vllm.SamplingParams (n=1: ChatEngine submits each choice itself)."""
        import vllm

        kw = self.sampling_kwargs(p)
        try:
            from vllm.sampling_params import RequestOutputKind
        except ImportError:  # vLLM < 0.6.3: cumulative outputs, diffed in _stream
            RequestOutputKind = None
        if RequestOutputKind is not None:
            kw["output_kind"] = RequestOutputKind.DELTA
        return vllm.SamplingParams(**kw)

    def sampling_kwargs(self, p) -> dict[str, Any]:
        """The kwargs of vllm.SamplingParams for tunesmith's p: temperature 0 is greedy in vLLM too; top_k 0 (off)
        is vLLM's -1; the stop ids are the engine's plus the request's; logprobs=N returns the top N plus the
        chosen token (0 = only the chosen token's); special tokens are kept in the text so stop strings such as
        '<|im_end|>' match as they do in tunesmith's own engine."""
        want = p.logprobs or p.top_logprobs
        return {"n": 1, "max_tokens": p.max_new_tokens, "temperature": float(p.temperature), "top_p": float(p.top_p),
                "top_k": int(p.top_k) if p.top_k and p.top_k > 0 else -1,
                "repetition_penalty": float(p.repetition_penalty), "stop": list(p.stop) or None,
                "stop_token_ids": sorted(self.stop_ids | {int(i) for i in p.stop_token_ids}), "seed": p.seed,
                "logprobs": int(p.top_logprobs or 0) if want else None, "skip_special_tokens": False,
                **({"min_p": float(p.min_p)} if p.min_p else {})}  # GRPO's --min_p; left out at vLLM's default 0

    def add_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter at PATH under NAME from the next request on, with a new int id (vLLM caches
        adapters by id, so a changed adapter needs a new one; the least recently used is evicted when
        --vllm_max_loras slots are full). GRPO calls this each round with the policy's current adapter."""
        ids = [r["lora_int_id"] for r in self._lora.values()]
        self._next_lora_id = max([getattr(self, "_next_lora_id", 0)] + ids) + 1
        self.adapters[name] = path
        self._lora[name] = {"lora_name": name, "lora_int_id": self._next_lora_id, "lora_path": path}

    def remove_adapter(self, name: str) -> None:
        """Stop serving NAME (requests naming it are refused; vLLM drops its copy when it needs the slot)."""
        self.adapters.pop(name, None)
        self._lora.pop(name, None)

    def lora_request(self, name: Optional[str]):
        """vllm LoRARequest for adapter NAME (None: no adapter). Positional (name, int id, path): the third field
        is lora_local_path in vLLM 0.5 and lora_path from 0.6."""
        if name is None:
            return None
        from vllm.lora.request import LoRARequest

        r = self._lora[name]
        return LoRARequest(r["lora_name"], r["lora_int_id"], r["lora_path"])

    async def _stream(self, handle, request_id: str, lora: Optional[str]):
        from tunesmith.inference.engine import TokenLogprob

        sp = self.sampling_params(handle.params)
        delta = getattr(getattr(sp, "output_kind", None), "name", None) == "DELTA"
        seen = 0
        k = handle.params.top_logprobs
        async for out in self.engine.generate({"prompt_token_ids": list(handle.prompt_ids)}, sp, request_id,
                                              lora_request=self.lora_request(lora)):
            o = out.outputs[0]
            ids = list(o.token_ids)
            lps = list(o.logprobs) if o.logprobs is not None else None
            if not delta:
                ids, lps = ids[seen:], (lps[seen:] if lps is not None else None)
            seen += len(ids)
            logprobs = None
            if lps is not None:
                logprobs = [TokenLogprob(t, float(_lp(d.get(t))), _top(((i, _lp(v)) for i, v in d.items()), k))
                            for t, d in zip(ids, lps)]
            finish = o.finish_reason if (o.finish_reason or getattr(out, "finished", False)) else None
            if finish is None and getattr(out, "finished", False):
                finish = "stop"
            yield ids, logprobs, finish, o.stop_reason

    async def _abort(self, request_id: str) -> None:
        await _maybe_await(self.engine.abort(request_id))

    def _shutdown(self) -> None:
        for name in ("shutdown", "shutdown_background_loop"):
            fn = getattr(self.engine, name, None)
            if callable(fn):
                fn()
                return


def _lp(value) -> float:
    # vLLM's Logprob(logprob, rank, decoded_token); a bare float in some test doubles and old versions
    if value is None:
        return float("nan")
    return float(getattr(value, "logprob", value))


def _vllm_max_len(engine) -> Optional[int]:
    for path in (("model_config", "max_model_len"), ("vllm_config", "model_config", "max_model_len"),
                 ("engine", "model_config", "max_model_len")):
        obj = engine
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, int):
            return obj
    return None
