"""Several processes on the engines users already trust: torchrun for the processes, accelerate for DDP and
DeepSpeed. This file only decides settings (process group, DeepSpeed config, each rank's share of a batch) and
offers the few collective helpers the loop needs; the loop itself stays in loop.py. `make_accelerator` returns the
accelerate Accelerator with a `Parallelism` (how this run is spread over processes: single, ddp or deepspeed).
The rank and world size are read in tunesmith.log and re-exported here.

Semantics (the same as one process with the global batch):
- global batch = per-device batch × processes × accumulation; each global micro-batch is cut into per-rank slices,
  so every rank sees a disjoint share of each epoch's (seeded) permutation;
- every loss term is divided by its units (trained tokens, pairs) summed over all processes and micro-batches, and
  multiplied by the number of processes because DDP and DeepSpeed average gradients across them;
- only rank 0 writes files, logs and shows progress.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

from tunesmith.errors import ConfigError
from tunesmith.log import is_main, rank, world_size  # noqa: F401 - re-exported: setup and loop use D.is_main() etc.
from tunesmith.model import default_device

DEEPSPEED_PRESETS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


def init_process_group(deepspeed: bool = False) -> None:
    """Join the process group torchrun described (gloo on CPU, nccl on GPUs), once, before models are loaded so each
    rank uses its own GPU. deepspeed: a run started without torchrun is set up as `torchrun --nproc_per_node 1`
    would set it up (a group of one process), since DeepSpeed needs one and would otherwise look for an MPI
    launcher."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    gpu = default_device().type == "cuda"
    if world_size() <= 1:
        if deepspeed:
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


def deepspeed_config(spec, optim, world: int, dtype) -> Optional[dict]:
    """--deepspeed (`spec`: a preset name, a JSON file or a JSON string, or a dict) with every "auto" filled from
    the optimisation slice (micro-batch, accumulation, clipping) and the model's dtype; None without --deepspeed.
    Raises ConfigError for a value that is none of these, invalid JSON, an optimizer/scheduler section, or values
    that contradict the flags."""
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
            raise ConfigError(f"--deepspeed {spec}: not valid JSON (line {e.lineno}: {e.msg})") from None
    elif spec.lstrip().startswith("{"):
        try:
            cfg = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--deepspeed: not valid JSON ({e.msg})") from None
    else:
        raise ConfigError(f"--deepspeed {spec}: not a preset ({', '.join(DEEPSPEED_PRESETS)}), a JSON file or a "
                          f"JSON string")
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
            raise ConfigError(f"--deepspeed: {k} is {cfg[k]} in the config but {v} from the arguments; set it to "
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
        raise ConfigError("--deepspeed: the config's optimizer/scheduler sections are not used: tunesmith builds "
                          "them from --optim, --learning_rate and --lr_scheduler_type; remove those sections")
    cfg["zero_force_ds_cpu_optimizer"] = False  # offload with the torch optimizer: no compiled extension needed
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ConfigError(f"--deepspeed: tunesmith cannot fill \"auto\" for {', '.join(leftover)}; give values")
    return cfg


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@dataclass
class Parallelism:
    """How the run is spread over processes: what the loop needs to know about the wrapper accelerate put around
    the model. (Named apart from tunesmith.engine's generation engine.)"""
    kind: str           # single | ddp | deepspeed
    world: int          # processes taking part
    rank: int           # this process's global rank

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and progress."""
        return self.rank == 0


def make_accelerator(dist, optim, model):
    """(Accelerator, Parallelism) from the distributed and optimisation slices: DeepSpeed when --deepspeed is
    given, DDP under torchrun, else one process. Raises ConfigError for a bad --deepspeed value or when DeepSpeed is
    not installed."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    world = world_size()
    gpu = default_device().type == "cuda"
    dtype = next(p.dtype for p in model.parameters())
    # autocast on GPUs only; on CPU the model computes in the dtype it was loaded in (--torch_dtype)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if gpu else "no"
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
