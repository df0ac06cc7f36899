"""What stops a training run mid-way, and the one message each gives instead of a traceback.

- A signal (SIGTERM from a scheduler, Ctrl-C): `signals_stop_training` turns it into an exception at once — or, inside
  `signals_deferred` (a checkpoint being written and renamed), when that block ends — and `stop_message` into one
  Interrupted error naming the step, the last checkpoint and how to resume. No checkpoint is saved on a signal.
- A write the disk refuses (full, quota, permissions, read-only; torch's and safetensors' wordings of one too, see
  tunesmith.files.failed_write): `disk_error`, naming the file and the last good checkpoint.
- A loss or gradient that is not finite (or sampling that met inf/NaN probabilities, GRPO): `diverged`, raised before
  the update is applied; `mark_diverged` writes diverged.json into the checkpoint whose weights gave it, so that no
  resume picks it up unawares.

`failures_explained` wraps the loop's steps and turns the last two into their messages. `state` here is the loop's
checkpoint.TrainState (read only).
"""
from __future__ import annotations

import contextlib
import errno
import math
import os

from tunesmith.errors import TunesmithError
from tunesmith.files import write_json_atomic


class TrainingDiverged(TunesmithError):
    pass


class NonFiniteSampling(TunesmithError):
    """Generation (GRPO's rollouts) met inf/NaN probabilities: the weights diverged before a loss could show it."""


def raise_sampling_errors(completions, who: str = "policy") -> None:
    """Raise the first error among the engine's completions of a training round (GRPO's rollouts, GKD's on-policy
    samples): NonFiniteSampling for inf/NaN next-token probabilities (the `who`'s weights diverged), else the error
    itself."""
    for c in completions:
        if c.error is not None:
            text = str(c.error).lower()
            if isinstance(c.error, RuntimeError) and ("inf" in text or "nan" in text):
                raise NonFiniteSampling(f"the {who}'s next-token probabilities hold inf or NaN: {c.error}") from None
            raise c.error


DIVERGED = "diverged.json"  # in a checkpoint whose weights gave a non-finite loss: resume refuses it


def diverged(loss: float, grad_norm: float, state) -> TrainingDiverged:
    """The error for a non-finite loss or gradient at the coming step. It names as good only a checkpoint whose
    weights a later step turned into a finite loss and gradient; the checkpoint saved just before this step holds
    the very weights that gave the non-finite value, and is named as such."""
    what = f"the loss became {loss}" if not math.isfinite(loss) else \
        f"the gradient norm became {grad_norm} (loss {loss:.4g})"
    good = state.good_checkpoint or "none (no checkpoint's weights have given a finite step yet)"
    bad = (f" {state.unconfirmed_checkpoint} holds the weights that gave it: do not resume from it."
           if state.unconfirmed_checkpoint else "")
    return TrainingDiverged(
        f"{what} at step {state.global_step + 1}; training stopped before applying that step.{bad} Last good "
        f"checkpoint (a later step gave a finite loss from its weights): {good}. Try a lower --learning_rate or "
        f"--max_grad_norm 1.0" + (" (from a checkpoint: with --resume_only_model true, since a full resume "
                                  "restores the old learning-rate schedule)" if state.good_checkpoint else "")
        + "; a float16 run can also use --torch_dtype bfloat16.")


def mark_diverged(state, loss: float, grad_norm: float, main: bool) -> None:
    """Mark the checkpoint whose weights gave the non-finite value, so that no resume picks it up unawares (rank 0
    writes; main: whether this is rank 0)."""
    if state.unconfirmed_checkpoint and main and os.path.isdir(state.unconfirmed_checkpoint):
        write_json_atomic(os.path.join(state.unconfirmed_checkpoint, DIVERGED),
                          {"step": state.global_step + 1, "loss": str(loss),
                           "grad_norm": str(grad_norm), "last_good_checkpoint": state.good_checkpoint})


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def failures_explained(state, main: bool):
    """Around the loop's steps: sampling that met inf/NaN (GRPO) becomes TrainingDiverged (its checkpoint marked
    as `mark_diverged` does), and a write the disk refused becomes `disk_error`'s one message; any other error
    passes unchanged."""
    try:
        yield
    except NonFiniteSampling as e:  # GRPO: the weights give non-finite probabilities before any loss is taken
        mark_diverged(state, float("nan"), float("nan"), main)
        raise TrainingDiverged(str(diverged(float("nan"), float("nan"), state)).replace(
            "the loss became nan", f"sampling became impossible ({e})", 1)) from None
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise disk_error(e, state) from None


def disk_error(e: OSError, state) -> TunesmithError:
    """One message for a write the disk refused mid-run (full, quota, permissions, read-only; EIO: a write torch
    or safetensors reported failed with room left on the disk): the file, what it
    is, why, and the last good checkpoint to resume from. Checkpoints are renamed into place only when complete,
    so none that looks complete is left half-written."""
    path = e.filename or "?"
    what = "a checkpoint" if ".tmp-checkpoint" in path or "checkpoint-" in path else \
        {"logging.jsonl": "the training log", "completions.jsonl": "the GRPO completions log"}.get(
            os.path.basename(path), "a run file")
    why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
           errno.EROFS: "the file system is read-only",
           errno.EIO: f"the write failed ({e.strerror}) with room left on the disk"}.get(e.errno, "permission denied")
    fix = {errno.ENOSPC: "Free some space", errno.EDQUOT: "Free some space (or raise the quota)",
           errno.EROFS: "Remount it writable (or choose another --output_dir)",
           errno.EIO: "Check the disk (a quota, a file-size limit, the storage itself)"}.get(
        e.errno, "Fix the permissions (or choose another --output_dir)")
    good = state.good_checkpoint or state.last_model_checkpoint
    return TunesmithError(
        f"could not write {what} ({path}): {why}. Training stopped at step {state.global_step}; every complete "
        f"checkpoint is intact (a checkpoint is renamed into place only once fully written). Last good checkpoint: "
        f"{good or 'none'}. {fix} and "
        + (f"resume with --resume_from_checkpoint {good}" if good else "start again"))


class _Signalled(BaseException):
    """Raised by the SIGTERM/SIGINT handler in the training process (a BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALS = {"deferred": 0, "pending": None}  # inside `signals_deferred`: the signal that came, raised at its end


@contextlib.contextmanager
def signals_stop_training():
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
def stop_message():
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
        state = seen.state  # None: stopped before the run was prepared (step 0, no checkpoint)
        step, total = (state.global_step, state.total_steps) if state else (0, 0)
        last = state.last_model_checkpoint if state else None
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} at step {step}"
            + (f" of {total}" if total else "") + "; no checkpoint was saved on the signal. "
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
