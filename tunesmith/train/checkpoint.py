"""Checkpoints: what a run saves every --save_steps and what --resume_from_checkpoint restores.

A checkpoint-<step> folder holds the weights (adapter only for LoRA: `run.save_model`), args.json, the optimiser
(optimizer.pt; DeepSpeed's and FSDP's shards in their own folders), the schedule (scheduler.pt), every RNG
(rng_state.pth), trainer_state.json (`TrainState`: step, epoch, data position, best metric, log history) and what the
method's hooks keep (GRPO's round in progress). It is written into a temporary folder and renamed when complete
(tunesmith.files.atomic_dir), so a killed save leaves nothing that looks like a checkpoint; older ones are rotated
(--save_total_limit, the best kept) and `last`/`best` links follow. Weights holding inf/NaN are never saved.

Resuming is exact: the weights (`resume_weights`, before any sharding), then `restore`: optimiser, schedule, RNG and
the data position (epoch, micro-batches done), so the run goes on with the batches and the numbers it would have
had. `run` here is the loop's frozen loop.Run; `state` the mutable TrainState.
"""
from __future__ import annotations

import errno
import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

from tunesmith.errors import FlagError, TunesmithError
from tunesmith.files import atomic_dir, failed_write, write_json_atomic
from tunesmith.runs.run_dir import rotate_checkpoints, save_args, update_symlink
from tunesmith.train.interrupts import DISK_ERRNOS, TrainingDiverged, disk_error, diverged
from tunesmith.train.optim import move_schedule_to, schedule_shape

DEEPSPEED_TAG = "deepspeed"  # the folder inside a checkpoint that holds DeepSpeed's optimiser shards (for resume)


@dataclass
class TrainState:
    """What the run has done so far, updated by the loop in place: saved into each checkpoint as
    trainer_state.json (all but the notes and the good/unconfirmed bookkeeping) and read back by `restore`."""
    global_step: int = 0
    epoch: int = 0                # epochs completed
    batches_done: int = 0         # micro-batches consumed in the current epoch
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    best_model_checkpoint: Optional[str] = None
    last_model_checkpoint: Optional[str] = None
    # a checkpoint is "good" once a later step computed a finite loss and gradient from its weights; the one saved
    # last is unconfirmed until then (its weights may be what makes the next loss NaN)
    good_checkpoint: Optional[str] = None
    unconfirmed_checkpoint: Optional[str] = None
    total_steps: int = 0
    log_history: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # one-time notes already given (not saved)


def save_checkpoint(run, state: TrainState) -> str:
    """checkpoint-<step>: written by rank 0 into a temporary folder and renamed when complete. Under DeepSpeed every
    rank writes its optimiser shard and (ZeRO-3) takes part in gathering the weights."""
    from tunesmith.train import distributed as D

    path = os.path.join(run.run_dir, f"checkpoint-{state.global_step}")
    _check_finite(run, state)
    full_state = None
    shards = os.path.join(run.run_dir, f".tmp-shards-{state.global_step}")
    if run.deepspeed:
        if not run.output.save_only_model:
            run.model.save_checkpoint(shards, tag=DEEPSPEED_TAG)
            D.barrier()  # every rank's shard is on disk before rank 0 moves them into the checkpoint
        full_state = run.accelerator.get_state_dict(run.model)
    elif run.par.kind == "fsdp":
        if not run.output.save_only_model:
            D.save_sharded_optimizer(run.model, run.optimizer, os.path.join(shards, D.FSDP_OPTIMIZER_DIR))
            D.barrier()
        full_state = D.full_state_dict(run.model, trainable_only=hasattr(run.model, "peft_config"))
    if run.par.main:
        _write_checkpoint(run, state, path, full_state, shards)
    D.barrier()
    state.last_model_checkpoint = state.unconfirmed_checkpoint = path
    if state.best_step == state.global_step:
        state.best_model_checkpoint = path
    return path


