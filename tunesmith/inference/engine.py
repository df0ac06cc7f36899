"""The generation engine: one scheduler thread owns the model and runs every generation (`infer`, `deploy`,
`eval`, and later RL rollouts) as continuous batches.

What lives here: token-level scheduling only — prompts in as token ids, token ids (and log-probs) out. Sampling
(transformers' logits processors over the batch, each row's counter-based random draws) and stop strings live in
`tunesmith.inference.sampling`; chat templates, reasoning and tool-call parsing in `tunesmith.inference.reply`;
HTTP in `tunesmith.serve`; model loading in `tunesmith.models.load`. torch and transformers are imported inside the
functions that use them, never at module level.

How a step works. Requests wait in a queue. Between decoding steps the scheduler admits queued requests, in
order, up to the plan's rows in flight and while the batch's KV cache, every row at its longest (prompt +
max_new_tokens), fits the plan's budget (`tunesmith.inference.budget`: both sized from the memory left once the
model is loaded; `--max_batch_size` caps the rows), prefills them as one left-padded batch, and appends their KV
cache to the running batch's (left-padded to a common length: every row stays `[pads…, real tokens]`, so position
ids and sliding windows are measured as in a lone run). Each step feeds every row its last token; a row that stops
(stop token, stop string, `max_new_tokens`, or a cancelled handle) leaves the batch and its cache rows are dropped
at once.
Rows of different LoRA adapters share a batch through peft's per-row `adapter_names`.

Pictures (vision-language models: Qwen2-VL, Qwen2.5-VL, Qwen3-VL). A request may bring its prompt's pictures as the
vision tower takes them (`tunesmith.data.vision.pixel_inputs`, made by the caller: decoding and resizing never run on
the scheduler thread) with every image placeholder of its prompt already expanded. A prefill batch that holds
pictures feeds them with the batch and gives every row its 3-D M-RoPE positions from the model's own
`get_rope_index` (text rows get their plain positions, repeated on the three axes); each row keeps its rope delta
(M-RoPE position after the prompt minus its length; 0 for text), and a decoding step feeds each row text position
+ delta, the same on all three axes, as transformers' `generate` does. So rows with and without pictures share
batches and join at any step; batches without pictures, and text-only models, run exactly as before.

Why our own loop and not transformers' `ContinuousBatchingManager`: on CPU the paged-attention path measured
slower than plain batching (bench/RESULTS.md, `bench/serve_load.py`), and this loop gives per-row sampling
settings, per-request seeds, per-step cancellation and log-probs. Greedy rows are exact against a lone run up to
float summation order (tests/inference/test_engine.py compares token for token), and so are seeded sampled rows:
each row's random draws are keyed by its seed and token index, not by its place in the batch.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import replace
from typing import Optional

from tunesmith.inference.budget import BatchPlan, measure_memory, model_shape, plan_batch
from tunesmith.inference.last_output import LastOutput, OutputScreen
# the request types live beside the engine; importing them from here keeps working
from tunesmith.inference.requests import (  # noqa: F401
    Completion, Handle, NonFiniteOutput, SamplingParams, TokenLogprob)
from tunesmith.inference.sampling import processed_scores, random_seed, sample_tokens, stop_string_hit
from tunesmith.inference.vision import check_images, engine_vision, prefill_inputs

# A prefill batch holds at most this many (padded) prompt tokens, so one huge prompt does not stall the batch
# behind it for long and the prefill activations stay bounded; a single longer prompt still runs alone.
MAX_PREFILL_TOKENS = 16384


class _Row:
    """A sequence in the running batch."""

    def __init__(self, handle: Handle, seed: Optional[int]):
        self.handle, self.params = handle, handle.params
        self.generated: list[int] = []
        self.logprobs: Optional[list] = [] if (handle.params.logprobs or handle.params.top_logprobs) else None
        self.seed = seed  # keys the row's random draws (sampling.row_uniform); None for beam search
        self.position = len(handle.prompt_ids)  # position id of the next token fed (+ its M-RoPE delta, `_prefill`)
        self.stop_ids = set(handle.params.stop_token_ids)
        self.finish: Optional[str] = None
        self.stop_hit: Optional[str] = None
        self.error: Optional[BaseException] = None


class GenerationEngine:
    """Owns a causal LM (a transformers model or a peft `PeftModel`) and runs all generation on one scheduler
    thread, started on first use.

    Args:
        model: the model, in eval mode while generating (the engine switches it and restores the mode).
        tokenizer: decodes output tails for stop strings.
        stop_ids: token ids that end every sequence (the model's generation_config eos ids, the template's
            end-of-turn tokens).
        max_batch_size: ms-swift's `--max_batch_size`: None sizes the rows in flight from memory (up to 256);
            N ≥ 1 caps them at N; ≤ 0 lifts the cap. Memory limits every one of them (`plan`).
        max_model_len: prompt + completion limit in tokens; `submit` raises `ValueError` past it.
        gpu_memory_utilization: on CUDA, the fraction (0-1) of the GPU's memory that weights and KV cache may
            take (`--gpu_memory_utilization`).
        plan: the batch to run (a `budget.BatchPlan`); None sizes it now from `max_batch_size`, the model's shape
            and the memory left once the weights loaded (`budget.plan_batch` over `budget.measure_memory`).

    `plan` (a `budget.BatchPlan`) says what was chosen and why (`plan.describe()`); `max_batch_size` is its rows in
    flight and `peak_rows` the most that were in flight at once so far.
    """

    def __init__(self, model, tokenizer, stop_ids, max_batch_size: Optional[int] = None, max_model_len: int = 4096,
                 gpu_memory_utilization: float = 0.9, plan: Optional[BatchPlan] = None):
        self.model, self.tok = model, tokenizer
        self.stop_ids = frozenset(int(i) for i in stop_ids if i is not None)
        self.max_model_len = max_model_len
        self.plan: BatchPlan = plan or plan_batch(model_shape(model), measure_memory(self.device,
                                                                                     gpu_memory_utilization),
                                                  max_batch_size, max_model_len, MAX_PREFILL_TOKENS)
        self.max_batch_size = self.plan.max_rows
        self.peak_rows = 0
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self._pending: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._adapter_names = _peft_adapters(model)
        from tunesmith.models.head import chunked_head
        # The decoder and the output weight, when calling them apart is exact (a plain Linear head): greedy rows
        # then take the arg-max chunk by chunk and never materialise their [rows x vocabulary] logits, which at a
        # real vocabulary (151,936) is most of a decoding step's memory traffic.
        self._head = chunked_head(model)
        self._screen = OutputScreen()  # greedy rows of a float32 head: a bfloat16 screen, exact (last_output.py)
        self._cache_kw = _cache_keyword(model)
        self._vision = engine_vision(model)  # a vision-language model's image token and M-RoPE function, else None
        # a vision-language model never samples a picture's placeholder
        self._banned = self._vision.placeholders if self._vision is not None else ()
        self._held: Optional[list] = None  # (handle, Completion) ended during the step in progress
        self._tasks: collections.deque = collections.deque()  # (fn, Future) to run between steps (`between_steps`)
        self._state: Optional[_Batch] = None  # the running batch (scheduler thread only)

    # -------------------------------------------------------------- public

    def submit(self, prompt_ids: list, params: SamplingParams, adapter: Optional[str] = None,
               loop: Optional[asyncio.AbstractEventLoop] = None, images: Optional[dict] = None) -> Handle:
        """Queue one sequence. adapter: None = the model as loaded, "" = the base with adapters off, or a peft
        adapter name. loop: deliver tokens to this asyncio loop (for `async for`). Raises ValueError when the
        prompt leaves no room under `max_model_len`, RuntimeError after `close()`.

        prompt_ids: [T] token ids. params.max_new_tokens is capped at the room left (0 or None: all of it).
        images: the prompt's pictures as the vision tower takes them, made by the caller
        (`tunesmith.data.vision.pixel_inputs`): {"pixel_values": [P, C·t·p·p] float, "image_grid_thw": [N, 3]
        int64}, its N pictures in the order of their placeholders in prompt_ids, each placeholder already repeated
        once per image token (grid_t·grid_h·grid_w / merge² of them: `tunesmith.data.vision.expand_images`); None
        or {} for a text prompt. The engine drops them once the prompt is prefilled.
        Also raises ValueError for an adapter name that is not loaded, for pictures given to a model without a
        vision tower, and (vision-language models) for image placeholders that do not match the pictures — checked
        here, so that one bad request never fails the batch it would have joined. Errors during generation are
        not raised: they end the sequence with finish_reason "error"."""
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's limit is {self.max_model_len}")
        if adapter and adapter not in self._adapter_names:
            raise ValueError(f"no adapter named {adapter!r}; loaded: {', '.join(self._adapter_names) or 'none'}")
        if images or self._vision is not None:
            check_images(self._vision, prompt_ids, images or None)
        room = self.max_model_len - len(prompt_ids)
        params = replace(params, max_new_tokens=max(1, min(params.max_new_tokens or room, room)))
        handle = Handle(prompt_ids, params, adapter, loop, images or None)
        with self._cv:
            if self._closed:
                raise RuntimeError("the generation engine is shut down")
            self._pending.append(handle)
            self._start()
            self._cv.notify()
        return handle

    def between_steps(self, fn):
        """Run fn() on the scheduler thread between two decoding steps, when no forward pass runs: how the model is
        changed while it serves (a new adapter version: `tunesmith.inference.live_adapters`). Sequences in flight
        go on at the next step. Returns a concurrent.futures.Future of fn's result (or of its exception); raises
        RuntimeError after `close()` (tasks still queued at close fail with it)."""
        import concurrent.futures

        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the generation engine is shut down")
            self._tasks.append((fn, future))
            self._start()
            self._cv.notify()
        return future

    def adopt(self, model) -> None:
        """Run `model` from the next step on: the same weights re-wrapped (a peft PeftModel around the model held
        so far) or with adapters added or removed. Scheduler thread only (inside `between_steps`)."""
        from tunesmith.models.head import chunked_head

        self.model = model
        self._adapter_names = _peft_adapters(model)
        self._head = chunked_head(model)
        self._screen = OutputScreen()
        self._cache_kw = _cache_keyword(model)

    def adapters_in_use(self) -> set:
        """The adapter names that queued or running sequences were submitted with (None and "" included when
        used). Scheduler thread only (inside `between_steps`), where neither set changes."""
        rows = self._state.rows if self._state is not None else []
        with self._cv:
            pending = list(self._pending)
        return {r.handle.adapter for r in rows} | {h.adapter for h in pending}

    def _start(self) -> None:
        """Start the scheduler thread on first use (under `_cv`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
            self._thread.start()

    def generate(self, prompts: list, params: SamplingParams, adapter: Optional[str] = None,
                 images: Optional[list] = None) -> list[Completion]:
        """Submit every prompt, wait for all: the completions in prompt order.

        prompts: lists of token ids; images: each prompt's pixel inputs (None for a text one; see `submit`), or
        None for all text. Blocks the calling thread; raises as `submit`."""
        images = images or [None] * len(prompts)
        handles = [self.submit(p, params, adapter, images=i) for p, i in zip(prompts, images)]
        return [h.result() for h in handles]

    def close(self, timeout: float = 30.0) -> None:
        """Stop the scheduler: queued and running sequences end with finish_reason "abort".

        timeout: seconds to wait for the scheduler thread; later `submit` calls raise RuntimeError."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -------------------------------------------------------------- the scheduler thread

    def _run(self) -> None:
        import torch

        state = self._state = _Batch()
        with torch.inference_mode():
            while True:
                self._run_tasks()
                admitted, closing = self._admit(state)
                if closing:
                    self._run_tasks()  # fails what close() left queued
                    for row in state.rows:
                        self._end(row, "abort")
                    for handle in admitted:
                        handle._finish(Completion([], "abort", len(handle.prompt_ids)))
                    return
                try:
                    self._step(state, admitted)
                except Exception as e:  # noqa: BLE001 - reported to every affected request; the engine goes on
                    for row in state.rows:
                        row.handle._finish(Completion(row.generated, "error", len(row.handle.prompt_ids), error=e))
                    for handle in admitted:
                        if handle.completion is None:
                            handle._finish(Completion([], "error", len(handle.prompt_ids), error=e))
                    state = self._state = _Batch()

    def _run_tasks(self) -> None:
        """Run the `between_steps` tasks queued so far (after close(), fail them instead)."""
        with self._cv:
            tasks, closed = list(self._tasks), self._closed
            self._tasks.clear()
        for fn, future in tasks:
            if closed:
                future.set_exception(RuntimeError("the generation engine is shut down"))
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller waiting on the future
                future.set_exception(e)

    def _admit(self, state) -> tuple[list[Handle], bool]:
        """Wait until there is work; take queued handles, in order, while they fit: rows in flight, the KV budget
        (every row at its longest, `plan.fits`; a request alone always runs) and the prefill tokens."""
        with self._cv:
            while not self._pending and not state.rows and not self._closed and not self._tasks:
                self._cv.wait()
            if self._closed:
                taken = list(self._pending)
                self._pending.clear()
                return taken, True
            taken, prompt_len = [], 0
            final_len = max((_longest(r.handle) for r in state.rows), default=0)
            while self._pending and len(state.rows) + len(taken) < self.max_batch_size:
                h = self._pending[0]
                if h.cancelled:
                    self._pending.popleft()._finish(Completion([], "abort", len(h.prompt_ids)))
                    continue
                if h.params.num_beams > 1 and (taken or state.rows):
                    break  # beam search runs alone
                prompt_len = max(prompt_len, len(h.prompt_ids))
                if taken and prompt_len * (len(taken) + 1) > MAX_PREFILL_TOKENS:
                    break
                final_len = max(final_len, _longest(h))
                if (taken or state.rows) and not self.plan.fits(len(state.rows) + len(taken) + 1, final_len):
                    break  # waits until rows finish
                taken.append(self._pending.popleft())
                if h.params.num_beams > 1:
                    break
            self.peak_rows = max(self.peak_rows, len(state.rows) + len(taken))
            return taken, False

    def _step(self, state: "_Batch", admitted: list[Handle]) -> None:
        import torch

        # a step runs in eval mode, and a model in training mode is put back after it, before the step's
        # completions are delivered (so a caller woken by one finds its model as it left it); switching walks every
        # module (and transformers' kernel set-up): ~8 ms each way for a LoRA model, so a caller that generates
        # many steps in a row from a training model (GRPO's rounds) switches once around them instead
        was_training = self.model.training
        if was_training:
            self.model.eval()
        self._held = []
        try:
            state.drop([r for r in state.rows if r.handle.cancelled], self._end)
            if admitted and admitted[0].params.num_beams > 1:
                self._beam_search(admitted[0])
                return
            if admitted:
                self._prefill(state, admitted)
            if not state.rows:
                return
            feed = torch.tensor([[r.generated[-1]] for r in state.rows], device=self.device)
            pos = torch.tensor([[r.position] for r in state.rows], device=self.device)
            state.mask = torch.cat([state.mask, state.mask.new_ones(len(state.rows), 1)], dim=1)
            last = self._forward(state.rows, feed, state.mask, pos, state.cache)
            for r in state.rows:
                r.position += 1
            done = self._choose(state.rows, last)
            state.drop(done, self._end)
        finally:
            if was_training:
                self.model.train()
            held, self._held = self._held, None
            for handle, completion in held:
                handle._finish(completion)

    def _prefill(self, state: "_Batch", handles: list[Handle]) -> None:
        """Run the new prompts as one left-padded batch, choose their first tokens, and join them to the batch.
        A batch with pictures also feeds them, with every row's M-RoPE positions (`inference.vision.prefill_inputs`)."""
        import torch
        from transformers import DynamicCache

        rows = [_Row(h, h.params.seed if h.params.seed is not None else random_seed()) for h in handles]
        longest = max(len(h.prompt_ids) for h in handles)
        ids = torch.tensor([[self.pad_id] * (longest - len(h.prompt_ids)) + h.prompt_ids for h in handles],
                           device=self.device)
        mask = torch.tensor([[0] * (longest - len(h.prompt_ids)) + [1] * len(h.prompt_ids) for h in handles],
                            device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        vision: dict = {}
        if any(h.images for h in handles):
            vision, pos, deltas = prefill_inputs(self._vision, handles, ids, mask, self.device)
            for r, delta in zip(rows, deltas):
                r.position += delta
        cache = DynamicCache()
        done = self._choose(rows, self._forward(rows, ids, mask, pos, cache, vision))
        keep = [i for i, r in enumerate(rows) if r not in done]
        for r in done:
            self._end(r)
        if keep:
            state.join([rows[i] for i in keep], cache, mask, keep)

    def _beam_search(self, handle: Handle) -> None:
        import torch

        p = handle.params
        ids = torch.tensor([handle.prompt_ids], device=self.device)
        kw = dict(max_new_tokens=p.max_new_tokens, num_beams=p.num_beams, do_sample=False,
                  eos_token_id=sorted(self.stop_ids | set(p.stop_token_ids)), pad_token_id=self.pad_id)
        if p.repetition_penalty != 1.0:
            kw["repetition_penalty"] = p.repetition_penalty
        if p.stop:
            kw.update(stop_strings=list(p.stop), tokenizer=self.tok)
        if self._banned:  # as the engine's own steps: no picture placeholder is ever generated
            kw["suppress_tokens"] = list(self._banned)
        if handle.images:  # generate builds the M-RoPE positions itself from mm_token_type_ids
            kw.update({k: v.to(self.device) for k, v in handle.images.items()},
                      mm_token_type_ids=(ids == self._vision.image_token_id).int())
            handle.images = None
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw,
                                  **self._adapter_kwargs([_Row(handle, None)]))
        row = _Row(handle, None)
        for t in out[0, len(handle.prompt_ids):].tolist():
            row.generated.append(t)
            handle._push(t)
            if self._stopped(row, t):
                break
        self._end(row)

    # -------------------------------------------------------------- per-row decisions

    def _forward(self, rows: list[_Row], ids, mask, pos, cache, vision: Optional[dict] = None):
        """One forward pass over [B, T] tokens; returns the last position's output: hidden states [B, H] (when the
        head can be applied apart) or logits [B, V]. pos: [B, T], or [3, B, T] M-RoPE positions; vision: a
        prefill's pixel_values and image_grid_thw (`inference.vision.prefill_inputs`), else nothing."""
        adapters = self._adapter_kwargs(rows)
        if self._head is not None and not adapters:
            decoder, _ = self._head
            out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                          **{self._cache_kw: cache}, **(vision or {}))
            return LastOutput(hidden=out.last_hidden_state[:, -1], banned=self._banned, screen=self._screen)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: cache}, **(vision or {}), **adapters)
        return LastOutput(logits=out.logits[:, -1].float(), banned=self._banned)

    def _choose(self, rows: list[_Row], last: LastOutput) -> list[_Row]:
        """Pick each row's next token from the last position's output; push it; return the rows that are done."""
        broken = _non_finite_rows(rows, last)
        greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0 and r.params.repetition_penalty == 1.0
                  and r.logprobs is None and i not in broken]
        full = [i for i in range(len(rows)) if i not in set(greedy) and i not in broken]
        picks = [0] * len(rows)
        if greedy:
            for i, t in zip(greedy, last.argmax(greedy, self._head).tolist()):
                picks[i] = t
        if full:
            logits = last.logits_of(full, self._head)
            for i, t in zip(full, sample_tokens(logits, [rows[i] for i in full])):
                if t is None:  # the processed logits overflowed: nothing to sample from
                    rows[i].finish, rows[i].error = "error", NonFiniteOutput(
                        f"the sampling weights of generated token {len(rows[i].generated) + 1} hold NaN or inf "
                        f"(the logits overflow at temperature {rows[i].params.temperature:g})")
                    broken.add(i)
                else:
                    picks[i] = t
            need = [j for j, i in enumerate(full) if rows[i].logprobs is not None and i not in broken]
            if need:
                logps = _logprobs(logits[need], [rows[full[j]] for j in need])
                for k, j in enumerate(need):
                    r, t = rows[full[j]], picks[full[j]]
                    top = logps[k].topk(r.params.top_logprobs) if r.params.top_logprobs else None
                    r.logprobs.append(TokenLogprob(
                        t, float(logps[k, t]),
                        list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []))
        done = [rows[i] for i in broken]
        for i, (r, t) in enumerate(zip(rows, picks)):
            if i in broken:
                continue
            r.generated.append(t)
            r.handle._push(t)
            if self._stopped(r, t):
                done.append(r)
        return done

    def _stopped(self, row: _Row, token: int) -> bool:
        p = row.params
        if token in self.stop_ids or token in row.stop_ids:
            row.finish = "stop"
            return True
        hit = stop_string_hit(self.tok, row.generated, p.stop)
        if hit is not None:
            row.finish, row.stop_hit = "stop", hit
            return True
        if len(row.generated) >= p.max_new_tokens:
            row.finish = "length"
            return True
        return False

    def _end(self, row: _Row, reason: Optional[str] = None) -> None:
        """Finish a row's handle with its Completion; inside a step, once the step is over (`_step`)."""
        reason = reason or row.finish or "abort"
        completion = Completion(row.generated, reason, len(row.handle.prompt_ids), row.logprobs, row.stop_hit,
                                row.error if reason == "error" else None)
        if self._held is not None:
            self._held.append((row.handle, completion))
        else:
            row.handle._finish(completion)

    def _adapter_kwargs(self, rows: list[_Row]) -> dict:
        """peft's per-row adapter choice (mixed-batch LoRA inference); nothing when every row uses the model as
        loaded."""
        if not self._adapter_names or all(r.handle.adapter is None for r in rows):
            return {}
        active = _active_adapter(self.model)
        names = ["__base__" if r.handle.adapter == "" else (r.handle.adapter or active) for r in rows]
        if all(n == active for n in names):  # every row runs the active adapter: the model as it is
            return {}
        return {"adapter_names": names}

    @property
    def device(self):
        """The device of the model's first parameter: where inputs are placed."""
        return next(self.model.parameters()).device


