"""The training loop: the one place where batches become optimiser steps.

`train` reads top to bottom: `prepare_run` (optimiser, schedule, distributed wrapping, `restore` of a checkpoint),
then per step `train_step` (the step's `gradient_accumulation_steps` micro-batches, each summed loss term divided
by its units — trained tokens, pairs — counted over the whole step; clip; `optimizer.step()`), then what is due at
that step: `log_record`, `evaluate`, `save_checkpoint`; `end_epoch` at each epoch's end. Every step is a
module-level function over the frozen `Run` and the mutable `TrainState`. Training methods plug in as an
`Objective`; batching is the collator's business, so packing changes the collator, not this file. The training
rows are a sized sequence (cut into seeded per-epoch batches of indices) or, with --streaming, a stream without a
length (data.stream.StreamingRows: `step_batches` cuts what each pass yields into the same batches; an epoch ends
where the stream does).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import sys
import time
from collections.abc import Sized
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Callable, Optional

from tunesmith.errors import TunesmithError
from tunesmith.runs.run_dir import atomic_dir, rotate_checkpoints, save_args, update_symlink, write_json_atomic


class TrainingDiverged(TunesmithError):
    pass


class NonFiniteSampling(TunesmithError):
    """Generation (GRPO's rollouts) met inf/NaN probabilities: the weights diverged before a loss could show it."""


DEEPSPEED_TAG = "deepspeed"  # the folder inside a checkpoint that holds DeepSpeed's optimiser shards (for resume)


@dataclass
class Objective:
    """How one training method turns a batch into a loss.

    loss(model, batch) -> ({unit: summed loss term}, {statistic: summed value}); a method may mix terms with
        different units (DPO: a per-pair loss plus an NLL over chosen tokens).
    count(batch) -> {unit: how many in this batch}; each term is divided by its units summed over the whole
        accumulated step, so gradient accumulation gives the same step as one large batch.
    metrics(summed statistics) -> the values to log (means), e.g. token_acc or rewards/accuracies.
    hooks: training state outside the model and optimiser (a reference that moves, TR-DPO; GRPO's round in
        progress): objects with after_step(model, global_step), save(checkpoint folder) and load(checkpoint
        folder); empty for most methods.
    """
    name: str
    loss: Callable[[Any, dict], tuple[dict, dict]]
    count: Callable[[dict], dict]
    metrics: Callable[[dict], dict]
    hooks: tuple = ()


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
    return {"eval_loss": signif(loss), **{f"eval_{k}": v for k, v in objective.metrics(stats).items()}}


def signif(x: float, digits: int = 6) -> float:
    """x for the log: `digits` decimal places, and for a small value (a KL of 1e-7) `digits` significant digits,
    where rounding to decimal places would log 0."""
    if not math.isfinite(x):
        return x
    return round(x, digits) if abs(x) >= 0.01 else float(f"{x:.{digits}g}")


@dataclass
class TrainState:
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


def build_optimizer(model, optim, drop_empty_groups: bool = False):
    """AdamW (or SGD, or a bitsandbytes 8-bit/paged AdamW) over the trainable parameters (optimisation slice),
    without weight decay on biases, norms and other 1-D parameters. Raises TunesmithError when nothing is
    trainable or bitsandbytes is missing for an 8-bit optimiser."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise TunesmithError("the model has no trainable parameters (check --train_type, --target_modules, "
                             "--target_regex); nothing would be learned")
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if drop_empty_groups:  # DeepSpeed drops them itself, and the schedule must see the same groups
        groups = [g for g in groups if g["params"]]
    lr, betas, eps = optim.learning_rate, (optim.adam_beta1, optim.adam_beta2), optim.adam_epsilon
    name = optim.optim
    if name in ("adamw_torch", "adamw", "adamw_hf", "adamw_torch_fused"):
        fused = name == "adamw_torch_fused" and torch.cuda.is_available()
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TunesmithError(f"--optim {name} needs bitsandbytes: pip install 'tunesmith[qlora]'") from None
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "adamw_bnb_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(groups, lr=lr, betas=betas, eps=eps)


def build_scheduler(optimizer, optim, total_steps: int):
    """transformers' schedule --lr_scheduler_type over `total_steps` optimiser steps, warming up for --warmup_steps
    (or --warmup_ratio of the steps, rounded up)."""
    from transformers import get_scheduler

    warmup = optim.warmup_steps if optim.warmup_steps > 0 else math.ceil(optim.warmup_ratio * total_steps)
    kwargs = dict(optim.lr_scheduler_kwargs or {})
    if optim.lr_scheduler_type == "cosine_with_min_lr" and not kwargs:
        kwargs = {"min_lr_rate": 0.1}
    return get_scheduler(optim.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
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
    """Peak memory in GiB: CUDA reserved memory on a GPU, else the process's peak RSS."""
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

    from tunesmith.models.checkpoint import is_adapter_dir

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


@dataclass(frozen=True)
class Run:
    """What every step of one training run shares, built once by `prepare_run` and never changed after."""
    optim: Any             # config.OptimConfig
    output: Any            # config.OutputConfig
    shuffle: bool          # --dataset_shuffle
    args: Any              # the whole resolved command, written as args.json into each checkpoint
    model: Any             # as accelerate prepared it: plain, DDP-wrapped or a DeepSpeed engine
    optimizer: Any
    scheduler: Any
    accelerator: Any
    par: Any               # distributed.Parallelism: kind ("single" | "ddp" | "deepspeed"), world, rank, main
    objective: Objective
    train_rows: list
    eval_rows: list
    collate: Callable
    run_dir: str
    save_model: Callable
    trackers: Any
    args_extra: Optional[dict]
    n_batches: Optional[int]  # micro-batches per epoch on this process; None for a stream (known at its end)
    params: list           # the trainable parameters (clipping, gradient norm)

    @property
    def deepspeed(self) -> bool:
        """Whether DeepSpeed wraps the model (it steps, clips and saves its own optimiser shards)."""
        return self.par.kind == "deepspeed"


@dataclass
class StepResult:
    """One optimiser step: the loss (each term over its units of the whole step, summed over processes), the
    tokens it read (all processes), the gradient norm before clipping, the summed statistics for `metrics`, and the
    learning rate the step used (logged as transformers' Trainer logs it: before the schedule moves on)."""
    loss: float
    tokens: int
    grad_norm: float
    stats: dict
    micro_batches: int
    lr: float = 0.0


@dataclass
class Window:
    """What is summed between two log records."""
    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    stats: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.time)


