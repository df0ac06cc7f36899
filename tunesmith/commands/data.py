"""`tunesmith data inspect|validate|convert|split|stats --dataset ...`: look at data the way training will;
`tunesmith data cache [--clean true]`: the encoded rows kept for --load_from_cache_file.

What lives here: the six actions, printing to stdout. What must not: the data rules themselves (load, formats,
encode hold them, so the command and training cannot disagree), training or model code. No torch import at
module level; a tokenizer is loaded only by the actions that encode.
"""
from __future__ import annotations

import os
import sys
from itertools import islice
from typing import Optional

from tunesmith.config.commands import DataCommandArguments
from tunesmith.data.encode import IGNORE, ChatEncoder, TooLong, NothingToTrain, render_highlighted
from tunesmith.data.formats import row_kind
from tunesmith.data.tiny_tokenizer import TEMPLATE_FAMILIES as _TEMPLATE_FAMILIES
from tunesmith.data.load import (LoadResult, load_datasets, normalise_rows, read_spec, rows_for, split_train_val,
                                 stream_records, write_jsonl)
from tunesmith.config.checks import raise_problems
from tunesmith.errors import ConfigError, DataError


def _has_tools(records) -> bool:
    """Whether any record carries tools or tool calls (the built-in tokenizers' compact templates render none)."""
    return any(r.get("tools") or any(m.get("tool_calls") for m in r["messages"]) for r in records)


def _tokenizer(args: DataCommandArguments, tools: bool = False, images: bool = False):
    """--model's tokenizer; without --model a built-in tiny one of --template's family (default qwen2, or qwen2_5_vl
    for rows with images), with the family's official chat template when `tools` (only those render tool calls)."""
    if args.model:
        from tunesmith.models.load import load_tokenizer
        return load_tokenizer(args)
    from tunesmith.data.tiny_tokenizer import build_tokenizer
    family = _family(args.template or ("qwen2_5_vl" if images else None))
    print(f"(no --model given: using the built-in tiny {family} tokenizer; pass --model to see your model's tokens)",
          file=sys.stderr)
    return build_tokenizer(family, official_template=tools)


# ms-swift's template names (and ours) -> the built-in tokenizers' families, for the data commands without --model
# Without --model, the vision-language families count image tokens with their released image processors' budgets
# (patch size, pixels per picture; preprocessor_config.json of Qwen2-VL/Qwen2.5-VL-7B-Instruct and Qwen3-VL-8B).
_BUILT_IN_IMAGE_PROCESSORS = {"qwen2_vl": (14, 3136, 12845056), "qwen2_5_vl": (14, 3136, 12845056),
                              "qwen3_vl": (16, 65536, 16777216)}


def _images(args: DataCommandArguments, tok):
    """The encoder's ImageTokens: --model's when it is a vision-language model, the built-in family's without
    --model (`_BUILT_IN_IMAGE_PROCESSORS`), else None (a text model: rows with images are bad rows). --max_pixels
    and MAX_PIXELS / IMAGE_MAX_TOKEN_NUM apply as in training."""
    if args.model and os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        return None  # a tokenizer folder: the data commands need no more of a text model
    if args.model:
        from transformers import AutoConfig
        from tunesmith.models.load import resolve_model_dir
        from tunesmith.models.vision import check_supported, image_tokens, is_vision_language

        model_dir = resolve_model_dir(args.model, args.use_hf, args.model_revision, args.hub_token)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
        check_supported(config, args.model)
        return image_tokens(model_dir, config, tok, args.max_pixels) if is_vision_language(config) else None
    family = _family(args.template) if args.template else None
    if family not in _BUILT_IN_IMAGE_PROCESSORS and "<|image_pad|>" not in tok.get_vocab():
        return None
    from transformers import Qwen2VLImageProcessorPil
    from tunesmith.data.vision import ImageTokens
    from tunesmith.models.vision import pixel_limits

    patch, low, high = _BUILT_IN_IMAGE_PROCESSORS[family or "qwen2_5_vl"]
    probe = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, size={"shortest_edge": low, "longest_edge": high})
    limits = pixel_limits(probe, patch, 2, args.max_pixels)
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, size={
        "shortest_edge": limits["min_pixels"], "longest_edge": limits["max_pixels"]})
    return ImageTokens("<|image_pad|>", tok.convert_tokens_to_ids("<|image_pad|>"), 2, family or "qwen2_5_vl",
                       limits, processor)


