"""Multi-turn GRPO rollouts with ms-swift's scheduler plugin interface (`--multi_turn_scheduler NAME`, `--max_turns`,
`--completion_length_limit_scope`): each completion is a trajectory of model turns and scheduler-provided turns (tool
results, user follow-ups), as ms-swift's colocate mode drives them (swift/rollout/agent_loop.py run_multi_turn).

The contract, ms-swift 4.6's (swift/rollout/multi_turn.py): a scheduler subclasses `MultiTurnScheduler` and is
registered as `multi_turns['name'] = Cls` (a plugin file does it after `from swift.rollout import
MultiTurnScheduler, multi_turns`, or 3.x's `from swift.plugin.multi_turn import ...`; see plugins.py). After each
model turn the driver appends the reply to the request's messages, awaits `on_turn_end`, asks `check_finished`
(`done` from on_turn_end wins; --max_turns always ends it); an unfinished trajectory gets `step(infer_request,
response_choice, current_turn)`, which returns {"infer_request": ..., optional "response_token_ids",
"response_loss_mask", "rollout_infos"} — usually with a tool or user message appended. `run()` overrides are
ms-swift's server mode and are not called here (as in ms-swift's colocate mode).

Tokens: the trajectory is one completion after the prompt, sampled token-in-token-out: each turn's context is the
prompt, then every token so far — the model's sampled tokens (trained, loss mask 1) and the environment's (the
template's rendering of the appended messages, and tokens a step adds with mask 0: untrained, as ms-swift's
response_loss_mask / loss_scale 'default') — so training scores exactly the tokens the model was sampled on.
Every trajectory's next turn is submitted to the engine together; turn t of completion k samples with its own seed.

What lives here: ms-swift's scheduler classes and protocol objects (what plugins are handed), the built-in
`tool_call_scheduler`, the driver (`MultiTurn`), loading a scheduler by name. What must not: the round, scoring,
advantages (rollouts.py), the loss (grpo.py). No torch import at module level.
"""
from __future__ import annotations

import asyncio
import copy
import json
import random
import uuid as uuid_lib
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


# ------------------------------------------------------------------ the driver

_SENTINEL = "\u2063tunesmith-turn\u2063"  # stands for a reply's text while the template renders what follows it


@dataclass
class Trajectory:
    """One completion of a multi-turn rollout: the prompt's token ids [P], then `token_ids` [C] (every token after
    the prompt: the model's turns and the environment's) with `mask` [C] (1: sampled by the model, trained; 0:
    the environment's, untrained), and `turn_ids`: each model turn's tokens as the scheduler left them (ms-swift's
    response_token_ids, [turn][token]). `request.messages` is the whole conversation (what rewards get as
    `messages`); `finish_reason` is the last turn's ("length": cut by a limit)."""
    request: RolloutInferRequest
    prompt_ids: list
    seed: int
    pictures: Optional[dict] = None
    token_ids: list = field(default_factory=list)
    mask: list = field(default_factory=list)
    turn_ids: list = field(default_factory=list)
    turns: int = 0
    finish_reason: str = "stop"
    infos: dict = field(default_factory=dict)

    @property
    def messages(self) -> list:
        """The conversation, the prompt's messages first."""
        return self.request.messages

    @property
    def text(self) -> str:
        """The completion as ms-swift hands it to rewards: the last message's content."""
        content = self.request.messages[-1].get("content") if self.request.messages else ""
        return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)

    def add(self, ids: list, mask: list, continued: bool = False) -> None:
        """Append a turn's tokens [T] with their loss mask [T]; `continued`: the turn continued the previous reply
        (ms-swift then extends that reply's entry of response_token_ids instead of starting one)."""
        self.token_ids += list(ids)
        self.mask += list(mask)
        if continued and self.turn_ids:
            self.turn_ids[-1] = self.turn_ids[-1] + list(ids)
        else:
            self.turn_ids.append(list(ids))


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of turn `turn` (1-based) of the completion whose own seed is `seed`: the first turn uses
    the completion's seed (so a first turn equals the single-turn completion), later ones a mix of both."""
    return seed if turn == 1 else (seed * 1_000_033 + turn * 2_654_435_761) % (2 ** 31)


