"""Generation with the model's own chat template (the same rendering training used), and `tunesmith infer`.

`Engine` is the one generation path: `tunesmith infer` (interactive chat and batch over a dataset) and
`tunesmith deploy` (the OpenAI-compatible server) both call it, so a reply is the same whichever way it is asked.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

_HARMONY = re.compile(r"<\|channel\|>analysis<\|message\|>(?P<r>.*?)(?:<\|end\|>|$)", re.S)
_HARMONY_FINAL = re.compile(r"<\|channel\|>final<\|message\|>(?P<c>.*)", re.S)
_THINK = re.compile(r"^\s*(?:<think>)?(?P<r>.*?)</think>\s*(?P<c>.*)$", re.S)


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

    @classmethod
    def from_args(cls, args) -> "GenConfig":
        return cls(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, repetition_penalty=args.repetition_penalty, stop=list(args.stop_words),
                   seed=args.seed, num_beams=args.num_beams)

    def merged(self, **overrides) -> "GenConfig":
        """These settings with every non-None override applied (a request's values over the server's)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Reply:
    content: str
    reasoning: Optional[str]
    finish_reason: str           # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


class PromptTooLong(ValueError):
    pass


class Engine:
    """Batched generation for one model and tokenizer. Not thread-safe: the server serialises calls."""

    def __init__(self, model, tokenizer, system: Optional[str] = None, defaults: Optional[GenConfig] = None,
                 max_model_len: Optional[int] = None):
        from tunesmith.data.encode import ChatEncoder

        self.model, self.tok = model, tokenizer
        self.encoder = ChatEncoder(tokenizer, system=system)
        self.defaults = defaults or GenConfig()
        cfg = getattr(model, "config", None)
        self.max_model_len = max_model_len or getattr(cfg, "max_position_embeddings", None) or 4096
        stop = {tokenizer.eos_token_id}
        for text in self.encoder.end_of_turn_tokens():  # e.g. <|im_end|>, <|eot_id|>, <|end|>/<|return|>
            ids = tokenizer.convert_tokens_to_ids(text)
            if isinstance(ids, int) and ids != tokenizer.unk_token_id:
                stop.add(ids)
        self.stop_ids = sorted(i for i in stop if i is not None)
        self.specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def prompt_ids(self, messages: list[dict], tools=None, **template_kwargs) -> list[int]:
        text = self.encoder.render(self.encoder.with_system(messages), add_generation_prompt=True, tools=tools,
                                   **template_kwargs)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def check_prompt(self, messages: list[dict], cfg: GenConfig, tools=None) -> None:
        """Raise PromptTooLong before any generation starts (the server answers 400 instead of a broken stream)."""
        self._gen_kwargs(cfg, len(self.prompt_ids(messages, tools=tools)))

    def _gen_kwargs(self, cfg: GenConfig, longest_prompt: int) -> dict:
        room = self.max_model_len - longest_prompt
        if room <= 0:
            raise PromptTooLong(f"the prompt has {longest_prompt} tokens; the model's limit is {self.max_model_len}")
        kw = dict(max_new_tokens=min(cfg.max_new_tokens or room, room), eos_token_id=self.stop_ids,
                  pad_token_id=self.tok.pad_token_id)
        if cfg.temperature == 0:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            if cfg.temperature is not None:
                kw.update(do_sample=True, temperature=cfg.temperature)
            for k in ("top_p", "top_k"):
                if getattr(cfg, k) is not None:
                    kw[k] = getattr(cfg, k)
        if cfg.repetition_penalty is not None:
            kw["repetition_penalty"] = cfg.repetition_penalty
        if cfg.num_beams > 1:
            kw["num_beams"] = cfg.num_beams
        if cfg.stop:
            kw.update(stop_strings=list(cfg.stop), tokenizer=self.tok)
        return kw

    def _split(self, raw: str) -> tuple[str, Optional[str]]:
        """(content, reasoning): thinking is returned separately when the template produces it."""
        reasoning = None
        m, final = _HARMONY.search(raw), _HARMONY_FINAL.search(raw)
        if m or final:
            reasoning = m.group("r") if m else None
            raw = final.group("c") if final else ""
        else:
            t = _THINK.match(raw)
            if t and "</think>" in raw:
                reasoning, raw = t.group("r").strip(), t.group("c")
        for s in self.specials:
            raw = raw.replace(s, "")
        return raw.strip(), (reasoning.strip() if reasoning is not None else None)

    def _finish(self, ids: list[int], prompt_len: int, cfg: GenConfig, max_new: int) -> Reply:
        end = next((i + 1 for i, t in enumerate(ids) if t in self.stop_ids), None)
        kept = ids[:end] if end else ids
        content, reasoning = self._split(self.tok.decode(kept, skip_special_tokens=False))
        stopped = end is not None
        for s in cfg.stop:  # OpenAI semantics: the stop sequence itself is not returned
            k = content.find(s)
            if k >= 0:
                content, stopped = content[:k].rstrip(), True
        if not stopped and len(kept) < max_new:
            stopped = True  # ended by a stop string inside generate
        return Reply(content, reasoning, "stop" if stopped else "length", prompt_len, len(kept))

    def generate(self, conversations: list[list[dict]], cfg: Optional[GenConfig] = None, tools=None) -> list[Reply]:
        """Reply to each conversation (messages ending with the user's turn) as one left-padded batch."""
        import torch

        cfg = cfg or self.defaults
        prompts = [self.prompt_ids(c, tools=tools) for c in conversations]
        longest = max(len(p) for p in prompts)
        kw = self._gen_kwargs(cfg, longest)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        if cfg.seed is not None and cfg.temperature != 0:
            torch.manual_seed(cfg.seed)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kw)
        if was_training:
            self.model.train()
        return [self._finish(row, len(p), cfg, kw["max_new_tokens"])
                for row, p in zip(out[:, longest:].tolist(), prompts)]

    def stream(self, messages: list[dict], cfg: Optional[GenConfig] = None, tools=None) -> Iterator:
        """Yield text pieces as they are generated, then the final Reply (same content as `generate`)."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        cfg = cfg or self.defaults
        if cfg.num_beams > 1:  # beam search cannot stream: the best beam is known only at the end
            reply = self.generate([messages], cfg, tools=tools)[0]
            yield reply.content
            yield reply
            return
        prompt = self.prompt_ids(messages, tools=tools)
        kw = self._gen_kwargs(cfg, len(prompt))
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        result = {}
        if cfg.seed is not None and cfg.temperature != 0:
            torch.manual_seed(cfg.seed)

        def run():
            try:
                with torch.no_grad():
                    result["out"] = self.model.generate(input_ids=torch.tensor([prompt], device=self.device),
                                                        streamer=streamer, **kw)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
                result["error"] = e
                streamer.end()

        self.model.eval()
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        acc, sent = "", ""
        for piece in streamer:
            acc += piece
            visible, done = _visible(acc, cfg.stop)
            if visible.startswith(sent) and len(visible) > len(sent):
                yield visible[len(sent):]
                sent = visible
            if done:
                break
        worker.join()
        if "error" in result:
            raise result["error"]
        yield self._finish(result["out"][0, len(prompt):].tolist(), len(prompt), cfg, kw["max_new_tokens"])


def _visible(text: str, stop: list[str]) -> tuple[str, bool]:
    """What a stream may show of the text so far, matching the final reply: leading and trailing whitespace are
    held back (the reply is stripped), as is a tail that could still become a stop word. (text, stop word seen)."""
    text = text.lstrip()
    cuts = [text.find(s) for s in stop if s and s in text]
    if cuts:
        return text[:min(cuts)].rstrip(), True
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold].rstrip(), False


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64,
                     system: Optional[str] = None, temperature: float = 0.0) -> list[str]:
    """Reply texts for conversations (greedy when temperature is 0): the Engine in one call."""
    engine = Engine(model, tokenizer, system=system)
    cfg = GenConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    return [r.content for r in engine.generate(conversations, cfg)]


# ------------------------------------------------------------------ `tunesmith infer`

def build_engine(args):
    """Resolve the checkpoint, load the model and adapters, and make the Engine (shared with deploy).
    Returns (engine, the checkpoint whose args.json was read, deploy's named adapters)."""
    from tunesmith.data.encode import read_system_prompt
    from tunesmith.model import load_for_inference, note
    from tunesmith.runs import resolve_checkpoint, split_named_adapters

    if args.infer_backend not in ("transformers", "pt"):
        raise_backend(args.infer_backend)
    ckpt = resolve_checkpoint(args)
    plain, named = split_named_adapters(list(args.adapters))
    model, tok, _ = load_for_inference(args, plain, named)
    if args.logprobs or args.top_logprobs:
        note("--logprobs/--top_logprobs: token log-probs are not returned yet; results carry logprobs: null")
    if getattr(args, "max_batch_size", 1) == -1:
        note("--max_batch_size -1: every row of a batch inference is generated in one batch")
    engine = Engine(model, tok, system=read_system_prompt(args.system), defaults=GenConfig.from_args(args),
                    max_model_len=args.max_model_len)
    return engine, ckpt, named


def raise_backend(backend: str):
    from tunesmith.errors import ConfigError
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError("--infer_backend vllm: vLLM is not installed (pip install vllm, on a CUDA machine); "
                              "use --infer_backend transformers") from None
        raise ConfigError("--infer_backend vllm is not wired into tunesmith yet; use --infer_backend transformers")
    raise ConfigError(f"--infer_backend {backend} is not supported; use --infer_backend transformers (or pt)")


def _default_result_path(args, ckpt: Optional[str]) -> str:
    from tunesmith.runs import model_suffix
    base = ckpt if ckpt else os.path.join("result", model_suffix(args.model))
    return os.path.join(base, "infer_result", time.strftime("%Y%m%d-%H%M%S") + ".jsonl")


def _infer_rows(args, ckpt: Optional[str]):
    """The rows to infer on: --val_dataset, or with --load_data_args the run's own validation split."""
    from tunesmith.data.load import load_datasets
    from tunesmith.errors import ConfigError

    files = list(args.val_dataset)
    if not files and args.load_data_args and ckpt:
        split = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "val_dataset.jsonl")
        if not os.path.isfile(split):
            raise ConfigError(f"--load_data_args: {split} does not exist (the run took no validation split); "
                              f"pass --val_dataset")
        files = [split]
    if not files:
        return None
    return load_datasets(files, strict=args.strict, columns=args.columns, seed=args.data_seed, use_hf=args.use_hf,
                         hub_token=args.hub_token, what="--val_dataset", need_reply=False)


