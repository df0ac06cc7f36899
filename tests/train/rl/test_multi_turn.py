"""Multi-turn GRPO rollouts (train/rl/multi_turn.py) with ms-swift's scheduler plugin interface: a trajectory's
tokens and loss mask equal an independent encoding of its conversation (the SFT encoder, every assistant turn
trained, as ms-swift's loss_scale 'default' under a multi-turn scheduler), the built-in tool_call_scheduler runs a
tool between turns, plugin files in ms-swift's form (4.x and 3.x import paths) load without ms-swift, a bad
scheduler name is a flag error naming the available ones, --max_turns and --completion_length_limit_scope bound the
trajectories, and — the done-when test — a multi-turn GRPO run with a scheduler plugin and a tool reaches a reward
a single turn cannot."""
import copy
import json
import os
import sys

import pytest

from conftest import read_jsonl, write_jsonl
from fakes import WEATHER, scripted_chat, weather_script
from tunesmith.config.parser import parse_args
from tunesmith.data.encode import IGNORE, ChatEncoder
from tunesmith.errors import ConfigError
from tunesmith.inference.chat import GenConfig
from tunesmith.train import recipe
from tunesmith.train.rl import multi_turn as mt
from tunesmith.train.rl import schedulers as sch
from tunesmith.train.rl import rewards  # noqa: F401 — offers ORM and orms to plugins, as GRPO loads rewards first
from tunesmith.train.rl.units import Unit, grpo_collate

needs_no_swift = pytest.mark.skipif(__import__("importlib").util.find_spec("swift") is not None,
                                    reason="ms-swift is installed: plugins import the real one")

pytestmark = pytest.mark.usefixtures("no_charts")