def _has_images(records) -> bool:
    return any(r.get("images") or r.get("rejected_images") for r in records)


def _family(template: Optional[str]) -> str:
    """The built-in tokenizer family for --template (default qwen2). Raises ConfigError for a template without one,
    naming those there are: checking rows against another family's template would pass rows it refuses."""
    if template is None:
        return "qwen2"
    family = _TEMPLATE_FAMILIES.get(template.lower())
    if family is None:
        raise ConfigError(f"--template {template}: no built-in tokenizer of that family; without --model the data "
                          f"commands render with one of: {', '.join(sorted(_TEMPLATE_FAMILIES))}. Pass --model "
                          f"(a local model directory) to use its own chat template")
    return family


def _encoder(args: DataCommandArguments, tok, max_length: Optional[int] = -1) -> ChatEncoder:
    """max_length -1 means --max_length; stats passes None to measure every row at full length. A vision-language
    --model (or built-in family) counts each picture's image tokens as training does."""
    return ChatEncoder(tok, loss_scale=args.loss_scale,
                       default_loss_scale="last_round" if args.rlhf or args.rlhf_type else "default",
                       max_length=args.max_length if max_length == -1 else max_length,
                       truncation_strategy=args.truncation_strategy, system=args.system,
                       use_chat_template=args.use_chat_template, images=_images(args, tok))


def _need_dataset(args):
    if not args.dataset:
        raise ConfigError("pass the data with --dataset FILE [FILE ...]")


def inspect(args: DataCommandArguments) -> None:
    """Print rows --row .. --row + --num_rows - 1 as the model sees them, trained tokens marked (green on a TTY).

    Raises ConfigError (no --dataset, --row past the end, template problems) or DataError (loading)."""
    _need_dataset(args)
    if args.row < 0 or (args.num_rows is not None and args.num_rows < 1):
        raise ConfigError(f"--row {args.row} --num_rows {args.num_rows}: expected --row >= 0 (0-based) and "
                          f"--num_rows >= 1")
    result = load_datasets(args.dataset, strict=args.strict, columns=args.columns, seed=args.data_seed)
    shown = result.records[args.row:args.row + max(1, args.num_rows or 1)]
    tok = _tokenizer(args, tools=_has_tools(shown), images=_has_images(shown))
    enc = _encoder(args, tok)
    color = sys.stdout.isatty()
    end = min(len(result.records), args.row + max(1, args.num_rows or 1))
    if args.row >= len(result.records):
        raise ConfigError(f"--row {args.row}: the data has {len(result.records)} rows")
    for i in range(args.row, end):
        rec, (src, line) = result.records[i], result.sources[i]
        keys = ["messages"] + (["rejected_messages"] if "rejected_messages" in rec else [])
        label = f", label {str(bool(rec['label'])).lower()}" if "label" in rec else ""  # KTO rows
        for key in keys:
            try:
                e = enc.encode(rec, key)
            except DataError as err:  # the row cannot be trained: say why and go on to the next
                print(f"--- row {i} ({src}:{line}) {key}: cannot be trained\n"
                      f"{DataError(src, line, err.field, err.problem, err.fix)}")
                continue
            except TooLong as t:
                print(f"--- row {i} ({src}:{line}) {key}: {t.args[0]} tokens, over --max_length {args.max_length}")
                continue
            except NothingToTrain:
                print(f"--- row {i} ({src}:{line}) {key}: no trained tokens")
                continue
            side = "" if key == "messages" and len(keys) == 1 else (" chosen" if key == "messages" else " rejected")
            pictures = _image_note(enc, e)
            print(f"--- row {i} ({src}:{line}){side}{label}: {len(e.input_ids)} tokens{pictures}, {e.n_trained} "
                  f"trained ({'green' if color else '[[marked]]'}), loss_scale={enc.base}"
                  f"{'+ignore_empty_think' if enc.ignore_empty_think else ''}")
            print(render_highlighted(tok, e, color=color,
                                     image_token_id=enc.images.image_token_id if enc.images else None))


