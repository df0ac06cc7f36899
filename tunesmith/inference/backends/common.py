"""What every accelerated engine shares, free of heavy imports: the backend names and the pip requirements
ms-swift installs, `check_backend` (is the engine importable, new enough, and is there an NVIDIA GPU?),
`engine_adapters` (the LoRA adapters to serve), the flag helpers every translation uses (dtype, context length,
adapter rank), and `EngineModelInfo`, which stands in for the model object when an engine holds the weights."""
from __future__ import annotations

import importlib
import json
import os
from typing import Optional

from tunesmith.config.slices import EngineConfig
from tunesmith.errors import ConfigError

BACKENDS = ("vllm", "sglang", "lmdeploy")
NAMES = {"vllm": "vLLM", "sglang": "SGLang", "lmdeploy": "LMDeploy"}
# (import name, the pip requirement ms-swift installs: requirements/install_all.sh and its README's table)
PACKAGES = {"vllm": ("vllm", "vllm>=0.5.1"), "sglang": ("sglang", "sglang>=0.4.6"),
            "lmdeploy": ("lmdeploy", "lmdeploy>=0.5")}


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
    under its folder name (what tunesmith's deploy calls it). Raises ConfigError for several plain adapters (the
    engines apply one LoRA per request, not a stack; merge them first: `tunesmith export --merge_lora true`) and for
    adapters of another peft tuner (AdaLoRA, VeRA, ...), which the engines cannot apply."""
    from tunesmith.models.checkpoint import adapter_config, model_suffix, split_named_adapters

    plain, named = split_named_adapters(list(cfg.adapters or []))
    if len(plain) > 1:
        raise ConfigError(f"--adapters {' '.join(plain)}: the accelerated engines apply one LoRA adapter per "
                          f"request; merge them into the model first (tunesmith export --merge_lora true), or "
                          f"serve them side by side as name=path pairs")
    lora = dict(named)
    for path in plain:
        name = model_suffix(path)
        lora[name if name not in lora else f"{name}-default"] = path
    other = [f"{p} ({adapter_config(p).get('peft_type')})" for p in lora.values()
             if adapter_config(p).get("peft_type", "LORA") != "LORA"]
    if other:
        raise ConfigError(f"--adapters {', '.join(other)}: the accelerated engines serve LoRA adapters only; merge "
                          f"it into the model (tunesmith export --adapters PATH --merge_lora true) and serve the "
                          f"merged folder with --model, or use --infer_backend transformers")
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


# ------------------------------------------------------------------ translation

def _dtype(cfg: EngineConfig) -> str:
    # The engines take the dtype by name; tunesmith's --torch_dtype is already normalised (bf16 -> bfloat16).
    dtype = cfg.torch_dtype
    return dtype if dtype in ("bfloat16", "float16", "float32") else "auto"


def _context_len(cfg: EngineConfig, engine_value: Optional[int]) -> Optional[int]:
    # ms-swift 3.x scripts pass the vLLM context length as --max_model_len (renamed --vllm_max_model_len in 3.7);
    # tunesmith parses that as the general --max_model_len, so the engine's own flag wins and that one fills in.
    return engine_value if engine_value is not None else cfg.max_model_len


# ------------------------------------------------------------------ the model stand-in

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