class Weather(sch.ToolCallScheduler):
    """The built-in tool-call scheduler with one tool, as a user would extend it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tools["get_weather"] = lambda city: {"city": city, "sky": "sunny"}


def _drive(chat, scheduler, messages, tools=None, max_turns=None, scope="per_round", limit=64):
    """One trajectory of `messages` through MultiTurn with greedy sampling; returns it."""
    driver = mt.MultiTurn(scheduler, chat, "test", max_turns, scope, limit)
    t = mt.Trajectory(sch.RolloutInferRequest(copy.deepcopy(messages), tools=tools, uuid="u"),
                      chat.prompt(messages, tools).ids, seed=7)

    def sample(rows):
        cfgs = [GenConfig(max_new_tokens=room, temperature=0.0, seed=seed) for _, room, seed, _ in rows]
        handles = [chat.engine.submit(ids, chat.sampling(c), None) for (ids, _, _, _), c in zip(rows, cfgs)]
        return [h.result() for h in handles]

    driver.run([t], sample)
    return t


@pytest.fixture
def weather_chat(tiny_models):
    chat = scripted_chat(tiny_models, "qwen2", weather_script)
    yield chat
    chat.close()


def test_a_tool_call_trajectory_is_masked_as_the_sft_encoder_masks_its_conversation(weather_chat):
    """The built-in tool_call_scheduler parses the model's `<tool_call>` (the template's format), runs the tool and
    appends its result as a tool message; the trajectory's ids are the token-for-token encoding of the final
    conversation, and its loss mask is 1 exactly where the SFT encoder (all assistant turns trained) trains."""
    chat = weather_chat
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    t = _drive(chat, Weather(max_turns=4, tokenizer=chat.tok), messages, WEATHER)
    roles = [m["role"] for m in t.messages]
    assert roles == ["user", "assistant", "tool", "assistant"] and t.turns == 2
    assert json.loads(t.messages[2]["content"]) == {"city": "Paris", "sky": "sunny"}
    assert t.messages[1]["content"].startswith("<tool_call>") and t.text == "It is sunny in Paris."
    assert t.finish_reason == "stop" and len(t.turn_ids) == 2 and len(t.mask) == len(t.token_ids)

    enc = ChatEncoder(chat.tok, loss_scale="default").encode({"messages": t.messages, "tools": WEATHER},
                                                             truncate=False)
    ours = t.prompt_ids + t.token_ids
    # the encoder renders the final turn's closing newline too (untrained); up to there the tokens are the same
    assert enc.input_ids[:len(ours)] == ours
    assert all(lab == IGNORE for lab in enc.labels[len(ours):])
    trained = [int(lab != IGNORE) for lab in enc.labels[len(t.prompt_ids):len(ours)]]
    assert trained == t.mask
    assert 0 < sum(t.mask) < len(t.mask)  # the tool turn's tokens are in the completion and masked
    assert sum(t.mask) == sum(len(ids) for ids in t.turn_ids)

    batch = grpo_collate([Unit(t.prompt_ids, t.token_ids, 1.0, True, completion_mask=t.mask)], pad_id=0)
    assert batch["completion_mask"][0].tolist() == [float(k) for k in t.mask]
    labels = batch["labels"][0, len(t.prompt_ids):].tolist()
    assert [int(lab != IGNORE) for lab in labels] == t.mask


def test_an_observation_joined_to_the_reply_is_untrained_and_the_next_turn_continues_it(weather_chat):
    """ms-swift's example tool scheduler (ReAct): step() adds the tool's answer to the reply itself and returns
    response_token_ids / response_loss_mask (0 on the answer); the next turn continues the same reply, and its
    response_token_ids entry is extended (one entry for the one reply)."""

    class Observe(sch.MultiTurnScheduler):
        def step(self, infer_request, response_choice, current_turn):
            seen = self.tokenizer("\nObservation: sunny\n", add_special_tokens=False)["input_ids"]
            infer_request.messages[-1]["content"] += "\nObservation: sunny\n"
            ids = [i for i in response_choice.token_ids if i != self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
            return {"infer_request": infer_request, "response_token_ids": ids + seen,
                    "response_loss_mask": [1] * len(ids) + [0] * len(seen)}

    chat = weather_chat
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    t = _drive(chat, Observe(max_turns=2, tokenizer=chat.tok), messages, WEATHER, max_turns=2)
    assert [m["role"] for m in t.messages] == ["user", "assistant"] and t.turns == 2
    assert "Observation: sunny" in t.messages[1]["content"] and len(t.turn_ids) == 1
    seen = len(chat.tok("\nObservation: sunny\n", add_special_tokens=False)["input_ids"])
    first = t.mask.index(0)
    assert t.mask[first:first + seen] == [0] * seen and all(t.mask[first + seen:]) and all(t.mask[:first])
    assert t.turn_ids[0] == t.token_ids  # no template tokens between the turns: the reply goes on


def test_the_trained_log_probs_of_a_trajectory_are_the_sampled_ones(tiny_models):
    """The loss's log-probs (completion_logps over grpo_collate's batch) at the trajectory's trained tokens equal
    the engine's log-probs when it sampled them, turn after turn (1e-5): the tokens before each turn are exactly
    the ones it was sampled after, and the tool turns sit under mask 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.inference.chat import ChatEngine
    from tunesmith.train.rl.units import completion_logps

    d = tiny_models("qwen2")
    tok, model = AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d).eval()
    chat = ChatEngine(model, tok)

    class Tool(sch.MultiTurnScheduler):
        def check_finished(self, infer_request, response_choice, current_turn):
            return current_turn >= 3

        def step(self, infer_request, response_choice, current_turn):
            infer_request.messages.append({"role": "tool", "content": "even" * 4})
            return {"infer_request": infer_request}

    sampled: dict = {}  # (the context a turn was sampled after, its seed) -> the engine's log-probs of its tokens

    def sample(rows):
        cfgs = [GenConfig(max_new_tokens=room, temperature=1.0, seed=seed, logprobs=True) for _, room, seed, _ in rows]
        out = [h.result() for h in [chat.engine.submit(r[0], chat.sampling(c), None) for r, c in zip(rows, cfgs)]]
        for (ids, _, seed, _), c in zip(rows, out):
            sampled[tuple(ids), seed] = [lp.logprob for lp in c.logprobs]
        return out

    messages = [{"role": "user", "content": "hi there"}]
    trajectories = [mt.Trajectory(sch.RolloutInferRequest(copy.deepcopy(messages), uuid=str(k)),
                                  chat.prompt(messages).ids, seed=k) for k in range(4)]
    try:
        mt.MultiTurn(Tool(), chat, "tool", 3, "per_round", 6).run(trajectories, sample)
    finally:
        chat.close()
    batch = grpo_collate([Unit(t.prompt_ids, t.token_ids, 1.0, True, completion_mask=t.mask) for t in trajectories],
                         pad_id=tok.pad_token_id)
    with torch.no_grad():
        logps = completion_logps(model, batch, 1.0)
    for i, t in enumerate(trajectories):
        assert t.turns == 3 and 0 in t.mask
        ours = [float(logps[i, k]) for k, keep in enumerate(t.mask) if keep]
        assert all(float(logps[i, k]) == 0.0 for k, keep in enumerate(t.mask) if not keep)
        starts = [k for k in range(len(t.mask)) if t.mask[k] and (k == 0 or not t.mask[k - 1])]
        engine = [x for turn, k in enumerate(starts, 1)
                  for x in sampled[tuple(t.prompt_ids + t.token_ids[:k]), mt.turn_seed(t.seed, turn)]]
        assert len(starts) == 3 and len(engine) == len(ours)
        assert max(abs(a - b) for a, b in zip(engine, ours)) < 1e-5


