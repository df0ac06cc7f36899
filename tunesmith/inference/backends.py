"""The accelerated inference engines behind `--infer_backend vllm|sglang|lmdeploy` (infer, deploy, eval).

What lives here, all CPU-testable and free of heavy imports at module load:

- `check_backend(backend)`: is the engine's package importable (and new enough) and is there an NVIDIA GPU?
  Raises ConfigError saying what to install or which backend to use instead.
- The translation from the engine slice of the parsed arguments (tunesmith.config.slices.EngineConfig, ms-swift's
  flag names: `--vllm_gpu_memory_utilization`, `--sglang_tp_size`, `--tp`/`--lmdeploy_tp`, ...) to each engine's
  constructor kwargs, following what ms-swift's own engines pass
  (swift/infer_engine/{vllm,sglang,lmdeploy}_engine.py): `vllm_engine_args` (vllm.AsyncEngineArgs),
  `sglang_engine_args` (sglang.Engine / ServerArgs), `lmdeploy_engine_config` (TurbomindEngineConfig or
  PytorchEngineConfig). LoRA adapters map to the engine's native multi-LoRA; `vllm_lora_requests` gives the
  per-request LoRARequest arguments.
- `native_serve_command(backend, cfg, model_dir, lora)`: the same settings as the engine's own OpenAI-compatible
  server command line (`vllm serve`, `python -m sglang.launch_server`, `lmdeploy serve api_server`), with secrets
  redacted: the documented alternative, printed when an engine fails to start inside tunesmith.
- The engines themselves behind tunesmith's ChatEngine (so chat templates, reasoning/tool-call parsing, the OpenAI
  server, infer and eval are shared): `VllmEngine`, `SglangEngine`, `LmdeployEngine` (`ENGINES[backend]`), each
  with GenerationEngine's interface (submit -> Handle, generate, close, stop_ids, max_model_len), running the
  engine's asyncio API on its own event-loop thread; `EngineModelInfo` stands in for the model object.
  The heavy packages are imported only when an engine is built.
"""
from __future__ import annotations

import importlib
import json
import os
import shlex
from typing import Any, Optional

from tunesmith.config.slices import EngineConfig
from tunesmith.errors import ConfigError

BACKENDS = ("vllm", "sglang", "lmdeploy")
NAMES = {"vllm": "vLLM", "sglang": "SGLang", "lmdeploy": "LMDeploy"}
# (import name, the pip requirement ms-swift installs: requirements/install_all.sh and its README's table)
PACKAGES = {"vllm": ("vllm", "vllm>=0.5.1"), "sglang": ("sglang", "sglang>=0.4.6"),
            "lmdeploy": ("lmdeploy", "lmdeploy>=0.5")}
REDACTED = "<redacted>"


# ------------------------------------------------------------------ availability

def _version_tuple(v: str) -> tuple[int, ...]:
    """'0.10.1.post1' -> (0, 10, 1, 1)-ish: the leading numeric parts, enough to compare against a minimum."""
    out = []
    for part in str(v).replace("-", ".").replace("+", ".").split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():
            break
    return tuple(out)


