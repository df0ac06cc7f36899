"""Trackers: logging.jsonl always; TensorBoard, SwanLab, W&B, MLflow and Trackio through their own libraries.

A tracker that is missing or fails (e.g. the network is gone) never stops training: it warns once and is
switched off, and logging.jsonl keeps every record. Tokens are passed to tracker libraries in memory only.
Warnings go through tunesmith.log.note (stderr, rank 0 only; the other ranks get a disabled fan-out anyway).
--run_name names the run in W&B, MLflow, SwanLab and Trackio (as transformers' run_name does); default: the run
folder. Trackio logs to its local store ($TRACKIO_DIR, default ~/.cache/huggingface/trackio) unless
--trackio_space_id names a Hugging Face Space. With --log_completions, GRPO's and GKD's completions also go to W&B
as ms-swift's `completions` table at each logging step (Trackers.hold_completions, CompletionRows).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from tunesmith.config.groups import TrackArgs
from tunesmith.log import note

ALL_TRACKERS = ("tensorboard", "swanlab", "wandb", "mlflow", "trackio")


def _run_name(run_dir: str, track: TrackArgs) -> str:
    """--run_name, else the run folder's name (vN-YYYYMMDD-HHMMSS)."""
    return track.run_name or os.path.basename(run_dir)


def _numeric(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class JsonlLog:
    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict) -> None:
        """Append one record; an OSError (a full disk) names this file."""
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from e


class _TensorBoard:
    def __init__(self, run_dir: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=os.path.join(run_dir, "runs"))
        self.w.add_text("args", "```\n" + json.dumps(config, indent=2, ensure_ascii=False, default=str) + "\n```")

    def log(self, metrics: dict, step: int):
        for k, v in metrics.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def close(self):
        self.w.close()


class _SwanLab:
    """SwanLab through its own SDK (not transformers' callback, which breaks with swanlab 0.10.3).

    The API key is handed to the SDK in memory only. SwanLab's runtime probe records the process command line
    (/proc/self/cmdline), which would put `--swanlab_token` on disk, so that probe is switched off."""

    MODES = {"cloud": "online", "online": "online", "local": "local", "offline": "offline", "disabled": "disabled"}

    def __init__(self, run_dir: str, config: dict, track: TrackArgs):
        import swanlab

        token = track.swanlab_token or os.environ.get("SWANLAB_API_KEY")
        mode = self.MODES[track.swanlab_mode or "cloud"]
        settings = swanlab.Settings(probe={"runtime": False})
        if mode == "online" and token:
            swanlab.login(api_key=token, save=False)
        self.run = swanlab.init(project=track.swanlab_project, workspace=track.swanlab_workspace,
                                name=track.swanlab_exp_name or _run_name(run_dir, track), config=config, mode=mode,
                                log_dir=os.path.join(run_dir, "swanlog"), settings=settings)
        self.swanlab = swanlab

    def log(self, metrics: dict, step: int):
        self.swanlab.log(metrics, step=step)

    def close(self):
        self.swanlab.finish()


class _Wandb:
    """W&B through its own SDK. Its system metadata (x_disable_meta) is switched off: it records the process command
    line, which would put `--hub_token`/`--swanlab_token` in the run's files (and upload them); the config it gets
    is args.json's record, secrets redacted."""

    def __init__(self, run_dir: str, config: dict, track: TrackArgs):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunesmith"), name=_run_name(run_dir, track),
                              config=config, dir=run_dir, settings=wandb.Settings(x_disable_meta=True))

    def log(self, metrics: dict, step: int, table: Optional[tuple] = None):
        """table: (columns, rows) of --log_completions, logged with the step's metrics as a new W&B table named
        `completions` (ms-swift's: one table per logging step; no type checks across rows, so a column of mixed
        JSON values is logged, not refused)."""
        if table is not None:
            columns, rows = table
            metrics = {**metrics, "completions": self.wandb.Table(columns=columns, data=rows, allow_mixed_types=True)}
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: str, config: dict, track: TrackArgs):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=_run_name(run_dir, track))
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, metrics: dict, step: int):
        self.mlflow.log_metrics(metrics, step=step)

    def close(self):
        self.mlflow.end_run()