def test_max_turns_and_the_completion_length_scopes_bound_a_trajectory(weather_chat):
    """A scheduler that never finishes (it always asks again) stops at --max_turns; per_round gives each turn up to
    max_completion_length tokens, total the whole completion (tool turns included)."""

    class Again(sch.MultiTurnScheduler):
        def check_finished(self, infer_request, response_choice, current_turn):
            return False

        def step(self, infer_request, response_choice, current_turn):
            infer_request.messages.append({"role": "user", "content": "again"})
            return {"infer_request": infer_request}

    chat, messages = weather_chat, [{"role": "user", "content": "Weather in Paris?"}]
    t = _drive(chat, Again(max_turns=3), messages, WEATHER, max_turns=3, limit=5)
    assert t.turns == 3 and [m["role"] for m in t.messages].count("assistant") == 3
    assert all(len(ids) <= 5 for ids in t.turn_ids) and t.finish_reason == "length"
    t = _drive(chat, Again(max_turns=3), messages, WEATHER, max_turns=3, scope="total", limit=20)
    assert len(t.token_ids) <= 20 and t.finish_reason == "length" and t.turns <= 3
    # the budget spent by a turn: the message step() appended leaves with its tokens, so rewards (which read the
    # last message) score the model's reply, never the scheduler's text
    assert t.messages[-1]["role"] == "assistant"


def test_a_scheduler_that_breaks_the_contract_is_named(weather_chat):
    class NoStep(sch.MultiTurnScheduler):
        def check_finished(self, infer_request, response_choice, current_turn):
            return False

    class BadMask(sch.ToolCallScheduler):
        def step(self, infer_request, response_choice, current_turn):
            return {"infer_request": infer_request, "response_token_ids": [1, 2], "response_loss_mask": [1]}

    class Raises(NoStep):
        def step(self, infer_request, response_choice, current_turn):
            raise KeyError("boom in step")

    class BadIds(BadMask):
        def step(self, infer_request, response_choice, current_turn):
            return {"infer_request": infer_request, "response_token_ids": [10 ** 9, -5]}

    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with pytest.raises(ConfigError, match=r"Raises.step\(\) raised KeyError: 'boom in step' \(turn 1\)"):
        _drive(weather_chat, Raises(), messages, WEATHER, max_turns=2)
    with pytest.raises(ConfigError, match="1000000000, not a token id"):
        _drive(weather_chat, BadIds(), messages, WEATHER, max_turns=2)
    with pytest.raises(ConfigError, match="NoStep does not implement step"):
        _drive(weather_chat, NoStep(), messages, WEATHER, max_turns=2)
    with pytest.raises(ConfigError, match="2 response_token_ids and a response_loss_mask of 1"):
        _drive(weather_chat, BadMask(), messages, WEATHER, max_turns=2)