def train(cfg, *, model, objective: Objective, train_rows: list, eval_rows: list, collate: Callable,
          run_dir: str, save_model: Callable[[Any, str], None], trackers,
          args_extra: Optional[dict] = None) -> TrainState:
    """Run training to the end (cfg: config.TrainConfig; the loop reads its optimisation, output and distributed
    slices); return the final state. Evaluation runs the same objective on `eval_rows`. Raises TrainingDiverged
    when the loss is not finite (before the update: the weights are not touched)."""
    with _signals_stop_training(), _stop_message() as seen:
        run, seen.state = prepare_run(cfg, model, objective, train_rows, eval_rows, collate, run_dir, save_model,
                                      trackers, args_extra)
        return _train_steps(run, seen.state, objective)


def _train_steps(run: Run, state: TrainState, objective: Objective) -> TrainState:
    """`_run_steps`, with what stops it mid-way said in one message (see `train`)."""
    try:
        return _run_steps(run, state, objective)
    except NonFiniteSampling as e:  # GRPO: the weights give non-finite probabilities before any loss is taken
        _mark_diverged(run, state, StepResult(float("nan"), 0, float("nan"), {}, 0))
        raise TrainingDiverged(str(diverged(StepResult(float("nan"), 0, float("nan"), {}, 0), state)).replace(
            "the loss became nan", f"sampling became impossible ({e})", 1)) from None
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise disk_error(e, state) from None


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