def _check_finite(run, state: TrainState) -> None:
    """A checkpoint is never written from non-finite weights (inf/NaN after an update that overflowed): the run
    stops with the same message as a non-finite loss. Raises TrainingDiverged."""
    import torch

    from tunesmith.train import distributed as D

    def _local(p):  # an FSDP2 shard is checked where it lives; the ranks then agree
        return p.to_local() if hasattr(p, "to_local") else p

    bad = next((n for n, p in D.bare_model(run.accelerator, run.par, run.model).named_parameters()
                if p.requires_grad and _local(p).numel() and not bool(torch.isfinite(_local(p).detach()).all())), None)
    if run.par.kind == "fsdp":
        bad = next((b for b in D.gather(bad) if b is not None), None)
    if bad is not None:
        err = diverged(float("nan"), float("nan"), state)
        raise TrainingDiverged(f"the weights hold inf/NaN after step {state.global_step} ({bad}), so "
                               f"checkpoint-{state.global_step} was not saved. "
                               + str(err).split("training stopped before applying that step.", 1)[1].strip())


def _write_checkpoint(run, state: TrainState, path: str, full_state, shards: str) -> None:
    """The checkpoint written aside and renamed into place, then rotation and the last/best links. A write the disk
    refuses — an OSError, or torch's and safetensors' own wordings of one (tunesmith.files.failed_write, which looks
    at the free space before the partial checkpoint is removed) — raises `disk_error`'s one message."""
    output = run.output
    try:
        with atomic_dir(path) as tmp:
            try:
                _fill_checkpoint(run, state, tmp, full_state, shards)
            except Exception as e:  # noqa: BLE001 - torch.save / safetensors raise RuntimeError and their own types
                failed = failed_write(e, path, tmp)
                if failed is None:
                    raise
                raise failed from e
        best = path if state.best_step == state.global_step else state.best_model_checkpoint
        rotate_checkpoints(run.run_dir, output.save_total_limit, best)
        if output.create_checkpoint_symlink:
            update_symlink(os.path.join(run.run_dir, "last"), path)
            if best and os.path.isdir(best):
                update_symlink(os.path.join(run.run_dir, "best"), best)
    except OSError as e:
        if e.errno not in DISK_ERRNOS | {errno.EIO}:  # EIO: failed_write's word for a write refused unexplained
            raise
        raise disk_error(e if e.filename else OSError(e.errno, e.strerror, path), state) from None


def _fill_checkpoint(run, state: TrainState, tmp: str, full_state, shards: str) -> None:
    """Everything a checkpoint holds, written into its temporary folder tmp."""
    import torch

    from tunesmith.train import distributed as D

    output = run.output
    run.save_model(D.bare_model(run.accelerator, run.par, run.model), tmp, full_state)
    save_args(tmp, run.args, run.args_extra)
    for hook in run.objective.hooks:
        hook.save(tmp)
    if os.path.isdir(shards):  # DeepSpeed's or FSDP's optimiser shards, written by every rank
        for name in os.listdir(shards):
            os.replace(os.path.join(shards, name), os.path.join(tmp, name))
        os.rmdir(shards)
    if not output.save_only_model:
        if run.par.kind not in ("deepspeed", "fsdp"):
            torch.save(run.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(run.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        torch.save(_rng_state(), os.path.join(tmp, "rng_state.pth"))
    st = {k: v for k, v in asdict(state).items()
          if k not in ("notes", "good_checkpoint", "unconfirmed_checkpoint")}  # log_history: as transformers
    write_json_atomic(os.path.join(tmp, "trainer_state.json"), st)


def resume_weights(model, ckpt: str) -> None:
    """The checkpoint's weights into the unwrapped, not yet sharded model. Raises TunesmithError when they do not
    fit it."""
    try:
        load_model_weights(model, ckpt)
    except RuntimeError as e:  # shapes that do not fit this model
        raise TunesmithError(f"--resume_from_checkpoint {ckpt}: its weights do not fit this model ({e})") from None


def restore(output, model, optimizer, scheduler, state: TrainState, own_optimizer: bool, main: bool) -> None:
    """Restore --resume_from_checkpoint's (output slice) optimiser/schedule/RNG (the weights are loaded first, by
    `resume_weights`), and the data position unless --ignore_data_skip; with --resume_only_model the position only.
    own_optimizer False: DeepSpeed's or FSDP's sharded optimiser state is restored by the caller."""
    import torch

    ckpt = output.resume_from_checkpoint
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as fh:
        saved = json.load(fh)
    state.last_model_checkpoint = ckpt  # until this run saves one: what a failure message points back to
    state.unconfirmed_checkpoint = ckpt  # good once the first step from its weights is finite
    if not output.resume_only_model:
        try:
            if own_optimizer:
                optimizer.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu",
                                                     weights_only=False))
            scheduler.load_state_dict(torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=False))
            _set_rng_state(torch.load(os.path.join(ckpt, "rng_state.pth"), weights_only=False))
        except (RuntimeError, ValueError, EOFError, OSError) as e:
            raise TunesmithError(f"--resume_from_checkpoint {ckpt}: its optimiser, scheduler or RNG state cannot "
                                 f"be read ({type(e).__name__}: {e}); pass --resume_only_model true to resume the "
                                 f"weights alone, or resume from another checkpoint-N") from None
        state.global_step = saved["global_step"]
        state.best_metric, state.best_step = saved.get("best_metric"), saved.get("best_step")
        state.best_model_checkpoint = saved.get("best_model_checkpoint")
    if not output.ignore_data_skip:
        state.epoch, state.batches_done = saved["epoch"], saved["batches_done"]
        if output.resume_only_model:
            state.global_step = saved["global_step"]
    if state.global_step:  # the run goes on numbering from the checkpoint: its curve so far comes along
        state.log_history = [r for r in saved.get("log_history", []) if r.get("global_step", 0) <= state.global_step]
    if main:
        print(f"[tunesmith] resumed from {ckpt} at step {saved['global_step']} "
              f"({'weights only' if output.resume_only_model else 'weights, optimiser, scheduler, RNG'}"
              f"{'' if output.ignore_data_skip else ', data position'})", file=sys.stderr)