PLUGIN_4X = '''
from swift.rollout import MultiTurnScheduler, multi_turns
from swift.infer_engine.protocol import ChatCompletionResponseChoice, RolloutInferRequest


class Echo4(MultiTurnScheduler):
    def step(self, infer_request: RolloutInferRequest, response_choice: ChatCompletionResponseChoice,
             current_turn: int):
        infer_request.messages.append({"role": "user", "content": "again"})
        return {"infer_request": infer_request}


multi_turns["echo4"] = Echo4
'''

PLUGIN_3X = '''
from swift.plugin import ORM, orms
from swift.plugin.multi_turn import MultiTurnScheduler, multi_turns
from swift.llm import RolloutInferRequest


class Echo3(MultiTurnScheduler):
    def __init__(self, max_turns=None, *args, **kwargs):
        super().__init__(max_turns=max_turns, *args, **kwargs)
        from swift.rollout import multi_turns  # an import at construction time finds the stand-in too

    def step(self, infer_request, response_choice, current_turn):
        return {"infer_request": infer_request}


multi_turns["echo3"] = Echo3
'''


@needs_no_swift
@pytest.mark.parametrize("body, name", [(PLUGIN_4X, "echo4"), (PLUGIN_3X, "echo3")])
def test_a_plugin_in_ms_swifts_form_loads_without_ms_swift(tmp_path, body, name):
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    scheduler = sch.load_scheduler(name, [str(path)], 3, tokenizer="TOK")
    assert isinstance(scheduler, sch.MultiTurnScheduler) and type(scheduler).__name__.lower() == name
    assert scheduler.max_turns == 3 and scheduler.tokenizer == "TOK"
    assert "swift" not in sys.modules  # the stand-in is gone once the plugin is loaded


def test_an_unknown_scheduler_names_the_available_ones(tmp_path):
    # (the registry is the process's, as ms-swift's: other tests' plugins may have added names)
    with pytest.raises(ConfigError, match=r"no such scheduler; did you mean tool_call_scheduler\?; available: "
                                          r"(\w+, )*tool_call_scheduler"):
        sch.load_scheduler("tool_call_schedular", [], None)
    with pytest.raises(ConfigError, match="math tip trick is an ms-swift built-in tunesmith does not ship yet"):
        sch.load_scheduler("math_tip_trick", [], None)
    path = tmp_path / "not_a_class.py"
    path.write_text("from swift.rollout import multi_turns\nmulti_turns['odd'] = 42\n")
    with pytest.raises(ConfigError, match="multi_turns\\['odd'\\] is 42, not a scheduler class"):
        sch.load_scheduler("odd", [str(path)], None)


@pytest.mark.parametrize("flags, message", [
    (["--multi_turn_scheduler", "nope"], "no such scheduler; available: .*tool_call_scheduler"),
    (["--max_turns", "2"], "give --multi_turn_scheduler NAME too"),
    (["--multi_turn_scheduler", "tool_call_scheduler", "--max_turns", "0"], "max_turns 0: expected 1 <="),
])
def test_what_multi_turn_cannot_take_is_a_flag_error(tiny_models, flags, message):
    args = parse_args("rlhf", ["--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", "x.jsonl",
                               "--reward_funcs", "format", *flags])
    with pytest.raises(ConfigError, match=message):
        recipe.configure(args)


def test_a_saved_round_keeps_the_loss_mask():
    from dataclasses import asdict

    u = Unit([1, 2], [3, 4, 5], 0.5, True, completion_mask=[1, 0, 1])
    assert Unit(**json.loads(json.dumps(asdict(u)))).completion_mask == [1, 0, 1]


# ------------------------------------------------------------------ done when: a reward a single turn cannot reach

# A plugin exactly as an ms-swift user writes one (4.x import paths), shipped as the docs' example: a scheduler whose
# step() calls a tool and appends its answer as a tool message, and a reward. Each trajectory's secret is a fair coin
# (from its uuid, which the model never sees); the tool tells it; the reward is the share of the last turn's tokens
# whose id has the secret's parity: whatever a policy that has not seen the secret does, it scores 0.5 on average.
SECRET_PLUGIN = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "plugins", "secret_tool.py")