class _Signalled(BaseException):
    """Raised by the SIGTERM/SIGINT handler in the training process (a BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALS = {"deferred": 0, "pending": None}  # inside `signals_deferred`: the signal that came, raised at its end


@contextlib.contextmanager
def _signals_stop_training():
    """While training runs: SIGTERM (and SIGINT) raise _Signalled at once — or, inside `signals_deferred` (a
    checkpoint being written and renamed), when that block ends. No checkpoint is saved on a signal (as in
    transformers' Trainer): a killed save is removed (atomic_dir), and every complete checkpoint stays intact.
    Only in the main thread (signal handlers can be set nowhere else); the previous handlers come back after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        """Raise now, or when the deferred block ends."""
        if _SIGNALS["deferred"]:
            _SIGNALS["pending"] = signum
            return
        raise _Signalled(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        _SIGNALS["pending"] = None


@contextlib.contextmanager
def signals_deferred():
    """A block a signal must not cut in two (writing, renaming and rotating checkpoints): a signal that comes
    meanwhile is raised when it ends."""
    _SIGNALS["deferred"] += 1
    try:
        yield
    finally:
        _SIGNALS["deferred"] -= 1
    if not _SIGNALS["deferred"] and _SIGNALS["pending"] is not None:
        signum, _SIGNALS["pending"] = _SIGNALS["pending"], None
        raise _Signalled(signum)


@contextlib.contextmanager
def _stop_message():
    """A signal (or Ctrl-C) during training becomes one Interrupted error naming the step, the last checkpoint and
    how to resume; no traceback. Yields a holder whose `state` the caller sets (the loop updates it in place)."""
    import signal
    from types import SimpleNamespace

    from tunesmith.errors import Interrupted

    seen = SimpleNamespace(state=None)
    try:
        yield seen
    except (_Signalled, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, _Signalled) else signal.SIGINT
        _close_progress_bars()
        state = seen.state or TrainState()
        last = state.last_model_checkpoint
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} at step {state.global_step}"
            + (f" of {state.total_steps}" if state.total_steps else "") + "; no checkpoint was saved on the signal. "
            + (f"Every complete checkpoint is intact (a checkpoint is renamed into place only once fully written); "
               f"the last: {last}. Resume with the same command and --resume_from_checkpoint {last}" if last else
               "No checkpoint had been saved yet (--save_steps); start again to train"), signum) from None


def _close_progress_bars() -> None:
    """End the progress bar's line, so the message starts on its own."""
    try:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def disk_error(e: OSError, state: TrainState) -> TunesmithError:
    """One message for a write the disk refused mid-run (full, quota, permissions, read-only): the file, what it
    is, why, and the last good checkpoint to resume from. Checkpoints are renamed into place only when complete,
    so none that looks complete is left half-written."""
    path = e.filename or "?"
    what = "a checkpoint" if ".tmp-checkpoint" in path or "checkpoint-" in path else \
        {"logging.jsonl": "the training log", "completions.jsonl": "the GRPO completions log"}.get(
            os.path.basename(path), "a run file")
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EROFS: "the file system is read-only"}.get(e.errno, "permission denied")
    good = state.good_checkpoint or state.last_model_checkpoint
    return TunesmithError(
        f"could not write {what} ({path}): {why}. Training stopped at step {state.global_step}; every complete "
        f"checkpoint is intact (a checkpoint is renamed into place only once fully written). Last good checkpoint: "
        f"{good or 'none'}. Free some space (or fix the permissions) and "
        + (f"resume with --resume_from_checkpoint {good}" if good else "start again"))


def _run_steps(run: Run, state: TrainState, objective: Objective) -> TrainState:
    """The optimiser steps until the run's end (see `train`)."""
    output = run.output
    start, start_step, total_tokens = time.time(), state.global_step, 0
    window = Window()
    bar = _progress_bar(run, state)
    while state.global_step < state.total_steps:
        for micro in step_batches(run, state):
            result = train_step(run, micro)
            if not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
                bar.close()
                _mark_diverged(run, state, result)
                raise diverged(result, state)
            state.batches_done += result.micro_batches
            state.global_step += 1
            if state.unconfirmed_checkpoint:  # its weights just gave a finite loss and gradient
                state.good_checkpoint, state.unconfirmed_checkpoint = state.unconfirmed_checkpoint, None
            for hook in objective.hooks:
                hook.after_step(run.model, state.global_step)
            total_tokens += result.tokens
            _accumulate(window, result)
            bar.update(1)
            if log_due(output, state):
                log_record(run, state, window, result, start, start_step, bar)
                window = Window()
            if eval_due(run, state):
                evaluate(run, state)
            if save_due(output, state):
                with signals_deferred():
                    save_checkpoint(run, state)
        # the batches ran out before the last step (a stream's end is only known here), or the last step took
        # the epoch's last batch
        if state.global_step < state.total_steps or state.batches_done == run.n_batches:
            end_epoch(run, state)
    bar.close()
    return summarise(run, state, total_tokens, time.time() - start)


