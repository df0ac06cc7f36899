"""What a caller hands the generation engine and gets back: `SamplingParams` (per-sequence settings), `Handle` (one
submitted sequence: its tokens as they come, then its `Completion`), `TokenLogprob`, and `NonFiniteOutput` (the error
a sequence ends with when the model's output holds NaN/inf). `tunesmith.inference.engine` runs them."""
from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from tunesmith.errors import TunesmithError


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence generation settings. `temperature` 0 is greedy. Processors apply in transformers' order:
    repetition penalty, temperature, top-k, top-p (Holtzman et al. 2020), min-p. `top_logprobs` > 0 returns that
    many alternatives per token (implies `logprobs`). `processed_logprobs`: the log-probs (and alternatives) are of
    the distribution sampled from — after the processors — as vLLM's logprobs_mode "processed_logprobs", instead
    of the model's raw one."""
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    stop: tuple = ()                  # strings; generation ends when the decoded output contains one
    stop_token_ids: tuple = ()        # in addition to the engine's own stop ids
    seed: Optional[int] = None        # per-sequence RNG: the same seed gives the same sample whatever the batch
    logprobs: bool = False
    top_logprobs: int = 0
    num_beams: int = 1                # > 1: beam search through `model.generate`, run alone
    processed_logprobs: bool = False


@dataclass
class TokenLogprob:
    """log p (nats) of a generated token under the model's raw distribution, with the top alternatives."""
    token_id: int
    logprob: float
    top: list = field(default_factory=list)   # [(token_id, logprob), …], most likely first


class NonFiniteOutput(TunesmithError, RuntimeError):
    """The model's output for a sequence holds NaN or inf: no token can be chosen from it (a greedy arg-max would
    pick one silently), so the sequence ends with this error."""


@dataclass
class Completion:
    """A finished sequence. finish_reason: "stop" (stop token or string), "length", "abort" (cancelled or the
    engine closed) or "error" (then `error` holds the exception)."""
    token_ids: list
    finish_reason: str
    prompt_tokens: int
    logprobs: Optional[list] = None
    stop_hit: Optional[str] = None     # the stop string that ended it, if any
    error: Optional[BaseException] = None


class Handle:
    """One submitted sequence. Iterate (`for tok in handle` / `async for tok in handle`) to receive token ids as
    they are generated; `result()` / `await aresult()` wait for the `Completion`. `cancel()` frees its batch slot
    at the next step. Thread-safe: the scheduler pushes, one consumer reads."""

    def __init__(self, prompt_ids: list, params: SamplingParams, adapter: Optional[str],
                 loop: Optional[asyncio.AbstractEventLoop] = None, images: Optional[dict] = None):
        self.prompt_ids, self.params, self.adapter = list(prompt_ids), params, adapter
        self.images = images  # the prompt's pixel inputs (see GenerationEngine.submit); dropped once prefilled
        self.cancelled = False
        self.completion: Optional[Completion] = None
        self._loop = loop
        self._q: Any = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def cancel(self) -> None:
        """Ask the scheduler to end this sequence (finish_reason "abort") at its next step; returns at once."""
        self.cancelled = True

    def _push(self, item) -> None:
        if self._loop is None:
            self._q.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone (server shut down): nobody is listening
            self.cancelled = True

    def _finish(self, completion: Completion) -> None:
        self.completion = completion
        self._push(completion)

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._q.get()
            if isinstance(item, Completion):
                return
            yield item

    async def __aiter__(self):
        while True:
            item = await self._q.get()
            if isinstance(item, Completion):
                return
            yield item

    def result(self) -> Completion:
        """Block until the sequence ends, dropping tokens not yet read. Only for a handle submitted without `loop`."""
        for _ in self:
            pass
        return self.completion

    async def aresult(self) -> Completion:
        """Await the end of the sequence, dropping tokens not yet read. Only for a handle submitted with `loop`."""
        async for _ in self:
            pass
        return self.completion
