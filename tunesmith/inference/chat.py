"""Chat-level generation with the model's own chat template (the same rendering training used).

`ChatEngine` renders conversations, submits them to the one `tunesmith.inference.engine.GenerationEngine` (which batches
every caller's sequences) and parses replies with `tunesmith.inference.reply`. `tunesmith infer` (interactive chat and batch
over a dataset), `tunesmith deploy` and `tunesmith eval` all go through it, so a reply is the same whichever way
it is asked.

Pictures (vision-language models): a conversation's messages carry ms-swift's `<image>` tags in their text and the
pictures come alongside, as references in tag order (a path, a `data:image/...;base64,` URL, an http(s) URL; read by
`tunesmith.data.images`). `prompt` renders the tags as the template's image placeholders, expands each to its
picture's tokens and makes the pixel inputs the engine feeds (`Prompt.pixels`) — in the caller's thread, never the
scheduler's. A text-only model, or an accelerated backend, refuses pictures (`ImageInputError`).

What lives here: rendering prompts, GenConfig -> sampling settings, decoding and parsing replies, streaming state,
building the engine from flags. What must not: the `infer` command (tunesmith.commands.infer), token
scheduling (`tunesmith.inference.engine`), template output conventions (`tunesmith.inference.reply`), HTTP (`tunesmith.serve`), model
loading (`tunesmith.models.load`). No torch import at module level.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

from tunesmith.config.groups import GenerationArgs, TemplateArgs
from tunesmith.config.slices import EngineConfig, ModelConfig, take

@dataclass
class GenConfig:
    """Per-request generation settings; None means the model's generation_config.json default."""
    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None       # 0 = greedy
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    stop: list = field(default_factory=list)
    seed: Optional[int] = None
    num_beams: int = 1
    min_p: float = 0.0                        # min-p sampling (0: off); GRPO's --min_p
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    processed_logprobs: bool = False          # log-probs of the distribution sampled from (vLLM's processed_logprobs)

    @classmethod
    def from_args(cls, args: GenerationArgs) -> "GenConfig":
        """From the infer/deploy/eval flags (--max_new_tokens, --temperature, ..., --stop_words, --n, --logprobs)."""
        return cls(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=list(args.stop_words),
                   num_beams=args.num_beams, n=args.n or 1, logprobs=bool(args.logprobs),
                   top_logprobs=args.top_logprobs or 0)

    def merged(self, **overrides) -> "GenConfig":
        """These settings with every non-None override applied (a request's values over the server's)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Reply:
    """A parsed reply. completion_tokens counts every generated token (the stop token included)."""
    content: str
    reasoning: Optional[str]
    finish_reason: str           # "stop", "length", "tool_calls" (or "abort"/"error" from the engine)
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list = field(default_factory=list)
    logprobs: Optional[list] = None   # [TokenLogprob] per completion token, when asked for
    error: Optional[BaseException] = None


class PromptTooLong(ValueError):
    """The rendered prompt has max_model_len tokens or more: no room to generate."""


class ImageInputError(ValueError):
    """A request's pictures cannot be used: the model (or the backend) takes text only, a picture cannot be read, or
    the `<image>` tags do not match the pictures. The message is one line, for the CLI or an HTTP 400. picture: the
    index (in `images`) of the picture that cannot be read, and reason what is wrong with it (no advice), when one
    picture is the cause; else None."""

    def __init__(self, message: str, picture: Optional[int] = None, reason: Optional[str] = None):
        super().__init__(message)
        self.picture, self.reason = picture, reason


@dataclass
class Prompt:
    """A rendered request: token ids [T] (each image placeholder expanded to its picture's tokens), whether the
    template left the output inside a `<think>` block, whether tool calls are parsed from the output, and the
    pictures' pixel inputs for the engine (`tunesmith.data.vision.pixel_inputs`: pixel_values [P, D],
    image_grid_thw [N, 3]), None for a text prompt."""
    ids: list
    in_think: bool
    tools: bool
    pixels: Optional[dict] = None


class ChatEngine:
    """Chat-level generation over the one `GenerationEngine`: renders conversations with the model's own chat
    template (the same rendering training used), submits them, and parses replies (reasoning, tool calls).
    Thread-safe: every call may come from any thread; the engine's scheduler batches them."""

    def __init__(self, model, tokenizer, system: Optional[str] = None, defaults: Optional[GenConfig] = None,
                 max_model_len: Optional[int] = None, max_batch_size: Optional[int] = None,
                 template_kwargs: Optional[dict] = None, engine=None, generation_config=None, config=None,
                 gpu_memory_utilization: float = 0.9, images=None, max_images: Optional[int] = None):
        """model: the loaded model, or None when `engine` is an accelerated engine (tunesmith.inference.backends) holding the
        weights; then `generation_config` (sampling defaults, eos ids) and `config` (context length) come from the
        checkpoint. engine: a pre-built object with GenerationEngine's interface (submit, generate, close,
        stop_ids, max_model_len); None builds the GenerationEngine over `model`, with `max_batch_size` (None: sized
        from memory, see tunesmith.inference.budget; N: at most N rows; -1: no cap) and `gpu_memory_utilization`
        (fraction 0-1 of a GPU's memory for weights and KV cache). max_model_len in tokens.
        images: the `tunesmith.data.vision.ImageTokens` of a vision-language model (`tunesmith.models.vision.
        image_tokens`: its pictures are counted, expanded and fed), else None (prompts with pictures are refused).
        max_images: at most this many pictures per prompt (--vllm_limit_mm_per_prompt's "image", as vLLM caps
        them); None: no cap.
        Raises ValueError when neither a model nor an engine is given."""
        from tunesmith.data.encode import ChatEncoder
        from tunesmith.inference.engine import GenerationEngine
        from tunesmith.inference.reply import OutputParser

        self._backend: Optional[str] = None  # the accelerated engine's name (vllm, sglang, lmdeploy), if one
        if model is None:
            if engine is None:
                raise ValueError("ChatEngine needs a model or an engine")
            from tunesmith.inference.backends import EngineModelInfo
            self._backend = getattr(engine, "name", "vllm")
            model = EngineModelInfo(config, generation_config, self._backend)
        self.model, self.tok = model, tokenizer
        self.images, self.max_images = images, max_images
        self.encoder = ChatEncoder(tokenizer, system=system, images=images)
        self.defaults = defaults or GenConfig()
        self.template_kwargs = dict(template_kwargs or {})
        cfg = getattr(model, "config", None)
        # an engine enforces its own context length: the prompt check must agree with it
        self.max_model_len = (getattr(engine, "max_model_len", None) if engine is not None else None) or \
            max_model_len or getattr(cfg, "max_position_embeddings", None) or 4096
        self.parser = OutputParser(tokenizer)
        self.stop_ids = stop_token_ids(model, tokenizer, self.encoder, self.parser.reasoning_style)
        if engine is not None:
            # the engine decides where sequences end; reply() strips exactly those ids
            self.stop_ids = sorted(getattr(engine, "stop_ids", None) or self.stop_ids)
            self.engine = engine
        else:
            self.engine = GenerationEngine(model, tokenizer, self.stop_ids, max_batch_size=max_batch_size,
                                           max_model_len=self.max_model_len,
                                           gpu_memory_utilization=gpu_memory_utilization)

    @property
    def device(self):
        """The device of the model's first parameter (a model loaded here, not an accelerated engine's)."""
        return next(self.model.parameters()).device

    def close(self) -> None:
        """Close the engine: sequences still queued or running end with finish_reason "abort"."""
        self.engine.close()

    def prompt(self, messages: list[dict], tools=None, template_kwargs: Optional[dict] = None,
               images: Optional[list] = None, pixels: bool = True) -> Prompt:
        """Render messages (OpenAI shape: tool_calls, tool messages, reasoning_content) with the generation prompt.
        Raises PromptTooLong when no room is left under the model's limit.

        template_kwargs override the engine's (--enable_thinking). images: the pictures of the messages' `<image>`
        tags, in order (references: a path, a data: URL, an http(s) URL), decoded here into `Prompt.pixels` (pixels
        False: only counted from their headers, `Prompt.pixels` None — GRPO decodes them when it samples).
        Returns a Prompt with ids [T]; `in_think` when the rendering ends in `<think>`. Raises ImageInputError for
        pictures given to a model that takes none, pictures that cannot be read, or tags that do not match the
        pictures (a vision-language model's text holding `<|image_pad|>` without a picture included). The
        template's own errors propagate."""
        from tunesmith.inference.reply import to_template_messages

        images = list(images or [])
        problem = self.image_problem(len(images))
        if problem:
            raise ImageInputError(problem)
        kwargs = {**self.template_kwargs, **(template_kwargs or {})}
        text = self.encoder.render(self.encoder.with_system(to_template_messages(messages)),
                                   add_generation_prompt=True, tools=tools, **kwargs)
        if len(text) > self.max_model_len * self.max_token_chars:
            # no token spells more than max_token_chars characters, so this text cannot fit: refused before the
            # tokenizer spends seconds (and memory) on it
            raise PromptTooLong(f"the prompt has {len(text)} characters, more than {self.max_model_len} tokens "
                                f"(the model's limit) can hold")
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        decoded = None
        if self.images is not None and (images or self.images.image_token_id in ids):
            ids, decoded = self._with_pictures(ids, images, pixels)
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; the model's limit is {self.max_model_len}")
        return Prompt(ids, text.rstrip().endswith("<think>"), bool(tools), decoded)

    def _with_pictures(self, ids: list, images: list, pixels: bool = True) -> tuple[list, Optional[dict]]:
        """(ids [T'] with each image placeholder repeated once per image token of its picture, the pictures' pixel
        inputs or None when there are none or `pixels` is False). Raises ImageInputError (one line) for
        placeholders that do not match the pictures or a picture that cannot be read."""
        from tunesmith.data.images import ImageError
        from tunesmith.data.vision import expand_images, pixel_inputs
        from tunesmith.errors import DataError

        try:
            ids, _, _ = expand_images(ids, [-100] * len(ids), images, self.images)
            return ids, (pixel_inputs([images], self.images) or None) if pixels else None
        except DataError as e:
            raise ImageInputError(f"{e.problem} Fix: {e.fix}" if e.fix else e.problem) from None
        except ImageError as e:
            at = next((i for i, ref in enumerate(images) if ref is e.ref), None)
            if at is None and e.ref in images:
                at = images.index(e.ref)
            raise ImageInputError(f"a picture cannot be read: {e}", at, e.reason) from None

    def image_problem(self, count: int) -> Optional[str]:
        """Why a prompt with `count` pictures cannot be answered (one line), or None: this engine takes none (a text
        model, an accelerated backend), or more than `max_images`. Cheap: callers ask before fetching pictures."""
        if count and self.images is None:
            return f"{count} image(s) given, but {self._text_only()}"
        if self.max_images is not None and count > self.max_images:
            return (f"{count} images in one prompt; at most {self.max_images} are taken (--vllm_limit_mm_per_prompt "
                    f"'{{\"image\": {self.max_images}}}')")
        return None

    def _text_only(self) -> str:
        """Why this engine takes no pictures (the end of an image_problem)."""
        from tunesmith.models.vision import is_vision_language

        if not is_vision_language(getattr(self.model, "config", None)):
            return ("the model takes text only (it has no vision tower); use a vision-language model (Qwen2-VL, "
                    "Qwen2.5-VL, Qwen3-VL), or leave the pictures out")
        if self._backend:
            return (f"--infer_backend {self._backend} takes text only in tunesmith so far; use --infer_backend "
                    f"transformers for pictures")
        return "this engine was built without the model's image processor (ChatEngine's images)"

    @property
    def max_token_chars(self) -> int:
        """The most characters one token of this vocabulary spells (its longest token string, byte-level or
        sentencepiece; computed once)."""
        if getattr(self, "_max_token_chars", None) is None:
            strings = self.tok.convert_ids_to_tokens(list(range(len(self.tok))))
            self._max_token_chars = max([len(s) for s in strings if isinstance(s, str)] + [1])
        return self._max_token_chars

    def non_finite_problem(self) -> Optional[str]:
        """What makes this model's output NaN/inf, or None: a weight holding NaN/inf (the first one, named), else a
        short greedy generation whose output is not finite (activations that overflow the dtype). Skipped (None)
        for an accelerated engine, which holds its own weights. Checked a tensor slice at a time (no full copy)."""
        import torch

        from tunesmith.inference.engine import NonFiniteOutput, SamplingParams

        if not isinstance(self.model, torch.nn.Module):
            return None
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if p.is_floating_point() and not all(bool(torch.isfinite(c).all())
                                                     for c in p.detach().reshape(-1).split(1 << 24)):
                    return f"the weight {name} holds NaN or inf"
        prompt = self.prompt([{"role": "user", "content": "Hello"}])
        (done,) = self.engine.generate([prompt.ids], SamplingParams(max_new_tokens=1, temperature=0.0))
        if isinstance(done.error, NonFiniteOutput):
            return "its output for a short test prompt holds NaN or inf (the activations overflow its dtype?)"
        return None

    def prompt_ids(self, messages: list[dict], tools=None, **template_kwargs) -> list[int]:
        """The rendered prompt's token ids [T] (see `prompt`). Raises PromptTooLong."""
        return self.prompt(messages, tools, template_kwargs).ids

    def check_prompt(self, messages: list[dict], cfg: GenConfig, tools=None) -> None:
        """Raise PromptTooLong before any generation starts (cfg is not used)."""
        self.prompt(messages, tools)

    def sampling(self, cfg: GenConfig, choice: int = 0):
        """GenConfig → the engine's SamplingParams (None → the model's generation_config defaults).

        choice: which of cfg.n sequences; it is added to cfg.seed so the n samples differ. max_new_tokens None
        becomes 0, which the engine reads as "all the room left"."""
        from tunesmith.inference.engine import SamplingParams

        gen = getattr(self.model, "generation_config", None)
        temperature = cfg.temperature
        if temperature is None:
            temperature = (getattr(gen, "temperature", None) or 1.0) if getattr(gen, "do_sample", False) else 0.0
        top_p = cfg.top_p if cfg.top_p is not None else (getattr(gen, "top_p", None) or 1.0)
        top_k = cfg.top_k if cfg.top_k is not None else (getattr(gen, "top_k", None) or 0)
        rep = cfg.repetition_penalty if cfg.repetition_penalty is not None else \
            (getattr(gen, "repetition_penalty", None) or 1.0)
        seed = None if cfg.seed is None else cfg.seed + choice
        return SamplingParams(max_new_tokens=cfg.max_new_tokens or 0, temperature=float(temperature),
                              top_p=float(top_p), top_k=int(top_k), repetition_penalty=float(rep),
                              stop=tuple(s for s in cfg.stop if s), seed=seed, logprobs=cfg.logprobs,
                              top_logprobs=cfg.top_logprobs or 0, num_beams=cfg.num_beams, min_p=float(cfg.min_p),
                              processed_logprobs=cfg.processed_logprobs)

    def submit(self, prompt: Prompt, cfg: GenConfig, adapter: Optional[str] = None, loop=None) -> list:
        """Queue cfg.n sequences for a rendered prompt (its pictures too): their engine Handles.

        loop: deliver tokens to this asyncio loop. Raises the engine's ValueError (no room, unknown adapter,
        pictures that do not fit) or RuntimeError (engine closed)."""
        pictures = {"images": prompt.pixels} if prompt.pixels else {}  # a text prompt: any engine's submit
        return [self.engine.submit(prompt.ids, self.sampling(cfg, i), adapter, loop, **pictures)
                for i in range(max(1, cfg.n))]

    def reply(self, completion, prompt: Prompt, cfg: GenConfig) -> Reply:
        """A finished sequence → Reply: decoded without its stop token, cut at a stop string, parsed.

        completion: the engine's Completion. finish_reason becomes "tool_calls" when calls were parsed, "stop" when
        a stop string cut the text; logprobs lose the stop token's entry. An engine error is returned in
        Reply.error, not raised."""
        ids = list(completion.token_ids)
        if ids and ids[-1] in self.stop_ids and completion.finish_reason == "stop":
            ids = ids[:-1]
        raw = self.tok.decode(ids, skip_special_tokens=False)
        stopped = completion.finish_reason == "stop"
        for s in cfg.stop:  # OpenAI semantics: the stop sequence itself is not returned
            k = raw.find(s) if s else -1
            if k >= 0:
                raw, stopped = raw[:k], True
        parsed = self.parser.parse(raw, tools=prompt.tools, final=True, in_think=prompt.in_think)
        reason = completion.finish_reason
        if parsed.tool_calls:
            reason = "tool_calls"
        elif stopped:
            reason = "stop"
        logprobs = completion.logprobs
        if logprobs is not None and completion.finish_reason == "stop" and len(logprobs) > len(ids):
            logprobs = logprobs[:len(ids)]
        return Reply(parsed.content, parsed.reasoning, reason, completion.prompt_tokens, len(completion.token_ids),
                     parsed.tool_calls, logprobs, completion.error)

    def generate(self, conversations: list[list[dict]], cfg: Optional[GenConfig] = None, tools=None,
                 adapter: Optional[str] = None, images: Optional[list] = None) -> list[Reply]:
        """Reply to each conversation (messages ending with the user's turn); all are batched by the engine.
        One reply per conversation (cfg.n is ignored here). images: each conversation's pictures (a list of
        references, or None), or None for all text. Raises PromptTooLong, ImageInputError, or the engine's
        error."""
        cfg = replace(cfg or self.defaults, n=1)
        images = images or [None] * len(conversations)
        prompts = [self.prompt(c, tools, images=i) for c, i in zip(conversations, images)]
        handles = [self.submit(p, cfg, adapter)[0] for p in prompts]
        replies = [self.reply(h.result(), p, cfg) for h, p in zip(handles, prompts)]
        for r in replies:
            if r.error is not None:
                raise r.error
        return replies

    def stream_state(self, prompt: Prompt, cfg: GenConfig) -> "StreamState":
        """A StreamState for one sequence of `prompt` (feed it the handle's tokens)."""
        return StreamState(self, prompt, cfg)

    def stream(self, messages: list[dict], cfg: Optional[GenConfig] = None, tools=None,
               images: Optional[list] = None) -> Iterator:
        """Yield answer text pieces as they are generated, then the final Reply (same content as `generate`).

        images: the pictures of the messages' `<image>` tags (see `prompt`). Only `content` is yielded as text
        (reasoning and tool calls are in the Reply). Raises PromptTooLong or ImageInputError before generating, or
        the engine's error at the end."""
        cfg = replace(cfg or self.defaults, n=1)
        prompt = self.prompt(messages, tools, images=images)
        handle = self.submit(prompt, cfg)[0]
        state = self.stream_state(prompt, cfg)
        for token in handle:
            piece = state.feed(token).get("content")
            if piece:
                yield piece
        reply, last = state.finish(handle.completion)
        if reply.error is not None:
            raise reply.error
        if last.get("content"):
            yield last["content"]
        yield reply


