"""The training loop: the one place where batches become optimiser steps.

Read top to bottom: build the optimiser and schedule, optionally restore a checkpoint, then for each step take
`gradient_accumulation_steps` micro-batches, normalise each summed loss term by its units (trained tokens, pairs)
counted over the whole step, clip, step, log, evaluate, save. Training methods plug in as an `Objective`; batching
is the collator's business, so packing changes the collator, not this file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Callable, Optional

from tunesmith.errors import TunesmithError
from tunesmith.runs import atomic_dir, rotate_checkpoints, save_args, update_symlink, write_json_atomic


class TrainingDiverged(TunesmithError):
    pass


DEEPSPEED_TAG = "deepspeed"  # the folder inside a checkpoint that holds DeepSpeed's optimiser shards (for resume)


@dataclass
class Objective:
    """How one training method turns a batch into a loss.

    loss(model, batch) -> ({unit: summed loss term}, {statistic: summed value}); a method may mix terms with
        different units (DPO: a per-pair loss plus an NLL over chosen tokens).
    count(batch) -> {unit: how many in this batch}; each term is divided by its units summed over the whole
        accumulated step, so gradient accumulation gives the same step as one large batch.
    metrics(summed statistics) -> the values to log (means), e.g. token_acc or rewards/accuracies.
    """
    name: str
    loss: Callable[[Any, dict], tuple[dict, dict]]
    count: Callable[[dict], dict]
    metrics: Callable[[dict], dict]


def _add(into: dict, values: dict) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0) + v


def evaluate_objective(model, objective: Objective, rows: list, collate: Callable, batch_size: int) -> dict:
    """eval_loss (every term divided by its units over the whole set) and eval_<metric> for each metric."""
    import torch

    device = next(model.parameters()).device
    terms, units, stats = {}, {}, {}
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = _to_device(collate(rows[i:i + batch_size]), device)
            parts, st = objective.loss(model, b)
            _add(terms, {k: float(v) for k, v in parts.items()})
            _add(units, objective.count(b))
            _add(stats, st)
    loss = sum(v / max(units[k], 1) for k, v in terms.items())
    return {"eval_loss": round(loss, 6), **{f"eval_{k}": v for k, v in objective.metrics(stats).items()}}


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0                # epochs completed
    batches_done: int = 0         # micro-batches consumed in the current epoch
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    best_model_checkpoint: Optional[str] = None
    last_model_checkpoint: Optional[str] = None
    total_steps: int = 0
    log_history: list = field(default_factory=list)


class _Collate:
    """Picklable collate for DataLoader workers: a list of row indices -> a batch."""

    def __init__(self, rows, collate):
        self.rows, self.collate = rows, collate

    def __call__(self, idx):
        return self.collate([self.rows[i] for i in idx])


def epoch_batches(n_rows: int, batch_size: int, seed: int, shuffle: bool) -> list[list[int]]:
    """The micro-batches of one epoch: a seeded permutation cut into batches (the same for the same seed)."""
    import torch

    if shuffle:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(n_rows))
    return [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]


def build_optimizer(model, args, drop_empty_groups: bool = False):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise TunesmithError("the model has no trainable parameters (check --train_type, --target_modules, "
                             "--target_regex); nothing would be learned")
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if drop_empty_groups:  # DeepSpeed drops them itself, and the schedule must see the same groups
        groups = [g for g in groups if g["params"]]
    lr, betas, eps = args.learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    optim = args.optim
    if optim in ("adamw_torch", "adamw", "adamw_hf", "adamw_torch_fused"):
        fused = optim == "adamw_torch_fused" and torch.cuda.is_available()
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    if optim == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TunesmithError(f"--optim {optim} needs bitsandbytes: pip install 'tunesmith[qlora]'") from None
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "adamw_bnb_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[optim]
    return cls(groups, lr=lr, betas=betas, eps=eps)


def build_scheduler(optimizer, args, total_steps: int):
    from transformers import get_scheduler

    warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if args.lr_scheduler_type == "cosine_with_min_lr" and not kwargs:
        kwargs = {"min_lr_rate": 0.1}
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=kwargs or None)


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)  # peak RSS (KiB on Linux)


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def load_model_weights(model, ckpt: str) -> None:
    """Load the weights saved in a checkpoint into the (possibly peft-wrapped) model in place."""
    from safetensors.torch import load_file

    from tunesmith.runs import is_adapter_dir

    if is_adapter_dir(ckpt):
        from peft import set_peft_model_state_dict

        path = os.path.join(ckpt, "adapter_model.safetensors")
        set_peft_model_state_dict(model, load_file(path))
        return
    state = {}
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(ckpt, f)))
    if not state:
        raise TunesmithError(f"{ckpt}: no model weights (*.safetensors) to resume from")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise TunesmithError(f"{ckpt}: weights do not match the model (missing {list(missing)[:3]}, "
                             f"unexpected {list(unexpected)[:3]})")


def train(*, args, model, objective: Objective, train_rows: list, eval_rows: list, collate: Callable,
          run_dir: str, save_model: Callable[[Any, str], None], trackers,
          args_extra: Optional[dict] = None) -> TrainState:
    """Run training to the end; return the final state. Evaluation runs the same objective on `eval_rows`."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from tunesmith.train import distributed as D

    accelerator, engine = D.make_accelerator(args, model)
    device = accelerator.device
    world, ds = engine.world, engine.kind == "deepspeed"

    bs, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    n_batches = len(D.rank_batches(epoch_batches(len(train_rows), bs * world, 0, False), world, engine.rank)[0])
    if n_batches == 0:
        raise TunesmithError(f"{len(train_rows)} training rows cannot give each of {world} processes a batch")
    steps_per_epoch = math.ceil(n_batches / gas)
    total_steps = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_train_epochs * steps_per_epoch))

    optimizer = build_optimizer(model, args, drop_empty_groups=ds)
    scheduler = build_scheduler(optimizer, args, total_steps)
    state = TrainState(total_steps=total_steps)

    if args.resume_from_checkpoint:
        ckpt = args.resume_from_checkpoint
        with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
        load_model_weights(model, ckpt)
        if not args.resume_only_model:
            if not ds:  # DeepSpeed restores its (partitioned) optimiser itself, after prepare
                optimizer.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu",
                                                     weights_only=False))
            scheduler.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=False))
            _set_rng_state(torch.load(os.path.join(ckpt, "rng_state.pth"), weights_only=False))
            state.global_step = saved["global_step"]
            state.best_metric, state.best_step = saved.get("best_metric"), saved.get("best_step")
            state.best_model_checkpoint = saved.get("best_model_checkpoint")
        if not args.ignore_data_skip:
            state.epoch, state.batches_done = saved["epoch"], saved["batches_done"]
            if args.resume_only_model:
                state.global_step = saved["global_step"]
        if engine.main:
            print(f"[tunesmith] resumed from {ckpt} at step {saved['global_step']} "
                  f"({'weights only' if args.resume_only_model else 'weights, optimiser, scheduler, RNG'}"
                  f"{'' if args.ignore_data_skip else ', data position'})", file=sys.stderr)

    model, optimizer = accelerator.prepare(model, optimizer)
    if ds and args.resume_from_checkpoint and not args.resume_only_model:
        model.load_checkpoint(args.resume_from_checkpoint, tag=DEEPSPEED_TAG, load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    eval_on = bool(eval_rows) and args.eval_strategy != "no"

    def do_eval() -> dict:
        model.eval()
        with torch.no_grad():
            metrics = evaluate_objective(accelerator.unwrap_model(model), objective, eval_rows, collate,
                                         args.per_device_eval_batch_size)
        model.train()
        if args.metric_for_best_model:
            key = args.metric_for_best_model if args.metric_for_best_model.startswith("eval_") \
                else f"eval_{args.metric_for_best_model}"
            value = metrics.get(key)
            greater = args.greater_is_better if args.greater_is_better is not None else not key.endswith("loss")
            if value is not None and (state.best_metric is None or
                                      (value > state.best_metric if greater else value < state.best_metric)):
                state.best_metric, state.best_step = value, state.global_step
        record = {**metrics, "global_step": state.global_step,
                  "epoch": round(state.epoch + state.batches_done / max(n_batches, 1), 4)}
        trackers.log(record, state.global_step)
        state.log_history.append(record)
        return metrics

    def save_checkpoint() -> str:
        path = os.path.join(run_dir, f"checkpoint-{state.global_step}")
        full_state = None
        shards = os.path.join(run_dir, f".tmp-deepspeed-{state.global_step}")
        if ds:  # every rank takes part: its optimiser shard, and (ZeRO-3) gathering the weights for rank 0
            if not args.save_only_model:
                model.save_checkpoint(shards, tag=DEEPSPEED_TAG)
                D.barrier()  # every rank's shard is on disk before rank 0 moves them into the checkpoint
            full_state = accelerator.get_state_dict(model)
        if engine.main:
            _write_checkpoint(path, full_state, shards)
        D.barrier()
        state.last_model_checkpoint = path
        if state.best_step == state.global_step:
            state.best_model_checkpoint = path
        return path

    def _write_checkpoint(path: str, full_state, shards: str) -> None:
        with atomic_dir(path) as tmp:
            save_model(accelerator.unwrap_model(model), tmp, full_state)
            save_args(tmp, args, args_extra)
            if ds and os.path.isdir(shards):
                for name in os.listdir(shards):
                    os.replace(os.path.join(shards, name), os.path.join(tmp, name))
                os.rmdir(shards)
            if not args.save_only_model:
                if not ds:
                    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
                torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
                torch.save(_rng_state(), os.path.join(tmp, "rng_state.pth"))
            st = {k: v for k, v in asdict(state).items() if k != "log_history"}
            write_json_atomic(os.path.join(tmp, "trainer_state.json"), st)
        best = path if state.best_step == state.global_step else state.best_model_checkpoint
        rotate_checkpoints(run_dir, args.save_total_limit, best)
        if args.create_checkpoint_symlink:
            update_symlink(os.path.join(run_dir, "last"), path)
            if best and os.path.isdir(best):
                update_symlink(os.path.join(run_dir, "best"), best)

    start, start_step = time.time(), state.global_step
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "stats": {}, "t0": time.time()}
    total_tokens = 0
    bar = tqdm(total=total_steps, initial=state.global_step, desc="train", dynamic_ncols=True,
               disable=not sys.stderr.isatty() or not engine.main, mininterval=0.5)
    num_workers = args.dataloader_num_workers or 0
    while state.global_step < total_steps:
        # the global batches of this epoch (the same permutation on every rank), each cut into per-rank slices
        batches, dropped = D.rank_batches(epoch_batches(len(train_rows), bs * world, args.seed + state.epoch,
                                                        args.dataset_shuffle), world, engine.rank)
        if dropped and state.epoch == 0 and engine.main:
            print(f"[tunesmith] {dropped} row(s) of the last batch of each epoch are skipped: fewer rows than the "
                  f"{world} processes", file=sys.stderr)
        loader = DataLoader(batches[state.batches_done:], batch_size=None, collate_fn=_Collate(train_rows, collate),
                            num_workers=num_workers, generator=torch.Generator().manual_seed(args.seed),
                            pin_memory=torch.cuda.is_available())
        it = iter(loader)
        epoch_ended = False
        while state.global_step < total_steps:
            micro = list(islice(it, gas))
            if not micro:
                epoch_ended = True
                break
            micro = [_to_device(b, device) for b in micro]
            units: dict = {}
            for b in micro:
                _add(units, objective.count(b))
            units = D.sum_values(units, device)  # the whole step's units, over every process
            loss_total = torch.zeros((), device=device)
            tokens = 0
            for j, b in enumerate(micro):
                last = j == len(micro) - 1
                # DDP all-reduces gradients only after the step's last micro-batch
                sync = model.no_sync() if engine.kind == "ddp" and not last else contextlib.nullcontext()
                with sync, accelerator.autocast():
                    parts, stats = objective.loss(model, b)
                    loss = sum(v / max(units[k], 1) for k, v in parts.items())
                    # DDP and DeepSpeed average gradients over processes; each holds its share of the global sum
                    if ds:
                        model.set_gradient_accumulation_boundary(last)
                        model.backward(loss * world, scale_wrt_gas=False)
                    else:
                        accelerator.backward(loss * world)
                loss_total += loss.detach().float()
                _add(window["stats"], stats)
                tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["input_ids"].numel())
            if world > 1:  # the step's loss and tokens over every process
                summed = D.sum_values({"loss": float(loss_total), "tokens": tokens}, device)
                loss_total, tokens = summed["loss"], int(summed["tokens"])
            window["tokens"] += tokens
            total_tokens += tokens
            loss_value = float(loss_total)
            if not math.isfinite(loss_value):
                bar.close()
                last = state.last_model_checkpoint or "none (no checkpoint was saved yet)"
                raise TrainingDiverged(
                    f"the loss became {loss_value} at step {state.global_step + 1}; training stopped before the "
                    f"update, so no weights were damaged. Last good checkpoint: {last}. Try a lower "
                    f"--learning_rate, --max_grad_norm 1.0, or --torch_dtype bfloat16 instead of float16.")
            if ds:  # the engine clips (gradient_clipping), steps and zeroes at the accumulation boundary
                model.step()
                grad_norm = float(model.get_global_grad_norm() or 0.0)
            else:
                if args.max_grad_norm and args.max_grad_norm > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(params, args.max_grad_norm))
                else:
                    grad_norm = float(torch.norm(torch.stack([p.grad.detach().float().norm() for p in params
                                                               if p.grad is not None])))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.batches_done += len(micro)
            state.global_step += 1
            window["loss"] += loss_value
            window["steps"] += 1
            step = state.global_step
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            if step % max(args.logging_steps, 1) == 0 or (step == 1 and args.logging_first_step) \
                    or step == total_steps:
                elapsed = time.time() - start
                dt = max(time.time() - window["t0"], 1e-9)
                stats = D.merge_dicts(window["stats"]) if world > 1 else window["stats"]
                record = {"loss": round(window["loss"] / window["steps"], 6), "grad_norm": round(grad_norm, 6),
                          "learning_rate": lr, **objective.metrics(stats),
                          "epoch": round(state.epoch + state.batches_done / max(n_batches, 1), 4),
                          "global_step/max_steps": f"{step}/{total_steps}",
                          "percentage": f"{100 * step / total_steps:.2f}%",
                          "elapsed_time": _fmt_time(elapsed),
                          "remaining_time": _fmt_time(elapsed / max(step - start_step, 1) * (total_steps - step)),
                          "memory(GiB)": memory_gib(), "tokens_per_second": round(window["tokens"] / dt, 1),
                          "train_speed(iter/s)": round(window["steps"] / dt, 4), "global_step": step}
                trackers.log(record, step)
                state.log_history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_second']:.0f}")
                window.update(loss=0.0, steps=0, tokens=0, stats={}, t0=time.time())
            last_step = step == total_steps
            if eval_on and ((args.eval_strategy == "steps" and step % args.eval_steps == 0) or last_step):
                do_eval()
            if args.save_strategy in ("steps", "best") and (step % args.save_steps == 0 or last_step) \
                    or args.save_strategy == "epoch" and last_step:
                if args.save_strategy != "best" or state.best_step == step or last_step:
                    save_checkpoint()
        if epoch_ended or state.batches_done >= n_batches:
            state.epoch += 1
            state.batches_done = 0
            if state.global_step < total_steps:
                if eval_on and args.eval_strategy == "epoch":
                    do_eval()
                if args.save_strategy == "epoch":
                    save_checkpoint()
    bar.close()
    runtime = time.time() - start
    summary = {"last_model_checkpoint": state.last_model_checkpoint,
               "best_model_checkpoint": state.best_model_checkpoint, "best_metric": state.best_metric,
               "global_step": state.global_step, "train_runtime": round(runtime, 2),
               "train_tokens_per_second": round(total_tokens / max(runtime, 1e-9), 1), "memory(GiB)": memory_gib()}
    trackers.write_summary(summary)
    state.log_history.append(summary)
    return state
