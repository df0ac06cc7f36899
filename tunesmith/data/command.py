"""`tunesmith data inspect|validate|convert|split|stats --dataset ...`: look at data the way training will.

What lives here: the five actions, printing to stdout. What must not: the data rules themselves (load, formats,
encode hold them, so the command and training cannot disagree), training or model code. No torch import at
module level; a tokenizer is loaded only by the actions that encode.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from tunesmith.args import DataCommandArguments
from tunesmith.data.encode import ChatEncoder, TooLong, NothingToTrain, render_highlighted
from tunesmith.data.formats import row_kind
from tunesmith.data.load import load_datasets, normalise_rows, read_spec, split_train_val, write_jsonl
from tunesmith.errors import ConfigError, DataError


def _tokenizer(args: DataCommandArguments):
    if args.model:
        from tunesmith.model import load_tokenizer
        return load_tokenizer(args)
    from tunesmith.testing import FAMILIES, build_tokenizer
    family = args.template if args.template in FAMILIES else "qwen2"
    print(f"(no --model given: using the built-in tiny {family} tokenizer; pass --model to see your model's tokens)",
          file=sys.stderr)
    return build_tokenizer(family)


def _encoder(args: DataCommandArguments, tok, max_length: Optional[int] = -1) -> ChatEncoder:
    """max_length -1 means --max_length; stats passes None to measure every row at full length."""
    return ChatEncoder(tok, loss_scale=args.loss_scale, default_loss_scale="last_round" if args.rlhf else "default",
                       max_length=args.max_length if max_length == -1 else max_length, truncation_strategy=args.truncation_strategy, system=args.system,
                       use_chat_template=args.use_chat_template)


def _need_dataset(args):
    if not args.dataset:
        raise ConfigError("pass the data with --dataset FILE [FILE ...]")


def inspect(args: DataCommandArguments) -> None:
    """Print rows --row .. --row + --num_rows - 1 as the model sees them, trained tokens marked (green on a TTY).

    Raises ConfigError (no --dataset, --row past the end, template problems) or DataError (loading)."""
    _need_dataset(args)
    result = load_datasets(args.dataset, strict=args.strict, columns=args.columns, seed=args.data_seed)
    tok = _tokenizer(args)
    enc = _encoder(args, tok)
    color = sys.stdout.isatty()
    end = min(len(result.records), args.row + max(1, args.num_rows))
    if args.row >= len(result.records):
        raise ConfigError(f"--row {args.row}: the data has {len(result.records)} rows")
    for i in range(args.row, end):
        rec, (src, line) = result.records[i], result.sources[i]
        keys = ["messages"] + (["rejected_messages"] if "rejected_messages" in rec else [])
        for key in keys:
            try:
                e = enc.encode(rec, key)
            except TooLong as t:
                print(f"--- row {i} ({src}:{line}) {key}: {t.args[0]} tokens, over --max_length {args.max_length}")
                continue
            except NothingToTrain:
                print(f"--- row {i} ({src}:{line}) {key}: no trained tokens")
                continue
            label = "" if key == "messages" and len(keys) == 1 else (" chosen" if key == "messages" else " rejected")
            print(f"--- row {i} ({src}:{line}){label}: {len(e.input_ids)} tokens, {e.n_trained} trained "
                  f"({'green' if color else '[[marked]]'}), loss_scale={enc.base}"
                  f"{'+ignore_empty_think' if enc.ignore_empty_think else ''}")
            print(render_highlighted(tok, e, color=color))


def validate(args: DataCommandArguments) -> int:
    """Print every problem of every --dataset, sorted by line, then a count; with --max_length also rows that are
    over it or have no trained tokens. Returns the exit code: 1 if any problem, else 0.

    Read errors are printed, not raised. Raises ConfigError (no --dataset, template problems)."""
    _need_dataset(args)
    problems = 0
    total = 0
    for spec in args.dataset:
        broken: list = []
        try:
            raw = read_spec(spec, seed=args.data_seed, errors=broken)
        except DataError as e:
            print(e)
            problems += 1
            continue
        res = normalise_rows(raw, strict=False, columns=args.columns, max_reasons=10 ** 9)
        total += len(raw) + len(broken)
        for reason in sorted([str(b) for b in broken] + res.reasons, key=_line_of):
            print(reason)
        problems += res.dropped + len(broken)
        if args.max_length and res.records:
            tok = _tokenizer(args)
            enc = _encoder(args, tok)
            for rec, (src, line) in zip(res.records, res.sources):
                for key in ["messages"] + (["rejected_messages"] if "rejected_messages" in rec else []):
                    try:
                        enc.encode(rec, key)
                    except TooLong as t:
                        print(f"{src}:{line}: {key}: {t.args[0]} tokens, over --max_length {args.max_length} "
                              f"(dropped in training with --truncation_strategy delete)")
                        problems += 1
                    except NothingToTrain:
                        print(f"{src}:{line}: {key}: no trained tokens (every reply excluded by loss settings)")
                        problems += 1
    print(f"{total} rows checked, {problems} problem(s).")
    return 1 if problems else 0


def _line_of(message: str) -> int:
    head = message.split(": ", 1)[0]
    tail = head.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def convert(args: DataCommandArguments) -> None:
    """Write the data as canonical JSONL to --output (bad rows dropped unless --strict).

    Raises ConfigError (no --dataset or --output), DataError (loading), OSError (writing)."""
    _need_dataset(args)
    if not args.output:
        raise ConfigError("pass --output FILE.jsonl for the converted data")
    result = load_datasets(args.dataset, strict=args.strict, columns=args.columns, seed=args.data_seed)
    write_jsonl(args.output, result.records)
    msg = f"wrote {len(result.records)} canonical rows to {args.output}"
    if result.dropped:
        msg += f" ({result.dropped} bad rows dropped; first: {result.reasons[0]})"
    print(msg)


def split(args: DataCommandArguments) -> None:
    """Write a seeded train/validation split (--val_ratio) as train.jsonl and val.jsonl under --output (default:
    FIRST_DATASET_split/).

    Raises ConfigError (no --dataset, --val_ratio not in (0, 1)), DataError (loading; no training rows left)."""
    _need_dataset(args)
    result = load_datasets(args.dataset, strict=args.strict, columns=args.columns, seed=args.data_seed)
    if not 0 < args.val_ratio < 1:
        raise ConfigError(f"--val_ratio must be between 0 and 1, got {args.val_ratio}")
    train, val = split_train_val(result, args.val_ratio, args.data_seed)
    out = args.output or os.path.splitext(args.dataset[0].split("#")[0])[0] + "_split"
    write_jsonl(os.path.join(out, "train.jsonl"), train.records)
    write_jsonl(os.path.join(out, "val.jsonl"), val.records)
    print(f"wrote {len(train)} train rows and {len(val)} validation rows to {out}/ (seed {args.data_seed})")


def _pct(xs: list[int], p: float) -> int:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))] if xs else 0


def stats(args: DataCommandArguments) -> dict:
    """Print and return row kinds, assistant turns, tokens per sequence (min/mean/p50/p90/max/total) and trained
    tokens, each sequence measured untruncated; with --max_length, how many sequences it would drop.

    Raises ConfigError (no --dataset, template problems) or DataError (loading)."""
    _need_dataset(args)
    result = load_datasets(args.dataset, strict=args.strict, columns=args.columns, seed=args.data_seed)
    tok = _tokenizer(args)
    max_length = args.max_length
    enc = _encoder(args, tok, max_length=None)
    kinds: dict[str, int] = {}
    lengths, trained, turns = [], [], []
    nothing = 0
    for rec in result.records:
        kinds[row_kind(rec)] = kinds.get(row_kind(rec), 0) + 1
        turns.append(sum(1 for m in rec["messages"] if m["role"] == "assistant"))
        for key in ["messages"] + (["rejected_messages"] if "rejected_messages" in rec else []):
            try:
                e = enc.encode(rec, key)
            except NothingToTrain:
                nothing += 1
                continue
            lengths.append(len(e.input_ids))
            trained.append(e.n_trained)
    over = sum(1 for n in lengths if max_length and n > max_length)
    s = {"rows": len(result.records), "bad_rows_dropped": result.dropped, "kinds": kinds,
         "assistant_turns": {"mean": round(sum(turns) / len(turns), 2), "max": max(turns)},
         "tokens": {"min": min(lengths, default=0), "mean": round(sum(lengths) / max(1, len(lengths)), 1),
                    "p50": _pct(lengths, 0.5), "p90": _pct(lengths, 0.9), "max": max(lengths, default=0),
                    "total": sum(lengths)},
         "trained_tokens": {"total": sum(trained), "mean": round(sum(trained) / max(1, len(trained)), 1)},
         "no_trained_tokens": nothing}
    if max_length:
        s["over_max_length"] = {"max_length": max_length, "sequences": over,
                                "note": "dropped in training with --truncation_strategy delete"}
    print(f"rows: {s['rows']} ({', '.join(f'{k}: {v}' for k, v in kinds.items())})"
          + (f", {result.dropped} bad rows dropped" if result.dropped else ""))
    print(f"assistant turns per row: mean {s['assistant_turns']['mean']}, max {s['assistant_turns']['max']}")
    t = s["tokens"]
    print(f"tokens per sequence: min {t['min']}, mean {t['mean']}, p50 {t['p50']}, p90 {t['p90']}, max {t['max']}; "
          f"total {t['total']}")
    print(f"trained tokens: total {s['trained_tokens']['total']}, mean {s['trained_tokens']['mean']} per sequence")
    if max_length:
        print(f"over --max_length {max_length}: {over} sequence(s) would be dropped (--truncation_strategy delete)")
    return s


def main(args: DataCommandArguments):
    """Run args.action. Returns the exit code (validate's; 0 for the others).

    Raises ConfigError for a missing or unknown action, and whatever the action raises."""
    actions = {"inspect": inspect, "validate": validate, "convert": convert, "split": split, "stats": stats}
    if args.action not in actions:
        raise ConfigError(f"say what to do: tunesmith data {{{'|'.join(actions)}}} --dataset FILE")
    rc = actions[args.action](args)
    return rc if args.action == "validate" else 0
