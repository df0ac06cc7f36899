"""The rollout protocol's wire format (`tunesmith rollout`): ms-swift 4.6's `swift rollout` request schemas
(swift/infer_engine/protocol.py: RolloutInferRequest, RequestConfig; swift/pipelines/infer/rollout.py: the /infer/
body), checked, and its response shape (RolloutOutput around a ChatCompletionResponse whose choices carry token ids).

tunesmith's extensions, all optional: an infer request's `prompt_token_ids` (the prompt as token ids, used as they
are instead of rendering `messages`, which may then be left out: a trainer that cut its prompts to --max_length
samples exactly those) and
`seed` (its completions' seeds are seed, seed + 1, …; without it, completion k of request i gets
request_config.seed + i·n + k, so copies of one prompt differ). No torch or fastapi import (pydantic only).
The request models carry no docstrings on purpose: FastAPI would publish them in /openapi.json.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.serve.protocol import ApiError, Float, Int


class RolloutInferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict] = Field(default_factory=list)   # may be left out when prompt_token_ids is given
    images: list[str] = Field(default_factory=list)
    audios: list = Field(default_factory=list)
    videos: list = Field(default_factory=list)
    tools: Optional[list] = None
    objects: dict = Field(default_factory=dict)
    chat_template_kwargs: dict = Field(default_factory=dict)
    data_dict: dict = Field(default_factory=dict)
    uuid: Optional[str] = None
    add_eos: Optional[Union[bool, str]] = None
    prompt_token_ids: Optional[list[Int]] = None
    seed: Optional[Int] = None


class RequestConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    max_tokens: Optional[Int] = Field(None, ge=1)
    temperature: Optional[Float] = Field(None, ge=0)
    top_k: Optional[Int] = Field(None, ge=-1)
    top_p: Optional[Float] = Field(None, gt=0, le=1)
    min_p: Optional[Float] = None
    repetition_penalty: Optional[Float] = Field(None, gt=0)
    num_beams: Int = Field(1, ge=1)
    stop: Optional[list[str]] = None
    seed: Optional[Int] = None
    stream: bool = False
    logprobs: bool = False
    top_logprobs: Optional[Int] = Field(None, ge=0)
    prompt_logprobs: Optional[Int] = None
    n: Int = Field(1, ge=1, le=256)
    best_of: Optional[Int] = None
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    length_penalty: Float = 1.0
    return_details: bool = False
    structured_outputs_regex: Optional[str] = None


class InferBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    infer_requests: list[RolloutInferRequest]
    request_config: Optional[RequestConfig] = None
    metrics: Optional[Any] = None
    use_tqdm: Optional[bool] = None
    adapter_request: Optional[dict] = None


# RequestConfig fields this server does not implement: (the values that change nothing, what to do instead)
UNSUPPORTED = {"min_p": ((None, 0, 0.0), "use top_p or top_k"),
               "presence_penalty": ((0, 0.0), "use repetition_penalty"),
               "frequency_penalty": ((0, 0.0), "use repetition_penalty"),
               "length_penalty": ((1, 1.0), "it applies to beam search only"),
               "best_of": ((None, 1), "ask for n completions and pick among them"),
               "prompt_logprobs": ((None,), "score prompts with a forward pass of the model"),
               "structured_outputs_regex": ((None, ""), "guided decoding is not supported"),
               "stream": ((False,), "/infer/ answers when every completion is done"),
               "num_beams": ((1,), "rollouts are sampled")}


def check_request_config(cfg: RequestConfig, max_logprobs: int) -> None:
    """Refuse what would be silently ignored. Raises ApiError 400 naming the field and what to use."""
    for name, (inert, hint) in UNSUPPORTED.items():
        if getattr(cfg, name) not in inert:
            raise ApiError(400, f"request_config.{name} {getattr(cfg, name)!r} is not supported by a tunesmith "
                                f"rollout server ({hint}); leave it at its default",
                           param=f"request_config.{name}")
    if (cfg.top_logprobs or 0) > max_logprobs:
        raise ApiError(400, f"request_config.top_logprobs {cfg.top_logprobs} is above this server's limit "
                            f"{max_logprobs} (--max_logprobs)", param="request_config.top_logprobs")


def check_infer_request(i: int, req: RolloutInferRequest, vocab: int) -> None:
    """Refuse a request with neither messages nor prompt_token_ids, and inputs this server cannot sample from:
    audio, video, other multimodal objects, message contents that are not text, token ids outside the vocabulary,
    token ids together with pictures. Raises ApiError 400."""
    at = f"infer_requests[{i}]"
    if not req.messages and req.prompt_token_ids is None:
        raise ApiError(400, f"{at}: give its messages (at least one) or its prompt_token_ids", param=f"{at}.messages")
    for name in ("audios", "videos", "objects"):
        if getattr(req, name):
            raise ApiError(400, f"{at}.{name}: only text and pictures (`images`) are taken", param=f"{at}.{name}")
    for k, m in enumerate(req.messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), (str, type(None))):
            raise ApiError(400, f"{at}.messages[{k}]: each message needs a role and text content (pictures go in "
                                f"`images`, with an <image> tag in the text where each one is)",
                           param=f"{at}.messages")
    ids = req.prompt_token_ids
    if ids is not None:
        if not ids or any(t < 0 or t >= vocab for t in ids):
            raise ApiError(400, f"{at}.prompt_token_ids: token ids must be in [0, {vocab}) and at least one",
                           param=f"{at}.prompt_token_ids")
        if req.images:
            raise ApiError(400, f"{at}: prompt_token_ids with images is not supported; send the messages and "
                                f"images alone", param=f"{at}.prompt_token_ids")


def choice(index: int, completion, reply, details: bool, logprobs) -> dict:
    """One ChatCompletionResponseChoice: the parsed reply, vLLM's finish_reason (stop or length), the log-probs
    when asked for, and the generated token ids (the stop token included, as vLLM's) when return_details."""
    from tunesmith.serve.protocol import assistant_message

    message = assistant_message(reply)
    if message.get("content") is None:
        message["content"] = ""
    return {"index": index, "message": message,
            "finish_reason": "length" if completion.finish_reason == "length" else "stop",
            "logprobs": logprobs, "token_ids": list(completion.token_ids) if details else None}


def rollout_output(model: str, prompt_ids: list, choices: list, completion_tokens: int, details: bool) -> dict:
    """A RolloutOutput (single turn: no messages, token ids or loss masks of its own) around the
    ChatCompletionResponse of one infer request; completion_tokens: of all its choices together."""
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
             "total_tokens": len(prompt_ids) + completion_tokens}
    response = {"model": model, "choices": choices, "usage": usage, "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion", "created": int(time.time()),
                "prompt_token_ids": list(prompt_ids) if details else None, "prompt_logprobs": None,
                "images_size": None}
    return {"response": response, "messages": None, "response_token_ids": [], "response_loss_mask": [],
            "rollout_infos": {}, "rollout_logprobs": [], "prompt_logprobs": None}