class MultiTurn:
    """Multi-turn rollouts: a scheduler (ms-swift's interface) and a ChatEngine; `run` drives trajectories turn by
    turn, every unfinished one's next turn submitted to the engine together.

    max_turns: None for no limit. scope: --completion_length_limit_scope, "per_round" (each model turn gets up to
    max_completion_length new tokens; ms-swift's default) or "total" (the whole completion after the prompt —
    model and environment tokens — holds at most max_completion_length). The engine's context length bounds both."""

    def __init__(self, scheduler, chat, name: str, max_turns: Optional[int], scope: str, max_completion_length: int):
        from tunesmith.inference.reply import OutputParser

        self.scheduler, self.chat, self.tok, self.name = scheduler, chat, chat.tok, name
        self.max_turns, self.scope, self.max_completion_length = max_turns, scope, max_completion_length
        self.parser = OutputParser(chat.tok)
        self.stop_ids = set(chat.stop_ids)

    def room(self, t: Trajectory) -> int:
        """How many tokens the next turn of `t` may sample (< 1: none)."""
        left = self.chat.max_model_len - len(t.prompt_ids) - len(t.token_ids)
        budget = self.max_completion_length - (len(t.token_ids) if self.scope == "total" else 0)
        return min(left, budget)

    def run(self, trajectories: list, sample) -> list:
        """Drive `trajectories` (fresh: their requests hold the prompt's messages) to their end; returns them.
        sample([(context ids, max new tokens, seed, pictures or None)]) -> the engine's Completions, in order.
        Raises ConfigError for a scheduler that breaks the contract (naming it and what it returned)."""
        loop = asyncio.new_event_loop()
        try:
            self._start(trajectories, loop)
            active, turn = list(trajectories), 1
            while active:
                runnable = [t for t in active if self.room(t) >= 1]
                for t in active:
                    if self.room(t) < 1:
                        t.finish_reason = "length"
                outs = sample([(t.prompt_ids + t.token_ids, self.room(t), turn_seed(t.seed, turn), t.pictures)
                               for t in runnable]) if runnable else []
                active = [t for t, c in zip(runnable, outs) if self._turn(t, c, turn, loop)]
                turn += 1
        finally:
            loop.close()
        return trajectories

    def generate(self, rollouts, records: dict, seed: int, r: int) -> list:
        """GRPO's hook (Rollouts._groups): the G trajectories [N] of each prompt ({j: its record}, j its place in the
        round), in order. Completion k of prompt j has Rollouts._generate's seed (its first turn is the single-turn
        completion), its later turns `turn_seed`s; its request holds a copy of the prompt's messages, its tools,
        pictures and other columns (`data_dict`, e.g. `solution`), and a uuid from its seed."""
        from tunesmith.data.vision import pixel_inputs

        g = rollouts.group  # --num_generations, or --num_generations_eval in a validation round
        trajectories = []
        for j, rec in records.items():
            base = (seed * 1_000_003 + r * 65_537 + j * g) % (2 ** 31)
            refs = rec.get("images")
            pictures = pixel_inputs([refs], rollouts.images) if refs else None
            for k in range(g):
                request = RolloutInferRequest(copy.deepcopy(rec["messages"]), tools=rec.get("tools"),
                                              images=list(refs or []), data_dict=dict(rec.get("columns") or {}),
                                              uuid=trajectory_uuid(base + k))
                trajectories.append(Trajectory(request, list(rec["prompt_ids"]), base + k, pictures))
        with _Sampler(rollouts) as sample:
            return self.run(trajectories, sample)

    def _start(self, trajectories: list, loop) -> None:
        """ms-swift's on_trajectory_start hook; a request whose messages it replaced gets its prompt rendered
        again."""
        before = [json.dumps(t.request.messages, sort_keys=True, default=str) for t in trajectories]
        loop.run_until_complete(self.scheduler.on_trajectory_start([t.request for t in trajectories]))
        for t, b in zip(trajectories, before):
            if json.dumps(t.request.messages, sort_keys=True, default=str) != b:
                t.prompt_ids = self.chat.prompt(t.request.messages, t.request.tools, images=t.request.images,
                                                pixels=False).ids

    def _turn(self, t: Trajectory, completion, turn: int, loop) -> bool:
        """Take one sampled turn into `t` (ms-swift's run_multi_turn for one request); True when it goes on."""
        ids = list(completion.token_ids)
        choice = self._choice(completion)
        continued = _append_reply(t.request.messages, choice.message.content)
        t.turns, t.finish_reason = turn, completion.finish_reason
        ended = loop.run_until_complete(self.scheduler.on_turn_end(t.request, choice, turn)) or {}
        t.infos.update(ended.get("rollout_infos") or {})
        stop = ended["done"] if "done" in ended else self.scheduler.check_finished(t.request, choice, turn)
        if stop or (self.max_turns and turn >= self.max_turns):
            ids, mask = self._tokens(ended, ids, "on_turn_end")
            t.add(ids, mask, continued)
            return False
        try:
            ret = self.scheduler.step(t.request, choice, turn)
        except NotImplementedError as e:
            raise ConfigError(f"--multi_turn_scheduler {self.name}: {type(self.scheduler).__name__} does not "
                              f"implement step() ({e}); run() overrides are ms-swift's server mode, tunesmith drives "
                              f"step() and check_finished() as ms-swift's colocate mode") from e
        if not isinstance(ret, dict) or ret.get("infer_request") is None:
            raise ConfigError(f"--multi_turn_scheduler {self.name}: step() returned {type(ret).__name__}, not a dict "
                              f"with 'infer_request' (the request for the next turn)")
        t.request = ret["infer_request"]
        t.infos.update(ret.get("rollout_infos") or {})
        ids, mask = self._tokens(ret, ids, "step")
        t.add(ids, mask, continued)
        glue = self._glue(t.request, ids)
        t.token_ids, t.mask = t.token_ids + glue, t.mask + [0] * len(glue)
        if self.room(t) < 1:  # no room for another turn: the environment's tokens at the end train nothing
            t.token_ids, t.mask = t.token_ids[:len(t.token_ids) - len(glue)], t.mask[:len(t.mask) - len(glue)]
            t.finish_reason = "length"
            return False
        return True

    def _choice(self, completion) -> ChatCompletionResponseChoice:
        """The engine's Completion as ms-swift's response choice: content decoded without the stop token and
        special tokens, tool calls parsed with the chat template's format."""
        ids = list(completion.token_ids)
        body = ids[:-1] if ids and ids[-1] in self.stop_ids and completion.finish_reason == "stop" else ids
        parsed = self.parser.parse(self.tok.decode(body, skip_special_tokens=False), tools=True, final=True)
        calls = [ChatCompletionMessageToolCall(Function(c["function"]["name"], c["function"]["arguments"]),
                                               id=c["id"]) for c in parsed.tool_calls]
        message = ChatMessage("assistant", self.tok.decode(body, skip_special_tokens=True), calls or None,
                              parsed.reasoning)
        return ChatCompletionResponseChoice(0, message, completion.finish_reason, None, ids)

    def _tokens(self, ret: dict, ids: list, where: str) -> tuple[list, list]:
        """This turn's tokens [T] and loss mask [T]: the scheduler's response_token_ids / response_loss_mask when
        it returned them, else the sampled ids, all trained. Raises ConfigError when they do not pair up."""
        given, mask = ret.get("response_token_ids"), ret.get("response_loss_mask")
        if given is None:
            if mask is not None:
                raise ConfigError(f"--multi_turn_scheduler {self.name}: {where}() returned response_loss_mask "
                                  f"without response_token_ids (ms-swift requires both)")
            return ids, [1] * len(ids)
        given = [int(i) for i in given]
        mask = [1] * len(given) if mask is None else [int(v) for v in mask]
        if len(mask) != len(given) or any(v not in (0, 1) for v in mask):
            raise ConfigError(f"--multi_turn_scheduler {self.name}: {where}() returned {len(given)} "
                              f"response_token_ids and a response_loss_mask of {len(mask)} values; it must have "
                              f"one 0 or 1 per token")
        return given, mask

    def _glue(self, request, turn_ids: list) -> list:
        """The environment's tokens [E] between this turn and the next: how the chat template renders the
        messages the scheduler appended after the reply (the reply's end-of-turn, each new message, the generation
        prompt), less the stop token the model already sampled. [] when the scheduler left the reply last (the
        next turn continues it). Raises ConfigError when there is no reply or the template hides its text."""
        msgs = request.messages
        if not msgs or msgs[-1].get("role") == "assistant":
            return []
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ConfigError(f"--multi_turn_scheduler {self.name}: step() left no assistant message in the "
                              f"conversation (the model's reply must stay in it)")
        text = self._render(msgs[:last] + [{"role": "assistant", "content": _SENTINEL}] + msgs[last + 1:], request)
        at = text.rfind(_SENTINEL)
        if at < 0:
            raise ConfigError("multi-turn rollouts: the chat template does not render an assistant reply's text "
                              "verbatim, so the turns cannot be joined token for token")
        tail = text[at + len(_SENTINEL):]
        stop = turn_ids[-1] if turn_ids and turn_ids[-1] in self.stop_ids else None
        if stop is not None:
            said = self.tok.decode([stop], skip_special_tokens=False)
            tail = tail[len(said):] if tail.startswith(said) else tail
        return self.tok(tail, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list, request) -> str:
        """The chat template's text for messages, with the generation prompt (as ChatEngine.prompt renders)."""
        from tunesmith.inference.reply import to_template_messages

        enc = self.chat.encoder
        kwargs = {**self.chat.template_kwargs, **(request.chat_template_kwargs or {})}
        return enc.render(enc.with_system(to_template_messages(messages)), add_generation_prompt=True,
                          tools=request.tools, **kwargs)


