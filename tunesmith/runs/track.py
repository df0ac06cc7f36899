"""Trackers: logging.jsonl always; TensorBoard, SwanLab, W&B, MLflow and Trackio through their own libraries.

A tracker that is missing or fails (e.g. the network is gone) never stops training: it warns once and is
switched off, and logging.jsonl keeps every record. Tokens are passed to tracker libraries in memory only.
Warnings go through tunesmith.log.note (stderr, rank 0 only; the other ranks get a disabled fan-out anyway).
--run_name names the run in W&B, MLflow, SwanLab and Trackio (as transformers' run_name does); default: the run
folder. Trackio logs to its local store ($TRACKIO_DIR, default ~/.cache/huggingface/trackio) unless
--trackio_space_id names a Hugging Face Space.
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
    def __init__(self, run_dir: str, config: dict, track: TrackArgs):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunesmith"), name=_run_name(run_dir, track),
                              config=config, dir=run_dir)

    def log(self, metrics: dict, step: int):
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


_EXTRAS = {"tensorboard": "tensorboard", "swanlab": "swanlab", "wandb": "wandb", "mlflow": "mlflow",
           "trackio": "trackio"}
_CLASSES = {"tensorboard": None, "swanlab": _SwanLab, "wandb": _Wandb, "mlflow": _MLflow, "trackio": _Trackio}


class Trackers:
    """Fan-out to the trackers named in --report_to, plus logging.jsonl. track: the tracker flags (TrackArgs:
    training's output slice, eval's command), read by the trackers that take a name, key or project."""

    def __init__(self, run_dir: str, report_to: list[str], config: dict, track: Optional[TrackArgs] = None,
                 enabled: bool = True):
        self.jsonl = JsonlLog(os.path.join(run_dir, "logging.jsonl")) if enabled else None
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

    def log(self, record: dict, step: int) -> None:
        if self.jsonl:
            self.jsonl.write(record)
        metrics = _numeric({k: v for k, v in record.items() if k not in ("global_step", "step")})
        for name in list(self.active):
            try:
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
