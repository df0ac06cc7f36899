"""ms-swift's multi-turn scheduler interface, as plugin files see it (`--multi_turn_scheduler NAME`): the protocol
objects a scheduler is handed (RolloutInferRequest, ChatCompletionResponseChoice, …), `RolloutScheduler` /
`MultiTurnScheduler` and the `multi_turns` registry plugin files add to, the built-in `tool_call_scheduler` and
ms-swift's gym interface (`Env`, `envs`, `gym_scheduler`, the `gym_reward` it feeds), offered to plugin files under
ms-swift's 4.x and 3.x module names (plugins.provide), and `load_scheduler`. The contract is ms-swift 4.6's
(swift/rollout/multi_turn.py, swift/plugin/env.py); the driver that runs schedulers turn by turn is multi_turn.py.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from tunesmith.errors import ConfigError
from tunesmith.train.rl import plugins


# ------------------------------------------------------------------ ms-swift's protocol objects


@dataclass
class RequestConfig:
    """ms-swift's RequestConfig (swift/infer_engine/protocol.py): the sampling settings of a turn."""
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    n: int = 1
    stop: list = field(default_factory=list)
    stream: bool = False
    logprobs: bool = False


@dataclass
class RolloutInferRequest:
    """One trajectory's request as schedulers see it (ms-swift's RolloutInferRequest): `messages` (OpenAI shape;
    the scheduler appends to them), `tools`, `images`, `data_dict` (the dataset row's other columns, e.g.
    `solution`), `uuid` (the trajectory's, stable across a resume)."""
    messages: list
    tools: Optional[list] = None
    images: list = field(default_factory=list)
    data_dict: dict = field(default_factory=dict)
    uuid: str = ""
    chat_template_kwargs: Optional[dict] = None
    audios: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    objects: dict = field(default_factory=dict)


@dataclass
class Function:
    """A tool call's function: name and JSON arguments (a string), as OpenAI and ms-swift."""
    name: str
    arguments: str


@dataclass
class ChatCompletionMessageToolCall:
    """One parsed tool call (ms-swift's ChatCompletionMessageToolCall)."""
    function: Function
    type: str = "function"
    id: str = ""


@dataclass
class ChatMessage:
    """The model's reply of a turn: `content` is the whole decoded reply (tool-call markup included, as ms-swift's
    engines return it), `tool_calls` the calls parsed from it with the chat template's format."""
    role: str
    content: str
    tool_calls: Optional[list] = None
    reasoning_content: Optional[str] = None


@dataclass
class ChatCompletionResponseChoice:
    """A turn's result (ms-swift's ChatCompletionResponseChoice): the message, finish_reason ("stop" or
    "length"), the sampled token ids [T] (the stop token included, as vLLM reports them)."""
    index: int
    message: ChatMessage
    finish_reason: Optional[str]
    logprobs: Optional[dict] = None
    token_ids: Optional[list] = None


@dataclass
class ChatCompletionResponse:
    """ms-swift's ChatCompletionResponse, for plugins' type hints."""
    model: str
    choices: list
    id: str = ""


@dataclass
class RolloutOutput:
    """ms-swift's RolloutOutput, for plugins' type hints (the driver builds `Trajectory` instead)."""
    response: Any = None
    messages: Optional[list] = None
    response_token_ids: list = field(default_factory=list)
    response_loss_mask: list = field(default_factory=list)
    rollout_infos: dict = field(default_factory=dict)


# ------------------------------------------------------------------ ms-swift's scheduler classes