def _image_tokens(enc: ChatEncoder, e) -> list[int]:
    """Image tokens of each picture of an encoded sequence (in order; [] without pictures)."""
    if not e.images or enc.images is None:
        return []
    return [enc.images.tokens_of(ref) for ref in e.images]


def _image_note(enc: ChatEncoder, e) -> str:
    counts = _image_tokens(enc, e)
    if not counts:
        return ""
    each = f": {' + '.join(map(str, counts))} for {len(counts)} pictures" if len(counts) > 1 else " for 1 picture"
    return f" (of which {sum(counts)} image tokens{each})"


def _rows_kind(args: DataCommandArguments) -> str:
    """What training would read the rows as: "kto" (--rlhf_type kto), "prompt" (--rlhf_type grpo or ppo: prompts, no
    reply needed), "sft" (--rlhf_type gkd: sft's rows), "preference" (--rlhf or another --rlhf_type: every row a
    pair) or "sft"."""
    if args.rlhf_type in ("kto", "grpo", "ppo", "gkd"):
        return {"kto": "kto", "grpo": "prompt", "ppo": "prompt", "gkd": "sft"}[args.rlhf_type]
    return "preference" if args.rlhf or args.rlhf_type else "sft"


def _usable(raw, args: DataCommandArguments, kind: str) -> LoadResult:
    """The rows of one file as the method reads them, every bad row dropped with its reason: GRPO's prompts by
    its own rule (train.rl.grpo.prompt_record: no reply needed), the other kinds by load.rows_for."""
    if kind != "prompt":
        return rows_for(normalise_rows(raw, strict=False, columns=args.columns, max_reasons=10 ** 9), kind)
    from tunesmith.data.load import map_records
    from tunesmith.train.rl.grpo import prompt_record

    loaded = normalise_rows(raw, strict=False, columns=args.columns, need_reply=False, keep_columns=True,
                            max_reasons=10 ** 9)
    return map_records(loaded, prompt_record)


def _each_file(specs: list[str]) -> list[str]:
    """The specs with each local folder replaced by its data files, so that validate reports every broken file of
    a folder rather than stopping at the first."""
    from tunesmith.data.load import folder_files, parse_spec

    out = []
    for spec in specs:
        path, hub, n = parse_spec(spec)
        if hub is None and n is None and os.path.isdir(path):
            try:
                out += folder_files(path)
                continue
            except DataError:
                pass  # read_spec says it again, as one problem
        out.append(spec)
    return out


def validate(args: DataCommandArguments) -> int:
    """Print every problem of every --dataset and --val_dataset, sorted by line, then a count: rows that do not
    load or normalise, rows the method cannot use (--rlhf/--rlhf_type: a pair needs a rejected reply; KTO a label or
    a pair; GRPO a prompt), and, when the rows are encoded (--model, --template, --max_length, tool calls or
    preference data; not GRPO's prompts), rows that training would drop: over --max_length, nothing to train, rows
    the template cannot render or pairs that do not encode. Returns the exit code: 1 if any problem, else 0.

    Read errors are printed, not raised. Raises ConfigError (no --dataset, template problems)."""
    _need_dataset(args)
    kind = _rows_kind(args)
    problems = total = 0
    enc = None
    for spec in _each_file(args.dataset + args.val_dataset):
        try:
            raw = read_spec(spec, seed=args.data_seed, use_hf=args.use_hf, hub_token=args.hub_token)
        except DataError as e:
            print(e)
            problems += 1
            continue
        total += len(raw)
        res = _usable(raw, args, kind)
        for reason in sorted(res.reasons, key=_line_of):
            print(reason)
        problems += res.dropped
        tools = _has_tools(res.records)
        if res.records and kind != "prompt" and (args.model or args.max_length or args.template or tools
                                                 or kind != "sft"):
            enc = enc or _encoder(args, _tokenizer(args, tools=tools))
            problems += _check_encoding(args, enc, res, kind)
    print(f"{total} rows checked, {problems} problem(s).")
    return 1 if problems else 0


