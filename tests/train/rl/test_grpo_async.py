"""GRPO's asynchronous rounds (`--async_generate true --vllm_mode server`) against `tunesmith rollout` on a thread:
the run trains; round r ≥ 1 is what the server samples with the weights after r − 1 steps (one round off-policy,
as ms-swift; round 0 with the initial weights), with the round's own seeds; a resumed run equals the uninterrupted
one (the checkpoint holds the request in flight and its answer); and ms-swift's refusals."""
import json
import math
import os

import pytest

from conftest import read_jsonl, serve_on_a_thread, write_jsonl
from tunesmith.config.parser import parse_args
from tunesmith.errors import ConfigError
from tunesmith.train import recipe
from fakes import EVEN_TOKENS_PLUGIN

pytestmark = pytest.mark.usefixtures("no_charts")

@pytest.fixture(scope="module")
def rollout(tiny_models):
    """`tunesmith rollout --model <tiny qwen2>` served on a thread: (model dir, port)."""
    from tunesmith.commands.rollout import build

    model = tiny_models("qwen2")
    engine, app, _ = build(parse_args("rollout", ["--model", model, "--verbose", "false"]))
    with serve_on_a_thread(app) as port:
        yield model, port
    engine.close()


@pytest.fixture
def setup(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": f"say something {i}"}], "solution": "even"} for i in range(16)])
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EVEN_TOKENS_PLUGIN)
    return data, str(plugin)


def _grpo(model, port, data, plugin, out, *flags):
    argv = ["--rlhf_type", "grpo", "--model", model, "--dataset", data, "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "10", "--logging_steps", "1",
            "--report_to", "none", "--output_dir", str(out), "--external_plugins", plugin,
            "--reward_funcs", "even_tokens", "--learning_rate", "5e-2", "--log_completions", "true",
            "--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_host", "127.0.0.1",
            "--vllm_server_port", str(port), "--async_generate", "true", *flags]
    return recipe.main(parse_args("rlhf", argv))


def _rounds(run_dir) -> dict:
    """{round: [(prompt messages, completion text)]} of a run's completions.jsonl, in the round's order."""
    out = {}
    for row in read_jsonl(os.path.join(run_dir, "completions.jsonl")):
        out.setdefault(row["round"], []).append((row["prompt"], row["completion"]))
    return out


def _sampled(model_dir, adapter, rows, r, g=4, seed=42):
    """What the trainer's engine samples for round r's prompts (rows: the round's (prompt, text), G per prompt)
    with the base model, or it with `adapter` (a checkpoint): the round's seeds (units._completion_seed), decoded
    as GRPO decodes. The server samples the same (tests/train/rl/test_grpo_server.py)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.inference.chat import ChatEngine, GenConfig
    from tunesmith.train.rl.units import _completion_seed

    tok = AutoTokenizer.from_pretrained(model_dir)
    net = AutoModelForCausalLM.from_pretrained(model_dir)
    net = (PeftModel.from_pretrained(net, adapter) if adapter else net).eval()
    chat = ChatEngine(net, tok)
    try:
        out = []
        for j in range(len(rows) // g):
            prompt = chat.prompt(rows[j * g][0])
            base = _completion_seed(seed, r, j, g)
            handles = chat.submit(prompt, GenConfig(max_new_tokens=10, temperature=0.9, seed=base, n=g))
            out += [tok.decode(h.result().token_ids, skip_special_tokens=True) for h in handles]
        return out
    finally:
        chat.close()


@pytest.mark.slow
def test_async_rounds_train_one_round_behind_and_resume_exactly(rollout, setup, tmp_path):
    """Four steps (one round each) with --async_generate: the loss is finite and the reward logged; round 0 is
    sampled with the initial weights, round 1 with them too (requested before step 1 trained), round 2 with
    checkpoint-1's and round 3 with checkpoint-2's — each with its own round's seeds — and not with the weights
    that train it. Resumed from checkpoint-2 (round 2's request in flight there, its answer saved), steps 3-4 and
    round 3 equal the uninterrupted run's."""
    model, port = rollout
    data, plugin = setup
    full = _grpo(model, port, data, plugin, tmp_path / "full", "--max_steps", "4", "--save_steps", "1")
    run = full["run_dir"]
    logs = {r["global_step"]: r for r in read_jsonl(os.path.join(run, "logging.jsonl")) if "reward" in r}
    assert sorted(logs) == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and "reward" in r for r in logs.values())
    rounds = _rounds(run)
    assert sorted(rounds) == [0, 1, 2, 3] and all(len(v) == 16 for v in rounds.values())
    for r, weights in ((0, None), (1, None), (2, "checkpoint-1"), (3, "checkpoint-2")):
        adapter = os.path.join(run, weights) if weights else None
        assert [t for _, t in rounds[r]] == _sampled(model, adapter, rounds[r], r), r
    # on-policy (the weights that train round 3) would have sampled something else: the rounds really lag
    assert [t for _, t in rounds[3]] != _sampled(model, os.path.join(run, "checkpoint-3"), rounds[3], 3)
    pending = json.load(open(os.path.join(run, "checkpoint-2", "grpo_pending_round.json")))
    assert len(pending["completions"]) == 16  # round 2's, sampled with checkpoint-1's weights

    resumed = _grpo(model, port, data, plugin, tmp_path / "resumed", "--max_steps", "4", "--save_steps", "1",
                    "--resume_from_checkpoint", os.path.join(run, "checkpoint-2"))
    again = {r["global_step"]: r for r in read_jsonl(os.path.join(resumed["run_dir"], "logging.jsonl"))
             if "reward" in r}
    for step in (3, 4):
        for key in ("loss", "reward", "grad_norm"):
            assert abs(logs[step][key] - again[step][key]) < 1e-6, (step, key, logs[step][key], again[step][key])
    assert _rounds(resumed["run_dir"])[3] == rounds[3]