class RolloutScheduler:
    """ms-swift's RolloutScheduler: `max_turns`, the tokenizer (`tokenizer`), and the two async hooks the driver
    awaits: `on_trajectory_start(requests)` before the first turn (may replace a request's messages) and
    `on_turn_end(request, choice, turn)` after each reply ({"done": bool, "rollout_infos": dict}, both optional).
    `infer_engine` is None here (colocate mode): tunesmith's engine samples the turns."""

    def __init__(self, infer_engine=None, max_turns: Optional[int] = None, *args, **kwargs):
        self.infer_engine = infer_engine
        self._tokenizer = kwargs.get("tokenizer")
        self._template = kwargs.get("template")
        self.max_turns = max_turns

    @property
    def tokenizer(self):
        """The policy's tokenizer."""
        return self._tokenizer

    @property
    def engine(self):
        """ms-swift's engine attribute: None (tunesmith's engine is not exposed to schedulers)."""
        return self.infer_engine

    async def on_trajectory_start(self, requests: list) -> None:
        """Before the first turn; the default does nothing."""

    async def on_turn_end(self, infer_request, response_choice, current_turn: int) -> dict:
        """After each turn's reply is appended; the default returns {}."""
        return {}

    @staticmethod
    def _extract_logprobs_from_choice(response_choice) -> list:
        """The turn's sampled log-probs (empty: tunesmith's rollouts do not report them to schedulers)."""
        if response_choice.logprobs is None or "content" not in response_choice.logprobs:
            return []
        return [item["logprob"] for item in response_choice.logprobs["content"]]

    async def run(self, infer_request, request_config, **kwargs):
        """ms-swift's server-mode entry point; tunesmith drives step/check_finished instead (colocate mode)."""
        raise NotImplementedError("run() is ms-swift's server mode (swift rollout); tunesmith drives the scheduler's "
                                  "step() and check_finished() as ms-swift's colocate mode does")


class MultiTurnScheduler(RolloutScheduler):
    """ms-swift's MultiTurnScheduler: implement `step` (the next turn's request, e.g. with a tool message
    appended) and optionally `check_finished` (default: the reply was cut by the length limit, or --max_turns
    reached)."""

    def step(self, infer_request, response_choice, current_turn: int) -> dict:
        """{"infer_request": the request for the next turn, optional "response_token_ids" [T] and
        "response_loss_mask" [T] (this turn's tokens as trained: 1 trained, 0 not), "rollout_infos": {...}}."""
        raise NotImplementedError("Please implement the `step` method in your MultiTurnScheduler subclass.")

    def check_finished(self, infer_request, response_choice, current_turn: int) -> bool:
        """Whether the trajectory ends after this turn."""
        if response_choice.finish_reason == "length":
            return True
        return bool(self.max_turns and current_turn >= self.max_turns)


class ToolCallScheduler(MultiTurnScheduler):
    """The built-in `tool_call_scheduler` (ms-swift ships it as an example plugin, ReAct-parsed; this one parses the
    chat template's own tool-call format, e.g. Qwen's `<tool_call>{json}</tool_call>`): a reply with tool calls
    gets each call executed and its result appended as a `tool` message; a reply without one ends the trajectory.

    Tools: `self.tools` {name: function(**arguments) -> result}; subclass it in a plugin and add yours (a result
    that is not a string is JSON-encoded). An unknown tool or a failing one answers with an error message (the
    model sees it, as ms-swift's example does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tools: dict = {}

    def check_finished(self, infer_request, response_choice, current_turn: int) -> bool:
        """Finished when the reply calls no tool (or the base class's limits)."""
        if not response_choice.message.tool_calls:
            return True
        return super().check_finished(infer_request, response_choice, current_turn)

    def call_tool(self, name: str, arguments: str) -> str:
        """One tool's result as text; errors become the result (the trajectory goes on)."""
        fn = self.tools.get(name)
        if fn is None:
            return f"unknown tool {name!r} (available: {', '.join(sorted(self.tools)) or 'none'})"
        try:
            args = json.loads(arguments) if arguments else {}
            out = fn(**args) if isinstance(args, dict) else fn(args)
        except Exception as e:  # noqa: BLE001 — the model reads the error, as ms-swift's example scheduler
            return f"tool error: {type(e).__name__}: {e}"
        return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)

    def step(self, infer_request, response_choice, current_turn: int) -> dict:
        """Execute the reply's tool calls; append one `tool` message per call."""
        for call in response_choice.message.tool_calls or []:
            infer_request.messages.append({"role": "tool", "name": call.function.name,
                                           "content": self.call_tool(call.function.name, call.function.arguments)})
        return {"infer_request": infer_request}