def _check_encoding(args: DataCommandArguments, enc: ChatEncoder, res, kind: str) -> int:
    """Encode each record as training encodes its kind (a pair with encode_pair); print each row training would
    drop, return how many."""
    problems = 0
    for rec, (src, line) in zip(res.records, res.sources):
        try:
            if kind == "preference":
                enc.encode_pair(rec)
            else:
                enc.encode(rec)
            continue
        except TooLong as t:
            print(f"{src}:{line}: {t.args[0]} tokens, over --max_length {args.max_length} "
                  f"(dropped in training with --truncation_strategy delete)")
        except NothingToTrain:
            print(f"{src}:{line}: no trained tokens (every reply excluded by loss settings or truncation)")
        except DataError as e:
            print(DataError(src, line, e.field, e.problem, e.fix))
        problems += 1
    return problems


def _line_of(message: str) -> int:
    head = message.split(": ", 1)[0]
    tail = head.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _rows(records: list[dict]) -> list[dict]:
    """Canonical records as rows to write: the row's other columns (ids, a GRPO `solution`, …) kept next to the
    conversation, so that nothing the format does not read is lost by converting or splitting; pictures' local
    paths made absolute, so the rows still find them from the folder they are written to."""
    return [{**{k: _absolute(k, v) for k, v in r.items() if k != "columns"}, **(r.get("columns") or {})}
            for r in records]


def _absolute(key: str, value):
    if key not in ("images", "rejected_images"):
        return value
    return [ref if ref.lower().startswith(("data:", "http://", "https://")) else os.path.abspath(ref)
            for ref in value]


def convert(args: DataCommandArguments) -> None:
    """Write the data as canonical JSONL to --output (bad rows dropped unless --strict).

    Raises ConfigError (no --dataset or --output), DataError (loading), OSError (writing)."""
    _need_dataset(args)
    if not args.output:
        raise ConfigError("pass --output FILE.jsonl for the converted data")
    result = load_datasets(args.dataset, strict=args.strict, columns=args.columns, seed=args.data_seed,
                           keep_columns=True)
    write_jsonl(args.output, _rows(result.records))
    msg = f"wrote {len(result.records)} canonical rows to {args.output}"
    if result.dropped:
        msg += f" ({result.dropped} bad rows dropped; first: {result.reasons[0]})"
    print(msg)


def split(args: DataCommandArguments) -> None:
    """Write a seeded train/validation split (--val_ratio) as train.jsonl and val.jsonl under --output (default:
    FIRST_DATASET_split/).

    Raises ConfigError (no --dataset, --val_ratio not in (0, 1)), DataError (loading; no training rows left)."""
    _need_dataset(args)
    result = load_datasets(args.dataset, strict=args.strict, columns=args.columns, seed=args.data_seed,
                           keep_columns=True)
    if not 0 < args.val_ratio < 1:
        raise ConfigError(f"--val_ratio must be between 0 and 1, got {args.val_ratio}")
    train, val = split_train_val(result, args.val_ratio, args.data_seed)
    out = args.output or os.path.splitext(args.dataset[0].split("#")[0])[0] + "_split"
    from tunesmith.files import unwritable

    why = unwritable(out, folder=True)  # the default, next to the data (a given --output was checked up front)
    if why:
        raise ConfigError(f"--output {out}: {why} for train.jsonl and val.jsonl")
    write_jsonl(os.path.join(out, "train.jsonl"), _rows(train.records))
    write_jsonl(os.path.join(out, "val.jsonl"), _rows(val.records))
    print(f"wrote {len(train)} train rows and {len(val)} validation rows to {out}/ (seed {args.data_seed})")


