"""GKD's --teacher_deepspeed (ms-swift's teacher with its own DeepSpeed config): two processes (torchrun, gloo, CPU)
with the student under --deepspeed zero2 and the teacher under ZeRO-3 train exactly as the same run with the teacher
whole on each process (loss and jsd per step within 1e-5), while each process's teacher holds only its share of
every large parameter; and what cannot work is a clear error before anything loads."""
import json
import math
import os
import random
import subprocess
import sys

import pytest

from conftest import free_port, launch, read_jsonl, run_dir_of, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError

pytestmark = pytest.mark.usefixtures("no_charts")

WORDS = "red green blue cat dog sun moon tree river stone bird fish".split()

# run under torchrun: the GKD run in this process, then what this process's teacher holds, to OUT/rank<R>.json
DRIVER = """
import json, os, sys
from tunesmith.config.parser import parse_args
from tunesmith.train import recipe

res = recipe.main(parse_args("rlhf", sys.argv[2:]))
engine = res["reference"].teacher.model
held = {n: [int(p.ds_tensor.numel()), int(p.ds_numel)] for n, p in engine.module.named_parameters()}
out = {"engine": type(engine).__name__, "stage": engine.zero_optimization_stage(), "held": held}
with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"]), "w") as fh:
    json.dump(out, fh)
"""


def _rows(n, seed):
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(5))}]}
            for _ in range(n)]


def _log(run_dir):
    return [r for r in read_jsonl(os.path.join(run_dir, "logging.jsonl")) if "jsd" in r]


@pytest.mark.slow
def test_a_zero3_teacher_trains_as_a_whole_one_and_each_process_holds_its_shard(tiny_models, tmp_path):
    pytest.importorskip("deepspeed")
    model, teacher = tiny_models("qwen2"), tiny_models("qwen2", seed=1, hidden=128, layers=3)  # a wider teacher
    data = write_jsonl(tmp_path / "train.jsonl", _rows(32, 0))
    common = ["--rlhf_type", "gkd", "--model", model, "--teacher_model", teacher, "--dataset", data,
              "--train_type", "lora", "--lora_dropout", "0", "--max_steps", "3", "--lmbda", "0.5",
              "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
              "--max_completion_length", "8", "--logging_steps", "1", "--report_to", "none", "--deepspeed", "zero2"]
    launch(["rlhf", *common, "--output_dir", str(tmp_path / "whole")], nproc=2, timeout=600)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(driver), str(tmp_path), *common,
                        "--teacher_deepspeed", "zero3", "--output_dir", str(tmp_path / "sharded")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert "sharded across the processes by DeepSpeed ZeRO-3 (--teacher_deepspeed)" in p.stderr + p.stdout
    whole, sharded = _log(run_dir_of(tmp_path / "whole")), _log(run_dir_of(tmp_path / "sharded"))
    assert len(whole) == len(sharded) == 3 and {r["on_policy"] for r in whole} == {0.0, 1.0}
    for a, b in zip(whole, sharded):
        assert (b["loss"], b["jsd"]) == pytest.approx((a["loss"], a["jsd"]), abs=1e-5)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    hidden = 128  # the teacher's
    for info in ranks:
        assert info["engine"] == "DeepSpeedEngine" and info["stage"] == 3
        big = {n: v for n, v in info["held"].items() if v[1] > 10 * hidden}  # smaller ones stay whole (ms-swift)
        assert big and all(held == math.ceil(numel / 2) for held, numel in big.values()), big
        assert "lm_head.weight" in big or "model.embed_tokens.weight" in big  # the output layer is sharded too
        held, numel = map(sum, zip(*info["held"].values()))
        assert held < 0.6 * numel


def _configure(tiny_models, tmp_path, *flags):
    from tunesmith.train.recipe import configure

    model = tiny_models("qwen2")
    return configure(parse_args("rlhf", ["--model", model, "--dataset", "x.jsonl",
                                         "--output_dir", str(tmp_path / "out"), *flags]))


@pytest.mark.parametrize("flags,match", [
    (["--rlhf_type", "gkd", "--teacher_model", "T"], "needs --deepspeed"),
    (["--rlhf_type", "gkd", "--deepspeed", "zero2", "--teacher_model_server", "http://h:1",
      "--gkd_logits_topk", "5"], "with --teacher_model_server"),
    (["--rlhf_type", "gkd", "--deepspeed", "zero2", "--teacher_model", "T", "--offload_teacher_model", "true"],
     "zero3_offload"),
    (["--rlhf_type", "gkd", "--deepspeed", "zero2", "--sft_alpha", "1"], "needs --teacher_model"),
    (["--rlhf_type", "grpo", "--reward_funcs", "format", "--deepspeed", "zero2", "--teacher_model", "T"],
     "grpo is not supported yet"),
])
def test_what_cannot_work_is_refused(tiny_models, tmp_path, flags, match):
    with pytest.raises(ConfigError, match=match):
        _configure(tiny_models, tmp_path, *flags, "--teacher_deepspeed", "zero3")


def test_a_bad_value_names_the_flag(tiny_models, tmp_path, capsys):
    from types import SimpleNamespace

    import torch

    from tunesmith.train import distributed as D
    from tunesmith.train.reference import setup_teacher

    with pytest.raises(ConfigError, match="--teacher_deepspeed zero9: not a preset"):
        _configure(tiny_models, tmp_path, "--rlhf_type", "gkd", "--deepspeed", "zero2", "--teacher_model", "T",
                   "--teacher_deepspeed", "zero9")
    optim = SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="--teacher_deepspeed: not valid JSON"):
        D.teacher_engine(model, "{not json", optim, 1)
    with pytest.raises(ConfigError, match="--teacher_deepspeed: train_micro_batch_size_per_gpu is 8"):
        D.teacher_engine(model, json.dumps({"train_micro_batch_size_per_gpu": 8}), optim, 1)
    # a teacher that is the student itself has nothing to shard
    with pytest.raises(ConfigError, match="no separate teacher model for DeepSpeed to shard"):
        setup_teacher(None, None, [], None, False, None, None, wrap=lambda m: (m, 3))
    # other methods: a note, as for GKD's other flags
    _configure(tiny_models, tmp_path, "--rlhf_type", "dpo", "--teacher_deepspeed", "zero3")
    assert "--teacher_deepspeed: GKD's flags (--rlhf_type gkd) change nothing for --rlhf_type dpo" in \
        capsys.readouterr().err
