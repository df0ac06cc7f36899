"""Several processes on the engines users already trust: torchrun for the processes, accelerate for DDP and
DeepSpeed, PyTorch's FSDP2 (`fully_shard`) for --fsdp. This file only decides settings (process group, DeepSpeed
and FSDP configs, each rank's share of a batch) and offers the few collective helpers the loop needs; the loop itself
stays in loop.py. `make_accelerator` returns the accelerate Accelerator with a `Parallelism` (how this run is spread
over processes: single, ddp, deepspeed or fsdp).
The rank and world size are read in tunesmith.log and re-exported here.

Semantics (the same as one process with the global batch):
- global batch = per-device batch × processes × accumulation; each global micro-batch is cut into per-rank slices,
  so every rank sees a disjoint share of each epoch's (seeded) permutation;
- every loss term is divided by its units (trained tokens, pairs) summed over all processes and micro-batches, and
  multiplied by the number of processes because DDP, DeepSpeed and FSDP average gradients across them;
- only rank 0 writes files, logs and shows progress.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

from tunesmith.errors import ConfigError
from tunesmith.log import is_main, rank, world_size  # noqa: F401 - re-exported: setup and loop use D.is_main() etc.
from tunesmith.models.load import default_device

DEEPSPEED_PRESETS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


def init_process_group(alone: bool = False) -> None:
    """Join the process group torchrun described (gloo on CPU, nccl on GPUs), once, before models are loaded so each
    rank uses its own GPU. alone: a run started without torchrun is set up as `torchrun --nproc_per_node 1`
    would set it up (a group of one process), since DeepSpeed and FSDP need one (DeepSpeed would otherwise look for
    an MPI launcher)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    gpu = default_device().type == "cuda"
    if world_size() <= 1:
        if alone:
            # what `torchrun --nproc_per_node 1` would set: DeepSpeed reads LOCAL_RANK itself
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                               ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
                os.environ.setdefault(key, value)
            dist.init_process_group("nccl" if gpu else "gloo")
        return
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if gpu else "gloo")


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (e.g. the run directory, whose name carries rank 0's clock)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_values(values: dict, device) -> dict:
    """{key: sum over ranks} for numbers every rank has under the same keys."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: (int(v) if isinstance(values[k], int) else v) for k, v in zip(keys, t.tolist())}


def gather(value: Any) -> list:
    """[every rank's value], in rank order ([value] in a single process)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def gather_cat(t):
    """Every rank's 1-D tensor `t` (lengths may differ), concatenated in rank order, on t's device (`t` itself in a
    single process); without gradient. A tensor all-gather (gloo on CPU, nccl on GPUs): each rank's length first,
    then the values padded to the longest, as accelerate's pad_across_processes + gather that TRL uses."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return t
    t = t.detach().reshape(-1)
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.numel()], dtype=torch.long, device=t.device))
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    if longest == 0:
        return t
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[:t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def merge_dicts(values: dict) -> dict:
    """Sum dicts of statistics whose keys may differ between ranks (logging steps only)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return values
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def rank_batches(batches: list[list[int]], world: int, r: int) -> tuple[list[list[int]], int]:
    """This rank's slice of each global micro-batch (contiguous, as even as possible). A last batch with fewer rows
    than processes cannot give every rank work, so it is dropped; returns (slices, rows dropped)."""
    if world <= 1:
        return batches, 0
    out, dropped = [], 0
    for b in batches:
        if len(b) < world:
            dropped += len(b)
            continue
        base, extra = divmod(len(b), world)
        start = r * base + min(r, extra)
        out.append(b[start:start + base + (1 if r < extra else 0)])
    return out, dropped


# ------------------------------------------------------------------ DeepSpeed

def _load_preset(name: str) -> dict:
    text = resources.files("tunesmith").joinpath("ds_config", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def deepspeed_spec_problem(spec: str, flag: str) -> str:
    """Why a --deepspeed-like value that is neither a preset, a file nor a JSON string is refused: a path that does
    not exist says so; anything else lists what it may be."""
    if spec.endswith(".json") or os.sep in spec or "/" in spec:
        return f"{flag} {spec}: the file does not exist (give a DeepSpeed JSON config file, a preset or a JSON string)"
    return f"{flag} {spec}: not a preset ({', '.join(DEEPSPEED_PRESETS)}), a JSON file or a JSON string"


def deepspeed_config(spec, optim, world: int, dtype, flag: str = "--deepspeed") -> Optional[dict]:
    """--deepspeed (`spec`: a preset name, a JSON file or a JSON string, or a dict) with every "auto" filled from
    the optimisation slice (micro-batch, accumulation, clipping) and the model's dtype; None without --deepspeed.
    flag: the flag the errors name (--teacher_deepspeed's value is read the same way). Raises ConfigError for a
    value that is none of these, invalid JSON, an optimizer/scheduler section, or values that contradict the
    flags."""
    import torch

    if not spec:
        return None
    if isinstance(spec, dict):
        cfg = copy.deepcopy(spec)
    elif spec in DEEPSPEED_PRESETS or spec.replace("default-", "") in DEEPSPEED_PRESETS:
        cfg = _load_preset(spec.replace("default-", ""))
    elif os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag} {spec}: not valid JSON (line {e.lineno}: {e.msg})") from None
    elif spec.lstrip().startswith("{"):
        try:
            cfg = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag}: not valid JSON ({e.msg})") from None
    else:
        raise ConfigError(deepspeed_spec_problem(spec, flag))
    bf16, fp16 = dtype == torch.bfloat16, dtype == torch.float16
    filled = {
        "train_micro_batch_size_per_gpu": optim.per_device_train_batch_size,
        "gradient_accumulation_steps": optim.gradient_accumulation_steps,
        "train_batch_size": optim.per_device_train_batch_size * optim.gradient_accumulation_steps * world,
        "gradient_clipping": optim.max_grad_norm if optim.max_grad_norm and optim.max_grad_norm > 0 else 0.0,
    }
    for k, v in filled.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
        elif k != "gradient_clipping" and cfg[k] != v:
            raise ConfigError(f"{flag}: {k} is {cfg[k]} in the config but {v} from the arguments; set it to "
                              f"\"auto\" (or remove it)")
    for key, on in (("bf16", bf16), ("fp16", fp16)):
        section = cfg.setdefault(key, {"enabled": "auto"})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    for k, v in list(zero.items()):
        if v == "auto":  # bucket sizes: DeepSpeed's own defaults
            del zero[k]
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # checkpoints are normal HF/PEFT directories
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(f"{flag}: the config's optimizer/scheduler sections are not used: tunesmith builds "
                          "them from --optim, --learning_rate and --lr_scheduler_type; remove those sections")
    cfg["zero_force_ds_cpu_optimizer"] = False  # offload with the torch optimizer: no compiled extension needed
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ConfigError(f"{flag}: tunesmith cannot fill \"auto\" for {', '.join(leftover)}; give values")
    return cfg


def teacher_engine(model, spec, optim, world: int):
    """--teacher_deepspeed, as ms-swift's `prepare_deepspeed` (rlhf_trainers/utils.py): the frozen teacher `model`
    wrapped by DeepSpeed with its own config, for inference only (no optimiser). `spec` is read as --deepspeed's
    (`deepspeed_config`: a preset, a JSON file or string; "auto" from the optimisation slice and the teacher's
    dtype). ZeRO-3 partitions the teacher's parameters across the `world` processes (each holds about 1/world of
    every large tensor; parameters under 10·hidden elements stay whole, buckets of hidden² elements, ms-swift's
    sizes) and its forward gathers them layer by layer; any other stage becomes stage 0 (a whole copy on each
    process, ms-swift's rule). Returns (the engine, in eval mode, the stage: 0 or 3). Raises ConfigError for a
    bad spec or without DeepSpeed installed."""
    dtype = next(model.parameters()).dtype
    cfg = deepspeed_config(spec, optim, world, dtype, flag="--teacher_deepspeed")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("--teacher_deepspeed needs DeepSpeed: pip install deepspeed") from None
    stage = 3 if cfg["zero_optimization"].get("stage") == 3 else 0
    if stage == 3:
        hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else None
        if hidden:
            cfg["zero_optimization"].update({"reduce_bucket_size": hidden * hidden,
                                             "stage3_param_persistence_threshold": 10 * hidden,
                                             "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)})
    else:
        cfg["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine, stage


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ------------------------------------------------------------------ FSDP2

FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
# ms-swift 4.6's swift/config/fsdp2.json, the preset `--fsdp fsdp2` names
FSDP_PRESETS = {"fsdp2": {"fsdp": "full_shard auto_wrap",
                          "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True,
                                          "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                          "cpu_ram_efficient_loading": True, "state_dict_type": "SHARDED_STATE_DICT",
                                          "activation_checkpointing": True}}}
# fsdp_config keys of transformers/accelerate that FSDP2 makes moot (FSDP1 tuning knobs) or that tunesmith covers
# otherwise: accepted, changing nothing
_FSDP_MOOT = {"cpu_ram_efficient_loading": "every process loads the model before it is sharded",
              "sync_module_states": "every process loads the same weights",
              "use_orig_params": "FSDP2 always keeps the original parameters",
              "limit_all_gathers": "an FSDP1 setting", "forward_prefetch": "FSDP2 prefetches on its own",
              "backward_prefetch": "FSDP2 prefetches on its own", "min_num_params": "only for SIZE_BASED_WRAP",
              "state_dict_type": "weights are saved whole (Hugging Face folders), the optimiser state sharded"}


@dataclass(frozen=True)
class FsdpSettings:
    """What --fsdp and --fsdp_config ask of PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`)."""
    reshard_after_forward: bool = True  # full_shard (ZeRO-3-like); False: shard_grad_op (ZeRO-2-like)
    offload: bool = False               # sharded parameters, gradients and optimiser state in CPU memory
    wrap_layers: bool = True            # each decoder layer its own unit (TRANSFORMER_BASED_WRAP)
    layer_classes: tuple = ()           # the units' class names; () = the model's own _no_split_modules
    activation_checkpointing: bool = False


def _json_spec(value: str, flag: str) -> dict:
    """A dict from a JSON file or string; ConfigError naming the flag otherwise."""
    text = value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as fh:
            text = fh.read()
    elif not value.lstrip().startswith("{"):
        raise ConfigError(f"{flag} {value}: expected " + (
            "a JSON object (a file that exists, or a string such as '{\"activation_checkpointing\": true}')"
            if flag == "--fsdp_config" else f"{' '.join(FSDP_OPTIONS)} (any of them), fsdp2, or a JSON file or "
                                            f"string"))
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {value}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{flag} {value}: expected a JSON object")
    return out


def fsdp_settings(fsdp, fsdp_config=None) -> Optional[FsdpSettings]:
    """--fsdp (HF's option words, ms-swift's `fsdp2` preset, or a JSON file/string holding "fsdp" and
    "fsdp_config") and --fsdp_config (a JSON file or string, merged over the former) as FsdpSettings; None without
    --fsdp. Keys may carry accelerate's `fsdp_` prefix. Raises ConfigError for an unknown option or key, a setting
    tunesmith does not implement (hybrid sharding, size-based wrapping, FSDP1) and contradictions."""
    items = [fsdp] if isinstance(fsdp, str) else list(fsdp or [])
    if len(items) == 1 and str(items[0]).lstrip().startswith("{"):  # a JSON string may hold spaces
        words = [str(items[0])]
    else:
        words = [w for item in items for w in str(item).split()]
    if not words:
        return None
    config: dict = {}
    if len(words) == 1 and (words[0] in FSDP_PRESETS or os.path.isfile(words[0]) or words[0].startswith("{")):
        spec = FSDP_PRESETS.get(words[0]) or _json_spec(words[0], "--fsdp")
        if "fsdp" not in spec and "fsdp_config" not in spec:
            spec = {"fsdp_config": spec}  # a bare fsdp_config
        if not isinstance(spec.get("fsdp_config") or {}, dict):
            raise ConfigError(f"--fsdp {words[0]}: its fsdp_config must be a JSON object")
        words, config = str(spec.get("fsdp", "full_shard auto_wrap")).split(), dict(spec.get("fsdp_config") or {})
    if fsdp_config:
        config.update(_json_spec(fsdp_config, "--fsdp_config") if isinstance(fsdp_config, str) else fsdp_config)
    config = {(k if k == "fsdp_version" else k.removeprefix("fsdp_")): v for k, v in config.items()}
    return _settings_from(words, config)


def _settings_from(words: list, config: dict) -> FsdpSettings:
    import difflib

    for w in words:
        if w in ("hybrid_shard", "hybrid_shard_zero2"):
            raise ConfigError(f"--fsdp {w} is not supported yet (it needs a two-dimensional device mesh); use "
                              f"full_shard, or --deepspeed zero3 across nodes")
        if w == "no_shard":
            raise ConfigError("--fsdp no_shard is plain data parallelism: drop --fsdp (several processes run DDP)")
        if w not in FSDP_OPTIONS:
            raise ConfigError(f"--fsdp {w}: expected {', '.join(FSDP_OPTIONS)} (any of them), fsdp2, or a JSON file "
                              f"or string")
    if "full_shard" in words and "shard_grad_op" in words:
        raise ConfigError("--fsdp full_shard shard_grad_op: choose one (full_shard re-shards the weights after the "
                          "forward pass, shard_grad_op keeps them whole until the backward pass)")
    known = {"fsdp_version", "reshard_after_forward", "auto_wrap_policy", "transformer_layer_cls_to_wrap",
             "activation_checkpointing", "offload_params", "cpu_offload", *_FSDP_MOOT}
    for k in config:
        if k not in known:
            near = difflib.get_close_matches(k, sorted(known), n=1)
            raise ConfigError(f"--fsdp_config: unknown key {k!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                                    f"; known: {', '.join(sorted(known))}"))
    if str(config.get("fsdp_version", 2)) not in ("2", "2.0"):
        raise ConfigError(f"--fsdp_config: fsdp_version {config['fsdp_version']} is not supported: tunesmith runs "
                          f"PyTorch's FSDP2 (fully_shard); set fsdp_version 2 or leave it out")
    policy = str(config.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP" if "auto_wrap" in words else "NO_WRAP"))
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        raise ConfigError(f"--fsdp_config: auto_wrap_policy {policy} is not supported; use TRANSFORMER_BASED_WRAP "
                          f"(each decoder layer its own unit) or NO_WRAP")
    classes = config.get("transformer_layer_cls_to_wrap") or ()
    classes = tuple(c.strip() for c in classes.split(",")) if isinstance(classes, str) else classes
    if not isinstance(classes, (tuple, list)) or not all(isinstance(c, str) and c for c in classes):
        raise ConfigError(f"--fsdp_config: transformer_layer_cls_to_wrap {classes!r}: expected class names, e.g. "
                          f"[\"Qwen2DecoderLayer\"]")
    classes = tuple(classes)
    if classes and "auto_wrap_policy" not in config:  # naming the layers asks for them to be wrapped
        policy = "TRANSFORMER_BASED_WRAP"
    state_type = str(config.get("state_dict_type", "SHARDED_STATE_DICT")).upper()
    if state_type not in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        raise ConfigError(f"--fsdp_config: state_dict_type {state_type}: expected SHARDED_STATE_DICT or "
                          f"FULL_STATE_DICT")
    reshard = config.get("reshard_after_forward", "shard_grad_op" not in words)
    return FsdpSettings(reshard_after_forward=_flag_bool(reshard, "reshard_after_forward"),
                        offload="offload" in words or _flag_bool(config.get("offload_params", config.get(
                            "cpu_offload", False)), "offload_params"),
                        wrap_layers=policy == "TRANSFORMER_BASED_WRAP", layer_classes=classes,
                        activation_checkpointing=_flag_bool(config.get("activation_checkpointing", False),
                                                            "activation_checkpointing"))


def _flag_bool(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"--fsdp_config: {key} {value!r}: expected true or false")


def shard_model(model, settings: FsdpSettings):
    """Shard `model` in place with FSDP2: `fully_shard` on each decoder layer (the model's `_no_split_modules`,
    or transformer_layer_cls_to_wrap), then on the whole model, which holds the embeddings, the final norm and the
    output layer. On a GPU with bf16/fp16 weights: the trainable parameters are kept in fp32 and cast to the
    model's dtype for compute, gradients reduced in fp32 (MixedPrecisionPolicy); on a CPU the model computes in its
    loaded dtype, as under DDP. Returns the model (the same object, now an FSDPModule). Raises ConfigError when no
    layer of the wrapped classes exists."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from tunesmith.models.load import unwrap_model

    gpu = default_device().type == "cuda"
    dtype = next(p.dtype for p in model.parameters())
    mixed = MixedPrecisionPolicy()
    if gpu and dtype in (torch.bfloat16, torch.float16):
        mixed = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for p in model.parameters():
            if p.requires_grad:  # the optimiser updates fp32 master weights, as accelerate's FSDP2 does
                p.data = p.data.float()
    offload = CPUOffloadPolicy() if settings.offload and gpu else OffloadPolicy()
    if settings.offload and not gpu:
        from tunesmith.log import note

        note("--fsdp offload: without a GPU the shards are in CPU memory already; nothing to offload")
    kw = {"reshard_after_forward": settings.reshard_after_forward, "mp_policy": mixed, "offload_policy": offload}
    if settings.wrap_layers:
        names = set(settings.layer_classes) or set(getattr(unwrap_model(model), "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if not layers:
            raise ConfigError(f"--fsdp auto_wrap: the model has no module of class {', '.join(sorted(names)) or '?'}"
                              f"; name its decoder layer class with --fsdp_config "
                              f"'{{\"transformer_layer_cls_to_wrap\": [\"...\"]}}' or use auto_wrap_policy NO_WRAP")
        for layer in layers:
            fully_shard(layer, **kw)
    # transformers returns views (hidden states, kept logits) that tunesmith never changes in place, which is what
    # this warning is about; it would print on every step
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # the outer unit keeps FSDP's default: gathered from its forward until the backward, which token_logps relies
    # on to take the chunked product with the whole output weight (and to give its gradient to FSDP)
    fully_shard(model, mp_policy=mixed, offload_policy=offload)
    return model


def is_sharded(model) -> bool:
    """Whether FSDP2 shards this model (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model, trainable_only: bool) -> dict:
    """The whole, unsharded weights of an FSDP2 model on rank 0's CPU ({} on other ranks); every rank must call it
    (the shards are all-gathered one tensor at a time). trainable_only: LoRA's adapter weights, not the frozen
    base."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))


def load_full_state_dict(model, state: dict) -> None:
    """Load whole weights (every rank holds `state`) into an FSDP2 model's shards; keys absent from `state` are kept
    (a LoRA adapter's state leaves the base untouched)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


FSDP_OPTIMIZER_DIR = "optimizer_0"  # what transformers' Trainer names the sharded optimiser state of an FSDP run


def save_sharded_optimizer(model, optimizer, path: str) -> None:
    """Each rank writes its shard of the optimiser state into `path` (torch.distributed.checkpoint; a folder every
    rank can reach). Loading re-shards, so a run may resume on another number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path)


def load_sharded_optimizer(model, optimizer, path: str) -> None:
    """The optimiser state `save_sharded_optimizer` wrote, re-sharded onto this run's processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def grad_norm(params: list, max_norm: float) -> float:
    """The total L2 norm of the parameters' gradients (before clipping), clipping them to max_norm when > 0. FSDP2's
    sharded gradients (DTensors) give the norm over every shard."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


@dataclass
class Parallelism:
    """How the run is spread over processes: what the loop needs to know about the wrapper accelerate put around
    the model. (Named apart from tunesmith.inference.engine's generation engine.)"""
    kind: str           # single | ddp | deepspeed | fsdp
    world: int          # processes taking part
    rank: int           # this process's global rank

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and progress."""
        return self.rank == 0


def bare_model(accelerator, par: Parallelism, model):
    """The model inside the wrapper `accelerator.prepare` put around it: accelerate's unwrap_model for a DeepSpeed
    engine; a DDP module's `.module` otherwise (FSDP2 shards in place, no wrapper). accelerate's unwrap_model
    imports DeepSpeed whenever it is installed, and DeepSpeed's import prints "[WARNING] Setting accelerator to
    CPU" on a machine without a GPU, into runs that never asked for DeepSpeed."""
    if par.kind == "deepspeed":
        return accelerator.unwrap_model(model)
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def make_accelerator(dist, optim, model):
    """(Accelerator, Parallelism) from the distributed and optimisation slices: FSDP2 with --fsdp (the model is
    sharded by `shard_model`, not by accelerate), DeepSpeed when --deepspeed is given, DDP under torchrun, else one
    process. Raises ConfigError for a bad --deepspeed value or when DeepSpeed is
    not installed."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    world = world_size()
    gpu = default_device().type == "cuda"
    dtype = next(p.dtype for p in model.parameters())
    # autocast on GPUs only; on CPU the model computes in the dtype it was loaded in (--torch_dtype)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if gpu else "no"
    if fsdp_settings(dist.fsdp, dist.fsdp_config) is not None:
        # FSDP2 is PyTorch's own (shard_model, before the optimiser is built); accelerate only gives the device
        return Accelerator(cpu=not gpu), Parallelism("fsdp", world, rank())
    cfg = deepspeed_config(dist.deepspeed, optim, world, dtype)
    if cfg is not None:
        try:
            import deepspeed  # noqa: F401  (imported here so a missing install is one clear message)
        except ImportError:
            raise ConfigError("--deepspeed needs DeepSpeed: pip install deepspeed") from None
        from accelerate.utils import DeepSpeedPlugin

        acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg), mixed_precision=mixed,
                          gradient_accumulation_steps=optim.gradient_accumulation_steps)
        # accelerate's process_index is not reliable for DeepSpeed on CPU; the process group is the truth
        return acc, Parallelism("deepspeed", world_size(), rank())
    # MoE layers leave experts unused in some batches; DDP must be told or it waits for their gradients
    cfg_model = getattr(model, "config", None)
    moe = any(getattr(cfg_model, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if moe else []
    acc = Accelerator(mixed_precision=mixed, cpu=not gpu, kwargs_handlers=handlers)
    return acc, Parallelism("ddp" if world > 1 else "single", world, rank())
