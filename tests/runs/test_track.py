"""--report_to trackio: a real training run logs to Trackio's local store (pointed into tmp_path with TRACKIO_DIR),
the values match logging.jsonl, no token is written, and a Trackio that is missing or fails is one note, never a
crash."""
import json
import os
import subprocess
import sys
import types

import pytest

from conftest import EXAMPLES, read_jsonl

TOKEN = "sk-swanlab-TOKEN-trackio-5e4d3c2b1a"

READ_BACK = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])))
"""


@pytest.mark.slow
def test_trackio_gets_the_metrics_and_never_the_token(tiny_models, tmp_path):
    pytest.importorskip("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    env.pop("TRACKIO_SPACE_ID", None)
    env.pop("TRACKIO_SERVER_URL", None)
    out = tmp_path / "output"
    argv = [sys.executable, "-m", "tunesmith", "sft", "--model", tiny_models("qwen2"),
            "--dataset", os.path.join(EXAMPLES, "capitals_messages.jsonl"), "--max_steps", "6", "--logging_steps", "2",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--output_dir", str(out),
            "--dataloader_num_workers", "0", "--report_to", "trackio", "--project", "tunesmith-test",
            "--run_name", "sft-run", "--swanlab_token", TOKEN]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--report_to trackio" not in r.stderr  # no "could not start" / "not installed" note
    (run_dir,) = [os.path.join(out, d) for d in os.listdir(out)]
    logged = {rec["global_step"]: rec for rec in read_jsonl(os.path.join(run_dir, "logging.jsonl"))
              if "loss" in rec and "global_step" in rec and "eval_loss" not in rec}
    back = subprocess.run([sys.executable, "-c", READ_BACK, "tunesmith-test", "sft-run"], capture_output=True,
                          text=True, env=env, check=True, timeout=120)
    tracked = {row["step"]: row for row in json.loads(back.stdout.strip().splitlines()[-1])}
    assert sorted(tracked) == sorted(logged) == [1, 2, 4, 6]
    for step, rec in logged.items():
        for key in ("loss", "learning_rate", "grad_norm", "token_acc"):
            assert tracked[step][key] == pytest.approx(rec[key], rel=1e-6, abs=1e-9), (key, step)
    stored = b""
    for dirpath, _, files in os.walk(tmp_path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                data = fh.read()
            assert TOKEN.encode() not in data, os.path.join(dirpath, f)
            if dirpath.startswith(str(tmp_path / "trackio")):
                stored += data
    assert b"<redacted>" in stored and b"learning_rate" in stored  # the config went in, redacted


def _args(**kw):
    return types.SimpleNamespace(**{"project": None, "run_name": None, "trackio_space_id": None,
                                    "trackio_bucket_id": None, **kw})


def test_trackio_that_cannot_start_is_one_note(tmp_path, monkeypatch, capsys):
    trackio = pytest.importorskip("trackio")
    from tunesmith.runs.track import Trackers

    def broken_init(**kw):
        raise ConnectionError("no route to the Space")

    monkeypatch.setattr(trackio, "init", broken_init)
    t = Trackers(str(tmp_path), ["trackio"], {"a": 1}, _args())
    t.log({"loss": 1.0}, step=1)
    t.close()
    err = capsys.readouterr().err
    assert err.count("--report_to trackio") == 1 and "could not start (ConnectionError" in err
    assert "logging.jsonl" in err and t.active == {}
    assert read_jsonl(tmp_path / "logging.jsonl") == [{"loss": 1.0}]


def test_trackio_missing_is_one_note(tmp_path, monkeypatch, capsys):
    from tunesmith.runs.track import Trackers

    monkeypatch.setitem(sys.modules, "trackio", None)  # import trackio raises ImportError
    t = Trackers(str(tmp_path), ["trackio"], {}, _args())
    t.close()
    err = capsys.readouterr().err
    assert "trackio is not installed" in err and "tunesmith[trackio]" in err


def test_trackio_that_fails_while_logging_is_switched_off(tmp_path, monkeypatch, capsys):
    trackio = pytest.importorskip("trackio")
    from tunesmith.runs.track import Trackers

    class Run:
        def log(self, metrics, step):
            raise OSError("disk full")

        def finish(self):
            pass

    seen = {}

    def fake_init(**kw):
        seen.update(kw)
        return Run()

    monkeypatch.setattr(trackio, "init", fake_init)
    t = Trackers(str(tmp_path / "v0-run"), ["trackio"], {"lr": 1e-4}, _args(project="p", trackio_space_id="me/s"))
    os.makedirs(tmp_path / "v0-run", exist_ok=True)
    t.log({"loss": 2.0}, step=1)
    t.log({"loss": 1.0}, step=2)
    t.close()
    assert seen["project"] == "p" and seen["name"] == "v0-run" and seen["space_id"] == "me/s"
    assert seen["config"] == {"lr": 1e-4}
    assert capsys.readouterr().err.count("trackio stopped logging (OSError: disk full)") == 1
    assert len(read_jsonl(tmp_path / "v0-run" / "logging.jsonl")) == 2
