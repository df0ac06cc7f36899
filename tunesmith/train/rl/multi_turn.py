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

What lives here: the driver (`MultiTurn`, `Trajectory`); ms-swift's scheduler classes, protocol objects and
built-ins, and loading a scheduler by name, are in schedulers.py. What must not: the round, scoring,
advantages (rollouts.py), the loss (grpo.py). No torch import at module level.
"""
from __future__ import annotations

import asyncio
import copy
import json
import random
import uuid as uuid_lib
from dataclasses import dataclass, field
from typing import Optional

from tunesmith.errors import ConfigError
from tunesmith.log import note
from tunesmith.train.rl.schedulers import (ChatCompletionMessageToolCall, ChatCompletionResponseChoice, ChatMessage,
                                          Function, RolloutInferRequest)


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
        if not max_turns:
            note(f"--multi_turn_scheduler {name} without --max_turns: a trajectory ends when the scheduler says so "
                 f"or when it fills the model's context ({chat.max_model_len} tokens" +
                 (f"; --max_completion_length {max_completion_length} in all" if scope == "total" else "") +
                 "); a scheduler that never finishes makes each round that long — pass --max_turns N to bound it")

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
        ended = self._call("on_turn_end", turn, lambda: loop.run_until_complete(
            self.scheduler.on_turn_end(t.request, choice, turn))) or {}
        t.infos.update(ended.get("rollout_infos") or {})
        stop = ended["done"] if "done" in ended else \
            self._call("check_finished", turn, lambda: self.scheduler.check_finished(t.request, choice, turn))
        if stop or (self.max_turns and turn >= self.max_turns):
            ids, mask = self._tokens(ended, ids, "on_turn_end")
            t.add(ids, mask, continued)
            return False
        replied = copy.deepcopy(t.request.messages)  # the conversation ending in the model's reply
        ret = self._call("step", turn, lambda: self.scheduler.step(t.request, choice, turn))
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
            t.request.messages = replied  # and its messages leave too: rewards score the model's last reply
            t.finish_reason = "length"
            return False
        return True

    def _call(self, what: str, turn: int, fn):
        """A scheduler hook's result; an exception in the plugin's code becomes one ConfigError naming the
        scheduler, the hook and the turn (NotImplementedError from step(): what tunesmith drives instead)."""
        try:
            return fn()
        except ConfigError:
            raise
        except NotImplementedError as e:
            raise ConfigError(f"--multi_turn_scheduler {self.name}: {type(self.scheduler).__name__} does not "
                              f"implement {what}() ({e}); run() overrides are ms-swift's server mode, tunesmith "
                              f"drives step() and check_finished() as ms-swift's colocate mode") from e
        except Exception as e:  # the plugin's own bug: said once, with where it happened
            raise ConfigError(f"--multi_turn_scheduler {self.name}: {type(self.scheduler).__name__}.{what}() "
                              f"raised {type(e).__name__}: {e} (turn {turn}); fix the scheduler (run it on one "
                              f"request to see the traceback)") from e

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
        bad = next((i for i in given if not 0 <= i < len(self.tok)), None)
        if bad is not None:
            raise ConfigError(f"--multi_turn_scheduler {self.name}: {where}() returned response_token_ids with {bad}, "
                              f"not a token id of this tokenizer (0 to {len(self.tok) - 1})")
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
        try:
            text = self._render(msgs[:last] + [{"role": "assistant", "content": _SENTINEL}] + msgs[last + 1:],
                                request)
        except Exception as e:  # a message the scheduler appended that the chat template cannot render
            raise ConfigError(f"--multi_turn_scheduler {self.name}: the chat template cannot render the messages "
                              f"step() appended ({type(e).__name__}: {e}); each needs a role the template knows "
                              f"(user, tool, system) and string content") from e
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