def _secret_run(model, data, plugin, out, turns: int):
    argv = ["--rlhf_type", "grpo", "--model", model, "--dataset", data, "--num_generations", "8",
            "--per_device_train_batch_size", "32", "--max_completion_length", "4", "--logging_steps", "1",
            "--report_to", "none", "--output_dir", str(out), "--external_plugins", plugin,
            "--reward_funcs", "secret_parity", "--multi_turn_scheduler", "secret_scheduler", "--max_turns",
            str(turns), "--train_type", "full", "--learning_rate", "2e-2", "--max_steps", "60",
            "--save_strategy", "no", "--log_completions", "true"]
    res = recipe.main(parse_args("rlhf", argv))
    return [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r], res["run_dir"]


@pytest.mark.slow
def test_multi_turn_grpo_with_a_tool_reaches_a_reward_a_single_turn_cannot(tiny_models, tmp_path):
    model = tiny_models("qwen2")
    data = write_jsonl(tmp_path / "prompts.jsonl",
                       [{"messages": [{"role": "user", "content": f"say something {i}"}]} for i in range(16)])
    plugin = os.path.abspath(SECRET_PLUGIN)
    single, _ = _secret_run(model, data, plugin, tmp_path / "single", turns=1)
    multi, run_dir = _secret_run(model, data, plugin, tmp_path / "multi", turns=2)
    tail = lambda log: sum(r["reward"] for r in log[-10:]) / 10  # noqa: E731
    assert all(r["num_turns"] == 1 for r in single) and all(r["num_turns"] == 2 for r in multi)
    # measured (mean of the last 10 steps): one turn 0.48 (its ceiling 0.5: the secret is a coin it never sees), two
    # turns 0.73 (from 0.53 at the start: the model learns to answer with the parity the tool told it)
    assert tail(single) < 0.56, tail(single)
    assert tail(multi) > 0.62 and tail(multi) > tail(single) + 0.08, (tail(single), tail(multi))
    # completion lengths count the trained tokens: the answer's (4 at most), not the tool-call turn's or the tool's
    assert multi[-1]["completions/mean_length"] <= 4 and single[-1]["completions/mean_length"] <= 4
    rollouts = read_jsonl(os.path.join(run_dir, "completions.jsonl"))
    assert rollouts[0]["prompt"][0]["role"] == "user" and "SecretParity" in rollouts[0]["rewards"]


@pytest.mark.slow
def test_a_resumed_multi_turn_run_equals_the_uninterrupted_one(tiny_models, tmp_path):
    """Every turn of every trajectory has its own seed and the trajectory's uuid comes from it, so resuming at a
    step regenerates exactly the trajectories the uninterrupted run trained on (LoRA, β > 0)."""
    model = tiny_models("qwen2")
    data = write_jsonl(tmp_path / "prompts.jsonl",
                       [{"messages": [{"role": "user", "content": f"say something {i}"}]} for i in range(16)])
    common = ["--rlhf_type", "grpo", "--model", model, "--dataset", data, "--num_generations", "4",
              "--per_device_train_batch_size", "8", "--max_completion_length", "4", "--logging_steps", "1",
              "--report_to", "none", "--external_plugins", os.path.abspath(SECRET_PLUGIN), "--reward_funcs",
              "secret_parity", "--multi_turn_scheduler", "secret_scheduler", "--max_turns", "2",
              "--learning_rate", "2e-2", "--max_steps", "4", "--save_steps", "2"]
    full = recipe.main(parse_args("rlhf", [*common, "--output_dir", str(tmp_path / "full")]))
    resumed = recipe.main(parse_args("rlhf", [*common, "--output_dir", str(tmp_path / "resumed"),
                                              "--resume_from_checkpoint",
                                              os.path.join(full["run_dir"], "checkpoint-2")]))
    a = {r["global_step"]: r for r in read_jsonl(os.path.join(full["run_dir"], "logging.jsonl")) if "reward" in r}
    b = {r["global_step"]: r for r in read_jsonl(os.path.join(resumed["run_dir"], "logging.jsonl")) if "reward" in r}
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "reward", "kl", "grad_norm", "num_turns"):
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step][key], b[step][key])


