"""The data a training run reads, prepared once: load, shape for the method, encode, cache.

`prepare_rows` loads --dataset (and --val_dataset, or a split of --dataset), lets the training method shape the
records (`MethodRows.shape_records`: pairs checked, KTO's pairs split, bad rows dropped or refused) and encodes every
row with the chat template (data.encode.ChatEncoder) into Arrow files (data.store), never holding all records as
Python objects: local files pass row by row through a records file (`_records_file`), then the shaped file, then the
encoded rows. The result is cached under a fingerprint of everything it depends on (`_data_fingerprint`: the files'
size and mtime, the flags, the tokenizer, the method's row kind), so --load_from_cache_file true reuses it. With
--streaming the training rows are a data.stream.StreamingRows read and encoded on the fly (`_stream_rows`) and only
--val_dataset is encoded here. GRPO's prompts are loaded whole, not encoded (`_prompts`).

The training side (train/setup.py) loads the tokenizer, resolves max_length from the model and describes its method
as plain values and a callable (`MethodRows`); nothing here imports training.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tunesmith import __version__
from tunesmith.data.encode import ChatEncoder
from tunesmith.data.load import LoadResult, load_datasets, split_train_val, write_jsonl
from tunesmith.data.store import cache_root
from tunesmith.errors import DataError, TunesmithError
from tunesmith.files import write_json_atomic
from tunesmith.log import is_main, note


@dataclass(frozen=True)
class MethodRows:
    """What a training method asks of its rows, given by the training side (train/setup.py) from its method object.

    name: the method as messages name it. rows: how rows are encoded, "sft" | "preference" | "kto", or "prompt"
    (prompts to generate from: GRPO). default_loss_scale: --loss_scale when not given. shape_records(LoadResult) ->
    LoadResult: the method's rules over loaded records (pairs checked, KTO's pairs split; bad rows dropped with
    reasons, or DataError under --strict true). shape_key: the shaping rules' identity in the cache key (the method
    object's class name). keep_columns: records carry the rows' other columns under "columns" for shape_records
    (GKD's teacher routing column)."""
    name: str
    rows: str
    default_loss_scale: str
    shape_records: Callable[[LoadResult], LoadResult]
    shape_key: str
    keep_columns: bool = False


@dataclass
class Prepared:
    """The encoded data and what it was encoded with. train_rows/eval_rows hold what the method's `rows` kind
    encodes to: Encoded rows (sft), (chosen, rejected) pairs (preference), (Encoded, desirable) (kto); with
    --streaming, train_rows is a data.stream.StreamingRows (no length: read and encoded on the fly)."""
    model_dir: str
    tokenizer: Any
    encoder: ChatEncoder
    train_rows: list
    eval_rows: list
    val_records: Optional[LoadResult]
    data_stats: dict


def prepare_rows(data, model, method: MethodRows, model_dir: str, tokenizer, max_length: Optional[int],
                 broadcast: Callable[[Any], Any], images=None) -> Prepared:
    """Load the data (data slice: --dataset, --val_dataset or a split), shape the records for the method
    (`method.shape_records`: pairs checked, KTO's pairs split) and encode every row with the tokenizer's chat
    template as `method.rows` says ("sft" | "preference" | "kto"; "prompt": GRPO's prompts, loaded but not encoded),
    rows longer than max_length (tokens) handled as --truncation_strategy says. The encoded rows are cached under
    data.store.cache_root() by their fingerprint (`_data_fingerprint`); rank 0 encodes and `broadcast(value)` (rank
    0's value on every rank: distributed.broadcast) tells the others how it went. With --streaming the training rows
    are read and encoded on the fly instead (`_stream_rows`); only --val_dataset is encoded here. model: the model
    slice (its hub flags reach the datasets too). Raises DataError for bad rows (--strict true), rows the method
    cannot use, or nothing left to train on. images: a vision-language model's ImageTokens (tunesmith.data.vision;
    None for a text model, whose rows with images are bad rows)."""
    encoder = ChatEncoder(tokenizer, loss_scale=data.loss_scale, default_loss_scale=method.default_loss_scale,
                          max_length=max_length, truncation_strategy=data.truncation_strategy,
                          system=data.system,  # the text: parse_args read a --system file
                          use_chat_template=data.use_chat_template, images=images)
    if method.rows == "prompt":  # GRPO: prompts to generate from, nothing encoded up front
        return _prompts(data, model, method, model_dir, tokenizer, encoder, max_length)
    path = os.path.join(cache_root(), _data_fingerprint(data, model_dir, tokenizer, max_length, method, images))
    if data.streaming and not data.val_dataset:  # nothing is encoded up front
        cached = None, None, {"val_split": False, "stats": {}}
    else:
        cached = _encoded(data, model, method, encoder, path, max_length, broadcast)
    train_rows, eval_rows, meta = cached
    if data.streaming:
        train_rows = _stream_rows(data, model, method, encoder, max_length)
    else:
        _report_drops("--dataset", meta["train_drops"], max_length)
    if eval_rows is not None:
        _report_drops("validation data", meta["val_drops"], max_length)
    val = None
    if meta["val_split"]:  # a split of --dataset: kept with the rows, written into the run as val_dataset.jsonl
        with open(os.path.join(path, "val_dataset.jsonl"), encoding="utf-8") as fh:
            val = LoadResult(records=[json.loads(line) for line in fh], sources=[])
    vd = meta.get("val_drops") or {}
    val_dropped = {"val_dropped_bad": vd.get("dropped", 0) + vd.get("bad", 0), "val_dropped_too_long":
                   vd.get("too_long", 0), "val_dropped_nothing_to_train": vd.get("nothing_to_train", 0)}
    stats = {"train_rows": "streamed" if data.streaming else len(train_rows), "val_rows": len(eval_rows or []),
             **meta["stats"], **(val_dropped if eval_rows is not None else {}), "max_length": max_length}
    return Prepared(model_dir, tokenizer, encoder, train_rows, eval_rows or [], val, stats)


def _prompts(data, model, method, model_dir: str, tok, encoder, max_length) -> Prepared:
    """The prompts of a method that generates its own completions (GRPO): --dataset loaded whole (rows without a
    reply are fine), each row's other columns kept for the reward functions, shaped by the method
    (`prompt_record`). Raises DataError (bad rows under --strict true, or no prompt left)."""
    def load(specs, what: str):
        """The prompts of `specs` (DataError when none is usable; bad rows dropped under --strict false)."""
        loaded = load_datasets(specs, strict=data.strict, columns=data.columns, seed=data.data_seed,
                               need_reply=False, use_hf=model.use_hf, hub_token=model.hub_token, keep_columns=True)
        prompts = method.shape_records(loaded)
        if not prompts.records:
            raise DataError(" ".join(specs), None, "", "no usable prompts; first reasons:\n  "
                            + "\n  ".join(prompts.reasons))
        if prompts.dropped:
            note(f"{what}: {prompts.dropped} bad row(s) dropped (--strict false); first reasons:\n  "
                 + "\n  ".join(prompts.reasons))
        return prompts

    prompts = load(data.dataset, "--dataset")
    val, split = LoadResult([], []), None
    if data.val_dataset:
        val = load(data.val_dataset, "--val_dataset")
    elif data.split_dataset_ratio > 0:
        prompts, val = split_train_val(prompts, data.split_dataset_ratio, data.data_seed)
        # written into the run as val_dataset.jsonl, as for the other methods: rows that read back as these prompts
        split = LoadResult([{"messages": r["messages"], **({"tools": r["tools"]} if r.get("tools") else {}),
                             **({"images": r["images"]} if r.get("images") else {}),
                             **r["columns"]} for r in val.records], [])
    stats = {"train_rows": len(prompts.records), "val_rows": len(val.records), "dropped_bad": prompts.dropped,
             "max_length": max_length}
    return Prepared(model_dir, tok, encoder, prompts.records, val.records, split, stats)


def _encoded(data, model, method, encoder, path: str, max_length, broadcast):
    """(train rows, validation rows or None, meta) encoded at `path`: reused (--load_from_cache_file true, the key
    matching) or encoded afresh by rank 0 and opened by every rank. Raises the DataError rank 0 met."""
    kind, what = method.rows, "encoded validation data" if data.streaming else "encoded data"
    cached = _cached_data(path, kind) if data.load_from_cache_file else None
    if cached is None:
        # rank 0 encodes; the others open what it wrote (one copy on disk), or raise the error it met
        failure = None
        if is_main():
            try:
                _encode_data(data, model, method, encoder, path, max_length)
            except TunesmithError as e:
                failure = e
            except OSError as e:  # the cache refused a write: full, read-only, no permission
                failure = TunesmithError(f"could not write the encoded data ({e.filename or path}): {e.strerror}. "
                                         f"It is kept under HF_DATASETS_CACHE; set it to a writable folder with "
                                         f"room (or free some space)")
        message = broadcast(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise DataError(" ".join(data.dataset), None, "", message)
        cached = _cached_data(path, kind)
        note(f"{what}: {path}")
    else:
        from tunesmith.data.store import mark_used

        mark_used(path)
        note(f"{what}: reusing {path} (--load_from_cache_file true)")
    return cached


def _cached_data(path: str, kind: str):
    """(train rows, validation rows or None, meta) encoded earlier at `path`; None when absent or incomplete."""
    from tunesmith.data.store import cached_rows

    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    streamed = meta.get("train_drops") is None  # --streaming: only validation rows are kept here
    train = None if streamed else cached_rows(os.path.join(path, "train"), kind)
    val = cached_rows(os.path.join(path, "val"), kind) if meta.get("val_drops") is not None else None
    if (train is None and not streamed) or (meta.get("val_drops") is not None and val is None):
        return None
    return train, val, meta


def _data_fingerprint(data, model_dir: str, tokenizer, max_length, method, images=None) -> str:
    """What the encoded rows depend on: the data files (path, size, modification time) or hub ids, the data and
    encoding flags, the tokenizer and its chat template, the method's row kind, tunesmith's version."""
    from tunesmith.data.store import fingerprint

    def stat(spec: str):
        """A local file or folder as [spec, [file, bytes, mtime], ...]; a hub id as itself."""
        path = spec.split("#")[0]
        if not os.path.exists(path):
            return spec  # a hub id (its revision is the hub's business)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        return [spec] + [[f, os.path.getsize(f), os.path.getmtime(f)] for f in files]

    tok_files = sorted(f for f in os.listdir(model_dir) if f.startswith(("tokenizer", "chat_template", "special",
                                                                          "vocab", "merges"))) \
        if os.path.isdir(model_dir) else []
    return fingerprint({
        "version": __version__, "kind": method.rows, "shape": method.shape_key,
        "default_loss_scale": method.default_loss_scale,
        "dataset": [stat(s) for s in data.dataset], "val_dataset": [stat(s) for s in data.val_dataset],
        "split": data.split_dataset_ratio, "seed": data.data_seed, "columns": data.columns, "strict": data.strict,
        "streaming": data.streaming, "interleave": [data.interleave_prob, data.stopping_strategy],
        "max_length": max_length, "truncation": data.truncation_strategy, "loss_scale": data.loss_scale,
        "system": data.system, "use_chat_template": data.use_chat_template,
        "tokenizer": [len(tokenizer), tokenizer.chat_template, str(tokenizer.all_special_tokens),
                      [[f, os.path.getsize(os.path.join(model_dir, f))] for f in tok_files]],
        **({"images": images.fingerprint()} if images is not None else {})})


def _stream_rows(data, model, method, encoder, max_length):
    """--streaming: the training rows as a StreamingRows over --dataset (read, normalised, shaped by the method and
    encoded row by row, each epoch), its drops noted after the first pass. The first usable row is read now, so a
    missing file, a hub id that does not load or an early bad row fails before the model loads."""
    from functools import partial

    from tunesmith.data.load import stream_records
    from tunesmith.data.stream import StreamingRows

    records = partial(stream_records, data.dataset, columns=data.columns, use_hf=model.use_hf,
                      hub_token=model.hub_token, shape=method.shape_records, keep_columns=method.keep_columns)
    for spec in data.dataset:  # each file's first row now: a later file that cannot be read fails before training
        next(stream_records([spec], LoadResult([], [], strict=data.strict), columns=data.columns,
                            use_hf=model.use_hf, hub_token=model.hub_token), None)
    rows = StreamingRows(records, encoder, method.rows, data.strict, data.shuffle_buffer_size,
                         report=partial(_report_drops, "--dataset (streamed; first pass)", max_length=max_length))
    rows.probe()
    return rows


def _encode_data(data, model, method, encoder, path: str, max_length) -> None:
    """Load --dataset (and --val_dataset or the split), shape the records for the method and encode them into
    `path`: train/ and val/ Arrow rows, meta.json (drop counts), val_dataset.jsonl for a split. The records pass
    through Arrow files, never all held as Python objects (`_records_file`). With --streaming only --val_dataset is
    encoded here (the training rows stream: `_stream_rows`). Raises DataError."""
    from tunesmith.data.load import split_indices
    from tunesmith.data.store import RecordsFile, encode_source

    common = dict(strict=data.strict, columns=data.columns, seed=data.data_seed, use_hf=model.use_hf,
                  hub_token=model.hub_token, keep_columns=method.keep_columns)
    if data.streaming:
        return _encode_val_only(data, method, encoder, path, common)
    os.makedirs(path, exist_ok=True)
    work = os.path.join(path, f".records-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    try:
        counts = [] if data.interleave_prob else None
        source, tally = _records_file(data.dataset, "--dataset", common, os.path.join(work, "train.arrow"), counts)
        parts = [("train", data.dataset, "--dataset", source, None, tally)]
        if data.val_dataset:
            val_source, val_tally = _records_file(data.val_dataset, "--val_dataset", common,
                                                  os.path.join(work, "val.arrow"))
            parts.append(("val", data.val_dataset, "--val_dataset", val_source, None, val_tally))
        elif data.split_dataset_ratio > 0:
            train_idx, val_idx = split_indices(len(source), data.split_dataset_ratio, data.data_seed)
            parts = [("train", data.dataset, "--dataset", source, train_idx, tally),
                     ("val", data.dataset, "the validation split", source, val_idx,
                      LoadResult([], [], strict=data.strict))]
        if counts is not None:  # --interleave_prob: the training rows mixed as interleave_datasets mixes them
            name, specs, what, src, idx, drops = parts[0]
            parts[0] = (name, specs, what, src, _interleaved(data, counts, idx), drops)
        meta = {"train_drops": None, "val_drops": None, "val_split": bool(not data.val_dataset and len(parts) > 1)}
        num_proc = max(1, data.dataset_num_proc)
        shutil.rmtree(os.path.join(path, "val"), ignore_errors=True)
        for name, specs, what, src, idx, drops in parts:
            shaped_file = os.path.join(work, f"{name}-shaped.arrow")
            _shape_records_file(method, src, idx, drops, shaped_file, specs, what)
            if meta["val_split"] and name == "val":
                write_jsonl(os.path.join(path, "val_dataset.jsonl"),
                            (r for chunk, _ in RecordsFile(shaped_file).chunks() for r in chunk))
            rows, stats = encode_source(encoder, RecordsFile(shaped_file), os.path.join(path, name), method.rows,
                                        data.strict, num_proc)
            if name == "train" and not len(rows):
                raise DataError(" ".join(data.dataset), None, "", "no rows left to train on after encoding "
                                f"({drops.dropped} bad, {stats['bad']} failed to encode, {stats['too_long']} too long,"
                                f" {stats['nothing_to_train']} with nothing to train).",
                                "raise --max_length, use --truncation_strategy left/right, or check --loss_scale.")
            meta[f"{name}_drops"] = _drops(drops, stats)
            if name == "train":
                meta["stats"] = {"dropped_bad": drops.dropped + stats["bad"], "dropped_too_long": stats["too_long"],
                                 "dropped_nothing_to_train": stats["nothing_to_train"]}
        write_json_atomic(os.path.join(path, "meta.json"), meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _streamable(spec: str) -> bool:
    """A local file or folder without `#N`: its rows can be read one at a time (sampling needs every row)."""
    from tunesmith.data.load import parse_spec

    path, hub, n = parse_spec(spec)
    return hub is None and n is None and os.path.exists(path)


def _records_file(specs: list, what: str, common: dict, file: str, counts: Optional[list] = None):
    """(the normalised records of `specs` as an Arrow records file, the tally of bad rows dropped). Local files
    are read, normalised and written a row at a time; hub ids and `#N` samples are loaded whole first. counts: a
    list that gets each spec's number of records, in order (--interleave_prob). Raises DataError (strict: the first
    bad row; no usable rows at all)."""
    from tunesmith.data.load import stream_records
    from tunesmith.data.store import RecordsFile, released, write_source

    if counts is not None:
        return _counted_records_file(specs, what, common, file, counts)
    if all(_streamable(s) for s in specs):
        tally = LoadResult([], [], strict=common["strict"])
        n = write_source(stream_records(specs, tally, columns=common["columns"], use_hf=common["use_hf"],
                                        hub_token=common["hub_token"], keep_columns=common["keep_columns"]), file)
        if not n:
            detail = f" All {tally.dropped} rows were bad; first reasons:\n  " + "\n  ".join(tally.reasons) \
                if tally.dropped else ""
            raise DataError(" ".join(specs), None, "", f"no usable rows in {what}.{detail}",
                            "fix the rows above (run `tunesmith data validate --dataset ...` to list every problem).")
        return RecordsFile(file), tally
    loaded = load_datasets(specs, what=what, **common)
    write_source(released(loaded.records, loaded.sources), file)
    return RecordsFile(file), LoadResult([], [], loaded.dropped, loaded.reasons, loaded.strict)


def _counted_records_file(specs: list, what: str, common: dict, file: str, counts: list):
    """`_records_file` spec by spec, into one file: counts gets each spec's records (its rows are the next
    counts[k] of the file)."""
    from tunesmith.data.store import RecordsFile, write_source

    parts, tally = [], LoadResult([], [], strict=common["strict"])
    for k, spec in enumerate(specs):
        source, part_tally = _records_file([spec], what, common, f"{file}.{k}")
        parts.append(source)
        counts.append(len(source))
        tally.dropped += part_tally.dropped
        tally.reasons += part_tally.reasons[:max(0, tally.max_reasons - len(tally.reasons))]

    def rows():
        """Every part's (record, source) pairs, in order."""
        for source in parts:
            for records, sources in source.chunks():
                yield from zip(records, map(tuple, sources))

    write_source(rows(), file)
    for k in range(len(specs)):
        os.remove(f"{file}.{k}")
    return RecordsFile(file), tally


def _interleaved(data, counts: list, train_idx) -> list:
    """--interleave_prob: the training rows' indices in the records file as interleaving the datasets gives them
    (load.interleave_order over each dataset's training rows; `train_idx`: the rows left for training, None for
    all)."""
    from tunesmith.data.load import interleave_order

    bounds = [sum(counts[:k]) for k in range(len(counts) + 1)]
    rows = range(bounds[-1]) if train_idx is None else sorted(train_idx)
    groups = [[i for i in rows if bounds[k] <= i < bounds[k + 1]] for k in range(len(counts))]
    return interleave_order(groups, data.interleave_prob, data.data_seed, data.stopping_strategy)


def _shape_records_file(method, source, indices, tally: LoadResult, out: str, specs, what: str) -> None:
    """The method's rules (`method.shape_records`: pairs checked, KTO's pairs split) over the records file's rows
    (`indices`, or all), 10,000 at a time, written to `out`; drops are added to `tally`. Raises DataError: strict,
    or no usable row left for the method."""
    from tunesmith.data.store import write_source

    def shaped():
        """The shaped (record, source) pairs, chunk by chunk."""
        for records, sources in source.chunks(indices):
            part = method.shape_records(LoadResult(records, sources, strict=tally.strict))
            tally.dropped += part.dropped
            tally.reasons += part.reasons[:max(0, tally.max_reasons - len(tally.reasons))]
            yield from zip(part.records, part.sources)

    if not write_source(shaped(), out):  # every row was bad for this method (--strict false)
        raise DataError(" ".join(specs), None, "", f"no usable rows in {what} for {method.name}: all "
                        f"{tally.dropped} were bad; first reasons:\n  " + "\n  ".join(tally.reasons),
                        "fix the rows (`tunesmith data validate --rlhf_type ...` lists every problem).")


def _encode_val_only(data, method, encoder, path: str, common: dict) -> None:
    """--streaming: `path` holds --val_dataset's encoded rows (read whole, as without streaming) and meta.json; no
    training rows (meta train_drops None)."""
    from tunesmith.data.store import encode_rows

    os.makedirs(path, exist_ok=True)
    shutil.rmtree(os.path.join(path, "val"), ignore_errors=True)
    meta = {"train_drops": None, "val_drops": None, "val_split": False, "stats": {}}
    if data.val_dataset:
        val = method.shape_records(load_datasets(data.val_dataset, what="--val_dataset", **common))
        if not val.records:
            raise DataError(" ".join(data.val_dataset), None, "", f"no usable rows in --val_dataset for "
                            f"{method.name}: all {val.dropped} were bad; first reasons:\n  "
                            + "\n  ".join(val.reasons))
        _, vstats = encode_rows(encoder, val.records, val.sources, os.path.join(path, "val"), method.rows,
                                data.strict, max(1, data.dataset_num_proc))
        meta["val_drops"] = _drops(val, vstats)
    write_json_atomic(os.path.join(path, "meta.json"), meta)


def _drops(loaded: LoadResult, stats: dict) -> dict:
    """What was dropped loading (bad rows, --strict false) and encoding, as meta.json keeps it."""
    return {"dropped": loaded.dropped, "reasons": loaded.reasons, "too_long": stats["too_long"],
            "nothing_to_train": stats["nothing_to_train"], "bad": stats["bad"], "encode_reasons": stats["reasons"]}


def _report_drops(what: str, drops: dict, max_length) -> None:
    """Notes for the rows dropped while loading (--strict false) and encoding (too long, nothing to train, bad)."""
    if drops["dropped"]:
        note(f"{what}: {drops['dropped']} bad row(s) dropped (--strict false); first reasons:\n  "
             + "\n  ".join(drops["reasons"]))
    if drops["too_long"]:
        note(f"{what}: {drops['too_long']} row(s) longer than --max_length {max_length} dropped "
             f"(--truncation_strategy delete)")
    if drops["nothing_to_train"]:
        note(f"{what}: {drops['nothing_to_train']} row(s) with no trained tokens dropped (the prompt fills "
             f"--max_length {max_length} after truncation, or --loss_scale / per-message loss trains nothing)")
    if drops["bad"]:
        note(f"{what}: {drops['bad']} row(s) failed to encode and were dropped; first reasons:\n  "
             + "\n  ".join(drops["encode_reasons"]))
