"""The training loop: the one place where batches become optimiser steps.

`train` reads top to bottom: `prepare_run` (optimiser and schedule: optim.py; distributed wrapping; with
--resume_from_checkpoint the restored weights, optimiser, schedule, RNG and data position: checkpoint.py), then per
step `train_step` (the step's `gradient_accumulation_steps` micro-batches, each summed loss term divided by its units
— trained tokens, pairs — counted over the whole step; clip; `optimizer.step()`), then what is due at that step: a
log record, `evaluate`, `checkpoint.save_checkpoint`; `end_epoch` at each epoch's end. A non-finite loss or gradient
stops the run before the update, a signal or a full disk with one message (interrupts.py). Every step is a
module-level function over the frozen `Run` and the mutable `checkpoint.TrainState`. Training methods plug in as an
`Objective`; batching is the collator's business, so packing changes the collator, not this file. Which
micro-batches a step trains on (seeded per-epoch order, each rank's slice, a stream read as it goes) is
microbatches.py's.

    recipe.main → loop.train → loop.train_step → optimizer.step()
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tunesmith.errors import TunesmithError
from tunesmith.train.checkpoint import (DEEPSPEED_TAG, TrainState, check_steps_left, restore, resume_schedule,
                                        resume_weights, save_checkpoint)
from tunesmith.train.interrupts import (NonFiniteSampling, TrainingDiverged,  # noqa: F401 - the loop's errors
                                        diverged, failures_explained, mark_diverged, signals_deferred,
                                        signals_stop_training, stop_message)
from tunesmith.train.microbatches import epoch_batches, step_batches, to_device
from tunesmith.train.optim import build_optimizer, build_scheduler


@dataclass
class Objective:
    """How one training method turns a batch into a loss.

    loss(model, batch) -> ({unit: summed loss term}, {statistic: summed value}); a method may mix terms with
        different units (DPO: a per-pair loss plus an NLL over chosen tokens).
    count(batch) -> {unit: how many in this batch}; each term is divided by its units summed over the whole
        accumulated step, so gradient accumulation gives the same step as one large batch.
    metrics(summed statistics) -> the values to log (means), e.g. token_acc or rewards/accuracies.
    hooks: training state outside the model and optimiser (a reference that moves, TR-DPO; GRPO's round in
        progress; LISA's trained layers): objects with begin(model, global_step) — before this run's first step —,
        after_step(model, global_step), save(checkpoint folder) and load(checkpoint folder); often empty.
    after_update: f(model, global_step, total_steps) after each optimiser update, before the gradients are cleared
        (a tuner's own step: AdaLoRA's rank allocation, train/tuners.py); not run under DeepSpeed.
    """
    name: str
    loss: Callable[[Any, dict], tuple[dict, dict]]
    count: Callable[[dict], dict]
    metrics: Callable[[dict], dict]
    hooks: tuple = ()
    after_update: tuple = ()


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
    when the loss is not finite (before the update: the weights are not touched), Interrupted on SIGTERM/Ctrl-C,
    TunesmithError when the disk refuses a write (interrupts.py)."""
    with signals_stop_training(), stop_message() as seen:
        run, state = prepare_run(cfg, model, objective, train_rows, eval_rows, collate, run_dir, save_model,
                                 trackers, args_extra)
        seen.state = state
        for hook in objective.hooks:  # state that starts from the step reached (LISA's layers)
            hook.begin(run.model, state.global_step)
        with failures_explained(state, run.par.main):
            start, start_step, total_tokens = time.time(), state.global_step, 0
            window, bar = Window(), _progress_bar(run, state)
            while state.global_step < state.total_steps:
                for micro in step_batches(run, state):
                    result = train_step(run, micro, state)
                    if not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
                        bar.close()
                        mark_diverged(state, result.loss, result.grad_norm, run.par.main)
                        raise diverged(result.loss, result.grad_norm, state)
                    state.batches_done += result.micro_batches
                    state.global_step += 1
                    if state.unconfirmed_checkpoint:  # its weights just gave a finite loss and gradient
                        state.good_checkpoint, state.unconfirmed_checkpoint = state.unconfirmed_checkpoint, None
                    for hook in objective.hooks:
                        hook.after_step(run.model, state.global_step)
                    total_tokens += result.tokens
                    _accumulate(window, result)
                    bar.update(1)
                    if log_due(run.output, state):
                        log_record(run, state, window, result, start, start_step, bar)
                        window = Window()
                    if eval_due(run, state):
                        evaluate(run, state)
                    if save_due(run.output, state):
                        with signals_deferred():
                            save_checkpoint(run, state)
                # the batches ran out before the last step (a stream's end is only known here), or the last step
                # took the epoch's last batch
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
        check_steps_left(output, optim, total_steps, math.ceil(n_batches / gas) if n_batches else 0)
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
    if fsdp:
        if output.resume_from_checkpoint and not output.resume_only_model:
            D.load_sharded_optimizer(model, optimizer, os.path.join(output.resume_from_checkpoint,
                                                                    D.FSDP_OPTIMIZER_DIR))
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if ds and output.resume_from_checkpoint and not output.resume_only_model:
        model.load_checkpoint(output.resume_from_checkpoint, tag=DEEPSPEED_TAG, load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    if output.resume_from_checkpoint:  # after every optimiser state: they carry the checkpoint's rates
        resume_schedule(output, optim, scheduler, state.global_step, total_steps, par.main)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    run = Run(optim, output, cfg.data.dataset_shuffle, cfg.args, model, optimizer, scheduler, accelerator, par,
              objective, train_rows, eval_rows, collate, run_dir, save_model, trackers, args_extra, n_batches, params)
    return run, state


def train_step(run: Run, micro: list[dict], state: TrainState) -> StepResult:
    """Forward and backward over the step's micro-batches, then clip (--max_grad_norm > 0), step the optimiser (and
    the objective's after_update) and the schedule; the gradient norm is taken before clipping.

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
        for update in objective.after_update:
            update(model, state.global_step + 1, state.total_steps)
        run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step used
    run.scheduler.step()
    return StepResult(loss_value, tokens, grad_norm, stats, len(micro), lr)


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
    run.trackers.log(record, step, completions=True)  # W&B's completions table (--log_completions) goes with it
    state.log_history.append(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_second']:.0f}")
    return record


def epoch_progress(run: Run, state: TrainState) -> float:
    """Epochs done, with the current one's fraction (4 decimals); a stream's fraction is unknown: epochs done."""
    return round(state.epoch + (state.batches_done / run.n_batches if run.n_batches else 0), 4)


def evaluate(run: Run, state: TrainState) -> dict:
    """eval_* on the validation rows with the training objective; updates the best metric; logs the record."""
    import torch

    from tunesmith.train import distributed as D

    output, model = run.output, run.model
    model.eval()
    with torch.no_grad():
        # rows generated at each evaluation (GRPO's validation prompts) come from the rows' own fresh()
        rows = run.eval_rows.fresh() if hasattr(run.eval_rows, "fresh") else run.eval_rows
        metrics = evaluate_objective(D.bare_model(run.accelerator, run.par, model), run.objective, rows, run.collate,
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


def evaluate_objective(model, objective: Objective, rows: list, collate: Callable, batch_size: int) -> dict:
    """eval_loss (every term divided by its units over the whole set) and eval_<metric> for each metric."""
    import torch

    device = next(model.parameters()).device
    terms, units, stats = {}, {}, {}
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = to_device(collate(rows[i:i + batch_size]), device)
            parts, st = objective.loss(model, b)
            _add(terms, {k: float(v) for k, v in parts.items()})
            _add(units, objective.count(b))
            _add(stats, st)
    loss = sum(v / max(units[k], 1) for k, v in terms.items())
    return {"eval_loss": signif(loss), **{f"eval_{k}": v for k, v in objective.metrics(stats).items()}}


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


def signif(x: float, digits: int = 6) -> float:
    """x for the log: `digits` decimal places, and for a small value (a KL of 1e-7) `digits` significant digits,
    where rounding to decimal places would log 0."""
    if not math.isfinite(x):
        return x
    return round(x, digits) if abs(x) >= 0.01 else float(f"{x:.{digits}g}")


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


def _add(into: dict, values: dict) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0) + v


def _progress_bar(run: Run, state: TrainState):
    from tqdm.auto import tqdm
    return tqdm(total=state.total_steps, initial=state.global_step, desc="train", dynamic_ncols=True,
                disable=not sys.stderr.isatty() or not run.par.main, mininterval=0.5)
