"""What every training method does around the loop, each step taking its slice of the resolved config
(train/config.py): load and encode the data (`prepare_data`), load the model and attach LoRA (`prepare_model`),
cut rows into batches (`batching`), open the run (`start_run`: directory, args.json, trackers) and close it
(`finish_run`: report, summary). Nothing method-specific lives here (that is each method's file), and nothing here
changes the configuration; the loop itself is train/loop.py."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Optional

from tunesmith import __version__
from tunesmith.data.encode import ChatEncoder
from tunesmith.data.load import LoadResult, load_datasets, split_train_val, write_jsonl
from tunesmith.data.store import cache_root
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.log import note
from tunesmith.models.load import (attach_lora, count_parameters, load_model, load_tokenizer, resolve_model_dir, unwrap_model)
from tunesmith.models.checkpoint import is_adapter_dir
from tunesmith.runs.run_dir import make_run_dir, save_args, write_json_atomic


@dataclass(frozen=True)
class Batches:
    """What a method trains on: its training and validation units (rows, pairs, packed groups) and the collator
    that turns a list of units into a batch; `reference` is the reference to train against (it may have become a
    cache of precomputed log-probs), None for methods without one."""
    train: list
    eval: list
    collate: Any
    reference: Any = None
    on_run_dir: Any = None  # called with the run directory once it exists (GRPO's completions log)
    hooks: tuple = ()       # training state the checkpoints carry (loop.Objective.hooks): GRPO's round in progress


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


def prepare_data(data, model, method) -> Prepared:
    """Load the tokenizer (model slice) and the data (data slice: --dataset, --val_dataset or a split), shape the
    records for the method (`method.shape_records`: pairs checked, KTO's pairs split) and encode every row with the
    chat template as `method.rows` says ("sft" | "preference" | "kto"). max_length defaults to the model's
    max_position_embeddings (tokens). With --streaming the training rows are read and encoded on the fly instead
    (`_stream_rows`); only --val_dataset is encoded here. Raises DataError for bad rows (--strict true), rows the
    method cannot use, or nothing left to train on."""
    model_dir = resolve_model_dir(model.model, model.use_hf, model.model_revision, model.hub_token)
    tok = load_tokenizer(model, model_dir)
    max_length = data.max_length
    if max_length is None:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=model.trust_remote_code)
        max_length = getattr(config, "max_position_embeddings", None)
    encoder = ChatEncoder(tok, loss_scale=data.loss_scale, default_loss_scale=method.default_loss_scale,
                          max_length=max_length, truncation_strategy=data.truncation_strategy,
                          system=data.system,  # the text: parse_args read a --system file
                          use_chat_template=data.use_chat_template)
    if method.rows == "prompt":  # GRPO: prompts to generate from, nothing encoded up front
        return _prompts(data, model, method, model_dir, tok, encoder, max_length)
    path = os.path.join(cache_root(), _data_fingerprint(data, model_dir, tok, max_length, method))
    if data.streaming and not data.val_dataset:  # nothing is encoded up front
        cached = None, None, {"val_split": False, "stats": {}}
    else:
        cached = _encoded(data, model, method, encoder, path, max_length)
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
    return Prepared(model_dir, tok, encoder, train_rows, eval_rows or [], val, stats)


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
                             **r["columns"]} for r in val.records], [])
    stats = {"train_rows": len(prompts.records), "val_rows": len(val.records), "dropped_bad": prompts.dropped,
             "max_length": max_length}
    return Prepared(model_dir, tok, encoder, prompts.records, val.records, split, stats)


def _encoded(data, model, method, encoder, path: str, max_length):
    """(train rows, validation rows or None, meta) encoded at `path`: reused (--load_from_cache_file true, the key
    matching) or encoded afresh by rank 0 and opened by every rank. Raises the DataError rank 0 met."""
    from tunesmith.train import distributed as D

    kind, what = method.rows, "encoded validation data" if data.streaming else "encoded data"
    cached = _cached_data(path, kind) if data.load_from_cache_file else None
    if cached is None:
        # rank 0 encodes; the others open what it wrote (one copy on disk), or raise the error it met
        failure = None
        if D.is_main():
            try:
                _encode_data(data, model, method, encoder, path, max_length)
            except TunesmithError as e:
                failure = e
        message = D.broadcast(None if failure is None else str(failure))
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


def _data_fingerprint(data, model_dir: str, tokenizer, max_length, method) -> str:
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
        "version": __version__, "kind": method.rows, "shape": type(method).__name__,
        "default_loss_scale": method.default_loss_scale,
        "dataset": [stat(s) for s in data.dataset], "val_dataset": [stat(s) for s in data.val_dataset],
        "split": data.split_dataset_ratio, "seed": data.data_seed, "columns": data.columns, "strict": data.strict,
        "streaming": data.streaming,
        "max_length": max_length, "truncation": data.truncation_strategy, "loss_scale": data.loss_scale,
        "system": data.system, "use_chat_template": data.use_chat_template,
        "tokenizer": [len(tokenizer), tokenizer.chat_template, str(tokenizer.all_special_tokens),
                      [[f, os.path.getsize(os.path.join(model_dir, f))] for f in tok_files]]})


def _stream_rows(data, model, method, encoder, max_length):
    """--streaming: the training rows as a StreamingRows over --dataset (read, normalised, shaped by the method and
    encoded row by row, each epoch), its drops noted after the first pass. The first usable row is read now, so a
    missing file, a hub id that does not load or an early bad row fails before the model loads."""
    from functools import partial

    from tunesmith.data.load import stream_records
    from tunesmith.data.stream import StreamingRows

    records = partial(stream_records, data.dataset, columns=data.columns, use_hf=model.use_hf,
                      hub_token=model.hub_token, shape=method.shape_records)
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
                  hub_token=model.hub_token)
    if data.streaming:
        return _encode_val_only(data, method, encoder, path, common)
    os.makedirs(path, exist_ok=True)
    work = os.path.join(path, f".records-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    try:
        source, tally = _records_file(data.dataset, "--dataset", common, os.path.join(work, "train.arrow"))
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


def _records_file(specs: list, what: str, common: dict, file: str):
    """(the normalised records of `specs` as an Arrow records file, the tally of bad rows dropped). Local files
    are read, normalised and written a row at a time; hub ids and `#N` samples are loaded whole first. Raises
    DataError (strict: the first bad row; no usable rows at all)."""
    from tunesmith.data.load import stream_records
    from tunesmith.data.store import RecordsFile, released, write_source

    if all(_streamable(s) for s in specs):
        tally = LoadResult([], [], strict=common["strict"])
        n = write_source(stream_records(specs, tally, columns=common["columns"], use_hf=common["use_hf"],
                                        hub_token=common["hub_token"]), file)
        if not n:
            detail = f" All {tally.dropped} rows were bad; first reasons:\n  " + "\n  ".join(tally.reasons) \
                if tally.dropped else ""
            raise DataError(" ".join(specs), None, "", f"no usable rows in {what}.{detail}",
                            "fix the rows above (run `tunesmith data validate --dataset ...` to list every problem).")
        return RecordsFile(file), tally
    loaded = load_datasets(specs, what=what, **common)
    write_source(released(loaded.records, loaded.sources), file)
    return RecordsFile(file), LoadResult([], [], loaded.dropped, loaded.reasons, loaded.strict)


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


def prepare_model(model_cfg, model_dir: str, tokenizer, seed: int, head: str = "causal_lm"):
    """The model to train (model slice): loaded with the method's head ("causal_lm", or "seq_cls" for a reward
    model), LoRA attached (--train_type lora) with the seeded init, gradient checkpointing and Liger kernels as
    asked. Returns (model, parameter counts). Raises ConfigError for an --adapters path that is not an adapter, or a
    model with nothing to train."""
    for a in model_cfg.adapters:
        if not is_adapter_dir(a):
            raise ConfigError(f"--adapters {a}: not an adapter directory (no adapter_config.json); a full "
                              f"checkpoint is passed with --model")
    from transformers import set_seed

    set_seed(seed)  # LoRA's random init (and anything else drawn here) is the same for the same --seed
    model = load_model(model_cfg, model_dir, tokenizer, for_training=True, head=head)
    if model_cfg.train_type == "lora":
        model = attach_lora(model, model_cfg)
    if model_cfg.gradient_checkpointing:
        # transformers 5.x renamed the method and its kwargs; keep working on 4.x too
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if model_cfg.use_liger_kernel:
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            note("--use_liger_kernel: liger-kernel is not installed (pip install liger-kernel); skipped")
        else:
            base = unwrap_model(model)
            _apply_liger_kernel_to_instance(model=base, cross_entropy=False, fused_linear_cross_entropy=False)
    info = count_parameters(model)
    if info["trainable"] == 0:
        raise ConfigError("the model has no trainable parameters (check --target_modules / --target_regex)")
    note(f"parameters: {info['trainable']:,} trainable of {info['total']:,} ({info['trainable_percent']}%)")
    return model, info


def batching(data, train_rows, eval_rows, padded, flat, packed, length, max_length):
    """(training units, validation units, collate) for --packing, --padding_free or plain padding.

    --packing groups rows to fill --packing_length (default --max_length); a batch is
    --per_device_train_batch_size such packed rows (read lazily: `Grouped`). --padding_free concatenates each batch
    into one sequence. Every mode trains on exactly the same tokens with the same loss normalisation; only the
    padding (and its compute) differs. length(row) -> tokens; None: the rows give theirs (`rows.lengths()`).
    --streaming training rows (a StreamingRows) are packed as they are read, PACK_BUFFER_ROWS rows at a time.
    Raises ConfigError for --packing without a length."""
    from tunesmith.data.collate import Grouped, pack_groups

    if data.packing:
        capacity = data.packing_length or max_length
        if not capacity:
            raise ConfigError("--packing needs --max_length (or --packing_length): the size of a packed sequence")
        if data.streaming:  # packed PACK_BUFFER_ROWS rows at a time as they are read
            from tunesmith.data.stream import PACK_BUFFER_ROWS

            note(f"--packing --streaming: every {PACK_BUFFER_ROWS} rows read are packed into sequences of up to "
                 f"{capacity} tokens")
            eval_units = Grouped(eval_rows, pack_groups(length_of(eval_rows, length), capacity))
            return train_rows.packed(capacity, length or _tokens), eval_units, packed
        units, total = [], 0
        for rows in (train_rows, eval_rows):
            lengths = length_of(rows, length)
            total = total or sum(lengths)
            units.append(Grouped(rows, pack_groups(lengths, capacity)))
        note(f"--packing: {len(train_rows)} rows -> {len(units[0])} sequences of up to {capacity} tokens "
             f"({100 * total / max(len(units[0]) * capacity, 1):.0f}% filled)")
        return units[0], units[1], packed
    if data.padding_free:
        return train_rows, eval_rows, flat
    return train_rows, eval_rows, padded


def length_of(rows, length) -> list[int]:
    """Tokens per row of a sized sequence of rows: length(row) each, or the rows' own `lengths()`."""
    return [length(r) for r in rows] if length else (rows.lengths() if len(rows) else [])


