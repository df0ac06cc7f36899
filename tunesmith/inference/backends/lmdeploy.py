"""LMDeploy (`--infer_backend lmdeploy`): the translation of the engine slice to TurbomindEngineConfig or
PytorchEngineConfig kwargs (`lmdeploy_engine_config`) and `LmdeployEngine`, LMDeploy's AsyncEngine behind
tunesmith's ChatEngine. lmdeploy itself is imported only when an engine is built."""
from __future__ import annotations

from typing import Any, Optional

from tunesmith.config.slices import EngineConfig
from tunesmith.errors import ConfigError
from tunesmith.inference.backends.async_backend import _AsyncBackend, _maybe_await, _top
from tunesmith.inference.backends.common import _context_len, _dtype

def lmdeploy_engine_config(cfg: EngineConfig, model_dir: str,
                           lora: Optional[dict[str, str]] = None) -> tuple[str, dict[str, Any]]:
    """(backend, kwargs): 'turbomind' with TurbomindEngineConfig kwargs, as ms-swift's LmdeployEngine builds them
    (it then lets lmdeploy.api.autoget_backend_config fall back to PyTorch for models TurboMind lacks), or
    'pytorch' with PytorchEngineConfig kwargs when LoRA adapters are given: only LMDeploy's PyTorch engine serves
    adapters (`adapters={name: path}`). session_len is in tokens; cache_max_entry_count is a fraction (0-1) of free
    GPU memory for the KV cache; quant_policy 4/8 quantises the KV cache. Raises ConfigError for KV-cache
    quantisation together with adapters (TurboMind-only feature vs PyTorch-only feature)."""
    lora = dict(lora or {})
    kw: dict[str, Any] = {
        "tp": cfg.lmdeploy_tp,
        "session_len": _context_len(cfg, cfg.lmdeploy_session_len),
        "cache_max_entry_count": cfg.lmdeploy_cache_max_entry_count,
        "quant_policy": cfg.lmdeploy_quant_policy,
    }
    dtype = _dtype(cfg)
    if dtype in ("bfloat16", "float16"):
        kw["dtype"] = dtype  # both configs take 'auto' | 'float16' | 'bfloat16'; float32 is not an option
    if not lora:
        return "turbomind", kw
    if cfg.lmdeploy_quant_policy:
        raise ConfigError(f"--quant_policy {cfg.lmdeploy_quant_policy} with --adapters: LMDeploy serves LoRA "
                          f"only on its PyTorch engine; drop --quant_policy or merge the adapter first "
                          f"(tunesmith export --merge_lora true)")
    kw["adapters"] = lora
    return "pytorch", kw


class LmdeployEngine(_AsyncBackend):
    """LMDeploy behind tunesmith's ChatEngine.

    API used (LMDeploy 0.5 - 0.16, lmdeploy/serve/async_engine.py, later serve/core/async_engine.py):
    `lmdeploy.pipeline(model_dir, backend_config=TurbomindEngineConfig(...) | PytorchEngineConfig(adapters=...))`
    returns the AsyncEngine; up to 0.15 `engine.generate(None, session_id, gen_config, stream_response=True,
    do_preprocess=False, adapter_name=NAME, input_ids=ids)`, from 0.16 `engine.preprocess(None, session_id,
    gen_config, adapter_name=NAME, input_ids=ids)` then `engine.generate(request)`; both stream GenOut with
    generate_token_len (cumulative), the newest token_ids at the end, logprobs [{id: logprob}] aligned with them,
    finish_reason. Cancelling the consuming task stops the session (AsyncEngine.safe_run); `stop_session` is
    called too where it exists. The stop token itself is not returned by LMDeploy."""

    name = "lmdeploy"

    def __init__(self, cfg: EngineConfig, model_dir: str, tokenizer, stop_ids,
                 adapters: Optional[dict[str, str]] = None, default_adapter: Optional[str] = None,
                 max_model_len: Optional[int] = None):
        self._model_dir = model_dir
        self._backend, self._kwargs = lmdeploy_engine_config(cfg, model_dir, adapters or {})
        self._trust = bool(cfg.trust_remote_code)
        self._sessions: dict[str, int] = {}
        super().__init__(tokenizer, stop_ids, max_model_len or cfg.lmdeploy_session_len
                         or cfg.max_model_len or 4096, adapters, default_adapter)

    def _create(self):
        import lmdeploy

        config = (lmdeploy.PytorchEngineConfig if self._backend == "pytorch" else lmdeploy.TurbomindEngineConfig)
        kw = {"backend_config": config(**self._kwargs)}
        if self._trust:
            kw["trust_remote_code"] = True
        return lmdeploy.pipeline(self._model_dir, **kw)

    def gen_config(self, p):
        """tunesmith SamplingParams -> lmdeploy.GenerationConfig: do_sample off for temperature 0 (greedy); top_k
        0 is 'no top-k' in LMDeploy as in tunesmith; logprobs=N returns the top N per token."""
        import lmdeploy

        want = p.logprobs or p.top_logprobs
        kw = {"n": 1, "max_new_tokens": p.max_new_tokens, "do_sample": p.temperature > 0,
              "temperature": float(p.temperature) if p.temperature > 0 else 1.0, "top_p": float(p.top_p),
              "top_k": int(p.top_k or 0), "repetition_penalty": float(p.repetition_penalty),
              "stop_words": list(p.stop) or None,
              "stop_token_ids": sorted(self.stop_ids | {int(i) for i in p.stop_token_ids}),
              "random_seed": p.seed, "skip_special_tokens": False,
              "logprobs": max(1, int(p.top_logprobs or 0)) if want else None}
        return lmdeploy.GenerationConfig(**kw)

    async def _stream(self, handle, request_id: str, lora: Optional[str]):
        from tunesmith.inference.engine import TokenLogprob

        session = int(request_id.rsplit("-", 1)[1]) + 1  # LMDeploy sessions are ints; 0 is avoided
        self._sessions[request_id] = session
        gen = self.gen_config(handle.params)
        ids = list(handle.prompt_ids)
        if hasattr(self.engine, "preprocess"):  # LMDeploy >= 0.16
            req = await self.engine.preprocess(None, session, gen, adapter_name=lora, input_ids=ids)
            outs = self.engine.generate(req, stream_response=True)
        else:
            outs = self.engine.generate(None, session, gen, stream_response=True, do_preprocess=False,
                                        adapter_name=lora, input_ids=ids)
        seen = 0
        k = handle.params.top_logprobs
        async for out in outs:
            total = int(getattr(out, "generate_token_len", 0) or 0)
            new = max(0, total - seen)
            toks = list(out.token_ids or [])[-new:] if new else []
            lps = list(out.logprobs or [])[-new:] if (new and out.logprobs) else None
            seen += len(toks)
            logprobs = None
            if lps is not None:
                logprobs = [TokenLogprob(t, float(d.get(t, float("nan"))), _top(d.items(), k))
                            for t, d in zip(toks, lps)]
            if out.finish_reason:
                self._sessions.pop(request_id, None)  # finished: nothing left to stop
            yield toks, logprobs, out.finish_reason, None

    async def _abort(self, request_id: str) -> None:
        session = self._sessions.pop(request_id, None)
        fn = getattr(self.engine, "stop_session", None)
        if session is not None and callable(fn):
            await _maybe_await(fn(session))

    def _shutdown(self) -> None:
        fn = getattr(self.engine, "close", None)
        if callable(fn):
            fn()
