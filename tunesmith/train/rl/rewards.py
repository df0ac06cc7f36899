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
This module stays light (no torch) because the CLI imports it to check names before training starts.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import math
import numbers
import os
import re
import sys
import traceback
import types
from fractions import Fraction
from typing import Any, Callable

from tunesmith.errors import ConfigError


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


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:\s*/\s*-?\d+(?:\.\d+)?)?")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None if there is none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0) if text[i - 1] != "\\" else 0
        if depth == 0:
            return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion or solution, for the fallback checker: inside <answer>...</answer> if
    present (as ms-swift's MathAccuracy), the last \\boxed{...}; else the whole tag content if there was a tag;
    else the last number (\\frac{a}{b} counts as a/b); else None."""
    tag = _ANSWER_TAG.search(text)
    inner = tag.group(1).strip() if tag else text
    boxed = last_boxed(inner)
    if boxed is not None:
        return boxed
    if tag:
        return inner
    numbers_ = _NUMBER.findall(_FRAC.sub(r"\1/\2", inner))
    return numbers_[-1] if numbers_ else None


def _normalise(answer: str) -> str:
    """LaTeX and formatting noise removed: $, \\left/\\right, spacing commands, \\text{}, degrees, percent,
    a leading `x =`, a trailing full stop, spaces; lower case."""
    s = answer.strip().strip("$")
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:| )", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\%|%|\\\$", "", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    s = _FRAC.sub(r"\1/\2", s)
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def to_number(answer: str) -> Fraction | None:
    """An answer as an exact number (integers, decimals, fractions a/b or \\frac{a}{b}, thousands separators
    1,234), or None when it is not one."""
    s = _normalise(answer)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"^\((-?[\d.]+)\)/\((-?[\d.]+)\)$", r"\1/\2", s)
    try:
        num, _, den = s.partition("/")
        value = Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def answers_match(predicted: str, gold: str) -> bool:
    """Whether two extracted answers are equal: as exact numbers when both are numbers, else as normalised
    strings (see _normalise)."""
    a, b = to_number(predicted), to_number(gold)
    if a is not None and b is not None:
        return a == b
    return _normalise(predicted) == _normalise(gold)


def _fallback_accuracy(content: str, solution: str, unparseable_gold=0.0):
    """1.0 / 0.0 by the fallback checker; `unparseable_gold` when the solution has no answer to compare with."""
    gold = extract_answer(solution)
    if gold is None:
        stripped = solution.strip()
        if not stripped or len(stripped) > 100:  # a bare short solution ("B", "x + 1") is its own answer
            return unparseable_gold
        gold = stripped
    predicted = extract_answer(content)
    return float(predicted is not None and answers_match(predicted, gold))


def _math_verify_accuracy(content: str, solution: str) -> float:
    """ms-swift 4.6 MathAccuracy.__call__ for one completion (swift/rewards/orm.py:78-120), the same logic."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify
    match = _ANSWER_TAG.search(content)
    to_parse = match.group(1).strip() if match else content
    sol_match = _ANSWER_TAG.search(solution)
    gold = parse(sol_match.group(1).strip() if sol_match else solution, extraction_mode="first_match")
    if len(gold) == 0:
        return 0.0  # an unparseable solution gets 0, as ms-swift (it "skips" the example)
    if match:
        answer = parse(to_parse, extraction_mode="first_match")
    else:
        norm = NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True, boxed=True, units=True)
        answer = parse(to_parse, extraction_config=[LatexExtractionConfig(
            normalization_config=norm, boxed_match_priority=0, try_extract_without_anchor=False)],
            extraction_mode="first_match")
    try:
        return float(verify(gold, answer))
    except Exception:  # noqa: BLE001 — ms-swift scores a verifier failure 0
        return 0.0


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
        check = _math_verify_accuracy if accuracy_backend() == "math_verify" else _fallback_accuracy
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
        return _fallback_accuracy(content, solution, unparseable_gold=None)
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

@dataclasses.dataclass
class RewardFn:
    """A resolved reward. `name` is what ms-swift and TRL log it as (rewards/{name}/mean: the class name of an
    instance, the function's __name__); `spec` is the name given on the command line. Calling it with
    `(completions, **kwargs)` returns the list of rewards — an awaitable for an async reward (`is_async`).
    `style` says how it is called: "swift" — fn(completions, **kwargs), completions as strings (ms-swift's
    convention); "trl" — fn(completions=..., **kwargs), completions in conversational form (a list with one
    assistant message each) when the prompts are conversations, as TRL's GRPOTrainer passes them."""
    name: str
    spec: str
    fn: Callable
    style: str = "swift"
    is_async: bool = False

    def __call__(self, completions, **kwargs):
        if self.style == "trl":
            return self.fn(completions=completions, **kwargs)
        return self.fn(completions, **kwargs)


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
        from_swift.update(_run_plugin(os.path.abspath(os.path.expanduser(path))))
    registered = {**orms, **from_swift}  # read after the plugins ran: they register into `orms`
    return [_resolve(name, registered, args, tokenizer) for name in names]