def prepare_run(cfg, model, objective, train_rows, eval_rows, collate, run_dir, save_model, trackers,
                args_extra) -> tuple[Run, TrainState]:
    """The optimiser, the schedule, the distributed wrapping and, with --resume_from_checkpoint, the restored
    weights, optimiser, schedule, RNG and data position. Raises TunesmithError when the rows cannot give every
    process a batch, or the model has nothing to train."""
    from tunesmith.train import distributed as D

    optim, output = cfg.optim, cfg.output
    accelerator, par = D.make_accelerator(cfg.dist, optim, model)
    bs, gas, world = optim.per_device_train_batch_size, optim.gradient_accumulation_steps, par.world
    # a stream: --streaming (--max_steps required, its length is not known) or GRPO's rollouts (known length)
    n_batches = getattr(train_rows, "batches_per_epoch", None)
    if isinstance(train_rows, Sized):
        n_batches = len(D.rank_batches(epoch_batches(len(train_rows), bs * world, 0, False), world, par.rank)[0])
        if n_batches == 0:
            raise TunesmithError(f"{len(train_rows)} training rows cannot give each of {world} processes a batch")
    total_steps = optim.max_steps if optim.max_steps > 0 \
        else max(1, math.ceil(optim.num_train_epochs * math.ceil(n_batches / gas)))
    ds, fsdp = par.kind == "deepspeed", par.kind == "fsdp"
    if output.resume_from_checkpoint:  # whole weights, into the model before any sharding
        resume_weights(model, output.resume_from_checkpoint)
    if fsdp:  # before the optimiser, which must hold the sharded parameters
        model = D.shard_model(model, D.fsdp_settings(cfg.dist.fsdp, cfg.dist.fsdp_config))
    optimizer = build_optimizer(model, optim, drop_empty_groups=ds)
    scheduler = build_scheduler(optimizer, optim, total_steps)
    state = TrainState(total_steps=total_steps)
    if output.resume_from_checkpoint:
        restore(output, model, optimizer, scheduler, state, own_optimizer=not (ds or fsdp), main=par.main)
        for hook in objective.hooks:
            hook.load(output.resume_from_checkpoint)
        for record in state.log_history:  # the new run's logging.jsonl and trackers carry the whole curve
            trackers.log(record, record["global_step"])
        if not output.resume_only_model and par.main:
            _note_restored_schedule(output.resume_from_checkpoint, optim)
    if fsdp:
        if output.resume_from_checkpoint and not output.resume_only_model:
            D.load_sharded_optimizer(model, optimizer, os.path.join(output.resume_from_checkpoint,
                                                                    D.FSDP_OPTIMIZER_DIR))
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if ds and output.resume_from_checkpoint and not output.resume_only_model:
        model.load_checkpoint(output.resume_from_checkpoint, tag=DEEPSPEED_TAG, load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    run = Run(optim, output, cfg.data.dataset_shuffle, cfg.args, model, optimizer, scheduler, accelerator, par,
              objective, train_rows, eval_rows, collate, run_dir, save_model, trackers, args_extra, n_batches, params)
    return run, state


def _note_restored_schedule(ckpt: str, optim) -> None:
    """A full resume restores the checkpoint's learning-rate schedule (as transformers' Trainer does): a different
    --learning_rate is not used, which is said rather than silently ignored."""
    try:
        with open(os.path.join(ckpt, "args.json"), encoding="utf-8") as fh:
            saved = json.load(fh).get("learning_rate")
    except (OSError, ValueError):
        return
    if saved is not None and optim.learning_rate is not None and float(saved) != float(optim.learning_rate):
        print(f"[tunesmith] resuming restores the checkpoint's learning-rate schedule (--learning_rate {saved}); "
              f"--learning_rate {optim.learning_rate} is not used. To train on from these weights with new "
              f"optimiser settings, add --resume_only_model true", file=sys.stderr)


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


def step_batches(run: Run, state: TrainState):
    """The rest of the current epoch, `gradient_accumulation_steps` micro-batches (on the device) per step, until
    the epoch or the training ends. Every rank cuts the same seeded global batches into its own slices; a stream's
    batches are read as they are needed (`stream_batches`)."""
    optim = run.optim
    it = loader_batches(run, state) if isinstance(run.train_rows, Sized) else stream_batches(run, state)
    while state.global_step < state.total_steps:
        micro = list(islice(it, optim.gradient_accumulation_steps))
        if not micro:
            return
        yield [_to_device(b, run.accelerator.device) for b in micro]


def loader_batches(run: Run, state: TrainState):
    """Rows in a sequence: the epoch's remaining micro-batches of this rank (from `batches_done` on), collated by a
    DataLoader over index lists of the seeded permutation."""
    import torch
    from torch.utils.data import DataLoader

    from tunesmith.train import distributed as D

    optim, par = run.optim, run.par
    batches, dropped = D.rank_batches(epoch_batches(len(run.train_rows), optim.per_device_train_batch_size * par.world,
                                                    optim.seed + state.epoch, run.shuffle),
                                      par.world, par.rank)
    if dropped and state.epoch == 0 and par.main:
        print(f"[tunesmith] {dropped} row(s) of the last batch of each epoch are skipped: fewer rows than the "
              f"{par.world} processes", file=sys.stderr)
    loader = DataLoader(batches[state.batches_done:], batch_size=None,
                        collate_fn=_Collate(run.train_rows, run.collate),
                        num_workers=optim.dataloader_num_workers or 0,
                        generator=torch.Generator().manual_seed(optim.seed), pin_memory=torch.cuda.is_available())
    return iter(loader)


def stream_batches(run: Run, state: TrainState):
    """A stream (--streaming): this rank's micro-batches of the epoch, collated in this process as they are read.
    The pass's units (shuffled within buffers with --seed + epoch) are cut into global batches of per-device batch
    × processes, each rank taking its slice as `epoch_batches` + `rank_batches` cut a sequence (with every slice
    full: every world-th per-device batch). A resumed run skips the `batches_done` already trained: the stream's
    `epoch(seed, shuffle, skip_units)` skips their units (a --streaming pass reads them again; GRPO's rollouts do
    not generate whole rounds skipped). Raises TunesmithError when a whole pass gives this process no batch."""
    optim, par = run.optim, run.par
    size = optim.per_device_train_batch_size * par.world
    # global batch k is units [k·size, (k+1)·size): a resumed run starts after the batches already trained
    units = run.train_rows.epoch(optim.seed + state.epoch, run.shuffle, state.batches_done * size)
    n = 0
    for batch in _rank_slices(units, size, par.world, par.rank):
        n += 1
        yield run.collate(batch)
    if n == 0 and state.batches_done == 0:
        raise TunesmithError(f"the streamed training data gave no batch to each of {par.world} processes")


def _rank_slices(units, size: int, world: int, rank: int):
    """This rank's slice of each global batch of `size` units read from `units`."""
    from tunesmith.train import distributed as D

    while True:
        batch = list(islice(units, size))
        if not batch:
            return
        for idx in D.rank_batches([list(range(len(batch)))], world, rank)[0]:
            yield [batch[i] for i in idx]


def train_step(run: Run, micro: list[dict]) -> StepResult:
    """Forward and backward over the step's micro-batches, then clip (--max_grad_norm > 0), step the optimiser and
    the schedule; the gradient norm is taken before clipping.

    Each loss term is divided by its units (tokens, pairs, …) counted over the whole step and every process, so
    accumulation and data parallelism give the step of one large batch; the loss is multiplied by the world size
    because DDP and DeepSpeed average gradients over processes. A non-finite loss returns before the update."""
    import torch

    from tunesmith.train import distributed as D

    model, objective, par, device = run.model, run.objective, run.par, run.accelerator.device
    units: dict = {}
    for b in micro:
        _add(units, objective.count(b))
    units = D.sum_values(units, device)
    loss_total = torch.zeros((), device=device)
    tokens, stats = 0, {}
    for j, b in enumerate(micro):
        last = j == len(micro) - 1
        # DDP all-reduces (FSDP reduce-scatters) gradients only after the step's last micro-batch
        sync = model.no_sync() if par.kind == "ddp" and not last else contextlib.nullcontext()
        if par.kind == "fsdp":
            model.set_requires_gradient_sync(last)
        with sync, run.accelerator.autocast():
            parts, st = objective.loss(model, b)
            loss = sum(v / max(units[k], 1) for k, v in parts.items())
            if run.deepspeed:
                model.set_gradient_accumulation_boundary(last)
                model.backward(loss * par.world, scale_wrt_gas=False)
            else:
                run.accelerator.backward(loss * par.world)
        loss_total += loss.detach().float()
        _add(stats, st)
        tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["input_ids"].numel())
    if par.world > 1:  # the step's loss and tokens over every process
        summed = D.sum_values({"loss": float(loss_total), "tokens": tokens}, device)
        loss_total, tokens = summed["loss"], int(summed["tokens"])
    loss_value = float(loss_total)
    if not math.isfinite(loss_value):
        return StepResult(loss_value, tokens, float("nan"), stats, len(micro))
    if run.deepspeed:  # the engine clips (gradient_clipping), steps and zeroes at the accumulation boundary
        model.step()
        grad_norm = float(model.get_global_grad_norm() or 0.0)
    else:
        if par.kind == "fsdp":  # sharded gradients: the norm over every shard
            grad_norm = D.grad_norm(run.params, run.optim.max_grad_norm)
        elif run.optim.max_grad_norm and run.optim.max_grad_norm > 0:
            grad_norm = float(run.accelerator.clip_grad_norm_(run.params, run.optim.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.detach().float().norm() for p in run.params
                                                       if p.grad is not None])))
        if not math.isfinite(grad_norm):  # a finite loss can still give a NaN/inf gradient: never apply it
            run.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_value, tokens, grad_norm, stats, len(micro))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step used
    run.scheduler.step()
    return StepResult(loss_value, tokens, grad_norm, stats, len(micro), lr)