def _tokens(row) -> int:
    """An Encoded row's tokens (a streamed row's length for packing)."""
    return len(row.input_ids)


def make_run(cfg, prepared: Prepared, param_info: dict) -> tuple[str, dict]:
    """The run directory (made by rank 0; its name, with rank 0's clock, is shared with every rank), its args.json
    (cfg.args, secrets redacted, plus the record-only fields returned) and, for a split, val_dataset.jsonl."""
    from tunesmith.train import distributed as D

    if D.is_main():  # unfinished saves of runs killed mid-checkpoint: removed, and said
        from tunesmith.runs.run_dir import remove_leftovers

        ckpt = cfg.output.resume_from_checkpoint
        gone = remove_leftovers([cfg.output.output_dir] + ([os.path.dirname(os.path.abspath(ckpt))] if ckpt else []))
        if gone:
            note(f"removed {len(gone)} unfinished checkpoint save(s) left by stopped runs: "
                 + ", ".join(os.path.relpath(g) for g in gone[:3]) + (" …" if len(gone) > 3 else ""))
    run_dir = D.broadcast(make_run_dir(cfg.output.output_dir, cfg.output.add_version) if D.is_main() else None)
    import torch
    import transformers

    extra = {"tunesmith_version": __version__, "model_dir": prepared.model_dir, "output_run_dir": run_dir,
             "data_stats": prepared.data_stats, "model_parameter_info": param_info, "world_size": D.world_size(),
             "library_versions": {"python": platform.python_version(), "torch": torch.__version__,
                                  "transformers": transformers.__version__}}
    if D.is_main():
        save_args(run_dir, cfg.args, extra)
        if prepared.val_records is not None and not cfg.data.val_dataset:
            write_jsonl(os.path.join(run_dir, "val_dataset.jsonl"), prepared.val_records.records)
    return run_dir, extra