def check_backend(backend: str, flag: Optional[str] = None, fallback: str = "use --infer_backend transformers") \
        -> None:
    """Raise ConfigError unless BACKEND can run here: the package imports, is at least the version ms-swift
    requires, and torch sees a CUDA GPU. Returns None when all hold. The message starts with `flag` (default
    `--infer_backend BACKEND`) and names the pip command (to run on a CUDA machine) or the `fallback`."""
    flag = flag or f"--infer_backend {backend}"
    if backend not in BACKENDS:
        raise ConfigError(f"--infer_backend {backend} is not supported; use --infer_backend transformers (or pt), "
                          f"{', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    module, requirement = PACKAGES[backend]
    name = NAMES[backend]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{flag}: {name} is not installed; pip install '{requirement}' on a CUDA machine (the "
                          f"range ms-swift requires), or {fallback}") from None
    except Exception as e:  # e.g. a CUDA-only build failing to load its kernels: say so, without a traceback
        raise ConfigError(f"{flag}: {name} is installed but fails to import ({type(e).__name__}: {e}); "
                          f"{fallback}") from None
    minimum = requirement.split(">=", 1)[1]
    have = getattr(mod, "__version__", None)
    if have and _version_tuple(have) < _version_tuple(minimum):
        raise ConfigError(f"{flag}: {name} {have} is older than ms-swift supports; pip install -U '{requirement}'")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{flag}: {name} needs an NVIDIA GPU and torch sees none; on CPU {fallback}")


# ------------------------------------------------------------------ adapters

def engine_adapters(cfg: EngineConfig) -> dict[str, str]:
    """The LoRA adapters to serve, {name: path}: deploy's `name=path` pairs as named, and a plain `--adapters PATH`
    under its folder name (what tunesmith's deploy calls it). Raises ConfigError for several plain adapters: the
    engines apply one LoRA per request, not a stack; merge them first (`tunesmith export --merge_lora true`)."""
    from tunesmith.models.checkpoint import model_suffix, split_named_adapters

    plain, named = split_named_adapters(list(cfg.adapters or []))
    if len(plain) > 1:
        raise ConfigError(f"--adapters {' '.join(plain)}: the accelerated engines apply one LoRA adapter per "
                          f"request; merge them into the model first (tunesmith export --merge_lora true), or "
                          f"serve them side by side as name=path pairs")
    lora = dict(named)
    for path in plain:
        name = model_suffix(path)
        lora[name if name not in lora else f"{name}-default"] = path
    return lora


def _adapter_rank(path: str) -> Optional[int]:
    """The LoRA rank r in PATH/adapter_config.json, None if unreadable (a hub id, or no file yet)."""
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    ranks = [r for r in ranks if isinstance(r, int)]
    return max(ranks) if ranks else None


def _no_lora(backend: str, lora: dict, fix: str) -> None:
    if lora:
        raise ConfigError(f"--infer_backend {backend}: LoRA adapters ({', '.join(lora)}) are not supported by "
                          f"{NAMES[backend]} here; {fix}")


def vllm_lora_requests(lora: dict[str, str]) -> dict[str, dict]:
    """{name: kwargs of vllm.lora.request.LoRARequest}: lora_name, lora_int_id (1, 2, ...: vLLM reserves 0 for
    'no adapter' and keys its adapter cache by the id), lora_path. A request for model NAME carries that one."""
    return {name: {"lora_name": name, "lora_int_id": i, "lora_path": path}
            for i, (name, path) in enumerate(lora.items(), start=1)}


# ------------------------------------------------------------------ translation

def _dtype(cfg: EngineConfig) -> str:
    # The engines take the dtype by name; tunesmith's --torch_dtype is already normalised (bf16 -> bfloat16).
    dtype = cfg.torch_dtype
    return dtype if dtype in ("bfloat16", "float16", "float32") else "auto"


def _context_len(cfg: EngineConfig, engine_value: Optional[int]) -> Optional[int]:
    # ms-swift 3.x scripts pass the vLLM context length as --max_model_len (renamed --vllm_max_model_len in 3.7);
    # tunesmith parses that as the general --max_model_len, so the engine's own flag wins and that one fills in.
    return engine_value if engine_value is not None else cfg.max_model_len


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


# ------------------------------------------------------------------ the engines' own servers

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _secret(value: Optional[str]) -> Optional[str]:
    # A key or token printed on a command line ends up in shell history, logs and screenshots: never show it.
    return REDACTED if value else None


def native_serve_command(backend: str, cfg: EngineConfig, model_dir: str,
                         lora: Optional[dict[str, str]] = None) -> list[str]:
    """The engine's own OpenAI-compatible server command (argv list) with the same settings as the translation:
    `vllm serve`, `python -m sglang.launch_server` or `lmdeploy serve api_server`. --host/--port/--api_key/
    --served_model_name come from deploy's flags where present. Secrets (--api_key) appear as '<redacted>';
    --hub_token is never included (set HF_TOKEN / MODELSCOPE_API_TOKEN in the environment instead).
    Raises ConfigError for an unknown backend or an impossible LoRA combination (as the translations do)."""
    from tunesmith.models.checkpoint import model_suffix

    lora = dict(lora or {})
    host, port = cfg.host, cfg.port
    served = cfg.served_model_name or model_suffix(cfg.model or model_dir)
    api_key = _secret(cfg.api_key)
    ssl = [(cfg.ssl_keyfile, "ssl_keyfile"), (cfg.ssl_certfile, "ssl_certfile")]
    if backend == "vllm":
        kw = vllm_engine_args(cfg, model_dir, lora)
        cmd = ["vllm", "serve", kw.pop("model")]
        kw.pop("tokenizer", None)
        kw.pop("disable_log_stats", None)  # the server logs its stats; that is useful there
        for key, value in kw.items():
            if value is None or (value is False and key != "enable_prefix_caching"):
                continue
            if value is True:
                cmd.append(_flag(key))
            elif value is False:  # only enable_prefix_caching: vLLM's flag is --[no-]enable-prefix-caching
                cmd.append("--no-" + key.replace("_", "-"))
            elif isinstance(value, (dict, list)):
                cmd += [_flag(key), json.dumps(value)]
            else:
                cmd += [_flag(key), str(value)]
        if lora:
            cmd += ["--lora-modules", *(f"{n}={p}" for n, p in lora.items())]
        cmd += ["--served-model-name", served, "--host", str(host), "--port", str(port)]
        if api_key:
            cmd += ["--api-key", api_key]
        if cfg.max_logprobs:
            cmd += ["--max-logprobs", str(cfg.max_logprobs)]
    elif backend == "sglang":
        kw = sglang_engine_args(cfg, model_dir, lora)
        cmd = ["python", "-m", "sglang.launch_server", "--model-path", kw.pop("model_path")]
        # the HTTP server renders chat templates and detokenises itself; log_level stays SGLang's default there
        for key in ("skip_tokenizer_init", "log_level"):
            kw.pop(key, None)
        lora_paths = kw.pop("lora_paths", None)
        for key, value in kw.items():
            if value is None or value is False:
                continue
            cmd += [_flag(key)] if value is True else [_flag(key), str(value)]
        if lora_paths:
            cmd += ["--lora-paths", *lora_paths]
        cmd += ["--served-model-name", served, "--host", str(host), "--port", str(port)]
        if api_key:
            cmd += ["--api-key", api_key]
    elif backend == "lmdeploy":
        engine, kw = lmdeploy_engine_config(cfg, model_dir, lora)
        cmd = ["lmdeploy", "serve", "api_server", model_dir, "--backend", engine]
        adapters = kw.pop("adapters", None)
        for key, value in kw.items():
            if value is not None:
                cmd += [_flag(key), str(value)]
        if adapters:
            cmd += ["--adapters", *(f"{n}={p}" for n, p in adapters.items())]
        cmd += ["--model-name", served, "--server-name", str(host), "--server-port", str(port)]
        if api_key:
            cmd += ["--api-keys", api_key]
        ssl = []  # lmdeploy's --ssl reads SSL_KEYFILE/SSL_CERTFILE from the environment instead
    else:
        raise ConfigError(f"--infer_backend {backend}: no native server for it; use one of {', '.join(BACKENDS)}")
    for value, key in ssl:
        if value:
            cmd += [_flag(key), value]
    return cmd


def format_command(cmd: list[str]) -> str:
    """A command list as one shell line (quoted where needed)."""
    return shlex.join(cmd)


# ------------------------------------------------------------------ the engines behind ChatEngine

def _handle_class():
    # Built lazily: tunesmith.inference.engine imports nothing heavy, but keeping this module import-light is the rule here.
    from tunesmith.inference.engine import Handle

    class BackendHandle(Handle):
        def __init__(self, prompt_ids, params, adapter, loop, backend):
            super().__init__(prompt_ids, params, adapter, loop)
            self._backend, self._task, self.request_id = backend, None, None

        def cancel(self) -> None:
            super().cancel()
            self._backend._cancel(self)

    # cancel() also aborts the engine's request at once: the engines keep generating for a request nobody reads
    return BackendHandle


class _Stream:
    """One request's output as it arrives: the tokens, their log-probs, and tunesmith's own stop checks (stop ids,
    stop strings, max_new_tokens) so a reply ends exactly where the transformers engine would end it."""

    def __init__(self, handle, tokenizer, stop_ids: frozenset):
        self.handle, self.tok = handle, tokenizer
        p = handle.params
        self.stop_ids = stop_ids | frozenset(int(i) for i in p.stop_token_ids)
        self.tokens: list[int] = []
        self.logprobs: Optional[list] = [] if (p.logprobs or p.top_logprobs) else None
        self.finish: Optional[str] = None
        self.stop_hit: Optional[str] = None

    def add(self, token: int, logprob=None) -> bool:
        """Record and stream one token; True when the sequence is done by tunesmith's rules."""
        from tunesmith.inference.engine import stop_string_hit

        p = self.handle.params
        self.tokens.append(int(token))
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        self.handle._push(int(token))
        if token in self.stop_ids:
            self.finish = "stop"
        else:
            hit = stop_string_hit(self.tok, self.tokens, p.stop)
            if hit is not None:
                self.finish, self.stop_hit = "stop", hit
        if self.finish is None and len(self.tokens) >= p.max_new_tokens:
            self.finish = "length"
        return self.finish is not None

    def completion(self, reason: Optional[str] = None, error: Optional[BaseException] = None):
        from tunesmith.inference.engine import Completion

        return Completion(self.tokens, self.finish or reason or "abort", len(self.handle.prompt_ids),
                          self.logprobs, self.stop_hit, error)


class _AsyncBackend:
    """What every engine adapter shares: the engine's asyncio API runs on this object's own event-loop thread;
    `submit` returns a tunesmith Handle at once and a task on that loop streams the engine's tokens into it.
    The public interface is GenerationEngine's: submit, generate, close, stop_ids, max_model_len.

    Subclasses implement `_create()` (runs on the loop thread; returns the engine), `_stream(handle, request_id,
    lora)` (an async generator of (new token ids, their TokenLogprobs or None, engine finish reason or None,
    matched stop string or None)), `_abort(request_id)` and `_shutdown()`."""

    name = "engine"

    def __init__(self, tokenizer, stop_ids, max_model_len: int, adapters: Optional[dict[str, str]] = None,
                 default_adapter: Optional[str] = None):
        import asyncio
        import itertools
        import threading

        self.tok = tokenizer
        self.stop_ids = frozenset(int(i) for i in stop_ids if i is not None)
        self.max_model_len = int(max_model_len)
        self.adapters = dict(adapters or {})
        if default_adapter is not None and default_adapter not in self.adapters:
            raise ValueError(f"default adapter {default_adapter!r} is not among {', '.join(self.adapters)}")
        self.default_adapter = default_adapter
        self._ids = itertools.count()
        self._closed = False
        self._active: dict[str, Any] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tunesmith-{self.name}", daemon=True)
        self._thread.start()
        try:
            self.engine = self._on_loop(self._create_async())
        except BaseException:
            self._stop_loop()
            raise

    # -------------------------------------------------------------- public (GenerationEngine's interface)

    def submit(self, prompt_ids: list, params, adapter: Optional[str] = None, loop=None):
        """Queue one sequence (n=1). adapter: None = the model as loaded (the plain --adapters one, if any), "" =
        the base model, else a named LoRA adapter. loop: deliver tokens to this asyncio loop. Raises ValueError for
        a prompt with no room under max_model_len (tokens), an unknown adapter or beam search; RuntimeError after
        close()."""
        import asyncio
        from dataclasses import replace

        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's limit is {self.max_model_len}")
        lora = self._lora_name(adapter)
        if getattr(params, "num_beams", 1) > 1:
            raise ValueError(f"num_beams {params.num_beams}: beam search is not available with --infer_backend "
                             f"{self.name}; use --infer_backend transformers")
        room = self.max_model_len - len(prompt_ids)
        params = replace(params, max_new_tokens=max(1, min(params.max_new_tokens or room, room)))
        if self._closed:
            raise RuntimeError("the generation engine is shut down")
        handle = _handle_class()(prompt_ids, params, adapter, loop, self)
        handle.request_id = f"tunesmith-{next(self._ids)}"
        asyncio.run_coroutine_threadsafe(self._run(handle, lora), self._loop)
        return handle

    def generate(self, prompts: list, params, adapter: Optional[str] = None) -> list:
        """Submit every prompt, wait for all: the completions in prompt order."""
        handles = [self.submit(p, params, adapter) for p in prompts]
        return [h.result() for h in handles]

    def close(self, timeout: float = 30.0) -> None:
        """Abort running sequences (finish_reason "abort"), shut the engine down and stop the loop thread."""
        if self._closed:
            return
        self._closed = True

        async def _cancel_all():
            for handle in list(self._active.values()):
                if handle._task is not None:
                    handle._task.cancel()

        try:
            self._on_loop(_cancel_all(), timeout)
            self._on_loop(self._shutdown_async(), timeout)
        except Exception:  # noqa: BLE001 - closing is best effort; the engine's processes die with ours anyway
            pass
        self._stop_loop(timeout)

    # -------------------------------------------------------------- the loop thread

    def _on_loop(self, coro, timeout: Optional[float] = None):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self, timeout: float = 30.0) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    async def _create_async(self):
        # on the loop thread: engines bind their background tasks to the event loop current at construction
        return self._create()

    async def _shutdown_async(self):
        self._shutdown()

    def _lora_name(self, adapter: Optional[str]) -> Optional[str]:
        if adapter is None:
            return self.default_adapter
        if adapter == "":
            return None
        if adapter not in self.adapters:
            raise ValueError(f"no adapter named {adapter!r}; loaded: {', '.join(self.adapters) or 'none'}")
        return adapter

    def _cancel(self, handle) -> None:
        """From any thread: end the handle's task, which aborts the engine's request."""
        def now():
            if handle._task is not None and not handle._task.done():
                handle._task.cancel()
        try:
            self._loop.call_soon_threadsafe(now)
        except RuntimeError:  # the loop is closed: nothing is running any more
            pass

    async def _run(self, handle, lora: Optional[str]) -> None:
        import asyncio

        handle._task = asyncio.current_task()
        rid = handle.request_id
        self._active[rid] = handle
        stream = _Stream(handle, self.tok, self.stop_ids)
        engine_done = False
        agen = None
        try:
            if handle.cancelled or self._closed:
                raise asyncio.CancelledError
            agen = self._stream(handle, rid, lora)
            async for tokens, logprobs, finish, stop_hit in agen:
                ended = False
                for i, t in enumerate(tokens):
                    if stream.add(t, logprobs[i] if logprobs and i < len(logprobs) else None):
                        ended = True
                        break
                if finish is not None:
                    engine_done = True
                    if stream.finish is None:
                        stream.finish = _finish_reason(finish)
                        stream.stop_hit = stop_hit if isinstance(stop_hit, str) else None
                if ended or engine_done:
                    break
            else:
                engine_done = True
            handle._finish(stream.completion("stop"))
        except asyncio.CancelledError:
            handle._finish(stream.completion("abort") if stream.finish else _aborted(stream))
        except Exception as e:  # noqa: BLE001 - reported to this request; the engine serves the others
            handle._finish(stream.completion("error", e) if stream.finish else _errored(stream, e))
        finally:
            self._active.pop(rid, None)
            if agen is not None:
                try:
                    await asyncio.shield(agen.aclose())
                except BaseException:  # noqa: BLE001 - the request is over either way
                    pass
            if not engine_done:
                # ended by us (cancel, stop string, length) while the engine still runs it: free its slot now
                try:
                    await asyncio.shield(self._abort(rid))
                except BaseException:  # noqa: BLE001
                    pass

    # -------------------------------------------------------------- per engine

    def _create(self):
        raise NotImplementedError

    async def _stream(self, handle, request_id: str, lora: Optional[str]):
        raise NotImplementedError
        yield  # pragma: no cover

    async def _abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        pass