def batch_infer(engine: Engine, args, loaded, result_path: str) -> int:
    """Generate for every row, writing ms-swift's result lines: response, labels, messages (+ the reply), …"""
    from tqdm.auto import tqdm

    records = loaded.records
    bs = len(records) if args.max_batch_size == -1 else max(1, args.max_batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(result_path)), exist_ok=True)
    written = 0
    with open(result_path, "a", encoding="utf-8") as fh, tqdm(total=len(records), desc="infer", disable=None) as bar:
        for i in range(0, len(records), bs):
            chunk = records[i:i + bs]
            prompts, labels = [], []
            for rec in chunk:
                msgs = list(rec["messages"])
                gold = None
                if msgs and msgs[-1]["role"] == "assistant":
                    gold = msgs.pop()["content"]  # the gold reply becomes `labels`, as in ms-swift
                prompts.append(msgs)
                labels.append(gold)
            if all(r.get("tools") == chunk[0].get("tools") for r in chunk):
                replies = engine.generate(prompts, tools=chunk[0].get("tools"))
            else:  # rows with different tool lists render different system prompts: generate them one by one
                replies = [engine.generate([p], tools=r.get("tools"))[0] for p, r in zip(prompts, chunk)]
            for rec, msgs, gold, rep in zip(chunk, prompts, labels, replies):
                reply_msg = {"role": "assistant", "content": rep.content}
                if rep.reasoning is not None:
                    reply_msg["reasoning_content"] = rep.reasoning
                line = {"response": rep.content, "labels": gold, "logprobs": None,
                        "messages": [*msgs, reply_msg], "finish_reason": rep.finish_reason}
                if rep.reasoning is not None:
                    line["reasoning_content"] = rep.reasoning
                line.update({k: v for k, v in rec.items() if k not in ("messages", "rejected_messages")})
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
            fh.flush()
            bar.update(len(chunk))
    return written


