"""The moment after a crash: a run killed (SIGKILL) in the middle of its second checkpoint save leaves the
unfinished `.tmp-checkpoint-N-PID` folder in its run directory; resuming from the first checkpoint must work on the
first try and reproduce the uninterrupted run (issue #27, item 1: it used to die in the leftover cleanup with
FileNotFoundError, and only a second attempt worked)."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import losses_by_step, run_dir_of, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# `tunesmith ARGV` in a fresh process whose second checkpoint save is killed after writing its files, before the
# rename that would complete it (atomic_dir's): what a SIGKILL (OOM killer, preemption) does to a save in progress
KILLED_IN_SECOND_SAVE = """
import contextlib, os, signal, sys
import tunesmith.train.checkpoint as checkpoint
atomic_dir, saves = checkpoint.atomic_dir, []
@contextlib.contextmanager
def dies_before_the_rename(final_path):
    with atomic_dir(final_path) as tmp:
        yield tmp
        saves.append(final_path)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
checkpoint.atomic_dir = dies_before_the_rename
from tunesmith.cli import main
sys.exit(main(sys.argv[1:]))
"""

METHODS = {
    "sft": ["sft", "--dataset", os.path.join(REPO, "examples", "data", "capitals_messages.jsonl")],
    "dpo": ["rlhf", "--rlhf_type", "dpo", "--dataset", os.path.join(REPO, "examples", "data", "dpo_messages.jsonl")],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_after_a_kill_during_the_second_save(method, tiny_models, tmp_path):
    command, *method_flags = METHODS[method]
    common = ["--model", tiny_models("qwen2"), *method_flags, "--train_type", "lora", "--lora_dropout", "0",
              "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3", "--report_to", "none"]
    full = train(command, *common, "--output_dir", str(tmp_path / "full"))

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_SECOND_SAVE, command, *common, "--output_dir", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = run_dir_of(out)
    names = os.listdir(run_dir)
    assert "checkpoint-2" in names and "checkpoint-4" not in names, names
    assert any(n.startswith(".tmp-checkpoint-4-") for n in names), names  # the save the kill cut short

    resumed = train(command, *common, "--output_dir", str(out),
                    "--resume_from_checkpoint", os.path.join(run_dir, "checkpoint-2"))
    assert not any(n.startswith(".tmp-") for n in os.listdir(run_dir)), "the dead run's unfinished save is removed"
    a, b = losses_by_step(full["run_dir"]), losses_by_step(resumed["run_dir"])
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
