"""Reward functions for GRPO, named on the command line as ms-swift and TRL name them.

A reward scores a batch of completions: `(completions: list[str], **kwargs) -> list[float | None]`, where kwargs
are the dataset's other columns batched as lists (e.g. `solution`), `messages`, `trainer_state`, and the
completions' token ids as `response_token_ids` (ms-swift) and `completion_ids` (TRL); None means "no reward for
this completion" (it becomes NaN and is left out of the weighted sum; see losses.combine_rewards). Sources:
  * ms-swift's built-ins (swift/rewards/orm.py in ms-swift 4.6): accuracy, format, react_format, cosine,
    repetition, soft_overlong — classes with ms-swift's names and semantics, reading their parameters from
    RewardArgs (ms-swift's flag names and defaults, rlhf_trainers/args_mixin.py:368-414);
  * ms-swift plugin files (`--external_plugins plugin.py`): classes derived from ORM / AsyncORM registered as
    `orms['name'] = Cls`, written for ms-swift 3.x (`from swift.plugin import ORM, orms`) or 4.x
    (`from swift.rewards import ORM, orms`); they run unchanged whether or not ms-swift is installed;
  * TRL's built-ins (trl/rewards: accuracy_reward, reasoning_accuracy_reward, think_format_reward,
    get_soft_overlong_punishment) and TRL-style `module.func` / `module:func` names (trl/scripts/grpo.py).
What lives here: the reward functions' parameters (RewardArgs), ms-swift's base classes (ORM, AsyncORM), the
built-ins of ms-swift and TRL, their registries, and how a name resolves (`load_reward_functions`). Elsewhere:
answer checking (`tunesmith.train.rl.answers`), running plugin files (`tunesmith.train.rl.plugins`), calling the
rewards on a batch (`tunesmith.train.rl.scoring`; `score` is reachable from here too). This module stays light (no
torch) because the CLI imports it to check names before training starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from typing import Any, Callable

from tunesmith.errors import ConfigError
from tunesmith.train.rl.answers import fallback_accuracy, math_verify_accuracy
from tunesmith.train.rl import rm_plugins, schedulers  # noqa: F401 — offer their names to plugins (plugins.provide)
from tunesmith.train.rl.plugins import provide, run_plugin
# score is called through this module too (rewards.score), as before scoring had a module of its own
from tunesmith.train.rl.scoring import RewardFn, score  # noqa: F401


@dataclasses.dataclass(frozen=True)
class RewardArgs:
    """The reward functions' parameters: ms-swift's flag names and defaults (rlhf_trainers/args_mixin.py:374-414).
    Plugin classes receive it as `self.args`, where ms-swift passes its GRPOConfig."""
    cosine_min_len_value_wrong: float = -0.5   # r^w_0: reward of a wrong answer of length 0 (Yeo et al. 2025)
    cosine_max_len_value_wrong: float = 0.0    # r^w_L: of a wrong answer of length cosine_max_len
    cosine_min_len_value_correct: float = 1.0  # r^c_0: of a correct answer of length 0
    cosine_max_len_value_correct: float = 0.5  # r^c_L: of a correct answer of length cosine_max_len
    cosine_max_len: int | None = None          # L_max, tokens; None: max_completion_length (arguments.py:111)
    repetition_n_grams: int = 3
    repetition_max_penalty: float = -1.0
    soft_max_length: int | None = None         # L_max (DAPO eq. 13); None: max_completion_length (rlhf_args.py:366)
    soft_cache_length: int | None = None       # L_cache; required by soft_overlong
    max_completion_length: int = 512           # ms-swift's default (arguments/rlhf_args.py:242)


# ------------------------------------------------------------------ base classes (ms-swift's interface)

class ORM:
    """A synchronous reward ("outcome reward model"), as ms-swift's swift.rewards.ORM: subclasses implement
    `__call__(self, completions, **kwargs) -> list[float | None]`; `args` is the RewardArgs."""

    def __init__(self, args: RewardArgs | None = None, **kwargs):
        self.args = args

    def __call__(self, completions, **kwargs) -> list:
        raise NotImplementedError


class AsyncORM:
    """An asynchronous reward, as ms-swift's swift.rewards.AsyncORM: `async def __call__(self, completions,
    **kwargs)`. All async rewards of a batch run concurrently (asyncio.gather), as ms-swift does."""

    def __init__(self, args: RewardArgs | None = None, **kwargs):
        self.args = args

    async def __call__(self, completions, **kwargs) -> list:
        raise NotImplementedError


# ------------------------------------------------------------------ answer checking

def accuracy_backend() -> str:
    """Which answer checker `accuracy` uses: "math_verify" (HuggingFace's Math-Verify, as ms-swift and TRL) when
    it is importable, else "fallback" (tunesmith's own: the last \\boxed{...} or final number, compared as exact
    numbers, else as normalised strings)."""
    return "math_verify" if importlib.util.find_spec("math_verify") is not None else "fallback"


# ------------------------------------------------------------------ ms-swift's built-ins (swift/rewards/orm.py)

def _token_count(ids) -> int:
    """A completion's length in tokens; multi-turn completions are lists of lists (orm.py:170)."""
    return sum(map(len, ids)) if ids and isinstance(ids[0], list) else len(ids)


def _need_token_ids(kwargs: dict, who: str) -> list:
    ids = kwargs.get("response_token_ids")
    if ids is None:
        raise ConfigError(f"the {who} reward needs the completions' token ids (response_token_ids)")
    return ids


class MathAccuracy(ORM):
    """`accuracy`: 1.0 when the completion's answer equals `solution`'s (a dataset column), else 0.0 — 0.0 too
    when the solution has no parseable answer. With math_verify as ms-swift (orm.py:69-120: the <answer> tag's
    content if present, else a LaTeX/boxed extraction); otherwise the fallback checker (accuracy_backend)."""

    def __call__(self, completions, solution=None, **kwargs) -> list:
        if solution is None:
            raise ConfigError("the accuracy reward needs a 'solution' column in the dataset")
        check = math_verify_accuracy if accuracy_backend() == "math_verify" else fallback_accuracy
        # a number in the column is its text; a row without a solution gets no reward (None: left out, as ms-swift)
        return [None if s is None else check(c, str(s)) for c, s in zip(completions, solution)]


class Format(ORM):
    """`format`: 1.0 when the completion is exactly `<think>...</think>` then `<answer>...</answer>` (whitespace
    between), else 0.0 — ms-swift's regex (orm.py:123-129)."""

    def __call__(self, completions, **kwargs) -> list:
        pattern = r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])"
        return [1.0 if re.match(pattern, c, re.DOTALL | re.MULTILINE) else 0.0 for c in completions]


class ReActFormat(ORM):
    """`react_format`: 1.0 for `<think>...</think>` then `Action: ... Action Input: ...` (orm.py:132-138)."""

    def __call__(self, completions, **kwargs) -> list:
        pattern = r"^<think>.*?</think>\s*Action:.*?Action Input:.*?$"
        return [1.0 if re.match(pattern, c, re.DOTALL | re.MULTILINE) else 0.0 for c in completions]


class CosineReward(ORM):
    """`cosine`: accuracy scaled by length (Yeo et al. 2025, arXiv:2502.03373; ms-swift orm.py:141-173).
    With t the completion's tokens (response_token_ids) and T = cosine_max_len:
    r = hi − (hi − lo)(1 − cos(πt/T))/2, where (hi, lo) = (min_len_value_correct, max_len_value_correct) for a
    correct answer (accuracy ≥ 1), (min_len_value_wrong, max_len_value_wrong) otherwise. As ms-swift, t is not
    capped at T (the cosine is periodic beyond it). Needs `solution` and the token ids."""

    def __init__(self, args: RewardArgs | None = None, accuracy_orm=None, **kwargs):
        super().__init__(args or RewardArgs())
        a = self.args
        self.max_len = a.cosine_max_len or a.max_completion_length
        self.accuracy_orm = accuracy_orm or MathAccuracy(a)

    @staticmethod
    def cosfn(t, T, min_value, max_value):
        """The cosine schedule from max_value (t = 0) to min_value (t = T)."""
        return max_value - (max_value - min_value) * (1 - math.cos(t * math.pi / T)) / 2

    def __call__(self, completions, solution=None, **kwargs) -> list:
        ids = _need_token_ids(kwargs, "cosine")
        a, rewards = self.args, []
        for n, acc in zip(ids, self.accuracy_orm(completions, solution, **kwargs)):
            if acc >= 1.0:
                lo, hi = a.cosine_max_len_value_correct, a.cosine_min_len_value_correct
            else:
                lo, hi = a.cosine_max_len_value_wrong, a.cosine_min_len_value_wrong
            rewards.append(self.cosfn(_token_count(n), self.max_len, lo, hi))
        return rewards


class RepetitionPenalty(ORM):
    """`repetition`: (1 − distinct n-grams / n-grams) · repetition_max_penalty over lower-cased whitespace words
    (Yeo et al. 2025, arXiv:2502.03373; ms-swift orm.py:176-213); 0.0 for an empty completion or one with fewer
    than n words."""

    def __init__(self, args: RewardArgs | None = None, **kwargs):
        super().__init__(args or RewardArgs())

    def __call__(self, completions, **kwargs) -> list:
        n, rewards = self.args.repetition_n_grams, []
        for completion in completions:
            words = completion.lower().split()
            if completion == "" or len(completion.split()) < n:
                rewards.append(0.0)
                continue
            grams = list(zip(*[words[i:] for i in range(n)]))
            rewards.append((1 - len(set(grams)) / len(grams)) * self.args.repetition_max_penalty)
        return rewards


class SoftOverlong(ORM):
    """`soft_overlong`: DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13; ms-swift
    orm.py:216-232): min(−(t − (L_max − L_cache)) / L_cache, 0) for a completion of t tokens, L_max =
    soft_max_length (default max_completion_length), L_cache = soft_cache_length. Unlike TRL's version it is not
    floored at −1 (as ms-swift). Needs the token ids. Raises ConfigError without soft_cache_length or when
    soft_cache_length ≥ soft_max_length."""

    def __init__(self, args: RewardArgs | None = None, **kwargs):
        super().__init__(args or RewardArgs())
        self.soft_max_length = self.args.soft_max_length or self.args.max_completion_length
        self.soft_cache_length = self.args.soft_cache_length
        if self.soft_cache_length is None:
            raise ConfigError("the soft_overlong reward needs --soft_cache_length")
        if not self.soft_cache_length < self.soft_max_length:
            raise ConfigError(f"soft_cache_length ({self.soft_cache_length}) must be below soft_max_length "
                              f"({self.soft_max_length})")

    def __call__(self, completions, **kwargs) -> list:
        expected = self.soft_max_length - self.soft_cache_length
        return [min(-(_token_count(ids) - expected) / self.soft_cache_length, 0)
                for ids in _need_token_ids(kwargs, "soft_overlong")]


# the registry plugins add to, as ms-swift's `orms` (swift/rewards/orm.py:462-471)
orms: dict[str, Any] = {
    "accuracy": MathAccuracy,
    "format": Format,
    "react_format": ReActFormat,
    "cosine": CosineReward,
    "repetition": RepetitionPenalty,
    "soft_overlong": SoftOverlong,
}
for _home in ("plugin", "rewards", "plugin.orm", "rewards.orm"):  # for code that imports them after loading
    provide(_home, ORM=ORM, AsyncORM=AsyncORM, orms=orms)


# ms-swift built-ins tunesmith does not carry (they need sympy's ANTLR LaTeX parser / rouge); a plugin can
NOT_BUILT_IN = {"math": "MathORM", "toolbench": "ReactORM"}


# ------------------------------------------------------------------ TRL's built-ins (trl/rewards)

def _content(completion) -> str:
    """A TRL completion's text: the string, or the first message's content in conversational form."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def think_format_reward(completions, **kwargs) -> list:
    """TRL's think_format_reward (trl/rewards/format_rewards.py): 1.0 when the completion starts with one
    <think>...</think> block, else 0.0."""
    pattern = r"^<think>(?!.*<think>)(.*?)</think>.*$"
    return [1.0 if re.match(pattern, _content(c), re.DOTALL | re.MULTILINE) else 0.0 for c in completions]


def _trl_accuracy(content: str, solution: str):
    """TRL's accuracy_reward for one completion: None when the solution does not parse (TRL skips the row)."""
    if accuracy_backend() == "fallback":
        return fallback_accuracy(content, solution, unparseable_gold=None)
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify
    gold = parse(solution)
    if len(gold) == 0:
        return None
    answer = parse(content, extraction_config=[LatexExtractionConfig(
        normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
        try_extract_without_anchor=False)], extraction_mode="first_match")
    return float(verify(gold, answer))


def accuracy_reward(completions, solution, **kwargs) -> list:
    """TRL's accuracy_reward (trl/rewards/accuracy_rewards.py): 1.0 / 0.0 by answer equivalence with
    `solution`, None when the solution has no parseable answer."""
    return [_trl_accuracy(_content(c), s) for c, s in zip(completions, solution)]


def reasoning_accuracy_reward(completions, solution, reasoning_delimiters=None, **kwargs) -> list:
    """TRL's reasoning_accuracy_reward: accuracy_reward on the text after the first delimiter found (default
    </think>) among reasoning_delimiters; 0.0 when none is present (the reasoning never finished)."""
    out = []
    for c, s in zip(completions, solution):
        text = _content(c)
        delim = next((d for d in (reasoning_delimiters or ["</think>"]) if d in text), None)
        out.append(0.0 if delim is None else _trl_accuracy(text.split(delim)[-1], s))
    return out


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> Callable:
    """TRL's soft overlong punishment (DAPO eq. 13, trl/rewards/other_rewards.py): 0 up to L_max − L_cache
    tokens, then (L_max − L_cache − t) / L_cache, and −1 beyond L_max. Reads `completion_ids`."""

    def soft_overlong_punishment_reward(completion_ids, **kwargs) -> list:
        """[N] rewards for N completions (token-id lists): the punishment above, per completion."""
        out = []
        for ids in completion_ids:
            t = len(ids)
            out.append(0.0 if t <= max_completion_len - soft_punish_cache else
                       (max_completion_len - soft_punish_cache - t) / soft_punish_cache if t <= max_completion_len
                       else -1.0)
        return out

    return soft_overlong_punishment_reward


# TRL's CLI registry (trl/scripts/grpo.py:55-60), with its fixed soft-overlong lengths
TRL_REWARDS: dict[str, Callable] = {
    "accuracy_reward": accuracy_reward,
    "reasoning_accuracy_reward": reasoning_accuracy_reward,
    "think_format_reward": think_format_reward,
    "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
}


# ------------------------------------------------------------------ resolving names

def _is_async(fn) -> bool:
    """As ms-swift's _is_async_reward (rl_core/grpo_algorithm.py:12-14): an async function or __call__."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _is_orm_class(obj) -> bool:
    """A class following ms-swift's interface: derived from our ORM/AsyncORM or ms-swift's (any class so named)."""
    return inspect.isclass(obj) and any(c.__name__ in ("ORM", "AsyncORM") for c in obj.__mro__[1:])


def _constructor_kwargs(cls, args: RewardArgs, tokenizer) -> dict:
    """What a reward class's constructor takes, as ms-swift builds its ORMs: `args` and `tokenizer` when its
    __init__ names them (or takes **kwargs); nothing for `def __init__(self)`."""
    if cls.__init__ is object.__init__:  # no constructor of its own: object's takes nothing
        return {}
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return {}
    anything = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in (("args", args), ("tokenizer", tokenizer)) if k in params or anything}


def _wrap(spec: str, obj, args: RewardArgs, style: str, tokenizer=None) -> RewardFn:
    """Instantiate a registered or imported class (with the args/tokenizer its constructor takes, as ms-swift),
    name it as ms-swift does."""
    if inspect.isclass(obj):
        try:
            obj = obj(**_constructor_kwargs(obj, args, tokenizer))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 — a plugin's constructor failing is the user's to fix
            raise ConfigError(f"reward {spec!r}: creating {obj.__name__} failed: {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise ConfigError(f"reward {spec!r} resolves to {type(obj).__name__}, which is not callable")
    name = obj.__name__ if inspect.isfunction(obj) or inspect.ismethod(obj) else type(obj).__name__
    return RewardFn(name=name, spec=spec, fn=obj, style=style, is_async=_is_async(obj))


def _import_attr(spec: str):
    """`module.func` or `module:func`, importable from sys.path or the current directory (as TRL's CLI)."""
    module_name, _, attr = spec.rpartition(":") if ":" in spec else spec.rpartition(".")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the module itself, not something it imports
            raise ConfigError(f"reward {spec!r}: no module named {module_name!r} (on sys.path or in "
                              f"{os.getcwd()})") from e
        raise ConfigError(f"reward {spec!r}: importing {module_name} failed: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"reward {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}") from e
    finally:
        if added:
            sys.path.remove(os.getcwd())
    if not hasattr(module, attr):
        raise ConfigError(f"reward {spec!r}: module {module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def _resolve(spec: str, registered: dict, args: RewardArgs, tokenizer=None) -> RewardFn:
    """One name: registry (built-ins and plugins), TRL built-in, module.func, else a ConfigError."""
    if spec in registered:
        return _wrap(spec, registered[spec], args, "swift", tokenizer)
    if spec in TRL_REWARDS:
        return _wrap(spec, TRL_REWARDS[spec], args, "trl", tokenizer)
    if spec in NOT_BUILT_IN:
        raise ConfigError(f"reward {spec!r}: ms-swift's {NOT_BUILT_IN[spec]} is not built into tunesmith; copy it "
                          f"into a plugin file (--external_plugins) and register it there")
    if re.fullmatch(r"[\w.]+[.:]\w+", spec):
        obj = _import_attr(spec)
        return _wrap(spec, obj, args, "swift" if _is_orm_class(obj) else "trl", tokenizer)
    known = sorted(set(registered) | set(TRL_REWARDS))
    near = difflib.get_close_matches(spec, known, n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"unknown reward function {spec!r}.{hint} Known: {', '.join(known)}; or register one with "
                      f"--external_plugins plugin.py (orms['name'] = Cls), or name a module.func.")


def load_reward_functions(names: list, plugins: list, args: RewardArgs | None = None, tokenizer=None) -> list:
    """The RewardFn for each name (ms-swift `--reward_funcs`), after running each plugin file (ms-swift
    `--external_plugins`, in order). A name resolves to, first match wins: an entry of `orms` — the built-ins and
    what plugins registered (a plugin may replace a built-in, as in ms-swift, where they share one dict); a TRL
    built-in name (TRL_REWARDS); `module.func` / `module:func` (a class there is instantiated, with args= when it
    derives from ORM/AsyncORM). Raises ConfigError for a name that resolves to nothing (naming the nearest known
    one), a plugin that is missing, does not parse (with the line) or raises (with the line), and a reward whose
    constructor fails (e.g. soft_overlong without soft_cache_length)."""
    args = args or RewardArgs()
    from_swift = {}
    for path in plugins or []:
        from_swift.update(run_plugin(os.path.abspath(os.path.expanduser(path)),
                                     {"ORM": ORM, "AsyncORM": AsyncORM, "orms": orms}))
    registered = {**orms, **from_swift}  # read after the plugins ran: they register into `orms`
    return [_resolve(name, registered, args, tokenizer) for name in names]