def _pct(xs: list[int], p: float) -> int:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))] if xs else 0


STREAM_SAMPLE_ROWS = 10_000  # `stats --streaming true` measures this many rows unless --num_rows says otherwise


def _stats_records(args: DataCommandArguments) -> tuple[LoadResult, str]:
    """What `stats` measures: every row; with --streaming, the first --num_rows (default 10,000) rows, read as
    training streams them (nothing else is read). Returns (records, "" or the line that says it is a sample).
    Raises DataError (loading; no usable row)."""
    if not args.streaming:
        return load_datasets(args.dataset, strict=args.strict, columns=args.columns, seed=args.data_seed), ""
    n = args.num_rows or STREAM_SAMPLE_ROWS
    result = LoadResult([], [], strict=args.strict)
    for rec, src in islice(stream_records(args.dataset, result, columns=args.columns, use_hf=args.use_hf,
                                          hub_token=args.hub_token), n):
        result.records.append(rec)
        result.sources.append(src)
    if not result.records:
        raise DataError(" ".join(args.dataset), None, "", "no usable rows in --dataset.",
                        "run `tunesmith data validate --dataset ...` to list every problem.")
    if len(result.records) < n:
        return result, f"--streaming: all {len(result.records)} rows measured (the data ends before --num_rows {n})"
    return result, (f"--streaming: a sample, the first {n} rows, measured (--num_rows N measures more; the rest "
                    f"of the data is not read)")


def _measured(enc: ChatEncoder, rec: dict, key: str):
    """One side of a row encoded untruncated, or None when it has no trained token. Raises DataError (no source)."""
    try:
        return enc.encode(rec, key)
    except NothingToTrain:
        return None


