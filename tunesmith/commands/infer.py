"""`tunesmith infer`: chat with a model in the terminal, or infer over a dataset into a JSONL of results (ms-swift's result layout). The engine it drives is tunesmith.inference.chat.

Pictures (vision-language models): a --val_dataset row's `images` go with its `<image>` tags; in the terminal, as in
ms-swift, a message with `<image>` tags is followed by one prompt per tag, `Input an image path or URL <<< `, and
the pictures stay with the conversation until `clear`."""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import replace
from typing import Optional
from tunesmith.inference.chat import (GenConfig, ImageInputError, Reply, PromptTooLong, Prompt, ChatEngine,
                                      build_engine, logprobs_json)
from tunesmith.inference.flags import check_inference_flags


def _default_result_path(args, ckpt: Optional[str]) -> str:
    from tunesmith.models.checkpoint import model_suffix
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
    loaded = load_datasets(files, strict=args.strict, columns=args.columns, seed=args.data_seed, use_hf=args.use_hf,
                           hub_token=args.hub_token, what="--val_dataset", need_reply=False, keep_columns=True)
    if loaded.dropped:
        print(f"[tunesmith] --val_dataset: {loaded.dropped} bad row(s) dropped (--strict false), no result lines for "
              f"them; first reasons:\n  " + "\n  ".join(loaded.reasons), file=sys.stderr)
    return loaded


def batch_infer(engine: ChatEngine, args, loaded, result_path: str) -> int:
    """Generate for every row, writing ms-swift's result lines: response, labels, logprobs, messages (+ the reply),
    and every other column of the row. Rows are submitted a window at a time and written in order; the engine
    batches them (--max_batch_size). With --stream true each reply is printed as it is generated, one row at a
    time. Returns the number of rows written.

    loaded: a LoadResult; result_path: a JSONL file, appended to (folders created). With --metric, the scores
    are printed to stderr. Raises ConfigError (--stream with --n > 1, a row over the context length), DataError
    (a row's pictures: a text model, a picture that does not read, tags that do not match; file:line) or the
    first generation error (rows before it are already written)."""
    from tqdm.auto import tqdm

    from tunesmith.errors import ConfigError

    records = loaded.records
    cfg = engine.defaults
    if args.stream and cfg.n > 1:
        raise ConfigError("--stream true prints one reply per row as it is generated; with --n 2 or more, drop "
                          "--stream (the replies are written under `choices`)")
    # rows in flight: the flag's, else (auto, -1) the engine's choice, at most 256 (vLLM and SGLang choose theirs)
    rows = args.max_batch_size if args.max_batch_size and args.max_batch_size > 0 else \
        min(256, getattr(engine.engine, "max_batch_size", None) or 64)
    window = max(64, 4 * rows)
    os.makedirs(os.path.dirname(os.path.abspath(result_path)), exist_ok=True)
    responses, golds = [], []
    written, skipped = 0, []
    with open(result_path, "a", encoding="utf-8") as fh, tqdm(total=len(records), desc="infer", disable=None) as bar:
        for i in range(0, len(records), 1 if args.stream else window):
            window_rows = records[i:i + (1 if args.stream else window)]
            chunk, prompts, labels, rendered = _render_chunk(engine, args, loaded, i, window_rows, skipped)
            if not rendered:
                bar.update(len(window_rows))
                continue
            if args.stream:
                replies = [[_stream_to(engine, rendered[0], cfg, sys.stdout)]]
            else:
                handles = [engine.submit(p, cfg) for p in rendered]
                replies = [[engine.reply(h.result(), p, cfg) for h in hs] for hs, p in zip(handles, rendered)]
            for rec, msgs, gold, reps in zip(chunk, prompts, labels, replies):
                for rep in reps:
                    if rep.error is not None:
                        raise rep.error
                fh.write(json.dumps(_result_line(engine, rec, msgs, gold, reps), ensure_ascii=False) + "\n")
                # a reply that is only tool calls is scored as its calls' text, as the gold call is
                responses.append(reps[0].content or (calls_text(reps[0].tool_calls) if reps[0].tool_calls else ""))
                golds.append(gold if gold is None else gold["labels"])
                written += 1
            fh.flush()
            bar.update(len(window_rows))
    if skipped:
        print(f"[tunesmith] --val_dataset: {len(skipped)} row(s) whose pictures cannot be used skipped (--strict "
              f"false), no result lines for them; first reasons:\n  " + "\n  ".join(skipped[:5]), file=sys.stderr)
    if args.metric:
        from tunesmith.eval.benchmarks import infer_metrics
        scores = infer_metrics(responses, golds, args.metric)
        print(f"[tunesmith] infer --metric {args.metric}: {json.dumps(scores, ensure_ascii=False)}", file=sys.stderr)
    return written