def diverged(result: StepResult, state: TrainState) -> TrainingDiverged:
    """The error for a non-finite loss or gradient at the coming step. It names as good only a checkpoint whose
    weights a later step turned into a finite loss and gradient; the checkpoint saved just before this step holds
    the very weights that gave the non-finite value, and is named as such."""
    what = f"the loss became {result.loss}" if not math.isfinite(result.loss) else \
        f"the gradient norm became {result.grad_norm} (loss {result.loss:.4g})"
    good = state.good_checkpoint or "none (no checkpoint's weights have given a finite step yet)"
    bad = (f" {state.unconfirmed_checkpoint} holds the weights that gave it: do not resume from it."
           if state.unconfirmed_checkpoint else "")
    return TrainingDiverged(
        f"{what} at step {state.global_step + 1}; training stopped before applying that step.{bad} Last good "
        f"checkpoint (a later step gave a finite loss from its weights): {good}. Try a lower --learning_rate or "
        f"--max_grad_norm 1.0" + (" (from a checkpoint: with --resume_only_model true, since a full resume "
                                  "restores the old learning-rate schedule)" if state.good_checkpoint else "")
        + "; a float16 run can also use --torch_dtype bfloat16.")


def _accumulate(window: Window, result: StepResult) -> None:
    window.loss += result.loss
    window.steps += 1
    window.tokens += result.tokens
    _add(window.stats, result.stats)