def say(text: str) -> None:
    """A progress line on stdout, as given (no prefix added), from rank 0 only."""
    note(text, file=sys.stdout, prefix="")


def make_trackers(run_dir: str, cfg, prepared: Prepared):
    """logging.jsonl and the --report_to trackers (output slice), on rank 0 only (other ranks get a disabled
    fan-out); the trackers' config is args.json's record plus the data statistics."""
    from tunesmith.config.parser import to_record
    from tunesmith.runs.track import Trackers
    from tunesmith.train import distributed as D

    return Trackers(run_dir, cfg.output.report_to, {**to_record(cfg.args), **prepared.data_stats}, cfg.output,
                    enabled=D.is_main())


def save_model_fn(tokenizer):
    """save(model, path, state_dict=None): the trained weights (adapter only for LoRA) and the tokenizer, as
    safetensors, into `path` (a checkpoint's temporary folder)."""
    from transformers.utils import logging as hf_logging

    def save(model, path: str, state_dict=None) -> None:
        """state_dict: the full weights gathered from every rank (DeepSpeed ZeRO-3 partitions them)."""
        hf_logging.disable_progress_bar()  # our own progress bar is running; theirs would interleave with it
        kw = {"safe_serialization": True} if state_dict is None else {"safe_serialization": True,
                                                                       "state_dict": state_dict}
        if len(getattr(model, "peft_config", {})) > 1:
            # a frozen reference adapter ("ref") rides along in preference training; only the trained one is saved
            model.save_pretrained(path, selected_adapters=["default"], **kw)
        else:
            model.save_pretrained(path, **kw)
        tokenizer.save_pretrained(path)
    return save