def _render_chunk(engine: ChatEngine, args, loaded, start: int, chunk: list, skipped: list) -> tuple:
    """(rows kept, their prompt messages, gold replies, rendered prompts) of a window of rows starting at `start`.
    A row whose pictures cannot be used (a text model, a picture that does not read, tags that do not match) is a
    DataError (file:line) under --strict true, else skipped with its reason appended to `skipped`. Raises
    ConfigError for a row over the context length."""
    from tunesmith.data.encode import record_images
    from tunesmith.errors import ConfigError, DataError

    kept, prompts, labels, rendered = [], [], [], []
    for k, rec in enumerate(chunk):
        msgs = list(rec["messages"])
        gold = None
        if msgs and msgs[-1]["role"] == "assistant":
            gold = _gold(msgs.pop())  # the gold reply becomes `labels`, as in ms-swift
        try:
            prompt = engine.prompt(msgs, rec.get("tools"), images=record_images(rec))
        except PromptTooLong as e:
            raise ConfigError(f"--val_dataset row {start + k + 1}: {e}; raise --max_model_len or shorten the "
                              f"row") from None
        except ImageInputError as e:
            source, line = loaded.sources[start + k]
            if args.strict:
                raise DataError(source, line, "images", str(e)) from None
            skipped.append(f"{source}:{line}: {e}")
            continue
        kept.append(rec)
        prompts.append(msgs)
        labels.append(gold)
        rendered.append(prompt)
    return kept, prompts, labels, rendered


def _gold(reply: dict) -> dict:
    """The result line's gold fields from the row's final assistant message: {"labels": its text} — or, for a reply
    that is only tool calls, the calls as ms-swift writes a tool_call message's content ({"name", "arguments"} JSON,
    one per line) — plus {"label_tool_calls": [OpenAI tool calls]} when it makes calls."""
    calls = reply.get("tool_calls")
    if not calls:
        return {"labels": reply["content"]}
    return {"labels": reply["content"] or calls_text(calls), "label_tool_calls": calls}


def calls_text(calls: list[dict]) -> str:
    """Tool calls as ms-swift writes a tool_call message's content: one {"name", "arguments"} JSON per line, the
    arguments as an object (a JSON-string argument, as OpenAI sends them, is decoded), keys in order — so a
    generated call and the gold one compare equal as text (--metric)."""
    lines = []
    for c in calls:
        args = c["function"].get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        lines.append(json.dumps({"name": c["function"]["name"], "arguments": args}, ensure_ascii=False,
                                sort_keys=True))
    return "\n".join(lines)


def _result_line(engine: ChatEngine, rec: dict, msgs: list[dict], gold: Optional[dict], reps: list[Reply]) -> dict:
    first = reps[0]
    reply_msg: dict = {"role": "assistant", "content": first.content}
    if first.reasoning is not None:
        reply_msg["reasoning_content"] = first.reasoning
    if first.tool_calls:
        reply_msg["tool_calls"] = first.tool_calls
    line = {"response": first.content, "labels": None, **(gold or {}),
            "logprobs": logprobs_json(engine.tok, first.logprobs), "messages": [*msgs, reply_msg],
            "finish_reason": first.finish_reason}
    if first.tool_calls:
        line["tool_calls"] = first.tool_calls
    if first.reasoning is not None:
        line["reasoning_content"] = first.reasoning
    if len(reps) > 1:
        line["choices"] = [{"index": k, "response": r.content, "reasoning_content": r.reasoning,
                            "finish_reason": r.finish_reason} for k, r in enumerate(reps)]
    if rec.get("tools"):
        line["tools"] = rec["tools"]
    if rec.get("images"):
        line["images"] = rec["images"]  # as ms-swift writes them: the row's references
    for k, v in (rec.get("columns") or {}).items():
        line.setdefault(k, v)  # the row's own columns (ids, metadata) come back unchanged
    return line