class _Batch:
    """The running batch: rows, their shared KV cache ([B, heads, L, dim] per layer) and attention mask [B, L]."""

    def __init__(self):
        self.rows: list[_Row] = []
        self.cache = None
        self.mask = None

    def join(self, rows: list[_Row], cache, mask, keep: list[int]) -> None:
        """Append freshly prefilled rows. cache, mask [b, L]: the prefill batch's; keep: the indices in it of
        `rows` (rows that ended at prefill are cut out). Both sides are left-padded to a common length."""
        import torch

        if len(keep) != mask.shape[0]:
            idx = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(idx)
            mask = mask.index_select(0, idx)
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, cache.layers):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
            self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)], dim=0)
            self.rows = self.rows + rows
        self._trim()

    def drop(self, rows: list[_Row], end) -> None:
        """Finish `rows` through `end(row)` and remove them, with their cache and mask rows."""
        import torch

        if not rows:
            return
        for r in rows:
            end(r)
        gone = set(map(id, rows))
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask.index_select(0, idx)
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row (left behind by rows that finished)."""
        first = int(self.mask.any(0).nonzero()[0])
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


def _longest(handle: Handle) -> int:
    """The most tokens a sequence can reach: prompt + max_new_tokens (which `submit` capped at the context)."""
    return len(handle.prompt_ids) + handle.params.max_new_tokens


def _logprobs(logits, rows: list[_Row]):
    """log-probs [b, V] of the rows' next token: of the model's raw distribution, or — for a row asking for
    processed_logprobs — of the distribution it samples from (`processed_scores`: penalty, temperature, top-k,
    top-p, min-p; removed tokens −inf), as vLLM's logprobs_mode "processed_logprobs". logits: [b, V], one row each."""
    import torch

    logps = torch.log_softmax(logits, dim=-1)
    processed = [k for k, r in enumerate(rows) if r.params.processed_logprobs]
    if processed:
        logps = logps.float().clone()
        logps[processed] = torch.log_softmax(processed_scores(logits[processed], [rows[k] for k in processed]), -1)
    return logps


def _non_finite_rows(rows: list[_Row], last: LastOutput) -> set[int]:
    """Rows whose last output (hidden state [H] or logits [V]) holds NaN/inf; each gets finish "error" with a
    NonFiniteOutput naming the generated token it stopped at. One reduction per step, read with the tokens."""
    import torch

    out = last.hidden if last.hidden is not None else last.logits
    bad = (~torch.isfinite(out).all(-1)).nonzero().flatten().tolist()
    for i in bad:
        rows[i].finish = "error"
        rows[i].error = NonFiniteOutput(
            f"the model's output holds NaN or inf at generated token {len(rows[i].generated) + 1} of this request "
            f"(its weights hold NaN/inf, or this input overflows the model's dtype); no token can be chosen "
            f"from it")
    return set(bad)


def _left_pad(t, width: int, dim: int = 2):
    import torch.nn.functional as F
    missing = width - t.shape[dim]
    if not missing:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def _cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache under: `cache` from transformers 5.25 on (where
    the old keyword is deprecated, to be removed in 5.40, with a warning at every call), `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _peft_adapters(model) -> list[str]:
    config = getattr(model, "peft_config", None)
    return list(config) if isinstance(config, dict) else []


def _active_adapter(model) -> str:
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0]
    return active or "default"