class _Sampler:
    """Submits a turn's rows to the rollouts' engine together (the policy in eval mode, or vLLM holding the
    round's adapter, for the whole rollout) and waits for them; raises the engine's sampling errors."""

    def __init__(self, rollouts):
        self.rollouts, self.training = rollouts, False

    def __enter__(self):
        ro = self.rollouts
        self.adapter = ro.vllm.sync(ro.weights) if ro.vllm is not None else None
        self.training = ro.vllm is None and ro.model.training
        if self.training:
            ro.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        if self.training:
            self.rollouts.model.train()

    def __call__(self, rows: list) -> list:
        """rows [(context ids, max new tokens, seed, pictures or None)] -> the engine's Completions, in order."""
        from tunesmith.inference.chat import GenConfig
        from tunesmith.train.interrupts import raise_sampling_errors

        m, chat = self.rollouts.method, self.rollouts.chat
        handles = []
        for ids, room, seed, pictures in rows:
            cfg = GenConfig(max_new_tokens=room, temperature=m.temperature, top_p=m.top_p, top_k=m.top_k,
                            repetition_penalty=m.repetition_penalty, seed=seed, min_p=m.min_p)
            extra = {"images": pictures} if pictures else {}
            handles.append(chat.engine.submit(ids, chat.sampling(cfg, 0), self.adapter, **extra))
        out = [h.result() for h in handles]
        raise_sampling_errors(out, "policy")
        return out


def _append_reply(messages: list, text: str) -> bool:
    """ms-swift's append_assistant_completion: a new assistant message, or the text added to the last one when the
    scheduler left a reply last (a continuation; returns True then)."""
    if messages and messages[-1].get("role") == "assistant":
        messages[-1]["content"] = (messages[-1].get("content") or "") + text
        return True
    messages.append({"role": "assistant", "content": text})
    return False


def trajectory_uuid(seed: int) -> str:
    """A trajectory's uuid, from its completion seed: the same across a resume."""
    return uuid_lib.UUID(int=random.Random(seed).getrandbits(128), version=4).hex
