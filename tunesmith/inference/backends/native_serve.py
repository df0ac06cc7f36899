"""The engines' own OpenAI-compatible servers: `native_serve_command` gives the same settings as the translations
(vllm_engine_args, sglang_engine_args, lmdeploy_engine_config) as a `vllm serve`, `python -m
sglang.launch_server` or `lmdeploy serve api_server` command line, secrets redacted; `format_command` joins it
into one shell line. Printed as the documented alternative when an engine fails to start inside tunesmith."""
from __future__ import annotations

import json
import shlex
from typing import Optional

from tunesmith.config.slices import EngineConfig
from tunesmith.errors import ConfigError
from tunesmith.inference.backends.common import BACKENDS
from tunesmith.inference.backends.lmdeploy import lmdeploy_engine_config
from tunesmith.inference.backends.sglang import sglang_engine_args
from tunesmith.inference.backends.vllm import vllm_engine_args

REDACTED = "<redacted>"


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