def _finish_reason(reason) -> str:
    reason = reason.get("type") if isinstance(reason, dict) else reason
    return reason if reason in ("stop", "length", "abort") else ("error" if reason == "error" else "stop")


def _aborted(stream: _Stream):
    stream.finish = "abort"
    return stream.completion()


def _errored(stream: _Stream, error: BaseException):
    stream.finish = "error"
    return stream.completion(error=error)


async def _maybe_await(value):
    import inspect
    if inspect.isawaitable(value):
        return await value
    return value


def _top(pairs, k: int) -> list:
    """[(token_id, logprob)] most likely first, at most k."""
    return sorted(((int(t), float(v)) for t, v in pairs), key=lambda x: -x[1])[:k] if k else []


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
                "logprobs": int(p.top_logprobs or 0) if want else None, "skip_special_tokens": False}

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


class EngineModelInfo:
    """Stands in for the model in ChatEngine when an accelerated engine holds the weights: the checkpoint's config
    (context length) and generation_config (sampling defaults, eos ids). Running it directly (log-prob scoring in
    eval, `.device`) raises ConfigError: the weights live in the engine's processes."""

    def __init__(self, config=None, generation_config=None, backend: str = "vllm"):
        self.config, self.generation_config, self.backend = config, generation_config, backend

    @classmethod
    def from_pretrained(cls, model_dir: str, backend: str, trust_remote_code: bool = False) -> "EngineModelInfo":
        """Read config.json and generation_config.json (derived from config.json when absent)."""
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        try:
            gen = GenerationConfig.from_pretrained(model_dir)
        except OSError:  # no generation_config.json: the defaults transformers would use
            gen = GenerationConfig.from_model_config(config)
        return cls(config, gen, backend)

    def _refuse(self, *_, **__):
        raise ConfigError(f"--infer_backend {self.backend}: the model runs inside {NAMES.get(self.backend, '')}; "
                          f"scoring log-probs directly needs --infer_backend transformers (or --mcq_scoring "
                          f"generation)")

    __call__ = parameters = _refuse


ENGINES = {"vllm": VllmEngine, "sglang": SglangEngine, "lmdeploy": LmdeployEngine}
