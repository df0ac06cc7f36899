"""The asyncio adapter behind every accelerated engine: `_AsyncBackend` runs the engine's asyncio API on its own
event-loop thread with GenerationEngine's interface (submit -> Handle, generate, close, stop_ids, max_model_len);
`_Stream` applies tunesmith's own stop rules (stop ids, stop strings, max_new_tokens) to what the engine streams;
and the small helpers the engines share (finish reasons, top log-probs, awaiting sync-or-async calls).
tunesmith.inference.engine is imported only when a request runs, keeping this module import-light."""
from __future__ import annotations

from typing import Any, Optional

def _handle_class():
    # Built lazily: tunesmith.inference.engine imports nothing heavy, but keeping this module import-light is the rule here.
    from tunesmith.inference.engine import Handle

    class BackendHandle(Handle):
        def __init__(self, prompt_ids, params, adapter, loop, backend):
            super().__init__(prompt_ids, params, adapter, loop)
            self._backend, self._task, self.request_id = backend, None, None

        def cancel(self) -> None:
            super().cancel()
            self._backend._cancel(self)

    # cancel() also aborts the engine's request at once: the engines keep generating for a request nobody reads
    return BackendHandle


class _Stream:
    """One request's output as it arrives: the tokens, their log-probs, and tunesmith's own stop checks (stop ids,
    stop strings, max_new_tokens) so a reply ends exactly where the transformers engine would end it."""

    def __init__(self, handle, tokenizer, stop_ids: frozenset):
        self.handle, self.tok = handle, tokenizer
        p = handle.params
        self.stop_ids = stop_ids | frozenset(int(i) for i in p.stop_token_ids)
        self.tokens: list[int] = []
        self.logprobs: Optional[list] = [] if (p.logprobs or p.top_logprobs) else None
        self.finish: Optional[str] = None
        self.stop_hit: Optional[str] = None

    def add(self, token: int, logprob=None) -> bool:
        """Record and stream one token; True when the sequence is done by tunesmith's rules."""
        from tunesmith.inference.engine import stop_string_hit

        p = self.handle.params
        self.tokens.append(int(token))
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        self.handle._push(int(token))
        if token in self.stop_ids:
            self.finish = "stop"
        else:
            hit = stop_string_hit(self.tok, self.tokens, p.stop)
            if hit is not None:
                self.finish, self.stop_hit = "stop", hit
        if self.finish is None and len(self.tokens) >= p.max_new_tokens:
            self.finish = "length"
        return self.finish is not None

    def completion(self, reason: Optional[str] = None, error: Optional[BaseException] = None):
        from tunesmith.inference.engine import Completion

        return Completion(self.tokens, self.finish or reason or "abort", len(self.handle.prompt_ids),
                          self.logprobs, self.stop_hit, error)