def check_steps_left(output, optim, total_steps: int, steps_per_epoch: int) -> None:
    """--num_train_epochs (or --max_steps) that ends at or before the checkpoint's step leaves nothing to train: a
    resumed run counts on from that step (unless --resume_only_model with --ignore_data_skip starts it from 0). The
    --max_steps case is found with the flags (train/config.py); the epochs' steps are known once the data is. Raises
    FlagError."""
    from tunesmith.models.tuners import WHOLE_MODEL

    ckpt = output.resume_from_checkpoint
    if output.resume_only_model and output.ignore_data_skip:
        return
    saved, _ = _saved_settings(ckpt)
    try:
        with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as fh:
            step = json.load(fh).get("global_step")
    except (OSError, ValueError):
        return
    if not isinstance(step, int) or total_steps > step:
        return
    flag = (f"--max_steps {optim.max_steps}" if optim.max_steps > 0 else
            f"--num_train_epochs {optim.num_train_epochs:g} ({total_steps} steps, {steps_per_epoch} per epoch)")
    more = "" if optim.max_steps > 0 else f"--num_train_epochs above {step / steps_per_epoch:g} or "
    weights = f"--model {ckpt}" if saved.get("train_type") in WHOLE_MODEL else f"--adapters {ckpt}"
    raise FlagError(f"--resume_from_checkpoint {ckpt}: the checkpoint is at step {step} and {flag} ends "
                    f"{'there' if total_steps == step else 'before it'}, so there is nothing left to train (a resumed "
                    f"run counts on from the checkpoint's step). To train on, give {more}--max_steps above {step} "
                    f"(the total); to start a new run from these weights, pass {weights} instead of resuming")


def resume_schedule(output, optim, scheduler, step: int, total_steps: int, main: bool) -> None:
    """The learning-rate schedule of a resumed run, set after every optimiser state is loaded (DeepSpeed's and FSDP's
    carry the checkpoint's rates). A full resume keeps the checkpoint's base --learning_rate (a different one is said
    to be unused) and goes on with this run's schedule — length (--max_steps or --num_train_epochs), type, warm-up —
    at the checkpoint's step: step k uses the rate an uninterrupted run with these settings uses at step k, and a
    schedule that differs from the checkpoint's is said to be rebuilt. --resume_only_model starts a new optimiser and
    schedule, which is said when the run counts on from the checkpoint's step."""
    ckpt = output.resume_from_checkpoint
    if output.resume_only_model:
        if main and step:
            _note_fresh_schedule(ckpt, optim, step, total_steps)
        return
    before = scheduler.get_last_lr()[0]
    move_schedule_to(scheduler, step)
    if not main:
        return
    saved, saved_total = _saved_settings(ckpt)
    lr = saved.get("learning_rate")
    if lr is not None and optim.learning_rate is not None and float(lr) != float(optim.learning_rate):
        print(f"[tunesmith] resuming restores the checkpoint's learning-rate schedule (--learning_rate {lr}); "
              f"--learning_rate {optim.learning_rate} is not used. To train on from these weights with new "
              f"optimiser settings, add --resume_only_model true", file=sys.stderr)
    if not isinstance(saved_total, int) or "lr_scheduler_type" not in saved:
        return
    old = schedule_shape(saved["lr_scheduler_type"], saved.get("lr_scheduler_kwargs"),
                         saved.get("warmup_steps") or 0, saved.get("warmup_ratio") or 0.0, saved_total)
    new = schedule_shape(optim.lr_scheduler_type, optim.lr_scheduler_kwargs, optim.warmup_steps, optim.warmup_ratio,
                         total_steps)
    if (old, saved_total) != (new, total_steps):
        was = "had ended at 0" if before == 0 and step >= saved_total else f"gives {before:.6g}"
        print(f"[tunesmith] the checkpoint's run had {_describe(old, saved_total)}, this run has "
              f"{_describe(new, total_steps)}: the learning-rate schedule is rebuilt for {total_steps} steps and goes "
              f"on from step {step} as an uninterrupted run with these settings would — step {step + 1} uses "
              f"{scheduler.get_last_lr()[0]:.6g} (the checkpoint's schedule {was} there)", file=sys.stderr)


