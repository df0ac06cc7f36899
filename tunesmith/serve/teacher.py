"""`tunesmith deploy`'s POST /infer/: ms-swift's `swift deploy` endpoint that a GKD or OPD-RL trainer's teacher client
(ms-swift's VLLMInferClient; tunesmith's tunesmith.train.rl.teacher_server) posts to, answering vLLM's
`prompt_logprobs` — the teacher's log-probabilities at every position of a sequence, one forward pass.

The request (ms-swift 4.6 rollout_mixin._infer_teacher_requests): {"infer_requests": [RolloutInferRequest, …],
"request_config": {"prompt_logprobs": k, "max_tokens": 1, "temperature": 0.0}}. Each request is its
`prompt_token_ids` (tunesmith's extension: the trainer's own tokens, so positions align exactly) or its `messages`
rendered with the model's chat template (a conversation ending with the assistant's reply is rendered whole, no
generation prompt after it; a final assistant message whose content is token ids — ms-swift's
replace_assistant_response_with_ids, a list of ids or {"input_ids": [...], "loss_scale": [...]} — is the earlier
messages rendered with the generation prompt, then those ids as they are). The answer: one ChatCompletionResponse per request whose `prompt_logprobs` is
vLLM's list — None for the first token, then for each token t ≥ 1 a dict {str(token id): {"logprob", "rank",
"decoded_token"}} holding the actual token t first (its rank among all tokens, 1 the most likely) and then the k
most likely tokens (k = 0: the actual token alone), log-probabilities in nats of the raw distribution
(temperature 1, as vLLM's prompt log-probs). k is at most the server's --max_logprobs (vLLM's rule). The choices
are the request's completion (max_tokens, at its temperature), as the /infer/ of `swift deploy`.

The forward pass runs on the engine's scheduler thread between two decoding steps (GenerationEngine.between_steps),
never beside one; everything else a request costs in proportion to its length (rendering and tokenising messages,
building the entries, encoding the answer) runs in a worker thread, after the length checks that refuse a prompt
filling the context from its count alone; --infer_backend vllm/sglang/lmdeploy answer 400 (their engines own their weights). No torch or
fastapi import at module level; the handler carries no docstring (FastAPI would publish it).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Optional

from starlette.requests import Request

from tunesmith.serve.protocol import ApiError
from tunesmith.serve.rollout_protocol import InferBody, RequestConfig, check_infer_request, choice

# RequestConfig fields /infer/ does not implement here (prompt_logprobs is what it is for): the inert values
_INERT = {"min_p": (None, 0, 0.0), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
          "length_penalty": (1, 1.0), "best_of": (None, 1), "structured_outputs_regex": (None, ""),
          "stream": (False,), "num_beams": (1,)}


def check_config(cfg: RequestConfig, max_logprobs: int) -> Optional[int]:
    """The request's prompt_logprobs k (None: not asked for), checked: 0 ≤ k ≤ max_logprobs, and no field that
    would be silently ignored. Raises ApiError 400 naming the field."""
    for name, inert in _INERT.items():
        if getattr(cfg, name) not in inert:
            raise ApiError(400, f"request_config.{name} {getattr(cfg, name)!r} is not supported by tunesmith "
                                f"deploy's /infer/; leave it at its default", param=f"request_config.{name}")
    k = cfg.prompt_logprobs
    if k is not None and not 0 <= k <= max_logprobs:
        raise ApiError(400, f"request_config.prompt_logprobs {k}: 0 to this server's --max_logprobs {max_logprobs} "
                            f"(start it with a larger --max_logprobs for more)", param="request_config.prompt_logprobs")
    return k


def prompt_logprobs(model, tok, ids: list, k: int) -> list:
    """vLLM's prompt_logprobs of token ids [T] under `model` (see the module's docstring): [None, {…} × (T − 1)]."""
    return logprob_entries(tok, ids, k, prompt_scores(model, ids, k))


def prompt_scores(model, ids: list, k: int) -> tuple:
    """The forward pass of prompt_logprobs: (the actual tokens' log-probs [T − 1], their ranks [T − 1], the k most
    likely tokens' log-probs and ids [T − 1, k] or None when k = 0), as CPU tensors. Scheduler thread only
    (inside between_steps)."""
    import torch

    with torch.no_grad():
        x = torch.tensor([ids], device=next(model.parameters()).device)
        logps = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)   # row t − 1 predicts token t
        actual = torch.tensor(ids[1:], device=logps.device)
        chosen = logps.gather(-1, actual[:, None]).squeeze(-1)
        ranks = (logps > chosen[:, None]).sum(-1) + 1
        top_v, top_i = logps.topk(k, dim=-1) if k else (None, None)
    return tuple(None if t is None else t.cpu() for t in (chosen, ranks, top_v, top_i))


def logprob_entries(tok, ids: list, k: int, scores: tuple) -> list:
    """prompt_logprobs' list from prompt_scores' tensors: the per-token dicts (decoded tokens included), built off
    the scheduler thread (a worker thread) so a long prompt's T·(k + 1) decodes never hold up decoding steps."""
    chosen, ranks, top_v, top_i = (None if t is None else t.tolist() for t in scores)
    out: list = [None]
    for t in range(len(ids) - 1):
        entry = {str(ids[t + 1]): _entry(tok, ids[t + 1], chosen[t], ranks[t])}
        for r in range(k):
            tid = top_i[t][r]
            entry.setdefault(str(tid), _entry(tok, tid, top_v[t][r], r + 1))
        out.append(entry)
    return out


def _entry(tok, tid: int, logprob: float, rank: int) -> dict:
    return {"logprob": logprob, "rank": rank, "decoded_token": tok.decode([tid])}


def response_ids(messages: list) -> Optional[list]:
    """The token ids of a final assistant message given as ids (a list of ints, or {"input_ids": [...]}), else
    None."""
    last = messages[-1] if messages else {}
    content = last.get("content")
    if isinstance(content, dict):
        content = content.get("input_ids")
    if last.get("role") == "assistant" and isinstance(content, list) and content and \
            all(isinstance(t, int) and not isinstance(t, bool) for t in content):
        return list(content)
    return None


def _too_long(server, i: int, n: int, where: str) -> None:
    """Raises ApiError 400 (context_length_exceeded, naming the model's limit) when n tokens leave no room under
    it: checked before anything runs on the tokens (a forward pass costs quadratic time in their number)."""
    limit = server.engine.max_model_len
    if n >= limit:
        raise ApiError(400, f"infer_requests[{i}].{where}: {n} tokens; the model's limit is {limit} "
                            f"(--max_model_len)", code="context_length_exceeded", param=f"infer_requests[{i}].{where}")


def _checked(server, body: InferBody) -> list:
    """Every request checked before any is rendered or scored, the O(1) length checks first (then the O(length)
    ones, under the limit): [(request, its reply given as ids or None)]. Raises ApiError 400."""
    vocab = len(server.engine.tok)
    out = []
    for i, req in enumerate(body.infer_requests):
        if req.prompt_token_ids is not None:
            _too_long(server, i, len(req.prompt_token_ids), "prompt_token_ids")
        reply = response_ids(req.messages) if req.prompt_token_ids is None else None
        if reply is not None:
            _too_long(server, i, len(reply), "messages[-1].content")
            if any(t < 0 or t >= vocab for t in reply):
                raise ApiError(400, f"infer_requests[{i}].messages[-1].content: token ids must be in [0, {vocab})",
                               param=f"infer_requests[{i}].messages")
        check_infer_request(i, req.model_copy(update={"messages": req.messages[:-1] + [
            {"role": "assistant", "content": ""}]}) if reply is not None else req, vocab)
        out.append((req, reply))
    return out


async def _ids(server, i: int, req, reply: Optional[list]) -> list:
    """Request i's token ids: prompt_token_ids, or its messages rendered in a worker thread (whole when the last is
    the assistant's; `reply`, its ids given as ids, appended after the generation prompt). A rendering with more
    characters than the model's context can hold is refused before the tokenizer runs; ids that fill the context,
    before the forward pass. Raises ApiError 400."""
    if req.prompt_token_ids is not None:
        return list(req.prompt_token_ids)
    from starlette.concurrency import run_in_threadpool

    chat = server.engine
    messages = req.messages[:-1] if reply is not None else req.messages
    prompt_only = reply is not None or messages[-1].get("role") != "assistant"
    kwargs = dict(req.chat_template_kwargs or {})

    def render():
        text = chat.tok.apply_chat_template(messages, tools=req.tools, tokenize=False,
                                            add_generation_prompt=prompt_only, **kwargs)
        if len(text) > chat.max_model_len * chat.max_token_chars:
            return len(text)   # cannot fit: not tokenized
        return list(chat.tok(text, add_special_tokens=False)["input_ids"]) + (reply or [])
    try:
        ids = await run_in_threadpool(render)
    except Exception as e:  # the template's own error: the request's conversation does not render
        raise ApiError(400, f"infer_requests[{i}].messages do not render with the model's chat template: {e}",
                       param=f"infer_requests[{i}].messages") from None
    if isinstance(ids, int):
        raise ApiError(400, f"infer_requests[{i}].messages: the prompt has {ids} characters, more than "
                            f"{chat.max_model_len} tokens (the model's limit) can hold",
                       code="context_length_exceeded", param=f"infer_requests[{i}].messages")
    _too_long(server, i, len(ids), "messages")
    return ids


async def _scored(server, ids: list, k: Optional[int]):
    """prompt_logprobs(ids, k), or None when k is None: its forward pass run between two decoding steps, its
    entries built in a worker thread."""
    if k is None:
        return None
    engine = server.engine.engine
    if not hasattr(engine, "between_steps"):
        raise ApiError(400, "request_config.prompt_logprobs needs tunesmith's own engine (--infer_backend "
                            "transformers): this server runs another", param="request_config.prompt_logprobs")
    from starlette.concurrency import run_in_threadpool

    scores = await asyncio.wrap_future(engine.between_steps(lambda: prompt_scores(engine.model, ids, k)))
    return await run_in_threadpool(logprob_entries, server.engine.tok, ids, k, scores)


async def infer(body: InferBody, request: Request):
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    from tunesmith.inference.chat import Prompt
    from tunesmith.serve.routes import _check, _wait

    server = request.app.state.server
    cfg = body.request_config or RequestConfig()
    k = check_config(cfg, server.max_logprobs)
    out = []
    for i, (req, reply) in enumerate(_checked(server, body)):
        ids = await _ids(server, i, req, reply)
        scored = await _scored(server, ids, k)
        gen = server.engine.defaults.merged(max_new_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                            top_p=cfg.top_p, top_k=0 if cfg.top_k == -1 else cfg.top_k,
                                            repetition_penalty=cfg.repetition_penalty, seed=cfg.seed, n=cfg.n)
        prompt = Prompt(ids, False, bool(req.tools))
        completions = await _wait(server.submit(prompt, gen, None), request)
        replies = [server.engine.reply(c, prompt, gen) for c in completions]
        _check(replies)
        n_out = sum(len(c.token_ids) for c in completions)
        out.append({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": next(iter(server.served)),
                    "choices": [choice(j, c, r, cfg.return_details, None)
                                for j, (c, r) in enumerate(zip(completions, replies))],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out,
                              "total_tokens": len(ids) + n_out},
                    "prompt_logprobs": scored, "prompt_token_ids": ids if cfg.return_details else None})
    return await run_in_threadpool(JSONResponse, out)