@dataclass
class RunOutputs:
    """Where a run writes: its directory, the extra args.json fields, and the opened trackers."""
    run_dir: str
    args_extra: dict
    trackers: Any


def checkpoint_bytes(model_dir: str, train_type: str, save_only_model: bool) -> int:
    """About how large one checkpoint of this run is (bytes): full training saves the weights (as large as the
    model's weight files) plus AdamW's two fp32 moments per parameter; LoRA saves an adapter and its optimiser
    state, taken as 2% of the weights (a rank-64 all-linear adapter of a 7B model with AdamW is ~1.3%)."""
    import json

    weights = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                  if f.endswith((".safetensors", ".bin", ".pt"))) if os.path.isdir(model_dir) else 0
    if train_type != "full":
        return int(weights * 0.02)
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
        dtype = config.get("torch_dtype") or config.get("dtype")
    except (OSError, ValueError):
        dtype = None
    per_param = 4 if dtype in (None, "float32") else 2
    return int(weights * (1 + (0 if save_only_model else 8 / per_param)))


def check_disk(cfg, model_dir: str) -> None:
    """Before the model loads: the output folder's disk must hold at least one checkpoint (`checkpoint_bytes`).
    Raises ConfigError naming the free and the needed GiB and the ways out."""
    import shutil as sh

    if cfg.output.save_strategy == "no":
        return
    from tunesmith.runs.run_dir import existing_ancestor

    path = existing_ancestor(cfg.output.output_dir)
    need = checkpoint_bytes(model_dir, cfg.model.train_type, cfg.output.save_only_model)
    free = sh.disk_usage(path).free
    if need > free:
        gib = 1 << 30
        raise ConfigError(f"--output_dir {cfg.output.output_dir}: {free / gib:.1f} GiB free on its disk, but one "
                          f"checkpoint of this run takes about {need / gib:.1f} GiB (the weights"
                          + ("" if cfg.output.save_only_model or cfg.model.train_type != "full" else
                             " and AdamW's state; --save_only_model true drops the latter") +
                          "); free some space or choose another --output_dir")


