"""LoRA adapters handed to a running engine: the policy's weights reaching a rollout server (`tunesmith rollout`)
over HTTP, without NCCL, and the wire format both ends share.

The format (`pack_adapter` / `unpack_adapter`): one safetensors file — the adapter's tensors under peft's saved
names (those of adapter_model.safetensors: `base_model.model.<module>.lora_A.weight`, …) — whose header metadata
holds the adapter's peft config as JSON under "peft_config" (adapter_config.json's content). A trainer packs its
policy's adapter (`policy_adapter`); the server loads it as a new adapter version (`LiveAdapters.load`) between two
decoding steps, and the requests that follow sample it while sequences already running keep the version they
started with (an older version is removed at an install once no sequence uses it). On vLLM (`VllmAdapters`) a
version is a LoRA request over a folder written from the upload.

What lives here: the format, and installing versions into the engine's model. What must not: HTTP (the server's
routes are tunesmith.serve.rollout, the trainer's client tunesmith.train.rl.rollout_client). No torch import at
module level.
"""
from __future__ import annotations

import enum
import json
import struct
import threading
from typing import Optional

PREFIX = "policy-"  # versions are named policy-1, policy-2, … in the order they arrive


def policy_adapter(model, adapter: str = "default") -> tuple[dict, dict]:
    """(peft config as a JSON-able dict, {saved name: tensor on CPU}) of `model`'s LoRA adapter `adapter` (a peft
    PeftModel), as save_pretrained would write them. Raises ValueError when the model has no such adapter."""
    from peft import get_peft_model_state_dict

    configs = getattr(model, "peft_config", None) or {}
    if adapter not in configs:
        raise ValueError(f"the model has no adapter {adapter!r} (adapters: {', '.join(configs) or 'none'})")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in
               get_peft_model_state_dict(model, adapter_name=adapter).items()}
    return _jsonable(configs[adapter].to_dict()), tensors


def _jsonable(value):
    """A peft config dict with its sets as sorted lists and enums as their values (as adapter_config.json)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def pack_adapter(config: dict, tensors: dict) -> bytes:
    """One safetensors file (bytes) of the adapter's tensors, its peft config in the header metadata."""
    from safetensors.torch import save

    return save(tensors, metadata={"peft_config": json.dumps(config)})


def unpack_adapter(data: bytes) -> tuple[dict, dict]:
    """(peft config, {name: tensor}) from `pack_adapter`'s bytes. Raises ValueError naming what is wrong: not a
    safetensors file, or no "peft_config" JSON object in its metadata."""
    metadata, tensors = read_safetensors(data)
    try:
        config = json.loads(metadata.get("peft_config", "null"))
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ValueError("the safetensors metadata holds no \"peft_config\" (the adapter_config.json content, as "
                         "JSON): pack the adapter with tunesmith.inference.live_adapters.pack_adapter")
    return config, tensors