class _Trackio:
    """Trackio through its own library, in its local mode unless --trackio_space_id is given. The config is
    args.json's record (secrets already redacted); no token is handed to Trackio (a Space upload uses the Hugging
    Face login of the machine)."""

    def __init__(self, run_dir: str, config: dict, track: TrackArgs):
        import trackio

        self.run = trackio.init(project=track.project or "tunesmith", name=_run_name(run_dir, track),
                                config=config, space_id=track.trackio_space_id, bucket_id=track.trackio_bucket_id)

    def log(self, metrics: dict, step: int):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class CompletionRows:
    """The rows of the next W&B completions table, as ms-swift builds it: a `step` column (the logging step, as a
    string), then each row's columns in order; with unique_prompts (--wandb_log_unique_prompts), only the first row
    of each prompt (pandas' drop_duplicates(subset=["prompt"]) in ms-swift)."""

    def __init__(self, unique_prompts: bool = False):
        self.unique_prompts = unique_prompts
        self.rows: list[dict] = []
        self.latest_round = False

    def hold(self, rows: list[dict], latest_round: bool) -> None:
        """latest_round True (GRPO): the rows replace those held and stay until the next round's, so each logging
        step shows the last round (ms-swift keeps GRPO's last --generation_batch_size completions); False (GKD):
        they join those held, which the next logging step takes (ms-swift clears GKD's once logged)."""
        self.rows = list(rows) if latest_round else self.rows + list(rows)
        self.latest_round = latest_round

    def take(self, step: int) -> Optional[tuple]:
        """(columns, rows as lists) for the table of logging step `step`, or None when nothing is held."""
        rows = self.rows
        if not self.latest_round:
            self.rows = []
        if not rows:
            return None
        if self.unique_prompts:
            first: dict = {}
            for r in rows:
                first.setdefault(_key(r.get("prompt")), r)
            rows = list(first.values())
        columns = ["step"] + list(dict.fromkeys(k for r in rows for k in r))
        return columns, [[str(step)] + [r.get(c) for c in columns[1:]] for r in rows]


def _key(value) -> str:
    """A hashable form of a prompt (text, or a list of messages)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


_EXTRAS = {"tensorboard": "tensorboard", "swanlab": "swanlab", "wandb": "wandb", "mlflow": "mlflow",
           "trackio": "trackio"}
_CLASSES = {"tensorboard": None, "swanlab": _SwanLab, "wandb": _Wandb, "mlflow": _MLflow, "trackio": _Trackio}


class Trackers:
    """Fan-out to the trackers named in --report_to, plus logging.jsonl. track: the tracker flags (TrackArgs:
    training's output slice, eval's command), read by the trackers that take a name, key or project."""

    def __init__(self, run_dir: str, report_to: list[str], config: dict, track: Optional[TrackArgs] = None,
                 enabled: bool = True, unique_prompts: bool = False):
        self.jsonl = JsonlLog(os.path.join(run_dir, "logging.jsonl")) if enabled else None
        # --log_completions' rows waiting for the next training record (W&B's table); unique_prompts: rlhf's
        # --wandb_log_unique_prompts (each prompt's first row only)
        self.completions = CompletionRows(unique_prompts)
        names = [n.lower() for n in report_to or []]
        if "all" in names:
            names = list(ALL_TRACKERS)
        names = [n for n in dict.fromkeys(names) if n != "none"]
        self.active: dict[str, Any] = {}
        if not enabled:
            return
        for n in names:
            if n not in ALL_TRACKERS:
                note(f"--report_to {n}: unknown tracker (use {', '.join(ALL_TRACKERS)}, all or none); skipped")
                continue
            try:
                if n == "tensorboard":
                    self.active[n] = _TensorBoard(run_dir, config)
                else:
                    self.active[n] = _CLASSES[n](run_dir, config, track)
            except ImportError:
                note(f"--report_to {n}: {n} is not installed (pip install 'tunesmith[{_EXTRAS[n]}]'); "
                      f"metrics still go to logging.jsonl")
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                note(f"--report_to {n}: could not start ({type(e).__name__}: {e}); metrics still go to logging.jsonl")

    @property
    def takes_completions(self) -> bool:
        """Whether a tracker takes --log_completions' table (W&B, on rank 0), so rows are worth building."""
        return "wandb" in self.active

    def hold_completions(self, rows: list[dict], latest_round: bool) -> None:
        """--log_completions: rows ({"prompt": …, "completion": …, then the method's columns}) for the W&B table
        of the next training record (`log(…, completions=True)`); nothing is held unless W&B is active (only rank
        0's trackers are). See CompletionRows.hold for latest_round."""
        if self.takes_completions:
            self.completions.hold(rows, latest_round)

    def log(self, record: dict, step: int, completions: bool = False) -> None:
        """Write the record to logging.jsonl and its finite numbers to every active tracker at `step`. completions:
        a training record at a logging step, which W&B gets with the completions held (ms-swift logs its
        `completions` table at each logging step)."""
        if self.jsonl:
            self.jsonl.write(record)
        metrics = _numeric({k: v for k, v in record.items() if k not in ("global_step", "step")})
        table = self.completions.take(step) if completions and self.takes_completions else None
        for name in list(self.active):
            try:
                if name == "wandb" and table is not None:
                    self.active[name].log(metrics, step, table)
                else:
                    self.active[name].log(metrics, step)
            except Exception as e:  # noqa: BLE001
                note(f"{name} stopped logging ({type(e).__name__}: {e}); switched off, logging.jsonl continues")
                self.active.pop(name, None)

    def write_summary(self, record: dict) -> None:
        if self.jsonl:
            self.jsonl.write(record)

    def close(self) -> None:
        for name, t in list(self.active.items()):
            try:
                t.close()
            except Exception:  # noqa: BLE001
                pass
        self.active.clear()