# ------------------------------------------------------------------ plugin files

@contextlib.contextmanager
def _swift_stand_in():
    """While a plugin runs, and only when ms-swift is not installed, make `swift.plugin` and `swift.rewards`
    importable with our ORM, AsyncORM and orms. Why: plugins written for ms-swift begin with `from swift.plugin
    import ORM, orms` (3.x) or `from swift.rewards import ORM, orms` (4.x) and need nothing else from it, so they
    run unchanged. Why only then: an installed ms-swift must win — the plugin may use more of it, and shadowing it
    would break it for the rest of the process. Why only while loading: so that nothing later mistakes the
    stand-in for ms-swift (importlib.util.find_spec("swift") and friends stay truthful)."""
    if importlib.util.find_spec("swift") is not None:
        yield
        return
    root = types.ModuleType("swift", "tunesmith's stand-in for ms-swift while loading a reward plugin")
    root.__path__ = []
    root.__spec__ = importlib.machinery.ModuleSpec("swift", None, is_package=True)
    stand_ins = {"swift": root}
    # the registry's homes in 3.x (swift.plugin, swift.plugin.orm) and 4.x (swift.rewards, swift.rewards.orm)
    for sub in ("plugin", "rewards", "plugin.orm", "rewards.orm"):
        module = types.ModuleType(f"swift.{sub}")
        module.ORM, module.AsyncORM, module.orms = ORM, AsyncORM, orms
        if "." not in sub:
            module.__path__ = []
            setattr(root, sub, module)
        else:
            setattr(stand_ins[f"swift.{sub.split('.')[0]}"], "orm", module)
        stand_ins[f"swift.{sub}"] = module
    utils = types.ModuleType("swift.utils")  # plugins' usual logger: `from swift.utils import get_logger`
    utils.get_logger = lambda *a, **k: logging.getLogger("tunesmith.plugin")
    root.utils = utils
    stand_ins["swift.utils"] = utils
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for key, module in stand_ins.items():
            if sys.modules.get(key) is module:
                del sys.modules[key]


def _swift_orms() -> dict:
    """ms-swift's own registries (4.x swift.rewards.orms, 3.x swift.plugin.orms), when ms-swift is installed."""
    found = {}
    if importlib.util.find_spec("swift") is None:
        return found
    for module_name in ("swift.plugin", "swift.rewards"):
        try:
            found[module_name] = importlib.import_module(module_name).orms
        except Exception:  # noqa: BLE001 — that ms-swift version has no such module
            continue
    return found


def _plugin_failure(path: str, e: BaseException) -> ConfigError:
    """A ConfigError naming the plugin file, the line and what went wrong."""
    if isinstance(e, SyntaxError):
        return ConfigError(f"{path}:{e.lineno}: syntax error in reward plugin: {e.msg}")
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]
    where = f"{path}:{lines[-1]}" if lines else path
    if isinstance(e, ImportError) and (e.name or "").split(".")[0] == "swift":
        if importlib.util.find_spec("swift") is None:
            return ConfigError(f"{where}: the reward plugin imports from ms-swift something tunesmith does not "
                               f"provide ({e}); without ms-swift installed only ORM, AsyncORM and orms from "
                               f"swift.plugin / swift.rewards (and their .orm modules) and swift.utils.get_logger "
                               f"are available")
        if e.name == "swift.plugin":
            return ConfigError(f"{where}: the installed ms-swift (4.x) has no swift.plugin; write "
                               f"`from swift.rewards import ORM, orms` (ms-swift 3.x plugins need this change "
                               f"for ms-swift 4 too), or uninstall ms-swift")
    return ConfigError(f"{where}: reward plugin failed: {type(e).__name__}: {e}")


_loaded_plugins: dict = {}  # path → what it registered in ms-swift's registries (a file runs once per process)