def _note_fresh_schedule(ckpt: str, optim, step: int, total_steps: int) -> None:
    left = total_steps - step
    print(f"[tunesmith] --resume_only_model: the run counts on from {ckpt}'s step {step} with a new optimiser and a "
          f"new {optim.lr_scheduler_type} learning-rate schedule over {total_steps} steps started at its step 0 "
          f"(warm-up included): steps {step + 1}..{total_steps} use its steps 0..{left - 1}, so it does not reach "
          f"its end. To go on with the checkpoint's optimiser and schedule, resume without --resume_only_model",
          file=sys.stderr)


def _saved_settings(ckpt: str) -> tuple[dict, Optional[int]]:
    """The checkpoint's args.json and the total steps its run was scheduled for ({} and None where unreadable)."""
    out: list = []
    for name in ("args.json", "trainer_state.json"):
        try:
            with open(os.path.join(ckpt, name), encoding="utf-8") as fh:
                out.append(json.load(fh))
        except (OSError, ValueError):
            out.append({})
    return out[0], out[1].get("total_steps")


def _describe(shape: tuple, total: int) -> str:
    kind, kwargs, warmup = shape
    extra = "".join(f", {k} {v}" for k, v in sorted(kwargs.items()))
    return f"{total} steps ({kind}{extra}, {warmup} warm-up step{'' if warmup == 1 else 's'})"


def load_model_weights(model, ckpt: str) -> None:
    """Load the weights saved in a checkpoint into the (possibly peft-wrapped) model in place: the training form
    of the weights where the checkpoint has one (models.tuners.TRAINING_WEIGHTS: AdaLoRA, PiSSA, OLoRA), else the
    adapter or the whole model."""
    from safetensors.torch import load_file

    from tunesmith.models.checkpoint import is_adapter_dir
    from tunesmith.models.tuners import TRAINING_WEIGHTS, load_training_weights

    if os.path.isfile(os.path.join(ckpt, TRAINING_WEIGHTS)):
        load_training_weights(model, ckpt)
        return
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
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - tied:
        # transformers saves some models in their checkpoints' original layout (Qwen-VL's `visual.*` and
        # `model.layers.*` for `model.visual.*` and `model.language_model.*`; fused MoE experts split): its own
        # loader converts them back
        del state
        missing, unexpected = model.load_state_dict(_converted_weights(model, ckpt), strict=False)
    if unexpected or set(missing) - tied:
        raise TunesmithError(f"{ckpt}: weights do not match the model (missing {list(missing)[:3]}, "
                             f"unexpected {list(unexpected)[:3]})")


def _converted_weights(model, ckpt: str) -> dict:
    """The checkpoint's full weights as transformers' from_pretrained reads them into this model's class (its
    checkpoint-layout conversions applied), on the CPU; {} when it cannot read them."""
    import torch

    from tunesmith.models.load import without_load_report

    try:
        with without_load_report():
            loaded = type(model).from_pretrained(ckpt, config=model.config, dtype=next(model.parameters()).dtype,
                                                 device_map={"": "cpu"})
    except (OSError, ValueError, RuntimeError, TypeError):
        return {}
    with torch.no_grad():
        return {k: v.detach() for k, v in loaded.state_dict().items()}


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