def log_due(output, state: TrainState) -> bool:
    """A log record is due every --logging_steps optimiser steps, at step 1 (--logging_first_step) and at the end."""
    step = state.global_step
    return step % max(output.logging_steps, 1) == 0 or (step == 1 and output.logging_first_step) \
        or step == state.total_steps


def eval_due(run: Run, state: TrainState) -> bool:
    """Evaluation is due every --eval_steps (eval_strategy steps) and at the last step, when there are eval rows."""
    output = run.output
    if not run.eval_rows or output.eval_strategy == "no":
        return False
    step = state.global_step
    return (output.eval_strategy == "steps" and step % output.eval_steps == 0) or step == state.total_steps


def save_due(output, state: TrainState) -> bool:
    """A checkpoint is due every --save_steps (steps), when the best metric improved (best), and at the last step
    unless --save_strategy no; epoch saves happen in `end_epoch`."""
    step, last_step = state.global_step, state.global_step == state.total_steps
    if output.save_strategy in ("steps", "best") and (step % output.save_steps == 0 or last_step) \
            or output.save_strategy == "epoch" and last_step:
        return output.save_strategy != "best" or state.best_step == step or last_step
    return False


def log_record(run: Run, state: TrainState, window: Window, last: StepResult, start: float, start_step: int,
               bar) -> dict:
    """The ms-swift-shaped log line for the steps since the last one: mean loss, the last step's gradient norm and
    learning rate (the one it used, as transformers' Trainer and so ms-swift log it), metrics, speed (tokens/s over
    every process), memory (GiB); written to the trackers and the state's history."""
    from tunesmith.train import distributed as D

    step, total = state.global_step, state.total_steps
    elapsed = time.time() - start
    dt = max(time.time() - window.t0, 1e-9)
    stats = D.merge_dicts(window.stats) if run.par.world > 1 else window.stats
    lr, grad_norm = last.lr, last.grad_norm
    record = {"loss": signif(window.loss / window.steps), "grad_norm": signif(grad_norm),
              "learning_rate": lr, **run.objective.metrics(stats),
              "epoch": epoch_progress(run, state),
              "global_step/max_steps": f"{step}/{total}",
              "percentage": f"{100 * step / total:.2f}%",
              "elapsed_time": _fmt_time(elapsed),
              "remaining_time": _fmt_time(elapsed / max(step - start_step, 1) * (total - step)),
              "memory(GiB)": memory_gib(), "tokens_per_second": round(window.tokens / dt, 1),
              "train_speed(iter/s)": round(window.steps / dt, 4), "global_step": step}
    run.trackers.log(record, step)
    state.log_history.append(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_second']:.0f}")
    return record


def epoch_progress(run: Run, state: TrainState) -> float:
    """Epochs done, with the current one's fraction (4 decimals); a stream's fraction is unknown: epochs done."""
    return round(state.epoch + (state.batches_done / run.n_batches if run.n_batches else 0), 4)


def evaluate(run: Run, state: TrainState) -> dict:
    """eval_* on the validation rows with the training objective; updates the best metric; logs the record."""
    import torch

    output, model = run.output, run.model
    model.eval()
    with torch.no_grad():
        # rows generated at each evaluation (GRPO's validation prompts) come from the rows' own fresh()
        rows = run.eval_rows.fresh() if hasattr(run.eval_rows, "fresh") else run.eval_rows
        metrics = evaluate_objective(run.accelerator.unwrap_model(model), run.objective, rows, run.collate,
                                     run.optim.per_device_eval_batch_size)
    model.train()
    if output.metric_for_best_model:
        key = output.metric_for_best_model if output.metric_for_best_model.startswith("eval_") \
            else f"eval_{output.metric_for_best_model}"
        value = metrics.get(key)
        if value is None and key not in state.notes and run.par.main:
            state.notes.append(key)
            print(f"[tunesmith] --metric_for_best_model {output.metric_for_best_model}: there is no {key} among "
                  f"the evaluation metrics ({', '.join(sorted(metrics))}), so no best checkpoint is chosen",
                  file=sys.stderr)
        greater = output.greater_is_better if output.greater_is_better is not None else not key.endswith("loss")
        if value is not None and (state.best_metric is None or
                                  (value > state.best_metric if greater else value < state.best_metric)):
            state.best_metric, state.best_step = value, state.global_step
    record = {**metrics, "global_step": state.global_step, "epoch": epoch_progress(run, state)}
    run.trackers.log(record, state.global_step)
    state.log_history.append(record)
    return metrics


def save_checkpoint(run: Run, state: TrainState) -> str:
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
        try:
            _write_checkpoint(run, state, path, full_state, shards)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from e
        except Exception as e:  # torch.save / safetensors report a failed write as RuntimeError and their own types
            if "space" in str(e).lower() or "write" in str(e).lower():
                raise OSError(errno.ENOSPC, str(e), path) from e
            raise
    D.barrier()
    state.last_model_checkpoint = state.unconfirmed_checkpoint = path
    if state.best_step == state.global_step:
        state.best_model_checkpoint = path
    return path


DIVERGED = "diverged.json"  # in a checkpoint whose weights gave a non-finite loss: resume refuses it


def _mark_diverged(run: Run, state: TrainState, result: StepResult) -> None:
    """Mark the checkpoint whose weights gave the non-finite value, so that no resume picks it up unawares."""
    if state.unconfirmed_checkpoint and run.par.main and os.path.isdir(state.unconfirmed_checkpoint):
        write_json_atomic(os.path.join(state.unconfirmed_checkpoint, DIVERGED),
                          {"step": state.global_step + 1, "loss": str(result.loss),
                           "grad_norm": str(result.grad_norm), "last_good_checkpoint": state.good_checkpoint})


def _check_finite(run: Run, state: TrainState) -> None:
    """A checkpoint is never written from non-finite weights (inf/NaN after an update that overflowed): the run
    stops with the same message as a non-finite loss. Raises TrainingDiverged."""
    import torch

    from tunesmith.train import distributed as D

    def _local(p):  # an FSDP2 shard is checked where it lives; the ranks then agree
        return p.to_local() if hasattr(p, "to_local") else p

    bad = next((n for n, p in run.accelerator.unwrap_model(run.model).named_parameters()
                if p.requires_grad and _local(p).numel() and not bool(torch.isfinite(_local(p).detach()).all())), None)
    if run.par.kind == "fsdp":
        bad = next((b for b in D.gather(bad) if b is not None), None)
    if bad is not None:
        result = StepResult(float("nan"), 0, float("nan"), {}, 0)
        err = diverged(result, state)
        raise TrainingDiverged(f"the weights hold inf/NaN after step {state.global_step} ({bad}), so "
                               f"checkpoint-{state.global_step} was not saved. "
                               + str(err).split("training stopped before applying that step.", 1)[1].strip())


def _write_checkpoint(run: Run, state: TrainState, path: str, full_state, shards: str) -> None:
    import torch

    output = run.output
    with atomic_dir(path) as tmp:
        run.save_model(run.accelerator.unwrap_model(run.model), tmp, full_state)
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
    best = path if state.best_step == state.global_step else state.best_model_checkpoint
    rotate_checkpoints(run.run_dir, output.save_total_limit, best)
    if output.create_checkpoint_symlink:
        update_symlink(os.path.join(run.run_dir, "last"), path)
        if best and os.path.isdir(best):
            update_symlink(os.path.join(run.run_dir, "best"), best)


def end_epoch(run: Run, state: TrainState) -> None:
    """The epoch is used up: the next one starts from its first batch; epoch-strategy eval and save are due."""
    state.epoch += 1
    state.batches_done = 0
    if state.global_step < state.total_steps:
        if run.eval_rows and run.output.eval_strategy == "epoch":
            evaluate(run, state)
        if run.output.save_strategy == "epoch":
            with signals_deferred():
                save_checkpoint(run, state)


def summarise(run: Run, state: TrainState, total_tokens: int, runtime: float) -> TrainState:
    """The run's summary (checkpoints, best metric, runtime in seconds, tokens/s, memory in GiB), written to the
    trackers and the history."""
    summary = {"last_model_checkpoint": state.last_model_checkpoint,
               "best_model_checkpoint": state.best_model_checkpoint, "best_metric": state.best_metric,
               "global_step": state.global_step, "train_runtime": round(runtime, 2),
               "train_tokens_per_second": round(total_tokens / max(runtime, 1e-9), 1), "memory(GiB)": memory_gib()}
    run.trackers.write_summary(summary)
    state.log_history.append(summary)
    return state


def _progress_bar(run: Run, state: TrainState):
    from tqdm.auto import tqdm
    return tqdm(total=state.total_steps, initial=state.global_step, desc="train", dynamic_ncols=True,
                disable=not sys.stderr.isatty() or not run.par.main, mininterval=0.5)