def stats(args: DataCommandArguments) -> dict:
    """Print and return row kinds, assistant turns, tokens per sequence (min/mean/p50/p90/max/total) and trained
    tokens, each sequence measured untruncated; with --max_length, how many sequences are over it and what
    --truncation_strategy does with them (delete: dropped; left/right: truncated, dropped only when no trained token
    is left).

    --streaming true measures a sample: the first --num_rows rows (default 10,000), and says so.

    Raises ConfigError (no --dataset, template problems) or DataError (loading)."""
    _need_dataset(args)
    result, sample = _stats_records(args)
    tok = _tokenizer(args, tools=_has_tools(result.records), images=_has_images(result.records))
    max_length = args.max_length
    enc = _encoder(args, tok, max_length=None)
    kinds: dict[str, int] = {}
    lengths, trained, turns = [], [], []
    pictures, image_tokens, over_rows = [], [], []  # per sequence with images; rows over --max_length
    nothing = emptied = 0
    rows = 0
    for rec, (src, line) in zip(result.records, result.sources):
        try:
            sides = [_measured(enc, rec, key) for key in ("messages", "rejected_messages") if key in rec]
        except DataError as err:  # the template cannot render the row: a bad row, as in training
            result.drop(DataError(src, line, err.field, err.problem, err.fix))
            continue
        rows += 1
        kinds[row_kind(rec)] = kinds.get(row_kind(rec), 0) + 1
        turns.append(sum(1 for m in rec["messages"] if m["role"] == "assistant"))
        nothing += sides.count(None)
        for e in filter(None, sides):
            lengths.append(len(e.input_ids))
            trained.append(e.n_trained)
            _count_images(enc, e, f"{src}:{line}", max_length, pictures, image_tokens, over_rows)
            if max_length and len(e.input_ids) > max_length and args.truncation_strategy != "delete":
                kept = e.labels[-max_length:] if args.truncation_strategy == "left" else e.labels[:max_length]
                emptied += all(x == IGNORE for x in kept)  # truncation cut every trained token: dropped
    over = sum(1 for n in lengths if max_length and n > max_length)
    if not rows:
        raise DataError(" ".join(args.dataset), None, "", "no row the template can render; first reasons:\n  "
                        + "\n  ".join(result.reasons), "fix the rows, or pass the --model (or --template) they are for.")
    s = {"rows": rows, "bad_rows_dropped": result.dropped, "kinds": kinds,
         "assistant_turns": {"mean": round(sum(turns) / len(turns), 2), "max": max(turns)},
         "tokens": {"min": min(lengths, default=0), "mean": round(sum(lengths) / max(1, len(lengths)), 1),
                    "p50": _pct(lengths, 0.5), "p90": _pct(lengths, 0.9), "max": max(lengths, default=0),
                    "total": sum(lengths)},
         "trained_tokens": {"total": sum(trained), "mean": round(sum(trained) / max(1, len(trained)), 1)},
         "no_trained_tokens": nothing, **({"sample": sample} if sample else {})}
    if image_tokens:
        s["images"] = _image_summary(pictures, image_tokens, enc.images.limits)
    strategy = args.truncation_strategy
    if strategy == "delete":
        fate = f"{over} sequence(s) would be dropped (--truncation_strategy delete)"
    else:
        fate = (f"{over} sequence(s) would be truncated to {max_length} tokens, cut on the {strategy} "
                f"(--truncation_strategy {strategy}): "
                + (f"{over - emptied} still trained, {emptied} dropped (no trained token left)" if emptied
                   else "all still trained"))
    if max_length:
        s["over_max_length"] = {"max_length": max_length, "sequences": over, "truncation_strategy": strategy,
                                "truncated": 0 if strategy == "delete" else over - emptied,
                                "dropped": over if strategy == "delete" else emptied, "note": fate,
                                "first_rows": over_rows}
    if sample:
        print(sample)
    print(f"rows: {s['rows']} ({', '.join(f'{k}: {v}' for k, v in kinds.items())})"
          + (f", {result.dropped} bad rows dropped" if result.dropped else ""))
    print(f"assistant turns per row: mean {s['assistant_turns']['mean']}, max {s['assistant_turns']['max']}")
    t = s["tokens"]
    print(f"tokens per sequence: min {t['min']}, mean {t['mean']}, p50 {t['p50']}, p90 {t['p90']}, max {t['max']}; "
          f"total {t['total']}")
    print(f"trained tokens: total {s['trained_tokens']['total']}, mean {s['trained_tokens']['mean']} per sequence")
    if image_tokens:
        _print_images(s["images"])
    if max_length:
        print(f"over --max_length {max_length}: {fate}")
        if over_rows:
            print("  first rows over it: " + "; ".join(over_rows[:5]) + (" ..." if over > 5 else ""))
    return s


def _count_images(enc: ChatEncoder, e, where: str, max_length, pictures: list, image_tokens: list,
                  over_rows: list) -> None:
    """stats' per-sequence tallies: its pictures and image tokens (when it has pictures), and the first 20 sequences
    over --max_length with where they are."""
    counts = _image_tokens(enc, e)
    if counts:
        pictures.append(len(counts))
        image_tokens.append(sum(counts))
    if max_length and len(e.input_ids) > max_length and len(over_rows) < 20:
        over_rows.append(f"{where} ({len(e.input_ids)} tokens"
                         + (f", {sum(counts)} of them image tokens" if counts else "") + ")")


def _image_summary(pictures: list[int], image_tokens: list[int], limits: dict) -> dict:
    """stats' "images": pictures and image tokens over the sequences that have pictures, and the pixel budget."""
    return {"sequences_with_images": len(pictures), "pictures": sum(pictures),
            "image_tokens": {"min": min(image_tokens), "mean": round(sum(image_tokens) / len(image_tokens), 1),
                             "max": max(image_tokens), "total": sum(image_tokens)},
            "max_pixels": limits["max_pixels"], "min_pixels": limits["min_pixels"]}