def read_safetensors(data: bytes) -> tuple[dict, dict]:
    """(header metadata {str: str}, {name: tensor}) of a safetensors file's bytes. Raises ValueError when it is not
    one (too short, a header that is not JSON, offsets past the end)."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError(f"the body ({len(data)} bytes) is not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n]) if 8 + n <= len(data) else None
        metadata = (header or {}).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ValueError("the body is not a safetensors file (its header is not JSON)") from None
    if header is None or not isinstance(metadata, dict):
        raise ValueError("the body is not a safetensors file (its header is cut short)")
    try:
        return metadata, load(data)
    except Exception as e:  # noqa: BLE001 - safetensors' own errors (truncated body, bad offsets)
        raise ValueError(f"the safetensors body cannot be read: {e}") from None


def lora_config(config: dict):
    """The peft LoraConfig of an adapter_config.json dict. Raises ValueError for another tuner or bad fields."""
    from peft import LoraConfig

    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise ValueError(f"peft_type {kind}: only LoRA adapters are loaded into a rollout server")
    fields = {k: v for k, v in config.items() if k not in ("peft_type", "auto_mapping")}
    try:
        return LoraConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the peft_config is not a LoRA config peft can build: {e}") from None


class LiveAdapters:
    """The policy versions a rollout server's engine holds. `load` installs a version (a new peft adapter in the
    engine's model, the model wrapped into a PeftModel on the first one) between two decoding steps and makes it
    the active adapter; `current` names the newest (None before any). At each install, the older versions that no
    queued or running sequence uses are deleted (one still in use waits for the next install). Thread-safe."""

    def __init__(self, engine):
        """engine: a GenerationEngine (tunesmith.inference.engine) over a transformers model, with or without
        peft adapters of its own (those stay, and are never deleted here)."""
        self.engine = engine
        self.current: Optional[str] = None
        self.loaded = 0
        self._lock = threading.Lock()
        self._own: list[str] = []  # versions installed here, oldest first (scheduler thread only)

    def load(self, config: dict, tensors: dict, timeout: Optional[float] = None) -> str:
        """Install an adapter (`unpack_adapter`'s config and tensors) as the next version; returns its name once
        the engine runs it (requests submitted from then on with that name, or with None, sample it). timeout:
        seconds to wait for the step in progress to end (None: as long as it takes). Raises ValueError when the
        config is not LoRA or the tensors do not fit the model (missing or unexpected names, wrong shapes)."""
        cfg = lora_config(config)
        with self._lock:
            self.loaded += 1
            name = f"{PREFIX}{self.loaded}"
        self.engine.between_steps(lambda: self._install(name, cfg, tensors)).result(timeout)
        return name

    def _install(self, name: str, cfg, tensors: dict) -> None:
        """On the scheduler thread: add the adapter, fill its weights, make it active, drop unused versions."""
        from peft import PeftModel, get_peft_model, set_peft_model_state_dict

        model, fresh = self.engine.model, not isinstance(self.engine.model, PeftModel)
        try:
            if fresh:
                model = get_peft_model(model, cfg, adapter_name=name)
            else:
                model.add_adapter(name, cfg)
            result = set_peft_model_state_dict(model, tensors, adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
            if missing or result.unexpected_keys:
                raise ValueError(f"the adapter does not fit the served model: {len(missing)} weight(s) missing "
                                 f"(e.g. {missing[:1]}), {len(result.unexpected_keys)} unexpected (e.g. "
                                 f"{result.unexpected_keys[:1]}); push an adapter trained on this base model")
        except Exception as e:  # noqa: BLE001 - the model is put back as it was, the reason handed on
            _remove(model, name, fresh)
            raise e if isinstance(e, ValueError) else ValueError(f"{type(e).__name__}: {e}") from e
        model.set_adapter(name)
        model.eval()  # new LoRA modules start in training mode; the engine runs eval only
        self._own.append(name)
        self.engine.adopt(model)
        self._drop_unused(model)
        with self._lock:  # set here, on the scheduler thread: uploads that race end with the last one installed
            self.current = name

    def _drop_unused(self, model) -> None:
        """Delete the versions before the newest that no queued or running sequence uses."""
        used = self.engine.adapters_in_use()
        for old in self._own[:-1]:
            if old not in used:
                model.delete_adapter(old)
                self._own.remove(old)
        model.set_adapter(self._own[-1])
        self.engine.adopt(model)

    def update_params(self, tensors: dict, timeout: Optional[float] = None) -> int:
        """Copy full weights ({parameter name as the model names it: tensor}, e.g. a fully trained policy's) into
        the engine's model between two decoding steps; returns how many. Sequences in flight go on with the new
        weights from the next step. Raises ValueError, before anything is copied, for a name the model does not
        have or a shape that differs, or when the model holds adapter versions (a LoRA run's server)."""
        return self.engine.between_steps(lambda: self._copy(tensors)).result(timeout)

    def _copy(self, tensors: dict) -> int:
        import torch

        if self._own:
            raise ValueError("this server holds LoRA versions pushed by a LoRA run; full weights would change its "
                             "base under them: restart the server for a full-weight run")
        params = dict(self.engine.model.named_parameters())
        unknown = [k for k in tensors if k not in params]
        wrong = [f"{k} {tuple(v.shape)} (the model's: {tuple(params[k].shape)})" for k, v in tensors.items()
                 if k in params and tuple(v.shape) != tuple(params[k].shape)]
        if unknown or wrong:
            raise ValueError(f"the weights do not fit the served model: {len(unknown)} unknown name(s) (e.g. "
                             f"{unknown[:2]}), {len(wrong)} with another shape (e.g. {wrong[:1]}); push weights "
                             f"of this model")
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v)
        return len(tensors)

    def names(self) -> list[str]:
        """The adapter names the engine's model holds now."""
        return list(getattr(self.engine.model, "peft_config", None) or {})


def _remove(model, name: str, fresh: bool) -> None:
    """Take a half-installed adapter out again: unwrap a model wrapped for it (its LoRA layers removed, the base
    weights untouched), else delete the adapter."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return
    if fresh:
        model.unload()
    elif name in model.peft_config:
        model.delete_adapter(name)


class VllmAdapters:
    """`LiveAdapters` for a rollout server on vLLM (--infer_backend vllm --vllm_enable_lora true): each version is
    written to a temporary folder (adapter_model.safetensors + adapter_config.json, as save_pretrained writes them)
    and served as a vLLM LoRA request under a new id (VllmEngine.add_adapter: vLLM caches adapters by id); the
    version before the previous one is dropped with its folder. Full weights are refused: vLLM takes them over
    NCCL only. Thread-safe."""

    def __init__(self, engine, max_lora_rank: int):
        """engine: a tunesmith.inference.backends.VllmEngine started with LoRA on; max_lora_rank: its
        --vllm_max_lora_rank (a larger adapter is refused at upload)."""
        import atexit
        import tempfile

        self.engine, self.max_lora_rank = engine, max_lora_rank
        self.root = tempfile.mkdtemp(prefix="tunesmith-rollout-lora-")
        atexit.register(self.close)
        self.current: Optional[str] = None
        self.loaded = 0
        self._lock = threading.Lock()
        self._own: list[str] = []

    def load(self, config: dict, tensors: dict, timeout: Optional[float] = None) -> str:
        """Write the adapter (`unpack_adapter`'s config and tensors) and serve it as the next version; returns its
        name. Raises ValueError for a config that is not LoRA or a rank above --vllm_max_lora_rank."""
        import os
        import shutil

        from safetensors.torch import save_file

        cfg = lora_config(config)
        if cfg.r > self.max_lora_rank:
            raise ValueError(f"LoRA rank {cfg.r} is above this server's --vllm_max_lora_rank {self.max_lora_rank}; "
                             f"restart it with --vllm_max_lora_rank {cfg.r}")
        with self._lock:
            self.loaded += 1
            name = f"{PREFIX}{self.loaded}"
            path = os.path.join(self.root, name)
            os.makedirs(path)
            save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
            with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as fh:
                json.dump(config, fh)
            self.engine.add_adapter(name, path)
            self._own.append(name)
            while len(self._own) > 2:  # the previous version may still have requests running
                old = self._own.pop(0)
                self.engine.remove_adapter(old)
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
            self.current = name
        return name

    def update_params(self, tensors: dict, timeout: Optional[float] = None) -> int:
        """Refused: raises ValueError (vLLM's weights are loaded over NCCL, by `swift rollout`)."""
        raise ValueError("full weights cannot be loaded into vLLM over HTTP (ms-swift's `swift rollout` broadcasts "
                         "them over NCCL); train LoRA against this server, or serve with --infer_backend "
                         "transformers")

    def names(self) -> list[str]:
        """The adapter names the engine serves now."""
        return list(self.engine.adapters)

    def close(self) -> None:
        """Remove the adapter folders."""
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)