def _run_plugin(path: str) -> dict:
    """Execute one plugin file as a module (as ms-swift's import_external_file, utils/utils.py:409-429: its
    folder goes on sys.path so it can import files next to it; a file already loaded is not run again). Returns
    the entries it added to or replaced in ms-swift's registries when ms-swift is installed (what it registers in
    ours lands in `orms` directly)."""
    if path in _loaded_plugins:
        return _loaded_plugins[path]
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: reward plugin file not found (--external_plugins)")
    if os.path.dirname(path) not in sys.path:
        sys.path.insert(0, os.path.dirname(path))
    before = {name: dict(reg) for name, reg in _swift_orms().items()}
    module_name = "_tunesmith_plugin_" + hashlib.sha256(path.encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with _swift_stand_in():
            spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 — any failure inside the user's file becomes one clear message
        sys.modules.pop(module_name, None)
        raise _plugin_failure(path, e) from e
    added = {}
    for name, reg in _swift_orms().items():
        old = before.get(name, {})
        added.update({k: v for k, v in reg.items() if old.get(k) is not v})
    _loaded_plugins[path] = added
    return added


# ------------------------------------------------------------------ scoring a batch

def _reward_kwargs(n: int, prompts, columns, messages, trainer_state, completion_ids) -> dict:
    """The keyword arguments every reward gets: ms-swift's (the dataset columns, messages, trainer_state,
    response_token_ids) and TRL's (prompts, completion_ids)."""
    kwargs = {}
    for key, values in (columns or {}).items():
        if key == "completions":
            raise ConfigError("a dataset column named 'completions' would hide the completions from the rewards")
        if len(values) != n:
            raise ConfigError(f"dataset column {key!r} has {len(values)} values for {n} completions")
        kwargs[key] = values
    if messages is not None:
        kwargs["messages"] = messages
    kwargs["trainer_state"] = trainer_state
    if prompts is not None:
        kwargs["prompts"] = prompts
    if completion_ids is not None:
        kwargs["response_token_ids"] = completion_ids
        kwargs["completion_ids"] = completion_ids
    return kwargs


def _check_output(fn: RewardFn, out, n: int) -> list:
    """The rewards as floats (None → NaN); ConfigError naming the function unless a list of n numbers/None."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # a numpy array or tensor
    if not isinstance(out, (list, tuple)):
        raise ConfigError(f"reward function {fn.name} ({fn.spec}) returned {type(out).__name__}, expected a list "
                          f"of {n} numbers or None")
    if len(out) != n:
        raise ConfigError(f"reward function {fn.name} ({fn.spec}) returned {len(out)} rewards for {n} completions")
    bad = next((r for r in out if r is not None and not isinstance(r, numbers.Real)), None)
    if bad is not None:
        raise ConfigError(f"reward function {fn.name} ({fn.spec}) returned {type(bad).__name__} {bad!r:.80}, "
                          f"expected numbers or None")
    return [math.nan if r is None else float(r) for r in out]


def _failure(fn: RewardFn, e: Exception, kwargs: dict) -> ConfigError:
    """An exception inside a reward as a ConfigError naming it and the keyword arguments it was given."""
    return ConfigError(f"reward function {fn.name} ({fn.spec}) raised {type(e).__name__}: {e} (it was given "
                       f"completions and {', '.join(sorted(kwargs))})")


def _call(fn: RewardFn, completions, kwargs: dict):
    """Call one synchronous reward."""
    try:
        return fn(completions, **kwargs)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _failure(fn, e, kwargs) from e


async def _gather(calls: list):
    """Await the async rewards concurrently (asyncio.gather, as ms-swift and TRL)."""
    async def one(fn, completions, kwargs):
        """One async reward function's scores; a ConfigError is the plugin's fault and is raised as it is."""
        try:
            return await fn(completions, **kwargs)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _failure(fn, e, kwargs) from e
    return await asyncio.gather(*(one(*c) for c in calls))


def _run_async(calls: list) -> list:
    """asyncio.run the async rewards; from inside a running event loop, in a worker thread instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_gather(calls))
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _gather(calls)).result()


def score(reward_fns: list, completions: list, prompts=None, columns: dict | None = None, messages=None,
          trainer_state=None, weights=None, completion_ids=None):
    """Score N completions (strings) with F rewards. Returns (rewards, errors): rewards an N × F list of lists
    (row i, reward f; None → NaN, ready for losses.combine_rewards), errors a list of messages about rows that got
    no reward at all (every function returned None: the row's combined reward is 0 — ms-swift and TRL warn).
    Every reward gets ms-swift's kwargs — `columns` (dataset column → N values, e.g. solution), `messages`
    (the conversations, completion last, as ms-swift passes them), `trainer_state`, `response_token_ids` — and
    TRL's `prompts` and `completion_ids` (the last three when given); TRL-style rewards get the completions as
    one-message conversations when the prompts are conversations. Synchronous rewards run in order, the async
    ones together (asyncio.gather). Raises ConfigError when weights do not match the rewards, a column has the
    wrong length, or a reward raises or does not return a list of N numbers/None (naming it)."""
    n = len(completions)
    if weights is not None and len(weights) != len(reward_fns):
        raise ConfigError(f"{len(weights)} reward weights for {len(reward_fns)} reward functions")
    kwargs = _reward_kwargs(n, prompts, columns, messages, trainer_state, completion_ids)
    conversational = bool(prompts) and isinstance(prompts[0], list)
    as_messages = [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions
    outputs, pending = [None] * len(reward_fns), []
    for f, fn in enumerate(reward_fns):
        given = as_messages if fn.style == "trl" else completions
        if fn.is_async:
            pending.append((f, (fn, given, kwargs)))
        else:
            outputs[f] = _check_output(fn, _call(fn, given, kwargs), n)
    if pending:
        for (f, (fn, _, _)), out in zip(pending, _run_async([c for _, c in pending])):
            outputs[f] = _check_output(fn, out, n)
    rows = [[outputs[f][i] for f in range(len(reward_fns))] for i in range(n)]
    errors = [f"completion {i}: every reward function returned None (its reward counts as 0)"
              for i, row in enumerate(rows) if row and all(math.isnan(r) for r in row)]
    return rows, errors
