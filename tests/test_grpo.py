"""GRPO (`tunesmith rlhf --rlhf_type grpo`) end to end on a tiny model: the mean reward of a reward the model can
reach rises, the KL to the reference rises from 0, a resumed run equals the uninterrupted one, plugins written for
ms-swift and TRL-style module.function rewards run, and what GRPO cannot do is a flag error before anything loads.
The loss and advantage formulas are checked against hand computations in test_grpo_losses.py, the reward
functions in test_rewards.py."""
import json
import os

import pytest

from conftest import read_jsonl, write_jsonl
from tunesmith.args import parse_args
from tunesmith.errors import ConfigError
from tunesmith.train import recipe

# a reward a random tiny model can climb: the share of its completion's tokens with an even id — in ms-swift's
# documented plugin form (3.x import path), run without ms-swift installed
PLUGIN = '''
from swift.plugin import ORM, orms


class EvenTokens(ORM):
    def __call__(self, completions, response_token_ids=None, **kwargs):
        return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in response_token_ids]


orms["even_tokens"] = EvenTokens
'''


@pytest.fixture(autouse=True)
def _no_charts(monkeypatch):
    import tunesmith.report

    monkeypatch.setattr(tunesmith.report, "write_run_report", lambda run_dir: "not written (test)")


@pytest.fixture
def setup(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"}], "solution": "even"} for i in range(16)])
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    return tiny_models("qwen2"), data, str(plugin)


def _grpo(model, data, out, *flags):
    argv = ["--rlhf_type", "grpo", "--model", model, "--dataset", data, "--num_generations", "8",
            "--per_device_train_batch_size", "32", "--max_completion_length", "12", "--logging_steps", "1",
            "--report_to", "none", "--output_dir", str(out), *flags]
    return recipe.main(parse_args("rlhf", argv))


def _log(run_dir):
    return [r for r in read_jsonl(os.path.join(run_dir, "logging.jsonl")) if "reward" in r]


@pytest.mark.slow
def test_grpo_raises_a_reachable_reward_and_the_kl_rises_from_zero(setup, tmp_path):
    model, data, plugin = setup
    res = _grpo(model, data, tmp_path / "out", "--external_plugins", plugin, "--reward_funcs", "even_tokens",
                "--train_type", "full", "--learning_rate", "5e-3", "--max_steps", "40", "--save_strategy", "no",
                "--log_completions", "true")
    log = _log(res["run_dir"])
    first = sum(r["reward"] for r in log[:5]) / 5
    last = sum(r["reward"] for r in log[-5:]) / 5
    assert first < 0.55 and last > first + 0.15, (first, last)  # measured: 0.47 -> 0.75
    assert log[0]["kl"] == 0.0 and log[-1]["kl"] > 0.1  # the policy starts as the reference, then moves
    assert {"reward_std", "rewards/EvenTokens/mean", "rewards/EvenTokens/std", "completions/mean_length",
            "completions/min_length", "completions/max_length", "completions/clipped_ratio",
            "clip_ratio/region_mean", "frac_reward_zero_std"} <= set(log[0])
    assert log[0]["completions/min_length"] <= log[0]["completions/mean_length"] <= log[0]["completions/max_length"]
    rollouts = read_jsonl(os.path.join(res["run_dir"], "completions.jsonl"))
    assert len(rollouts) == 40 * 32 and set(rollouts[0]) == {"round", "prompt", "completion", "rewards", "reward",
                                                             "advantage"}
    assert rollouts[0]["prompt"][0]["role"] == "user" and "EvenTokens" in rollouts[0]["rewards"]
    group = rollouts[:8]  # one prompt's G completions: advantages are centred within the group
    assert abs(sum(r["advantage"] for r in group)) < 1e-6
    from tunesmith.report import _completions_table, load_run
    table = _completions_table(load_run(res["run_dir"]))
    assert "Last 24 rollouts" in table and rollouts[-1]["completion"][:10] in table.replace("&#x27;", "'")


def test_a_resumed_grpo_run_equals_the_uninterrupted_one(setup, tmp_path):
    """Each completion has its own seed and a round starts from the weights of its step, so resuming at a step
    regenerates exactly the rollouts the uninterrupted run trained on (LoRA, β > 0, two iterations per round)."""
    model, data, plugin = setup
    common = ["--external_plugins", plugin, "--reward_funcs", "even_tokens", "--learning_rate", "2e-2",
              "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "16"]
    full = _grpo(model, data, tmp_path / "full", *common)
    ckpt = os.path.join(full["run_dir"], "checkpoint-2")
    resumed = _grpo(model, data, tmp_path / "resumed", *common, "--resume_from_checkpoint", ckpt)
    a = {r["global_step"]: r for r in _log(full["run_dir"])}
    b = {r["global_step"]: r for r in _log(resumed["run_dir"])}
    assert sorted(b) == [3, 4]
    for step in b:
        for key in ("loss", "reward", "kl", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step][key], b[step][key])


def test_trl_style_module_function_rewards_and_builtins(setup, tmp_path, monkeypatch):
    model, data, _ = setup
    (tmp_path / "my_rewards.py").write_text(
        "STEPS = []\n"
        "def short(completions, trainer_state=None, **kwargs):\n"
        "    STEPS.append((trainer_state.global_step, trainer_state.max_steps))\n"
        "    return [1.0 / (1 + len(c[0]['content'])) for c in completions]\n")  # TRL's form: message lists
    monkeypatch.syspath_prepend(str(tmp_path))
    res = _grpo(model, data, tmp_path / "out", "--reward_funcs", "my_rewards.short", "format", "format",
                "--reward_weights", "1", "0.5", "0.25", "--max_steps", "2", "--save_strategy", "no",
                "--per_device_train_batch_size", "16")
    log = _log(res["run_dir"])
    assert len(log) == 2 and "rewards/short/mean" in log[0] and "rewards/Format/mean" in log[0]
    assert "rewards/Format_2/mean" in log[0]  # the same reward twice: two keys
    import my_rewards
    assert my_rewards.STEPS == [(0, 2), (1, 2)]  # transformers' TrainerState attributes, optimiser steps
    args = json.load(open(os.path.join(res["run_dir"], "args.json")))
    assert args["reward_funcs"] == ["my_rewards.short", "format", "format"] and args["beta"] == 0.04
    assert args["loss_type"] == ["grpo"] and args["scale_rewards"] == "group"
    cfg, method = recipe.configure(parse_args("rlhf", ["--rlhf_type", "grpo", "--model", model, "--dataset", data,
                                                       "--reward_funcs", "format", "--scale_rewards", "false"]))
    assert method.scale_rewards == "none"  # ms-swift 3.x's boolean


@pytest.mark.parametrize("flags,message", [
    ([], "GRPO needs --reward_funcs"),
    (["--reward_funcs", "acuracy"], "acuracy.*accuracy"),
    (["--reward_funcs", "accuracy", "--num_generations", "3", "--per_device_train_batch_size", "4",
      "--steps_per_generation", "1"], "must hold whole groups of --num_generations 3"),
    (["--reward_funcs", "accuracy", "--use_vllm", "true"], "vLLM needs CUDA GPUs"),
    (["--reward_funcs", "accuracy", "--loss_type", "dapoo"], "did you mean dapo"),
    (["--reward_funcs", "accuracy", "format", "--reward_weights", "1"], "one weight per function"),
    (["--reward_funcs", "accuracy", "--split_dataset_ratio", "0.1"], "GRPO evaluation"),
    (["--reward_funcs", "accuracy", "--external_plugins", "/nonexistent/plugin.py"], "plugin.py"),
    (["--reward_funcs", "accuracy", "--top_p", "1.5", "--repetition_penalty", "0"], "repetition_penalty 0.0: expected 0 <"),
])
def test_what_grpo_cannot_do_is_a_flag_error(tiny_models, tmp_path, flags, message):
    args = parse_args("rlhf", ["--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", "x.jsonl",
                               *flags])
    with pytest.raises(ConfigError, match=message):
        recipe.configure(args)


def test_prompts_keep_the_solution_and_columns(tiny_models, tmp_path):
    """A row's final assistant reply becomes `solution` (unless it has one); other columns reach the rewards."""
    from tunesmith.data.load import load_datasets
    from tunesmith.train.grpo import prompt_record

    data = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}], "id": 7},
        {"query": "2+2?", "solution": "4"},
        {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}],
         "solution": "\\boxed{6}"}])
    loaded = load_datasets([data], need_reply=False, keep_columns=True)
    recs = [prompt_record(r, s)[0] for r, s in zip(loaded.records, loaded.sources)]
    assert recs[0] == {"messages": [{"role": "user", "content": "1+1?"}], "columns": {"id": 7, "solution": "2"}}
    assert recs[1]["messages"] == [{"role": "user", "content": "2+2?"}] and recs[1]["columns"]["solution"] == "4"
    assert recs[2]["columns"]["solution"] == "\\boxed{6}"


@pytest.mark.slow
def test_two_ddp_processes_run_grpo_like_one_process_with_the_same_global_batch(setup, tmp_path):
    """Each process generates its share of the round's groups (with the seeds one process would use), the round is
    gathered, and each process trains its slice: the logged rewards, KL and losses equal one process's."""
    from test_distributed import _run, _run_dir

    model, data, plugin = setup
    common = ["rlhf", "--rlhf_type", "grpo", "--model", model, "--dataset", data, "--external_plugins", plugin,
              "--reward_funcs", "even_tokens", "--num_generations", "8", "--max_completion_length", "8",
              "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "2e-2", "--save_strategy", "no",
              "--report_to", "none", "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0"]
    _run([*common, "--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "one")], nproc=1)
    _run([*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "two")], nproc=2)
    one, two = _log(_run_dir(str(tmp_path / "one"))), _log(_run_dir(str(tmp_path / "two")))
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("loss", "reward", "reward_std", "kl", "grad_norm", "completions/mean_length"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (key, a[key], b[key])