GYM_PLUGIN = '''
from swift.rollout import Env, envs


class Countdown(Env):
    """Two steps: says "go", then "again" after the first reply; each reply earns 0.25, the episode ends after two."""

    async def reset(self, config):
        self.replies = 0
        return "go", {}, "Count with me. " + config.data_dict.get("solution", "")

    async def step(self, action):
        self.replies += 1
        assert action[-1]["role"] == "assistant"
        return "again", 0.25, self.replies >= 2, {}

    async def close(self):
        pass


envs["countdown"] = Countdown
'''


def test_a_gym_environment_runs_the_conversation_and_sums_its_rewards(weather_chat, tmp_path):
    """ms-swift's gym_scheduler with an Env a plugin registers (envs['name'] = Cls): the environment's first
    observation and system prompt replace the prompt, each reply gets its next observation as a user message, and
    its rewards are summed into rollout_infos['total_reward']."""
    path = tmp_path / "gym.py"
    path.write_text(GYM_PLUGIN)
    chat = weather_chat
    scheduler = sch.load_scheduler("gym_scheduler", [str(path)], 5, chat.tok, gym_env="countdown")
    t = _drive(chat, scheduler, [{"role": "user", "content": "placeholder"}], max_turns=5)
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert t.messages[1]["content"] == "go" and t.messages[3]["content"] == "again" and t.turns == 2
    assert t.infos["total_reward"] == 0.5 and t.infos["step_rewards"] == [0.25, 0.25] and t.infos["gym_done"]
    assert t.prompt_ids == chat.prompt(t.messages[:2]).ids  # the prompt was rendered again from the observation
    assert sch.gym_reward()(["x"], rollout_infos=[t.infos]) == [0.5]
    with pytest.raises(ConfigError, match="gym environment 'nope' not found.*available: .*countdown"):
        _drive(chat, sch.load_scheduler("gym_scheduler", [], 5, chat.tok, gym_env="nope"),
               [{"role": "user", "content": "placeholder"}], max_turns=5)


@pytest.mark.slow
def test_grpo_with_a_gym_environment_takes_its_total_reward(tiny_models, tmp_path):
    """--gym_env implies --use_gym_env: the environment's summed rewards are the reward (no --reward_funcs needed),
    logged as rewards/gym_reward."""
    path = tmp_path / "gym.py"
    path.write_text(GYM_PLUGIN)
    data = write_jsonl(tmp_path / "rows.jsonl",
                       [{"messages": [{"role": "user", "content": "start"}], "solution": str(i)} for i in range(8)])
    res = recipe.main(parse_args("rlhf", [
        "--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", data, "--num_generations", "4",
        "--per_device_train_batch_size", "8", "--max_completion_length", "4", "--logging_steps", "1",
        "--report_to", "none", "--output_dir", str(tmp_path / "out"), "--external_plugins", str(path),
        "--multi_turn_scheduler", "gym_scheduler", "--gym_env", "countdown", "--max_turns", "3",
        "--max_steps", "2"]))
    log = [r for r in read_jsonl(os.path.join(res["run_dir"], "logging.jsonl")) if "reward" in r]
    assert [r["rewards/gym_reward/mean"] for r in log] == [0.5, 0.5] and all(r["num_turns"] == 2 for r in log)


@pytest.mark.parametrize("flags, message", [
    (["--gym_env", "countdown"], "give --multi_turn_scheduler NAME too"),
    (["--multi_turn_scheduler", "gym_scheduler", "--use_gym_env", "true", "--reward_weights", "1"],
     "1 value\\(s\\) for 2 reward function"),
])
def test_what_gym_runs_cannot_take_is_a_flag_error(tiny_models, flags, message):
    args = parse_args("rlhf", ["--rlhf_type", "grpo", "--model", tiny_models("qwen2"), "--dataset", "x.jsonl",
                               "--reward_funcs", "format", *flags])
    with pytest.raises(ConfigError, match=message):
        recipe.configure(args)
