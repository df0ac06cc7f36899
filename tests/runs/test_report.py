"""Seeing a run: TensorBoard and SwanLab records (read back), no token on disk, plots, the HTML report in headless
Chromium, and comparing runs."""
import glob
import os
import shutil
import subprocess

import pytest

from conftest import EXAMPLES, read_jsonl, train
from tunesmith.config.parser import parse_args

TOKEN = "sk-swanlab-TOKEN-9f8e7d6c5b4a"


def _short_run(command, model_dir, out, *extra, dataset="capitals_messages.jsonl"):
    """6 steps of `tunesmith <command>` on an example file, logging every 2nd: recipe.main's result."""
    return train(command, "--model", model_dir, "--dataset", os.path.join(EXAMPLES, dataset), "--max_steps", "6",
                 "--logging_steps", "2", "--output_dir", str(out), "--per_device_train_batch_size", "4",
                 "--gradient_accumulation_steps", "1", *extra)


def _logged(run_dir):
    return {r["global_step"]: r for r in read_jsonl(os.path.join(run_dir, "logging.jsonl"))
            if "loss" in r and "global_step" in r and "eval_loss" not in r}


def _swanlab_scalars(run_dir):
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    out = {}
    (path,) = glob.glob(os.path.join(run_dir, "swanlog", "run-*", "run-*.swanlab"))
    reader = DataStoreReader()
    reader.open(path)
    for raw in reader:
        rec = Record()
        rec.ParseFromString(raw)
        if rec.HasField("scalar"):
            out[(rec.scalar.key, rec.scalar.step)] = rec.scalar.value.number
    reader.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "rlhf"])