class StreamState:
    """Incremental detokenisation and parsing of one streamed sequence: `feed(token)` → delta fields to send now;
    `finish(completion)` → (Reply, the remaining delta). Decoding keeps a small window (as vLLM does), so a
    stream costs O(tokens), and bytes of a multi-byte character are held until the character is whole."""

    def __init__(self, chat: ChatEngine, prompt: Prompt, cfg: GenConfig):
        from tunesmith.inference.reply import StreamDeltas

        self.chat, self.prompt, self.cfg = chat, prompt, cfg
        self.ids: list[int] = []
        self.text, self._prefix, self._read = "", 0, 0
        self.deltas = StreamDeltas()

    def feed(self, token: int) -> dict:
        """Take the next generated token id; return the delta fields to send now ({} while bytes, markers or stop
        strings may still complete; stop tokens add nothing)."""
        tok = self.chat.tok
        self.ids.append(token)
        if token in self.chat.stop_ids:
            return {}
        before = tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=False)
        after = tok.decode(self.ids[self._prefix:], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        else:
            return {}
        parsed = self.chat.parser.parse(self.text, tools=self.prompt.tools, final=False,
                                        in_think=self.prompt.in_think, stops=tuple(self.cfg.stop))
        return self.deltas.delta(parsed)

    def finish(self, completion) -> tuple[Reply, dict]:
        """The ended Completion → (the Reply, the delta fields not sent yet); errors stay in Reply.error."""
        from tunesmith.inference.reply import Parsed

        reply = self.chat.reply(completion, self.prompt, self.cfg)
        delta = self.deltas.delta(Parsed(reply.content, reply.reasoning, reply.tool_calls))
        return reply, delta


def stop_token_ids(model, tokenizer, encoder, reasoning_style: str) -> list[int]:
    """The ids that end a reply: the model's generation_config eos ids (gpt-oss: `<|return|>`, `<|call|>`), the
    tokenizer's eos, and the template's end-of-turn tokens — except Harmony's `<|end|>`, which ends a message
    (the analysis channel) but not the turn.

    encoder: a ChatEncoder (for the template's end-of-turn tokens); reasoning_style: OutputParser's. Returns the
    ids sorted. Raises ConfigError when the template does not render assistant content verbatim."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(tokenizer.eos_token_id)
    for text in encoder.end_of_turn_tokens():
        if reasoning_style == "harmony" and text == "<|end|>":
            continue
        i = tokenizer.convert_tokens_to_ids(text)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    if reasoning_style == "harmony":
        for text in ("<|return|>", "<|call|>"):
            i = tokenizer.convert_tokens_to_ids(text)
            if isinstance(i, int) and i != tokenizer.unk_token_id:
                ids.add(i)
        end = tokenizer.convert_tokens_to_ids("<|end|>")
        ids.discard(end)
    return sorted(i for i in ids if i is not None)


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                     system: Optional[str] = None, temperature: float = 0.0) -> list[str]:
    """Reply texts for conversations (greedy when temperature is 0): a ChatEngine in one call.

    max_new_tokens in tokens. Raises PromptTooLong, or the first generation error."""
    engine = ChatEngine(model, tokenizer, system=system)
    try:
        cfg = GenConfig(max_new_tokens=max_new_tokens, temperature=temperature)
        return [r.content for r in engine.generate(conversations, cfg)]
    finally:
        engine.close()


# ------------------------------------------------------------------ `tunesmith infer`

def build_engine(args):
    """Resolve the checkpoint, load the model and adapters, and make the ChatEngine (shared with deploy and eval).
    With --infer_backend vllm|sglang|lmdeploy see `_build_backend_engine`; raises ConfigError when it cannot run
    here. args: a parsed infer, deploy or eval command, not changed. Returns (engine, the resolved command — a new
    frozen one with what the checkpoint's args.json filled in, see models.checkpoint.resolve_checkpoint —, the
    checkpoint whose args.json was read, deploy's named adapters).

    Named adapters: {name: path}. Also raises ConfigError for bad --adapters, a reward model or a model that cannot
    be resolved, and FlagError for --max_new_tokens over the model's context length (both before the weights
    load)."""
    from tunesmith.config.checks import raise_problems
    from tunesmith.inference.flags import check_model_reply_room, served_base_name
    from tunesmith.models.checkpoint import (named_adapter_problems, resolve_checkpoint, side_by_side_problems,
                                             split_named_adapters)
    from tunesmith.models.load import load_for_inference, note, resolve_model_dir

    batch = args.max_batch_size
    if args.infer_backend not in ("transformers", "pt"):
        return _build_backend_engine(args, batch)
    args, ckpt = resolve_checkpoint(args)
    plain, named = split_named_adapters(list(args.adapters))
    # the names again, now that the checkpoint's args.json may have named the model (the base's served name)
    raise_problems(named_adapter_problems(list(args.adapters), served_base_name(args)) + side_by_side_problems(named))
    model_dir = resolve_model_dir(args.model, args.use_hf, args.model_revision, args.hub_token)
    check_model_reply_room(args, model_dir)  # --max_new_tokens within the context: before the weights load
    model, tok, _ = load_for_inference(take(ModelConfig, args), plain, named, model_dir=model_dir)
    engine = ChatEngine(model, tok, system=args.system, defaults=GenConfig.from_args(args),
                        max_model_len=args.max_model_len, max_batch_size=batch,
                        template_kwargs=template_kwargs(args),
                        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                        images=_image_tokens(args, model, tok, model_dir),
                        max_images=image_cap(args.vllm_limit_mm_per_prompt))
    if args.seed is not None:
        import torch
        torch.manual_seed(args.seed)  # once: unseeded sampling is reproducible per run, not per request
    note(f"generation: tunesmith continuous batching; {engine.engine.plan.describe()}")
    note(f"generation: stop tokens {engine.tok.convert_ids_to_tokens(engine.stop_ids)}")
    return engine, args, ckpt, named


def _image_tokens(args, model, tok, model_dir: str):
    """A vision-language model's ImageTokens (tunesmith.models.vision.image_tokens, within --max_pixels /
    MAX_PIXELS), with a note of the budget; None for a text model."""
    from tunesmith.models.load import note
    from tunesmith.models.vision import image_tokens, is_vision_language

    if not is_vision_language(model.config):
        return None
    images = image_tokens(model_dir, model.config, tok, args.max_pixels)
    note(f"images: {images.limits['min_pixels']:,} to {images.limits['max_pixels']:,} pixels each (--max_pixels / "
         f"MAX_PIXELS); {images.image_token} placeholders expanded per picture")
    return images


def image_cap(limit_mm_per_prompt: Optional[dict]) -> Optional[int]:
    """Pictures per prompt from --vllm_limit_mm_per_prompt (ms-swift's JSON, vLLM's limit_mm_per_prompt): its
    "image" entry, a count or vLLM's {"count": N, ...}; None when it sets none. Its other modalities (video, audio)
    limit inputs tunesmith does not take."""
    value = (limit_mm_per_prompt or {}).get("image")
    if isinstance(value, dict):
        value = value.get("count")
    return None if value is None else int(value)


def _build_backend_engine(args, batch: Optional[int]):
    """build_engine for vLLM/SGLang/LMDeploy: only the tokenizer and configs are loaded here; the engine
    (tunesmith.inference.backends) loads the weights and adapters."""
    from tunesmith.inference.backends import ENGINES, NAMES, EngineModelInfo, check_backend, engine_adapters
    from tunesmith.data.encode import ChatEncoder
    from tunesmith.errors import ConfigError
    from tunesmith.inference.flags import check_reply_room, context_length
    from tunesmith.models.load import load_tokenizer, note, refuse_reward_model, resolve_model_dir
    from tunesmith.inference.reply import OutputParser
    from tunesmith.models.checkpoint import resolve_checkpoint, split_named_adapters

    backend = args.infer_backend
    check_backend(backend)  # the package, its version and a GPU, each a one-line error
    args, ckpt = resolve_checkpoint(args)  # an adapter checkpoint names its base model in args.json
    cfg = take(EngineConfig, args)
    plain, named = split_named_adapters(list(args.adapters))
    lora = engine_adapters(cfg)  # raises for several plain adapters (one LoRA per request)
    default = next((n for n, p in lora.items() if plain and p == plain[0] and n not in named), None)
    model_dir = resolve_model_dir(args.model, args.use_hf, args.model_revision, args.hub_token)
    refuse_reward_model(args.model, model_dir)
    tok = load_tokenizer(args, model_dir)
    info = EngineModelInfo.from_pretrained(model_dir, backend, trust_remote_code=args.trust_remote_code)
    stop = stop_token_ids(info, tok, ChatEncoder(tok, system=args.system), OutputParser(tok).reasoning_style)
    own = {"vllm": cfg.vllm_max_model_len, "sglang": cfg.sglang_context_length,
           "lmdeploy": cfg.lmdeploy_session_len}[backend]  # the engine's own context flag
    flag = {"vllm": "--vllm_max_model_len", "sglang": "--sglang_context_length", "lmdeploy": "--lmdeploy_session_len"}
    context, source = (own, flag[backend]) if own else context_length(info.config, args.max_model_len)
    check_reply_room(args.max_new_tokens, context, source)
    try:
        inner = ENGINES[backend](cfg, model_dir, tok, stop, lora, default, max_model_len=context)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - CUDA, memory, an unsupported architecture: say so in one line
        raise_backend(backend, cfg, e)
    try:
        engine = ChatEngine(None, tok, system=args.system, defaults=GenConfig.from_args(args),
                            max_model_len=inner.max_model_len, max_batch_size=batch,
                            template_kwargs=template_kwargs(args), engine=inner,
                            generation_config=info.generation_config, config=info.config)
    except BaseException:
        inner.close()
        raise
    note(f"generation: {NAMES[backend]} engine (--infer_backend {backend}), context {inner.max_model_len} "
         f"tokens" + (f", LoRA adapters {', '.join(lora)}" if lora else "")
         + f"; stop tokens {tok.convert_ids_to_tokens(engine.stop_ids)}")
    return engine, args, ckpt, named


def template_kwargs(args: TemplateArgs) -> dict:
    """Chat-template variables from flags: --enable_thinking (Qwen3 and other hybrid-thinking templates).

    Returns {} or {"enable_thinking": bool}."""
    return {} if args.enable_thinking is None else {"enable_thinking": bool(args.enable_thinking)}


def logprobs_json(tokenizer, logprobs: Optional[list]) -> Optional[dict]:
    """[TokenLogprob] → OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}.

    One entry per generated token; logprob in nats; bytes: the UTF-8 bytes of the token's decoded text. None
    when log-probs were not asked for."""
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        """One token's {token, logprob, bytes}."""
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def raise_backend(backend: str, cfg: EngineConfig, error: BaseException):
    """Raise ConfigError for an accelerated engine (`--infer_backend vllm|sglang|lmdeploy`) that failed to start
    with `error`: one line naming the engine and the error, then the engine's own OpenAI-compatible server command
    with the same settings (tunesmith.inference.backends.native_serve_command; secrets redacted) as an alternative, and the
    fallback --infer_backend transformers.

    Always raises ConfigError, chained to `error`."""
    from tunesmith.inference.backends import NAMES, engine_adapters, format_command, native_serve_command
    from tunesmith.errors import ConfigError

    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    msg = f"--infer_backend {backend}: {NAMES[backend]} failed to start ({type(error).__name__}: {first})"
    cmd = native_serve_command(backend, cfg, cfg.model, engine_adapters(cfg))
    # the engines download hub ids from Hugging Face unless told otherwise; tunesmith defaults to ModelScope
    modelscope = {"vllm": "VLLM_USE_MODELSCOPE=True", "sglang": "SGLANG_USE_MODELSCOPE=true",
                  "lmdeploy": "LMDEPLOY_USE_MODELSCOPE=True"}[backend]
    hub = "" if os.path.isdir(cfg.model) else (
        " (a hub id: set HF_TOKEN in the environment if it is gated"
        + ("" if cfg.use_hf else f"; {modelscope} to download from ModelScope as tunesmith does") + ")")
    raise ConfigError(f"{msg}. The same model and settings with {NAMES[backend]}'s own OpenAI-compatible "
                      f"server{hub}, for clients or `tunesmith eval --eval_url http://HOST:PORT/v1`:\n  "
                      f"{format_command(cmd)}\nor use --infer_backend transformers") from error
