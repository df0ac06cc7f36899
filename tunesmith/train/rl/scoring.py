"""Scoring a batch of completions with the resolved reward functions (GRPO's rollouts call `score`).

`RewardFn` is one resolved reward (`tunesmith.train.rl.rewards.load_reward_functions` makes them); `score` calls
every one on the batch with ms-swift's and TRL's keyword arguments — synchronous rewards in order, async ones
together — and checks what each returns (N numbers or None; None becomes NaN, left out of the weighted sum by
losses.combine_rewards). No torch import.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import numbers
from typing import Callable

from tunesmith.errors import ConfigError


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


def _reward_kwargs(n: int, prompts, columns, messages, trainer_state, completion_ids) -> dict:
    """The keyword arguments every reward gets: ms-swift's (the dataset columns, messages, trainer_state,
    response_token_ids — unless a column gives them, as multi-turn rollouts do per turn) and TRL's (prompts,
    completion_ids)."""
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
    if completion_ids is not None:  # a multi-turn rollout's response_token_ids come per turn, as a column
        kwargs.setdefault("response_token_ids", completion_ids)
        kwargs["completion_ids"] = completion_ids
    return kwargs


def _who(fn: RewardFn) -> str:
    """How messages name a reward: a reward-model plugin by its flag (its `error_label`), else by name and spec."""
    return getattr(fn.fn, "error_label", None) or f"reward function {fn.name} ({fn.spec})"


def _not_a_list(fn: RewardFn, out, n: int):
    """ConfigError saying what `out` is when it is not one value per completion (a coroutine — closed —, an array
    or tensor of another shape, a number, a dict, …), or None when it is a list/tuple or a 1-D array."""
    import inspect

    expected = f"expected one value per completion: a list of {n} numbers or None"
    if inspect.isawaitable(out):
        if hasattr(out, "close"):
            out.close()  # never awaited: closed, so that Python does not warn about it
        return ConfigError(f"{_who(fn)} returned a coroutine, not rewards (an async __call__ called synchronously: "
                           f"define it with `def`, or derive the class from AsyncORM); {expected}")
    shape = getattr(out, "shape", None)
    if shape is not None and not isinstance(out, (list, tuple)) and len(shape) != 1:
        return ConfigError(f"{_who(fn)} returned a {type(out).__name__} of shape {tuple(shape)}, expected shape "
                           f"({n},): one reward per completion")
    if isinstance(out, dict):
        return ConfigError(f"{_who(fn)} returned a dict (keys {', '.join(map(str, list(out)[:4]))}), {expected}")
    if shape is None and not isinstance(out, (list, tuple)):
        return ConfigError(f"{_who(fn)} returned a {type(out).__name__} ({out!r:.60}), {expected}")
    return None


def _check_output(fn: RewardFn, out, n: int, completions=None) -> list:
    """The rewards as floats (None → NaN); ConfigError naming the function unless a list of n numbers/None, or
    when one is infinite (naming the completion: GRPO's advantages and PPO's returns would become NaN)."""
    problem = _not_a_list(fn, out, n)
    if problem is not None:
        raise problem
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # a 1-D numpy array or tensor
    if len(out) != n:
        raise ConfigError(f"{_who(fn)} returned {len(out)} rewards for {n} completions")
    bad = next((r for r in out if r is not None and not isinstance(r, numbers.Real)), None)
    if bad is not None:
        raise ConfigError(f"{_who(fn)} returned {type(bad).__name__} {bad!r:.80} among its rewards, expected "
                          f"numbers or None (one per completion)")
    values = [math.nan if r is None else float(r) for r in out]
    inf = next((i for i, v in enumerate(values) if math.isinf(v)), None)
    if inf is not None:
        text = f" ({completions[inf]!r:.80})" if completions is not None and inf < len(completions) else ""
        raise ConfigError(f"{_who(fn)} returned {values[inf]} for completion {inf}{text}: a reward must be finite "
                          f"(None or NaN: no reward for that completion); fix what it computes for such a completion")
    return values


def _failure(fn: RewardFn, e: Exception, kwargs: dict) -> ConfigError:
    """An exception inside a reward as a ConfigError naming it and the keyword arguments it was given."""
    return ConfigError(f"{_who(fn)} raised {type(e).__name__}: {e} (it was given completions and "
                       f"{', '.join(sorted(kwargs))})")


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
            outputs[f] = _check_output(fn, _call(fn, given, kwargs), n, completions)
    if pending:
        for (f, (fn, _, _)), out in zip(pending, _run_async([c for _, c in pending])):
            outputs[f] = _check_output(fn, out, n, completions)
    rows = [[outputs[f][i] for f in range(len(reward_fns))] for i in range(n)]
    errors = [f"completion {i}: every reward function returned None (its reward counts as 0)"
              for i, row in enumerate(rows) if row and all(math.isnan(r) for r in row)]
    return rows, errors
