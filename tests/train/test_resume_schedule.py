"""Resuming with a different length (--max_steps, --num_train_epochs), schedule or warm-up: the learning-rate
schedule is rebuilt for this run and goes on from the checkpoint's step as an uninterrupted run with these settings
would (transformers #34053: the first resumed step used the old schedule's rate — 0 after its end — and the next
jumped into the new one, with no word)."""
import os

import pytest

from conftest import read_jsonl, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import FlagError
from tunesmith.train import recipe


def _rates(run_dir):
    """{global_step: learning_rate} of a run's logging.jsonl (the resumed run's carries the checkpoint's steps)."""
    return {r["global_step"]: r["learning_rate"] for r in read_jsonl(os.path.join(run_dir, "logging.jsonl"))
            if "learning_rate" in r}


def _data(tmp_path, n=16):
    words = "red blue green black white gold pink gray".split()
    rows = [{"messages": [{"role": "user", "content": "say " + " ".join(words[: 1 + i % 7])},
                          {"role": "assistant", "content": " ".join(words[: 1 + (3 * i) % 8])}]} for i in range(n)]
    return write_jsonl(tmp_path / "rows.jsonl", rows)


def _run(argv):
    return recipe.main(parse_args("sft", argv))


def _common(tiny_models, tmp_path, *extra):
    return ["--model", tiny_models("qwen2"), "--dataset", _data(tmp_path), "--train_type", "lora",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
            "--report_to", "none", "--learning_rate", "5e-3", "--save_steps", "2", *extra]


def _assert_same_rates(full: dict, resumed: dict, steps) -> None:
    for step in steps:
        a, b = full[step], resumed[step]
        assert abs(a - b) <= 1e-9 * abs(a), (step, a, b)
        assert b > 0 or a == 0, (step, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [
    ("--lr_scheduler_type", "cosine"),
    ("--lr_scheduler_type", "linear", "--warmup_ratio", "0.3"),
    ("--lr_scheduler_type", "cosine_with_min_lr", "--warmup_steps", "1"),
    ("--lr_scheduler_type", "constant"),
])
def test_a_longer_resume_goes_on_with_the_schedule_of_the_new_length(schedule, tiny_models, tmp_path, capfd):
    """4 steps saving at 2, resumed from checkpoint-2 with --max_steps 8: every step 3..8 uses the rate an
    uninterrupted 8-step run uses there (none at 0 where that run's is not), and a note says the schedule was
    rebuilt for 8 steps."""
    common = _common(tiny_models, tmp_path, *schedule)
    short = _run(common + ["--max_steps", "4", "--output_dir", str(tmp_path / "short")])
    full = _run(common + ["--max_steps", "8", "--output_dir", str(tmp_path / "full")])
    capfd.readouterr()
    resumed = _run(common + ["--max_steps", "8", "--output_dir", str(tmp_path / "resumed"),
                             "--resume_from_checkpoint", os.path.join(short["run_dir"], "checkpoint-2")])
    err = capfd.readouterr().err
    a, b = _rates(full["run_dir"]), _rates(resumed["run_dir"])
    assert sorted(b) == list(range(1, 9))
    _assert_same_rates(a, b, range(3, 9))
    if "constant" not in schedule:
        assert "schedule is rebuilt for 8 steps" in err, err


@pytest.mark.slow
def test_resuming_the_end_of_a_shorter_run_with_more_epochs(tiny_models, tmp_path, capfd):
    """The issue's case through --num_train_epochs: a run of half an epoch (4 steps, warm-up 1) resumed from its
    last checkpoint — where its schedule had ended at 0 — with one epoch (8 steps, warm-up 2): step 5 does not
    train at 0; steps 5..8 use the uninterrupted one-epoch run's rates, and the note says so. Resumed with fewer
    epochs than the checkpoint's step, it is the --max_steps check's message (nothing left to train)."""
    common = _common(tiny_models, tmp_path, "--warmup_ratio", "0.25")
    short = _run(common + ["--num_train_epochs", "0.5", "--output_dir", str(tmp_path / "short")])
    full = _run(common + ["--num_train_epochs", "1", "--output_dir", str(tmp_path / "full")])
    capfd.readouterr()
    resumed = _run(common + ["--num_train_epochs", "1", "--output_dir", str(tmp_path / "resumed"),
                             "--resume_from_checkpoint", os.path.join(short["run_dir"], "checkpoint-4")])
    err = capfd.readouterr().err
    a, b = _rates(full["run_dir"]), _rates(resumed["run_dir"])
    assert _rates(short["run_dir"])[4] > 0 and sorted(b) == list(range(1, 9))
    _assert_same_rates(a, b, range(5, 9))
    assert ("had 4 steps (cosine, 1 warm-up step), this run has 8 steps (cosine, 2 warm-up steps): the "
            "learning-rate schedule is rebuilt for 8 steps and goes on from step 4") in err, err
    assert "had ended at 0" in err, err
    # fewer epochs than the checkpoint's step: nothing left to train is one message (exit 2) and no run folder
    # (was: "done: 4 steps", nothing trained)
    with pytest.raises(FlagError) as e:
        _run(common + ["--num_train_epochs", "0.25", "--output_dir", str(tmp_path / "none"),
                       "--resume_from_checkpoint", os.path.join(short["run_dir"], "checkpoint-4")])
    assert ("checkpoint-4: the checkpoint is at step 4 and --num_train_epochs 0.25 (2 steps, 8 per epoch) ends "
            "before it, so there is nothing left to train") in str(e.value), e.value
    assert "give --num_train_epochs above 0.5 or --max_steps above 4 (the total)" in str(e.value), e.value
    assert not os.listdir(tmp_path / "none")


@pytest.mark.slow
def test_an_exact_resume_says_nothing_about_the_schedule(tiny_models, tmp_path, capfd):
    """Same settings: no note about the schedule; with --resume_only_model the fresh schedule is described."""
    common = _common(tiny_models, tmp_path, "--max_steps", "4")
    short = _run(common + ["--output_dir", str(tmp_path / "short")])
    ckpt = os.path.join(short["run_dir"], "checkpoint-2")
    capfd.readouterr()
    resumed = _run(common + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", ckpt])
    err = capfd.readouterr().err
    assert "schedule" not in err.replace("weights, optimiser, scheduler", ""), err
    assert _rates(resumed["run_dir"]) == _rates(short["run_dir"])
    _run(common + ["--output_dir", str(tmp_path / "only"), "--resume_from_checkpoint", ckpt,
                   "--resume_only_model", "true"])
    err = capfd.readouterr().err
    assert "new cosine learning-rate schedule over 4 steps started at its step 0 (warm-up included): steps 3..4 " \
           "use its steps 0..1, so it does not reach its end" in err, err
