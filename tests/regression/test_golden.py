"""Golden loss curves: a seeded tiny model, 10 optimiser steps on CPU, for sft and dpo. The numbers were recorded on
the code before the training-loop refactor (issue 15); a change that moves any of them by more than 1e-5 changes
what users' runs compute, and must say so here."""
import os

import pytest

from conftest import EXAMPLES, read_jsonl
from tunesmith.config.parser import parse_args

COMMON = ["--max_steps", "10", "--logging_steps", "1", "--per_device_train_batch_size", "2",
          "--gradient_accumulation_steps", "2", "--learning_rate", "5e-3", "--seed", "3", "--report_to", "none",
          "--save_strategy", "no", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.1"]

SFT_CURVE = [7.611305, 7.655385, 7.391571, 7.293704, 7.220526, 7.168985, 7.139689, 7.040886, 7.001138, 7.007623]
DPO_CURVE = [0.693147, 0.693147, 0.549148, 0.487724, 0.444348, 0.389361, 0.357758, 0.34144, 0.32602, 0.322675]


def _curve(run_dir):
    return [r["loss"] for r in read_jsonl(os.path.join(run_dir, "logging.jsonl")) if "loss" in r and "grad_norm" in r]


@pytest.mark.slow
def test_sft_golden_curve(tiny_models, tmp_path):
    from tunesmith.train import recipe
    res = recipe.main(parse_args("sft", ["--model", tiny_models("qwen2"), "--dataset",
                                      os.path.join(EXAMPLES, "capitals_messages.jsonl"),
                                      "--output_dir", str(tmp_path), *COMMON]))
    assert _curve(res["run_dir"]) == pytest.approx(SFT_CURVE, abs=1e-5)


@pytest.mark.slow
def test_dpo_golden_curve(tiny_models, tmp_path):
    from tunesmith.train import recipe
    res = recipe.main(parse_args("rlhf", ["--rlhf_type", "dpo", "--model", tiny_models("qwen2"), "--dataset",
                                              os.path.join(EXAMPLES, "dpo_messages.jsonl"),
                                              "--output_dir", str(tmp_path), *COMMON]))
    assert _curve(res["run_dir"]) == pytest.approx(DPO_CURVE, abs=1e-5)
