"""SGLang (`--infer_backend sglang`): the translation of the engine slice to sglang.Engine / ServerArgs kwargs
(`sglang_engine_args`) and `SglangEngine`, SGLang's offline Engine behind tunesmith's ChatEngine. sglang itself is
imported only when an engine is built."""
from __future__ import annotations

from typing import Any, Optional

from tunesmith.config.slices import EngineConfig
from tunesmith.inference.backends.async_backend import _AsyncBackend, _maybe_await, _top
from tunesmith.inference.backends.common import _context_len, _dtype

def sglang_engine_args(cfg: EngineConfig, model_dir: str, lora: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """kwargs for sglang.Engine(**kw) / sglang.srt.server_args.ServerArgs, as ms-swift's SglangEngine builds them.

    mem_fraction_static is a fraction (0-1) of GPU memory; context_length is in tokens. skip_tokenizer_init is set
    because tunesmith renders and tokenises prompts itself (the model's chat template) and reads token ids back.
    Adapters become SGLang's multi-LoRA `lora_paths` (["name=path", ...]); a request picks one with lora_path=NAME.
    pp_size/enable_ep_moe are only set when not their defaults: some SGLang versions lack them (ms-swift checks
    the signature for the same reason)."""
    lora = dict(lora or {})
    kw: dict[str, Any] = {
        "model_path": model_dir,
        "dtype": _dtype(cfg),
        "tp_size": cfg.sglang_tp_size,
        "dp_size": cfg.sglang_dp_size,
        "ep_size": cfg.sglang_ep_size,
        "mem_fraction_static": cfg.sglang_mem_fraction_static,
        "context_length": _context_len(cfg, cfg.sglang_context_length),
        "disable_cuda_graph": cfg.sglang_disable_cuda_graph,
        "quantization": cfg.sglang_quantization,
        "kv_cache_dtype": cfg.sglang_kv_cache_dtype,
        "enable_dp_attention": cfg.sglang_enable_dp_attention,
        "disable_custom_all_reduce": cfg.sglang_disable_custom_all_reduce,
        "speculative_algorithm": cfg.sglang_speculative_algorithm,
        "speculative_num_steps": cfg.sglang_speculative_num_steps,
        "speculative_eagle_topk": cfg.sglang_speculative_eagle_topk,
        "speculative_num_draft_tokens": cfg.sglang_speculative_num_draft_tokens,
        "log_level": "error",
        "skip_tokenizer_init": True,
        "trust_remote_code": bool(cfg.trust_remote_code),
    }
    if cfg.seed is not None:
        kw["random_seed"] = cfg.seed
    if cfg.model_revision:
        kw["revision"] = cfg.model_revision
    if cfg.sglang_pp_size != 1:
        kw["pp_size"] = cfg.sglang_pp_size
    if cfg.sglang_enable_ep_moe:
        kw["enable_ep_moe"] = True
    if lora:
        kw["lora_paths"] = [f"{name}={path}" for name, path in lora.items()]
        # SGLang reserves GPU memory for this many adapters per batch (default 8); all of ours should fit at once
        kw["max_loras_per_batch"] = max(len(lora), 8)
    return kw


class SglangEngine(_AsyncBackend):
    """SGLang behind tunesmith's ChatEngine.

    API used (SGLang 0.4.6 - 0.5.x, python/sglang/srt/entrypoints/engine.py): `sglang.Engine(**kw)` with
    skip_tokenizer_init (tunesmith tokenises); `await engine.async_generate(input_ids=ids, sampling_params={...},
    stream=True, lora_path=NAME, return_logprob=..., top_logprobs_num=..., rid=request_id)` returns an async
    iterator of dicts {"output_ids", "meta_info": {"finish_reason": {"type", "matched"} | None,
    "completion_tokens", "output_token_logprobs": [(logprob, id, text)], "output_top_logprobs"}}; output_ids are
    cumulative unless --incremental_streaming_output (told apart by meta_info.completion_tokens);
    `engine.tokenizer_manager.abort_request(rid)`; `engine.shutdown()`. Stop strings are NOT passed: SGLang
    refuses them without its tokenizer (sampling_params.raise_if_tokenizer_required); tunesmith checks them and
    aborts the request instead."""

    name = "sglang"

    def __init__(self, cfg: EngineConfig, model_dir: str, tokenizer, stop_ids,
                 adapters: Optional[dict[str, str]] = None, default_adapter: Optional[str] = None,
                 max_model_len: Optional[int] = None):
        self._kwargs = sglang_engine_args(cfg, model_dir, adapters or {})
        super().__init__(tokenizer, stop_ids, max_model_len or cfg.max_model_len or 4096,
                         adapters, default_adapter)

    def _create(self):
        import sglang

        return sglang.Engine(**self._kwargs)

    def sampling_params(self, p) -> dict[str, Any]:
        """tunesmith SamplingParams -> SGLang's sampling_params dict: temperature 0 is greedy there too; top_k 0
        (off) is SGLang's -1; sampling_seed only when a seed is asked for (SGLang >= 0.5 knows it)."""
        sp = {"max_new_tokens": p.max_new_tokens, "temperature": float(p.temperature), "top_p": float(p.top_p),
              "top_k": int(p.top_k) if p.top_k and p.top_k > 0 else -1,
              "repetition_penalty": float(p.repetition_penalty),
              "stop_token_ids": sorted(self.stop_ids | {int(i) for i in p.stop_token_ids}),
              "skip_special_tokens": False}
        if p.seed is not None:
            sp["sampling_seed"] = int(p.seed)
        return sp

    async def _stream(self, handle, request_id: str, lora: Optional[str]):
        from tunesmith.inference.engine import TokenLogprob

        p = handle.params
        want = bool(p.logprobs or p.top_logprobs)
        kw: dict[str, Any] = {"input_ids": list(handle.prompt_ids), "sampling_params": self.sampling_params(p),
                              "stream": True, "rid": request_id}
        if lora is not None:
            kw["lora_path"] = lora
        if want:
            kw.update(return_logprob=True, top_logprobs_num=int(p.top_logprobs or 0),
                      logprob_start_len=len(handle.prompt_ids))  # no prompt log-probs: only the completion's
        seen = 0
        incremental = bool(self._kwargs.get("incremental_streaming_output"))
        async for out in await self.engine.async_generate(**kw):
            meta = out.get("meta_info", {}) or {}
            ids = list(out.get("output_ids") or [])
            total = meta.get("completion_tokens")
            # cumulative lists hold all completion_tokens; a delta chunk holds completion_tokens - seen (the two
            # only coincide for the first chunk, where they mean the same)
            if seen and (len(ids) == total if total is not None else not incremental):
                ids = ids[seen:]
            lps = meta.get("output_token_logprobs") if want else None
            tops = meta.get("output_top_logprobs") if want else None
            logprobs = None
            if lps is not None:
                # aligned with the completion so far (cumulative) or with this chunk: take the last len(ids)
                lps = lps[-len(ids):] if ids else []
                tops = (tops or [])[-len(ids):] if ids else []
                logprobs = []
                for j, (t, entry) in enumerate(zip(ids, lps)):
                    top = tops[j] if j < len(tops) and tops[j] else []
                    logprobs.append(TokenLogprob(t, float(entry[0]),
                                                 _top(((e[1], e[0]) for e in top), p.top_logprobs)))
            seen += len(ids)
            reason = meta.get("finish_reason")
            matched = reason.get("matched") if isinstance(reason, dict) else None
            yield ids, logprobs, (reason if reason else None), matched

    async def _abort(self, request_id: str) -> None:
        await _maybe_await(self.engine.tokenizer_manager.abort_request(request_id))

    def _shutdown(self) -> None:
        self.engine.shutdown()
