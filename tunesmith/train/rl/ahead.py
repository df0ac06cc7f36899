"""GRPO's asynchronous rounds (`--async_generate true`, with `--vllm_mode server`): the rollout server samples the
next round while this one trains, as ms-swift's async_generate_rollout.

The order of one round r, as train/rl/rollouts.py drives it:
1. take round r's completions: requested ahead (the request sent before round r − 1 trained), or — round 0, or a
   round nothing was requested for — requested now, after the policy's current weights are pushed;
2. push the policy's current weights W_r (the weights after r rounds of training) and send round r + 1's request,
   which the server answers on a worker thread while round r is scored and trained;
3. score round r, take its log-probs under the current model (old and reference: the loss's π_old is the model
   that trains the round, as ms-swift's _prepare_batch_inputs computes it) and train it.
So round r ≥ 1 is sampled with W_{r−1}, one round behind the weights it trains (round 0 with W_0) — ms-swift's
"one step off-policy": its step t trains on the rollouts its step t − 1 asked for.

No weights move while a request is in flight: a push (the next round's, an evaluation's, a sync round's) waits
for the request before it (`settle`), as ms-swift's _wait_queue before _move_model_to_vllm.

Resume: a checkpoint holds the request in flight and its answer (`save`: waited for; `PENDING_FILE`), so a resumed
run trains on exactly the completions the uninterrupted one did — the weights they were sampled with (W_{r−1}) are
not the checkpoint's (W_r), so asking the server again could not give them back. A saved answer is used only for
the identical request (the same prompt ids, seeds and sampling).

What must not live here: the rounds (rollouts.py), HTTP (rollout_client.py). No torch import.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future
from typing import Optional

PENDING_FILE = "grpo_pending_round.json"  # the request in flight at a checkpoint, with its answer


class Ahead:
    """The one round requested ahead of the round being trained, on a rollout_client.RolloutServer: a request is
    (prompts [(token ids, first seed, messages)], sampling: RequestConfig fields, n completions per prompt)."""

    def __init__(self, server, corrected: bool = False):
        """server: the RolloutServer; corrected: --rollout_importance_sampling_mode is on (else a note suggests it,
        as ms-swift's note that asynchronous rounds bypass the clip)."""
        from tunesmith.log import note

        self.server = server
        note("GRPO --async_generate: each round after the first is sampled by the rollout server while the one "
             "before it trains, from the weights before that round's update (one round off-policy, as ms-swift); "
             "π_old is the model that trains the round, so the clip does not see the lag" +
             ("" if corrected else "; add --rollout_importance_sampling_mode token_truncate to correct it"))
        self.pending: Optional[tuple] = None  # (the request's key, its Future of engine Completions)
        self.saved: Optional[tuple] = None    # (key, completions) read from a checkpoint, until used
        self.requested = 0                    # requests sent ahead (for tests and the log)
        self.taken = 0                        # answers taken (sent ahead, or saved by the checkpoint)
        self.said_missing = False             # the note on a resumed round nothing holds, given once

    @staticmethod
    def key(prompts: list, sampling: dict, n: int) -> str:
        """A request as canonical JSON: two requests are the same round exactly when their keys are equal."""
        return json.dumps([[[list(ids), int(seed), messages] for ids, seed, messages in prompts], sampling, n],
                          sort_keys=True, ensure_ascii=False)

    def submit(self, prompts: list, sampling: dict, n: int, adapter: Optional[str]) -> None:
        """Send a request now, answered on a daemon thread with the server's weights as they are (the caller
        pushed the policy's first); adapter: the server's name of the adapter version to sample (None: full
        weights). A request still in flight is waited for and dropped first."""
        self.settle()
        future: Future = Future()

        def answer() -> None:
            """The request, on its own daemon thread (a run that ends with one in flight does not wait for it)."""
            try:
                future.set_result(self.server.generate(prompts, sampling, n, adapter))
            except BaseException as e:  # the server's error, raised by `take`
                future.set_exception(e)
        threading.Thread(target=answer, name="tunesmith-rollout-ahead", daemon=True).start()
        self.pending, self.requested = (self.key(prompts, sampling, n), future), self.requested + 1

    def take(self, prompts: list, sampling: dict, n: int, later: bool = False) -> Optional[list]:
        """The completions of this request when it was sent ahead (waited for; the server's error raised here),
        or saved by the checkpoint resumed from, else None (the caller samples it now). A different request in
        flight stays pending (it is the next round's). later: not the run's first round — a resumed run's first
        round that nothing holds (a checkpoint saved without --async_generate) is said, once."""
        k = self.key(prompts, sampling, n)
        if self.pending is not None and self.pending[0] == k:
            future, self.pending = self.pending[1], None
            self.taken += 1
            return future.result()
        if self.saved is not None and self.saved[0] == k:
            out, self.saved = self.saved[1], None
            self.taken += 1
            return out
        if later and not self.requested and not self.taken and not self.said_missing:
            from tunesmith.log import note

            self.said_missing = True
            note("--async_generate: resumed from a checkpoint that holds no round requested ahead (saved by a run "
                 "without --async_generate?): this round is sampled now with the checkpoint's weights, so from "
                 "here the run is not the uninterrupted one")
        return None

    def settle(self) -> None:
        """Wait until the request in flight (if any) is answered, so that weights may be pushed; its answer, or
        error, stays for `take`."""
        if self.pending is not None:
            _wait(self.pending[1])

    def save(self, path: str) -> None:
        """Write the request in flight and its answer (waited for) into checkpoint folder `path`, atomically;
        nothing when none is pending."""
        from tunesmith.files import write_json_atomic

        if self.pending is None:
            return
        key, future = self.pending
        completions = future.result()
        write_json_atomic(os.path.join(path, PENDING_FILE),
                          {"request": key, "completions": [[list(c.token_ids), c.finish_reason, c.prompt_tokens,
                                                            None if c.logprobs is None else
                                                            [lp.logprob for lp in c.logprobs]]
                                                           for c in completions]})

    def load(self, path: str) -> None:
        """Keep checkpoint `path`'s saved request and answer (absent when none was in flight) for `take`."""
        from tunesmith.inference.engine import Completion, TokenLogprob

        f = os.path.join(path, PENDING_FILE)
        if not os.path.isfile(f):
            self.saved = None
            return
        with open(f, encoding="utf-8") as fh:
            saved = json.load(fh)
        self.saved = (saved["request"], [Completion(list(ids), reason, n, None if lps is None else
                                                    [TokenLogprob(t, v) for t, v in zip(ids, lps)])
                                         for ids, reason, n, lps in saved["completions"]])


def round_request(method, ids: dict, seed: int, r: int, messages: dict, g: int, logprobs: bool = False) -> tuple:
    """(prompts [(token ids, first seed, messages)], sampling, n): the /infer/ request of these prompts of round r
    ({j: token ids}, {j: messages}; j the place in the round), G = g completions each, with the GRPO `method`'s
    sampling; completion k of prompt j gets seed units._completion_seed(seed, r, j, g) + k. logprobs: the server's
    log-probs of the sampled tokens too (the rollout correction's π_engine)."""
    from tunesmith.train.rl.units import _completion_seed

    prompts = [(prompt, _completion_seed(seed, r, j, g), messages[j]) for j, prompt in ids.items()]
    sampling = {"max_tokens": method.max_completion_length, "temperature": method.temperature,
                "top_p": method.top_p, "top_k": method.top_k, "repetition_penalty": method.repetition_penalty,
                **({"logprobs": True} if logprobs else {})}
    return prompts, sampling, g


def _wait(future: Future) -> None:
    """Block until `future` is done, without raising its error (that is `take`'s)."""
    future.exception()
