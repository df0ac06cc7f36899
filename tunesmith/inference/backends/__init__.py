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

The files:

  common.py         backend names and pip requirements, check_backend, engine_adapters, the shared flag helpers
                    (dtype, context length, adapter rank), EngineModelInfo
  async_backend.py  the event-loop adapter every engine shares (_AsyncBackend, the handle, tunesmith's stop rules)
  vllm.py           vllm_engine_args, vllm_lora_requests, VllmEngine
  sglang.py         sglang_engine_args, SglangEngine
  lmdeploy.py       lmdeploy_engine_config, LmdeployEngine
  native_serve.py   native_serve_command, format_command (the engines' own server command lines)

This package's public surface is the names below; callers import them from here.
"""
from __future__ import annotations

from tunesmith.inference.backends.common import (BACKENDS, NAMES, PACKAGES, EngineModelInfo, check_backend,
                                                 engine_adapters)
from tunesmith.inference.backends.lmdeploy import LmdeployEngine, lmdeploy_engine_config
from tunesmith.inference.backends.native_serve import REDACTED, format_command, native_serve_command
from tunesmith.inference.backends.sglang import SglangEngine, sglang_engine_args
from tunesmith.inference.backends.vllm import VllmEngine, vllm_engine_args, vllm_lora_requests

__all__ = ["BACKENDS", "ENGINES", "NAMES", "PACKAGES", "REDACTED", "EngineModelInfo", "LmdeployEngine",
           "SglangEngine", "VllmEngine", "check_backend", "engine_adapters", "format_command",
           "lmdeploy_engine_config", "native_serve_command", "sglang_engine_args", "vllm_engine_args",
           "vllm_lora_requests"]

ENGINES = {"vllm": VllmEngine, "sglang": SglangEngine, "lmdeploy": LmdeployEngine}