@pytest.mark.slow
def test_full_weight_async_rounds(tiny_models, setup, tmp_path):
    """--train_type full (a server of its own: full weights change its model): the trainable weights are pushed only
    once the request before them is answered; round 1 is sampled with the initial weights (requested before step 1
    trained), and the run trains."""
    from tunesmith.commands.rollout import build

    model = tiny_models("qwen2")
    data, plugin = setup
    engine, app, _ = build(parse_args("rollout", ["--model", model, "--verbose", "false"]))
    try:
        with serve_on_a_thread(app) as port:
            res = _grpo(model, port, data, plugin, tmp_path / "full", "--max_steps", "2", "--train_type", "full",
                        "--learning_rate", "1e-3")
    finally:
        engine.close()
    rounds = _rounds(res["run_dir"])
    assert [t for _, t in rounds[1]] == _sampled(model, None, rounds[1], 1)
    logs = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) for r in logs)


@pytest.mark.slow
def test_resuming_a_synchronous_checkpoint_with_async_rounds_says_so(rollout, setup, tmp_path, capsys):
    """A checkpoint saved without --async_generate holds no round requested ahead: the resumed run samples its
    first round now, with the checkpoint's weights, and says that it is not the uninterrupted run."""
    model, port = rollout
    data, plugin = setup
    first = _grpo(model, port, data, plugin, tmp_path / "sync", "--max_steps", "1", "--async_generate", "false")
    capsys.readouterr()
    _grpo(model, port, data, plugin, tmp_path / "async", "--max_steps", "2",
          "--resume_from_checkpoint", os.path.join(first["run_dir"], "checkpoint-1"))
    assert "holds no round requested ahead" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--rlhf_type", "grpo", "--reward_funcs", "format", "--async_generate", "true"],
     "--async_generate true needs --use_vllm true --vllm_mode server"),
    (["--rlhf_type", "grpo", "--reward_funcs", "format", "--async_generate", "true", "--use_vllm", "true",
      "--vllm_mode", "server", "--vllm_server_host", "127.0.0.1", "--multi_turn_scheduler", "tool_call_scheduler"],
     "asynchronous rounds are not supported with multi-turn"),
    (["--rlhf_type", "gkd", "--teacher_model", "MODEL", "--async_generate", "true"],
     "--async_generate true with --rlhf_type gkd"),
])
def test_what_async_rounds_cannot_do_is_a_flag_error(tiny_models, tmp_path, flags, message):
    """ms-swift's checks: async generation needs a rollout server (server mode), and is not for multi-turn
    rollouts or GKD."""
    model = tiny_models("qwen2")
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}])
    flags = [model if f == "MODEL" else f for f in flags]
    with pytest.raises(ConfigError, match=message):
        recipe.main(parse_args("rlhf", ["--model", model, "--dataset", data, "--output_dir", str(tmp_path),
                                        "--report_to", "none", *flags]))


@pytest.mark.slow
def test_the_rollout_correction_sees_the_lag(rollout, setup, tmp_path):
    """The server returns the log-probs of the distribution it sampled from (processed, as `swift rollout`'s vLLM),
    so --rollout_importance_sampling_mode corrects the lag: ρ = π_old / π_server, π_old the model that trains the
    round (ms-swift's). Round 0 is sampled and trained with the same weights (KL ~0, every weight ~1); rounds 2
    and 3 are sampled one update behind (KL > 0)."""
    model, port = rollout
    data, plugin = setup
    res = _grpo(model, port, data, plugin, tmp_path / "is", "--max_steps", "3",
                "--rollout_importance_sampling_mode", "token_truncate", "--log_rollout_offpolicy_metrics", "true")
    logs = {r["global_step"]: r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r}
    assert abs(logs[1]["rollout_correction/kl"]) < 1e-4 and abs(logs[1]["rollout_correction/is_weight_mean"] - 1) < 1e-3
    assert logs[3]["rollout_correction/kl"] > 1e-4, logs[3]
    assert all(math.isfinite(r["loss"]) for r in logs.values())