class Env:
    """ms-swift's gym environment (swift/rollout/gym_env.py), one per trajectory, made as Cls(env_config) (the row's
    `env_config` column; its "name" picks the class from `envs`, else --gym_env): `async reset(request) ->
    (observation, info, system_message)` opens the conversation, `async step(messages) -> (next_observation,
    reward, done, info)` answers each model turn, `async close()` when done."""

    def __init__(self, env_config):
        self.env_config = env_config

    async def reset(self, config) -> tuple:
        """(the first user message, info, the system prompt or "")."""
        raise NotImplementedError("implement reset() in your Env subclass")

    async def step(self, action: list) -> tuple:
        """(the next user message, this turn's reward, whether the episode is over, info) for the conversation so
        far (`action`: its messages, the model's reply last)."""
        raise NotImplementedError("implement step() in your Env subclass")

    async def close(self) -> None:
        """Free the environment's resources; the default does nothing."""


envs: dict = {}  # ms-swift's registry of gym environments: name -> Env class


class GYMScheduler(MultiTurnScheduler):
    """ms-swift's `gym_scheduler`: each trajectory gets its own environment (see `Env`), which replaces the prompt
    with its first observation (and system prompt), answers every model turn with the next observation as a user
    message, and ends the trajectory when it says done (or --max_turns does). Each turn's reward is summed into
    rollout_infos["total_reward"] (with "step_rewards"), which --use_gym_env makes a reward (`gym_reward`).
    Raises ConfigError for an environment name not in `envs`."""

    def __init__(self, infer_engine=None, max_turns: Optional[int] = None, **kwargs):
        super().__init__(infer_engine, max_turns, **kwargs)
        self.gym_env_name = kwargs.get("gym_env")
        self._envs, self._total, self._steps, self._pending = {}, {}, {}, {}

    async def on_trajectory_start(self, requests: list) -> None:
        """Make and reset each request's environment; its observation becomes the conversation."""
        for req in requests:
            config = dict((req.data_dict or {}).get("env_config") or {})
            name = config.get("name", self.gym_env_name)
            if name not in envs:
                raise ConfigError(f"gym environment {name!r} not found (--gym_env, or the row's env_config name); "
                                  f"available: {', '.join(sorted(envs)) or 'none'} (an --external_plugins file "
                                  f"registers one as envs['name'] = MyEnv)")
            env = envs[name](config)
            observation, _, system = await env.reset(req)
            req.messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": observation}]
            self._envs[req.uuid], self._total[req.uuid], self._steps[req.uuid] = env, 0.0, []
            self._pending[req.uuid] = None

    async def on_turn_end(self, infer_request, response_choice, current_turn: int) -> dict:
        """The environment's step: its reward is added up, its observation kept for `step`."""
        key = infer_request.uuid
        env = self._envs.get(key)
        if env is None:
            return {"done": True, "rollout_infos": {}}
        observation, reward, done, _ = await env.step(copy.deepcopy(infer_request.messages))
        self._total[key] += float(reward)
        self._steps[key].append(float(reward))
        self._pending[key] = None if done else observation
        infos = {"total_reward": self._total[key], "step_rewards": list(self._steps[key]), "gym_done": done}
        if done:
            self._envs.pop(key, None)
            await env.close()
        return {"done": done, "rollout_infos": infos}

    def step(self, infer_request, response_choice, current_turn: int) -> dict:
        """The environment's observation as the next user message."""
        observation = self._pending.pop(infer_request.uuid, None)
        if observation is not None:
            infer_request.messages.append({"role": "user", "content": observation})
        return {"infer_request": infer_request}


def gym_reward():
    """--use_gym_env's reward: each trajectory's rollout_infos["total_reward"] (None when the scheduler reported
    none), logged as rewards/gym_reward, after the reward functions and models as in ms-swift."""
    from tunesmith.train.rl.scoring import RewardFn

    return RewardFn("gym_reward", "gym_reward", _total_reward)


def _total_reward(completions, rollout_infos=None, **kwargs) -> list:
    return [(info or {}).get("total_reward") for info in (rollout_infos or [None] * len(completions))]


# ms-swift's registry: name -> scheduler class
multi_turns: dict = {"tool_call_scheduler": ToolCallScheduler, "gym_scheduler": GYMScheduler}