@contextlib.contextmanager
def start_run(cfg, prepared: Prepared, param_info: dict, header):
    """The run directory (args.json), the trackers, and the header line (`header(run_dir)`); the trackers are
    closed when the block ends, however it ends."""
    run_dir, extra = make_run(cfg, prepared, param_info)
    trackers = make_trackers(run_dir, cfg, prepared)
    say(header(run_dir))
    failed = None
    try:
        yield RunOutputs(run_dir, extra, trackers)
    except DataError as e:  # --streaming: a row met mid-run (strict)
        failed = e
    finally:
        trackers.close()
    if failed is not None:
        raise _stopped_on_data(failed, run_dir) from None


def _stopped_on_data(e: DataError, run_dir: str) -> DataError:
    """A bad row met during training (--streaming, --strict true): a run with no checkpoint yet leaves nothing
    behind (its directory is removed, as for data refused before training); otherwise the error says how to go on
    from the last checkpoint."""
    from tunesmith.train import distributed as D

    checkpoints = sorted(glob.glob(os.path.join(run_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    if not checkpoints:
        if D.is_main():
            shutil.rmtree(run_dir, ignore_errors=True)
        return e
    return DataError(e.source, e.line, e.field, e.problem,
                     f"{e.fix} Training stopped at this row; after fixing it (or with --strict false, which drops "
                     f"bad rows), continue with --resume_from_checkpoint {checkpoints[-1]}.".strip())


def finish_run(state, run_dir: str, metric_for_best_model: Optional[str] = None) -> None:
    """Plots and report.html for the run, then the summary on stderr (rank 0 only). A plotting failure never fails
    a finished run.

    The best checkpoint is labelled with the metric that chose it, named as the loop logs it (eval_ prefixed):
    metric_for_best_model, or when not given, --metric_for_best_model from the run's args.json (default loss)."""
    from tunesmith.runs.report import write_run_report
    from tunesmith.train import distributed as D

    if not D.is_main():
        return
    metric = metric_for_best_model
    if not metric:  # the callers pass the run directory only; make_run wrote the arguments into its args.json
        try:
            with open(os.path.join(run_dir, "args.json"), encoding="utf-8") as fh:
                metric = json.load(fh).get("metric_for_best_model")
        except (OSError, ValueError, AttributeError):  # no or unreadable args.json: the default below
            metric = None
    metric = metric or "loss"
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"  # as the loop names it

    try:
        report = write_run_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the weights are saved; the report can be rebuilt with `tunesmith report`
        report = f"not written ({type(e).__name__}: {e}); rebuild with: tunesmith report {run_dir}"
    lines = [f"done: {state.global_step} steps",
             f"  run directory:    {run_dir}",
             f"  last checkpoint:  {state.last_model_checkpoint}",
             f"  best checkpoint:  {state.best_model_checkpoint}"
             + (f" ({metric} {state.best_metric:.4f})" if state.best_metric is not None else ""),
             f"  log:              {os.path.join(run_dir, 'logging.jsonl')}",
             f"  report:           {report}"]
    print("\n".join(lines), file=sys.stderr)