def _stream_to(engine: ChatEngine, prompt: Prompt, cfg: GenConfig, out) -> Reply:
    """Generate one reply, writing its reasoning and answer to `out` as they arrive."""
    handle = engine.submit(prompt, replace(cfg, n=1))[0]
    state = engine.stream_state(prompt, cfg)
    for token in handle:
        delta = state.feed(token)
        out.write(delta.get("reasoning_content", "") + delta.get("content", ""))
        out.flush()
    reply, last = state.finish(handle.completion)
    out.write(last.get("reasoning_content", "") + last.get("content", "") + "\n")
    out.flush()
    return reply


def chat(engine: ChatEngine, args, result_path: Optional[str], stdin=None, stdout=None) -> None:
    """Interactive chat: streamed replies, multi-turn; `exit`/`quit`, `clear`, `reset-system`, `multi-line`.

    With a vision-language model, each `<image>` tag of a message is followed by a prompt for that picture's path
    or URL (ms-swift's `Input an image path or URL <<< `); the conversation keeps its pictures until `clear` (or
    `reset-system`). A message whose pictures cannot be used (a picture that does not read) is dropped with a
    one-line note and the conversation goes on. Reads stdin until EOF or exit; with result_path, appends each
    turn's history (and its `images`) as a JSONL line. Raises PromptTooLong when the conversation outgrows the
    context, or the engine's error."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict] = []
    pictures: list[str] = []
    print("tunesmith chat: type a message; commands: exit, clear, reset-system, multi-line"
          + ("; <image> in a message asks for a picture's path or URL" if engine.images is not None else ""),
          file=stdout)
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
            history, pictures = [], []
            print("(history cleared)", file=stdout)
            continue
        if cmd == "reset-system":
            stdout.write("new system prompt: ")
            stdout.flush()
            engine.encoder.system = stdin.readline().rstrip("\n") or None
            history, pictures = [], []
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
        asked = _ask_pictures(engine, text, stdin, stdout)
        history.append({"role": "user", "content": text})
        try:
            reply = _reply_to(engine, history, pictures + asked, stdout)
        except ImageInputError as e:
            history.pop()
            print(f"[tunesmith] the message was not sent: {e}", file=stdout)
            continue
        pictures += asked
        history.append({"role": "assistant", "content": reply.content})
        if result_path:
            os.makedirs(os.path.dirname(os.path.abspath(result_path)), exist_ok=True)
            with open(result_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"response": reply.content, "messages": history,
                                     **({"images": pictures} if pictures else {})}, ensure_ascii=False) + "\n")


def _ask_pictures(engine: ChatEngine, text: str, stdin, stdout) -> list[str]:
    """For a vision-language model: one line read per `<image>` tag of the message (its picture's path or URL),
    after ms-swift's prompt; [] for a text model, whose `<image>` is plain text."""
    from tunesmith.data.encode import IMAGE_TAG

    if engine.images is None:
        return []
    out = []
    for _ in range(text.count(IMAGE_TAG)):
        stdout.write("Input an image path or URL <<< ")
        stdout.flush()
        out.append(stdin.readline().strip())
    return out


def _reply_to(engine: ChatEngine, history: list[dict], pictures: list[str], stdout) -> Reply:
    """Stream the reply to the conversation onto stdout after `>>> `; returns the Reply. Raises ImageInputError or
    PromptTooLong before anything is written (the prompt, and its pictures, are read first)."""
    pieces = engine.stream(history, images=pictures or None)
    first = next(pieces)
    stdout.write(">>> ")
    reply = None
    for piece in itertools.chain([first], pieces):
        if isinstance(piece, Reply):
            reply = piece
        else:
            stdout.write(piece)
            stdout.flush()
    stdout.write("\n")
    return reply


def main(args):
    """`tunesmith infer`: batch inference over --val_dataset (or --load_data_args' split), else interactive chat.

    Returns 0; the engine is closed on the way out. Raises ConfigError or DataError (see build_engine,
    batch_infer)."""
    from tunesmith.errors import ConfigError
    from tunesmith.files import unwritable

    check_inference_flags(args)
    engine, args, ckpt, _ = build_engine(args)
    try:
        loaded = _infer_rows(args, ckpt)
        if loaded is None:
            chat(engine, args, args.result_path)
            return 0
        result_path = args.result_path or _default_result_path(args, ckpt)
        why = unwritable(result_path)
        if why:
            raise ConfigError(f"the result file {result_path}: {why}; or pass --result_path FILE")
        n = batch_infer(engine, args, loaded, result_path)
        print(f"[tunesmith] infer: {n} rows -> {result_path}", file=sys.stderr)
        return 0
    finally:
        engine.close()
