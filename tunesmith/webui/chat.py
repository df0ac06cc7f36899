"""The Chat page's model: one ChatEngine — the engine `tunesmith deploy` serves (tunesmith.inference.chat:
build_engine, continuous batching, the model's own chat template, reply parsing) — loaded from the same flags as
`tunesmith infer`, and a reply streamed token by token with its reasoning and tool calls kept apart from the answer.

The engine is shared by every browser tab of the page (it batches their requests); loading another model closes
the previous engine (its unfinished replies end). Sampling settings are checked by the same function that checks
infer's and deploy's flags, so a bad value reads as the CLI's message.
"""
from __future__ import annotations

import json
import threading
from typing import Iterator, Optional

from tunesmith.config.groups import GenerationArgs
from tunesmith.errors import ConfigError


def _generation(settings: dict) -> GenerationArgs:
    """The sampling settings of the page ({max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
    stop}) as GenerationArgs (None: the model's default). Raises ConfigError for a value of the wrong type."""
    def num(key, kind):
        value = settings.get(key)
        if value is None or value == "":
            return None
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") \
                from None

    stop = [s for s in (settings.get("stop") or []) if s]
    return GenerationArgs(max_new_tokens=num("max_new_tokens", int), temperature=num("temperature", float),
                          top_p=num("top_p", float), top_k=num("top_k", int),
                          repetition_penalty=num("repetition_penalty", float), stop_words=stop,
                          seed=num("seed", int) if settings.get("seed") not in (None, "") else 42)


def gen_config(settings: dict):
    """The GenConfig of one turn from the page's settings, checked as infer's flags are (inference.flags:
    generation_problems). Raises FlagError naming every bad value."""
    from tunesmith.config.checks import raise_problems
    from tunesmith.inference.chat import GenConfig
    from tunesmith.inference.flags import generation_problems

    args = _generation(settings)
    raise_problems(generation_problems(args))
    cfg = GenConfig.from_args(args)
    return cfg.merged(seed=args.seed if settings.get("seed") not in (None, "") else None)


def parse_tools(text: Optional[str]) -> Optional[list]:
    """The tools box: an OpenAI `tools` JSON list (or one tool object), or None when empty. Raises ConfigError for
    text that is not such JSON."""
    if not text or not text.strip():
        return None
    try:
        tools = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"tools: not JSON ({e}); give a list of OpenAI tool objects") from None
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ConfigError("tools: expected a JSON list of OpenAI tool objects ({\"type\": \"function\", ...})")
    return tools


class ChatSession:
    """At most one loaded engine, shared by every tab; thread-safe. `engine` and `name`: one built already (the
    app command's)."""

    def __init__(self, engine=None, name: str = ""):
        self._lock = threading.Lock()
        self.engine, self.name = engine, name

    def load(self, argv: list) -> str:
        """Build the engine from infer's flags (argv: --model/--adapters/... as on a command line), as infer and
        deploy do, closing the one loaded before. Returns a line saying what was loaded. Raises ArgError, FlagError
        or ConfigError (bad flags, a model that cannot load, output that is NaN/inf)."""
        from tunesmith.config.parser import parse_args
        from tunesmith.inference.chat import build_engine
        from tunesmith.inference.flags import check_inference_flags

        args = parse_args("infer", argv, defer_problems=True)
        check_inference_flags(args)
        engine, args, ckpt, _ = build_engine(args)
        problem = engine.non_finite_problem()
        if problem:
            engine.close()
            raise ConfigError(f"{ckpt or args.model}: {problem}; every reply would be garbage. Load an earlier "
                              f"checkpoint")
        with self._lock:
            old, self.engine = self.engine, engine
            self.name = ", ".join(args.adapters) if args.adapters else str(args.model)
        if old is not None:
            old.close()
        return f"loaded {self.name}" + (f" (base {args.model})" if args.adapters else "")

    def close(self) -> None:
        """Close the loaded engine, if any."""
        with self._lock:
            old, self.engine = self.engine, None
        if old is not None:
            old.close()


def stream_turn(engine, messages: list, cfg, tools=None) -> Iterator[dict]:
    """Generate the reply to `messages` (OpenAI shape, ending with the user's turn), yielding the reply so far after
    each token that adds text: {"reasoning": str, "content": str, "tool_calls": [OpenAI call], "finish_reason":
    None until the last}. Closing the iterator early (the page's Stop) cancels the sequence. Raises PromptTooLong
    (inference.chat) or the engine's error."""
    prompt = engine.prompt(messages, tools)
    handle = engine.submit(prompt, cfg)[0]
    state = engine.stream_state(prompt, cfg)
    acc = {"reasoning": "", "content": "", "tool_calls": [], "finish_reason": None}

    def add(delta: dict) -> bool:
        """Fold a delta (reasoning_content, content, tool_calls) into acc; whether anything was new."""
        acc["reasoning"] += delta.get("reasoning_content", "")
        acc["content"] += delta.get("content", "")
        acc["tool_calls"] += [{k: v for k, v in c.items() if k != "index"} for c in delta.get("tool_calls", [])]
        return bool(delta)

    try:
        for token in handle:
            if add(state.feed(token)):
                yield dict(acc)
        reply, delta = state.finish(handle.completion)
        add(delta)
        if reply.error is not None:
            raise reply.error
        acc["finish_reason"] = reply.finish_reason
        yield dict(acc)
    finally:
        if handle.completion is None:
            handle.cancel()


def shown(reply: dict, labels: dict) -> list[dict]:
    """A reply as chat messages for the page: the reasoning in a folded message of its own, each tool call as a
    message titled with the function's name (its arguments as JSON), then the answer."""
    out = []
    if reply["reasoning"]:
        done = reply["finish_reason"] is not None or bool(reply["content"])
        out.append({"role": "assistant", "content": reply["reasoning"],
                    "metadata": {"title": labels["reasoning"], "status": "done" if done else "pending"}})
    for call in reply["tool_calls"]:
        fn = call.get("function", {})
        args = fn.get("arguments", "")
        try:
            args = json.dumps(json.loads(args), indent=2, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
        out.append({"role": "assistant", "content": f"```json\n{args}\n```",
                    "metadata": {"title": f"{labels['tool_call']}: {fn.get('name', '?')}"}})
    if reply["content"] or not out:
        out.append({"role": "assistant", "content": reply["content"]})
    return out


def conversation(history: list, system: Optional[str]) -> list[dict]:
    """The model's conversation from the page's messages: the system prompt first (when given), the user turns and
    the answers; the folded reasoning and tool-call messages are display only and are left out."""
    out = [{"role": "system", "content": system}] if system and system.strip() else []
    for m in history:
        if (m.get("metadata") or {}).get("title"):
            continue
        content = m.get("content")
        if isinstance(content, list):  # gradio's content parts
            content = " ".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
        out.append({"role": m["role"], "content": str(content or "")})
    return out