def chat(engine: Engine, args, result_path: Optional[str], stdin=None, stdout=None) -> None:
    """Interactive chat: streamed replies, multi-turn; `exit`/`quit`, `clear`, `reset-system`, `multi-line`."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict] = []
    print("tunesmith chat: type a message; commands: exit, clear, reset-system, multi-line", file=stdout)
    while True:
        stdout.write("<<< ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        cmd = text.strip().lower()
        if cmd in ("exit", "quit"):
            break
        if cmd == "clear":
            history = []
            print("(history cleared)", file=stdout)
            continue
        if cmd == "reset-system":
            stdout.write("new system prompt: ")
            stdout.flush()
            engine.encoder.system = stdin.readline().rstrip("\n") or None
            history = []
            continue
        if cmd == "multi-line":
            stdout.write("(end with a line containing only #)\n")
            lines = []
            for more in stdin:
                if more.rstrip("\n") == "#":
                    break
                lines.append(more.rstrip("\n"))
            text = "\n".join(lines)
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        stdout.write(">>> ")
        reply = None
        for piece in engine.stream(history):
            if isinstance(piece, Reply):
                reply = piece
            else:
                stdout.write(piece)
                stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": reply.content})
        if result_path:
            os.makedirs(os.path.dirname(os.path.abspath(result_path)), exist_ok=True)
            with open(result_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"response": reply.content, "messages": history}, ensure_ascii=False) + "\n")


def main(args):
    engine, ckpt, _ = build_engine(args)
    loaded = _infer_rows(args, ckpt)
    if loaded is None:
        chat(engine, args, args.result_path)
        return 0
    result_path = args.result_path or _default_result_path(args, ckpt)
    n = batch_infer(engine, args, loaded, result_path)
    print(f"[tunesmith] infer: {n} rows -> {result_path}", file=sys.stderr)
    return 0