# what plugins import from ms-swift (4.x homes, then 3.x's), offered while they load without ms-swift installed
_PROTOCOL = dict(RequestConfig=RequestConfig, RolloutInferRequest=RolloutInferRequest, Function=Function,
                 ChatMessage=ChatMessage, ChatCompletionResponseChoice=ChatCompletionResponseChoice,
                 ChatCompletionResponse=ChatCompletionResponse, RolloutOutput=RolloutOutput,
                 ChatCompletionMessageToolCall=ChatCompletionMessageToolCall)
_SCHEDULERS = dict(MultiTurnScheduler=MultiTurnScheduler, RolloutScheduler=RolloutScheduler, multi_turns=multi_turns)
for _home in ("rollout", "rollout.multi_turn", "plugin", "plugin.multi_turn"):
    plugins.provide(_home, **_SCHEDULERS)
for _home in ("rollout", "rollout.gym_env", "plugin", "plugin.env"):
    plugins.provide(_home, Env=Env, envs=envs)
for _home in ("infer_engine", "infer_engine.protocol", "llm", "llm.infer", "llm.infer.protocol"):
    plugins.provide(_home, **_PROTOCOL)
plugins.provide("template", Messages=list)


# ------------------------------------------------------------------ loading a scheduler

# ms-swift 4.6's built-in schedulers tunesmith does not ship, and why (a name of theirs gets this in its error)
_NOT_SHIPPED = {"math_tip_trick": "ms-swift's math tip trick", "thinking_tips_scheduler": "ms-swift's thinking tips",
                "openenv_scheduler": "OpenEnv environments (a server per environment)"}


def load_scheduler(name: str, plugin_paths: list, max_turns: Optional[int], tokenizer=None,
                   gym_env: Optional[str] = None):
    """The scheduler registered as `name`: tunesmith's built-ins (`multi_turns`), what the --external_plugins files
    (absolute paths; run here unless already run, see plugins.run_plugin) registered in it, or in an installed
    ms-swift's registry. Instantiated as ms-swift does: Cls(max_turns=..., tokenizer=..., template=None).

    Raises ConfigError: an unknown name (naming the available ones), a registered object that is not a
    MultiTurnScheduler-like class (no step/check_finished), a constructor that fails, or a plugin that fails.
    gym_env: --gym_env, passed on as ms-swift does (only when set)."""
    import difflib
    import os

    installed = {}
    for path in plugin_paths:
        path = os.path.abspath(os.path.expanduser(path))
        plugins.run_plugin(path, {})
        installed.update(plugins.plugin_schedulers(path))
    found = {**multi_turns, **installed}  # read after the plugins ran: they register into `multi_turns`
    cls = found.get(name)
    if cls is None:
        near = difflib.get_close_matches(name, list(found), n=1)
        why = (f" ({_NOT_SHIPPED[name]} is an ms-swift built-in tunesmith does not ship yet)"
               if name in _NOT_SHIPPED else "")
        raise ConfigError(f"--multi_turn_scheduler {name}: no such scheduler{why}"
                          + (f"; did you mean {near[0]}?" if near else "")
                          + f"; available: {', '.join(sorted(found))} (an --external_plugins file registers more as "
                            f"multi_turns['name'] = MyScheduler, after `from swift.rollout import "
                            f"MultiTurnScheduler, multi_turns`)")
    if not (isinstance(cls, type) and callable(getattr(cls, "step", None))
            and callable(getattr(cls, "check_finished", None))):
        raise ConfigError(f"--multi_turn_scheduler {name}: multi_turns[{name!r}] is {cls!r}, not a scheduler class "
                          f"(subclass MultiTurnScheduler and implement step())")
    try:
        with plugins.stand_in():  # imports of ms-swift inside the constructor find the stand-in too
            return cls(max_turns=max_turns, tokenizer=tokenizer, template=None,
                       **({"gym_env": gym_env} if gym_env is not None else {}))
    except Exception as e:  # noqa: BLE001 — the plugin's constructor: one clear message
        raise ConfigError(f"--multi_turn_scheduler {name}: {cls.__name__}(max_turns=..., tokenizer=..., "
                          f"template=None) failed: {type(e).__name__}: {e}") from e