def test_tensorboard_and_swanlab_get_the_metrics_and_never_the_token(tiny_models, tmp_path, command, monkeypatch):
    pytest.importorskip("swanlab")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # anything a library writes to the working directory is checked too
    out = tmp_path / "output"
    extra = ["--report_to", "tensorboard", "swanlab", "--swanlab_mode", "offline", "--swanlab_token", TOKEN,
             "--swanlab_project", "tunesmith-test", "--swanlab_exp_name", f"{command}-run"]
    if command == "rlhf":
        res = _short_run("rlhf", tiny_models("qwen2"), out, *extra, "--learning_rate", "5e-3",
                     dataset="dpo_messages.jsonl")
    else:
        res = _short_run("sft", tiny_models("qwen2"), out, *extra)
    run_dir = res["run_dir"]
    logged = _logged(run_dir)
    keys = ["loss", "learning_rate", "grad_norm"] + (["rewards/margins", "rewards/accuracies"] if command == "rlhf"
                                                     else ["token_acc"])
    events = EventAccumulator(os.path.join(run_dir, "runs"))
    events.Reload()
    swan = _swanlab_scalars(run_dir)
    for key in keys:
        tb = {e.step: e.value for e in events.Scalars(key)}
        assert sorted(tb) == sorted(logged) == [1, 2, 4, 6]
        for step, rec in logged.items():
            assert tb[step] == pytest.approx(rec[key], rel=1e-5, abs=1e-7)
            assert swan.get((key, step), 0.0) == pytest.approx(rec[key], rel=1e-6, abs=1e-9)
    assert "args" in "".join(events.Tags()["tensors"])  # the hyper-parameters, logged once
    config = open(glob.glob(os.path.join(run_dir, "swanlog", "run-*", "files", "config.yaml"))[0]).read()
    assert "learning_rate" in config and "<redacted>" in config
    for dirpath, _, files in os.walk(tmp_path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                assert TOKEN.encode() not in fh.read(), os.path.join(dirpath, f)


@pytest.mark.slow
def test_a_failing_tracker_never_stops_training(tiny_models, tmp_path, capsys):
    from tunesmith.runs.track import Trackers

    class Broken:
        calls = 0

        def log(self, metrics, step):
            Broken.calls += 1
            raise ConnectionError("network is gone")

        def close(self):
            pass

    real_init = Trackers.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.active["swanlab"] = Broken()

    Trackers.__init__ = init
    try:
        res = _short_run("sft", tiny_models("qwen2"), tmp_path / "o", "--report_to", "none")
    finally:
        Trackers.__init__ = real_init
    err = capsys.readouterr().err
    assert Broken.calls == 1 and err.count("swanlab stopped logging") == 1
    assert sorted(_logged(res["run_dir"])) == [1, 2, 4, 6]  # the local log kept every step


def test_missing_tracker_library_says_how_to_install(tmp_path, capsys):
    from tunesmith.runs.track import Trackers
    if shutil.which("wandb") or _importable("wandb"):
        pytest.skip("wandb is installed here")
    t = Trackers(str(tmp_path), ["wandb"], {}, parse_args("sft", []))
    assert "pip install 'tunesmith[wandb]'" in capsys.readouterr().err and not t.active


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


@pytest.mark.slow
def test_run_report_has_plots_args_data_and_checkpoints(tiny_models, tmp_path):
    res = _short_run("rlhf", tiny_models("qwen2"), tmp_path / "o", "--report_to", "none", "--save_steps", "3",
                 "--swanlab_token", TOKEN, dataset="dpo_messages.jsonl")
    run_dir = res["run_dir"]
    images = sorted(os.listdir(os.path.join(run_dir, "images")))
    assert {"loss.png", "learning_rate.png", "grad_norm.png", "tokens_per_second.png", "memory__GiB.png",
            "rewards.png", "reward_margin.png", "reward_accuracy.png"} <= set(images)
    page = open(os.path.join(run_dir, "report.html"), encoding="utf-8").read()
    assert page.count("<img") == len(images) and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # opens offline
    assert "checkpoint-3" in page and "checkpoint-6" in page and "train_rows" in page
    assert TOKEN not in page and "&lt;redacted&gt;" in page


@pytest.mark.slow
def test_comparing_two_runs_overlays_curves_and_lists_differing_args(tiny_models, tmp_path):
    from tunesmith.cli import main
    from tunesmith.runs.report import CHARTS, chart_lines, load_run

    a = _short_run("sft", tiny_models("qwen2"), tmp_path / "a", "--report_to", "none", "--learning_rate", "1e-3")
    b = _short_run("sft", tiny_models("qwen2"), tmp_path / "b", "--report_to", "none", "--learning_rate", "5e-3")
    out = tmp_path / "compare.html"
    assert main(["report", a["run_dir"], b["run_dir"], "--output", str(out)]) == 0
    runs = [load_run(a["run_dir"]), load_run(b["run_dir"])]
    loss_chart = dict(CHARTS)["loss"]
    assert {r.path for r, _ in chart_lines(runs, loss_chart)} == {r.path for r in runs}  # both on one chart
    page = out.read_text(encoding="utf-8")
    row = page[page.index("Arguments that differ"):page.index("<h2>Charts")]
    assert "<td>learning_rate</td><td>0.001</td><td>0.005</td>" in row
    assert "<td>lora_rank</td>" not in row  # equal arguments are not listed
    # rebuilding one run's report on demand
    os.remove(os.path.join(a["run_dir"], "report.html"))
    assert main(["report", a["run_dir"]]) == 0 and os.path.isfile(os.path.join(a["run_dir"], "report.html"))


@pytest.mark.slow
def test_report_opens_in_headless_chromium_and_shows_charts(tiny_models, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    import numpy as np
    from PIL import Image

    res = _short_run("sft", tiny_models("qwen2"), tmp_path / "o", "--report_to", "none")
    page = os.path.join(res["run_dir"], "report.html")
    shot = tmp_path / "shot.png"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(common + ["--dump-dom", f"file://{page}"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<img") >= 5 and "Final metrics" in dom.stdout
    r = subprocess.run(common + [f"--screenshot={shot}", "--window-size=1320,2400", f"file://{page}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert (img.std(axis=(0, 1)) > 20).all()                       # not a blank page
    blue = (abs(img[..., 0] - 31) < 30) & (abs(img[..., 1] - 119) < 30) & (abs(img[..., 2] - 180) < 30)
    assert blue.sum() > 500                                        # matplotlib's curve colour: charts are drawn