def _print_images(im: dict) -> None:
    t = im["image_tokens"]
    print(f"images: {im['pictures']} in {im['sequences_with_images']} sequences; image tokens per sequence: "
          f"min {t['min']}, mean {t['mean']}, max {t['max']}; total {t['total']} (pictures resized to "
          f"{im['min_pixels']:,}-{im['max_pixels']:,} pixels: --max_pixels / MAX_PIXELS)")


def cache(args: DataCommandArguments) -> list[dict]:
    """List the encoded datasets kept for --load_from_cache_file (path, size, last use); with --clean true remove
    them (only those unused for --older_than_days when given). Returns the entries listed or removed.
    Raises ConfigError (--older_than_days without --clean, or negative)."""
    import shutil
    import time

    from tunesmith.data.store import cache_entries, cache_root

    if args.dataset:
        raise ConfigError("tunesmith data cache lists (and --clean true removes) every encoded dataset, whatever its "
                          "data; drop --dataset (--older_than_days N keeps the recently used ones)")
    if args.older_than_days is not None and not args.clean:
        raise ConfigError("--older_than_days N goes with --clean true: remove the entries unused for N days")
    if args.older_than_days is not None and args.older_than_days < 0:
        raise ConfigError(f"--older_than_days {args.older_than_days}: expected a number of days >= 0")
    entries = cache_entries()
    now = time.time()
    if args.clean:
        cutoff = now - 86400 * (args.older_than_days or 0)
        entries = [e for e in entries if args.older_than_days is None or e["last_used"] < cutoff]
        for e in entries:
            shutil.rmtree(e["path"], ignore_errors=True)
    for e in entries:
        print(f"{e['path']}  {e['bytes'] / 2 ** 20:9.1f} MiB  last used {(now - e['last_used']) / 86400:.1f} days ago")
    total = sum(e["bytes"] for e in entries) / 2 ** 30
    print(f"{'removed' if args.clean else 'kept'}: {len(entries)} encoded dataset(s), {total:.2f} GiB "
          f"({cache_root()})" + ("" if args.clean or not entries else "; remove them with --clean true"))
    return entries


def _flag_problems(args: DataCommandArguments) -> list[str]:
    """Flag values the data commands can judge before reading anything (every problem at once, exit 2): no empty
    --dataset or --val_dataset name; split's --val_ratio in (0, 1), and not training's --split_dataset_ratio; convert's --output a file and split's a folder that can be written."""
    from tunesmith.config.checks import empty_names
    from tunesmith.config.parser import given_flags
    from tunesmith.files import unwritable

    out: list[str] = []
    empty_names(out, "dataset", args.dataset)
    empty_names(out, "val_dataset", args.val_dataset)
    if args.action == "split":
        if "split_dataset_ratio" in given_flags(args):  # training's flag: `data split` would silently ignore it
            out.append(f"--split_dataset_ratio {args.split_dataset_ratio}: that is training's validation split; "
                       f"`tunesmith data split` takes --val_ratio")
        if not 0 < args.val_ratio < 1:
            out.append(f"--val_ratio {args.val_ratio}: expected 0 < val_ratio < 1")
    if args.output is not None and args.action in ("convert", "split"):
        why = "is empty; give the path to write" if not str(args.output).strip() else \
            unwritable(args.output, folder=args.action == "split", example="data.jsonl")
        if why:
            out.append(f"--output {args.output}: {why}")
    return out


def main(args: DataCommandArguments):
    """Run args.action. Returns the exit code (validate's; 0 for the others).

    Raises ConfigError for a missing or unknown action, and whatever the action raises."""
    actions = {"inspect": inspect, "validate": validate, "convert": convert, "split": split, "stats": stats,
               "cache": cache}
    if args.action not in actions:
        raise ConfigError(f"say what to do: tunesmith data {{{'|'.join(actions)}}} --dataset FILE")
    raise_problems(_flag_problems(args))
    rc = actions[args.action](args)
    return rc if args.action == "validate" else 0