class _AsyncBackend:
    """What every engine adapter shares: the engine's asyncio API runs on this object's own event-loop thread;
    `submit` returns a tunesmith Handle at once and a task on that loop streams the engine's tokens into it.
    The public interface is GenerationEngine's: submit, generate, close, stop_ids, max_model_len.

    Subclasses implement `_create()` (runs on the loop thread; returns the engine), `_stream(handle, request_id,
    lora)` (an async generator of (new token ids, their TokenLogprobs or None, engine finish reason or None,
    matched stop string or None)), `_abort(request_id)` and `_shutdown()`."""

    name = "engine"

    def __init__(self, tokenizer, stop_ids, max_model_len: int, adapters: Optional[dict[str, str]] = None,
                 default_adapter: Optional[str] = None):
        import asyncio
        import itertools
        import threading

        self.tok = tokenizer
        self.stop_ids = frozenset(int(i) for i in stop_ids if i is not None)
        self.max_model_len = int(max_model_len)
        self.adapters = dict(adapters or {})
        if default_adapter is not None and default_adapter not in self.adapters:
            raise ValueError(f"default adapter {default_adapter!r} is not among {', '.join(self.adapters)}")
        self.default_adapter = default_adapter
        self._ids = itertools.count()
        self._closed = False
        self._active: dict[str, Any] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tunesmith-{self.name}", daemon=True)
        self._thread.start()
        try:
            self.engine = self._on_loop(self._create_async())
        except BaseException:
            self._stop_loop()
            raise

    # -------------------------------------------------------------- public (GenerationEngine's interface)

    def submit(self, prompt_ids: list, params, adapter: Optional[str] = None, loop=None):
        """Queue one sequence (n=1). adapter: None = the model as loaded (the plain --adapters one, if any), "" =
        the base model, else a named LoRA adapter. loop: deliver tokens to this asyncio loop. Raises ValueError for
        a prompt with no room under max_model_len (tokens), an unknown adapter or beam search; RuntimeError after
        close()."""
        import asyncio
        from dataclasses import replace

        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's limit is {self.max_model_len}")
        lora = self._lora_name(adapter)
        if getattr(params, "num_beams", 1) > 1:
            raise ValueError(f"num_beams {params.num_beams}: beam search is not available with --infer_backend "
                             f"{self.name}; use --infer_backend transformers")
        room = self.max_model_len - len(prompt_ids)
        params = replace(params, max_new_tokens=max(1, min(params.max_new_tokens or room, room)))
        if self._closed:
            raise RuntimeError("the generation engine is shut down")
        handle = _handle_class()(prompt_ids, params, adapter, loop, self)
        handle.request_id = f"tunesmith-{next(self._ids)}"
        asyncio.run_coroutine_threadsafe(self._run(handle, lora), self._loop)
        return handle

    def generate(self, prompts: list, params, adapter: Optional[str] = None) -> list:
        """Submit every prompt, wait for all: the completions in prompt order."""
        handles = [self.submit(p, params, adapter) for p in prompts]
        return [h.result() for h in handles]

    def close(self, timeout: float = 30.0) -> None:
        """Abort running sequences (finish_reason "abort"), shut the engine down and stop the loop thread."""
        if self._closed:
            return
        self._closed = True

        async def _cancel_all():
            for handle in list(self._active.values()):
                if handle._task is not None:
                    handle._task.cancel()

        try:
            self._on_loop(_cancel_all(), timeout)
            self._on_loop(self._shutdown_async(), timeout)
        except Exception:  # noqa: BLE001 - closing is best effort; the engine's processes die with ours anyway
            pass
        self._stop_loop(timeout)

    # -------------------------------------------------------------- the loop thread

    def _on_loop(self, coro, timeout: Optional[float] = None):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self, timeout: float = 30.0) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():  # stopped: its resources go too (else "unclosed event loop" at exit)
            self._loop.close()

    async def _create_async(self):
        # on the loop thread: engines bind their background tasks to the event loop current at construction
        return self._create()

    async def _shutdown_async(self):
        self._shutdown()

    def _lora_name(self, adapter: Optional[str]) -> Optional[str]:
        if adapter is None:
            return self.default_adapter
        if adapter == "":
            return None
        if adapter not in self.adapters:
            raise ValueError(f"no adapter named {adapter!r}; loaded: {', '.join(self.adapters) or 'none'}")
        return adapter

    def _cancel(self, handle) -> None:
        """From any thread: end the handle's task, which aborts the engine's request."""
        def now():
            if handle._task is not None and not handle._task.done():
                handle._task.cancel()
        try:
            self._loop.call_soon_threadsafe(now)
        except RuntimeError:  # the loop is closed: nothing is running any more
            pass

    async def _run(self, handle, lora: Optional[str]) -> None:
        import asyncio

        handle._task = asyncio.current_task()
        rid = handle.request_id
        self._active[rid] = handle
        stream = _Stream(handle, self.tok, self.stop_ids)
        engine_done = False
        agen = None
        try:
            if handle.cancelled or self._closed:
                raise asyncio.CancelledError
            agen = self._stream(handle, rid, lora)
            async for tokens, logprobs, finish, stop_hit in agen:
                ended = False
                for i, t in enumerate(tokens):
                    if stream.add(t, logprobs[i] if logprobs and i < len(logprobs) else None):
                        ended = True
                        break
                if finish is not None:
                    engine_done = True
                    if stream.finish is None:
                        stream.finish = _finish_reason(finish)
                        stream.stop_hit = stop_hit if isinstance(stop_hit, str) else None
                if ended or engine_done:
                    break
            else:
                engine_done = True
            handle._finish(stream.completion("stop"))
        except asyncio.CancelledError:
            handle._finish(stream.completion("abort") if stream.finish else _aborted(stream))
        except Exception as e:  # noqa: BLE001 - reported to this request; the engine serves the others
            handle._finish(stream.completion("error", e) if stream.finish else _errored(stream, e))
        finally:
            self._active.pop(rid, None)
            if agen is not None:
                try:
                    await asyncio.shield(agen.aclose())
                except BaseException:  # noqa: BLE001 - the request is over either way
                    pass
            if not engine_done:
                # ended by us (cancel, stop string, length) while the engine still runs it: free its slot now
                try:
                    await asyncio.shield(self._abort(rid))
                except BaseException:  # noqa: BLE001
                    pass

    # -------------------------------------------------------------- per engine

    def _create(self):
        raise NotImplementedError

    async def _stream(self, handle, request_id: str, lora: Optional[str]):
        raise NotImplementedError
        yield  # pragma: no cover

    async def _abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        pass


def _finish_reason(reason) -> str:
    reason = reason.get("type") if isinstance(reason, dict) else reason
    return reason if reason in ("stop", "length", "abort") else ("error" if reason == "error" else "stop")


def _aborted(stream: _Stream):
    stream.finish = "abort"
    return stream.completion()


def _errored(stream: _Stream, error: BaseException):
    stream.finish = "error"
    return stream.completion(error=error)


async def _maybe_await(value):
    import inspect
    if inspect.isawaitable(value):
        return await value
    return value


def _top(pairs, k: int) -> list:
    """[(token_id, logprob)] most likely first, at most k."""
    return sorted(((int(t), float(v)) for t, v in pairs), key=lambda x: -x[1])[:k] if k else []
