"""Encoded rows in Arrow: every row is tokenised once through `datasets.map` (--dataset_num_proc workers) into
memory-mapped Arrow files, kept under a fingerprint of what the encoding depends on, and read back row by row.

Why: a 1M-row dataset held as Python lists of token ids needs ~14 GB before training starts (about 70 bytes per
token); in Arrow a token is 4 bytes on disk and only the pages a batch touches are in memory, and a second run
with --load_from_cache_file true skips loading and encoding altogether (ms-swift's semantics, where the default is
false: encode afresh).

What lives here: `encode_rows` (records -> Arrow + drop statistics), `EncodedRows` (the rows as a read-only
sequence of what the method's `rows` kind encodes to), `fingerprint`, and the cache directory. What must not:
tokenisation or masking (encode.py), loading files (load.py), batching (collate.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from itertools import islice
from typing import Any, Optional

from tunesmith.data.encode import ChatEncoder, Encoded, encode_one
from tunesmith.errors import DataError

STORE_VERSION = 1  # bump when the stored layout or the encoding changes meaning


def cache_root() -> str:
    """Where encoded datasets are kept: `tunesmith-encoded` under the datasets cache (HF_DATASETS_CACHE, default
    ~/.cache/huggingface/datasets)."""
    base = os.environ.get("HF_DATASETS_CACHE")
    if not base:
        from datasets import config
        base = str(config.HF_DATASETS_CACHE)
    return os.path.join(base, "tunesmith-encoded")


def fingerprint(parts: dict) -> str:
    """A short stable hash (hex, 20 chars) of a JSON-able description of everything the encoded rows depend on."""
    text = json.dumps({"store": STORE_VERSION, **parts}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _features(kind: str):
    from datasets import Features, Sequence, Value

    cols = {"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))}
    if kind == "preference":
        cols.update(rejected_input_ids=Sequence(Value("int32")), rejected_labels=Sequence(Value("int32")))
    if kind == "kto":
        cols["desirable"] = Value("bool")
    return Features({**cols, "status": Value("string"), "reason": Value("string")})


def _encode_batch(batch: dict, encoder: ChatEncoder, kind: str) -> dict:
    """datasets.map function: JSON records -> token columns, with status ok | too_long | nothing_to_train | bad and,
    for bad rows, the DataError's parts as JSON [file, line, field, problem, fix]."""
    out: dict = {k: [] for k in _features(kind)}
    for text, src, line in zip(batch["record"], batch["source"], batch["line"]):
        status, value = encode_one(encoder, json.loads(text), kind)
        if status != "ok":
            first = second = None
        else:  # sft: one Encoded; preference: (chosen, rejected); kto: (Encoded, desirable)
            first, second = (value, None) if kind == "sft" else value
        out["input_ids"].append(first.input_ids if first else [])
        out["labels"].append(first.labels if first else [])
        if kind == "preference":
            out["rejected_input_ids"].append(second.input_ids if first else [])
            out["rejected_labels"].append(second.labels if first else [])
        if kind == "kto":
            out["desirable"].append(bool(second) if first else False)
        out["status"].append(status)
        out["reason"].append(json.dumps([src, line, value.field, value.problem, value.fix], ensure_ascii=False)
                             if status == "bad" else "")
    return out


def write_source(items, path: str) -> int:
    """(record, (file, line)) pairs -> an Arrow stream file at `path` (one JSON text per record, with its file and
    line), written 10,000 at a time so the records never need to be all in memory. Returns the rows written."""
    import pyarrow as pa

    schema = pa.schema([("record", pa.large_string()), ("source", pa.string()), ("line", pa.int64())])
    items, n = iter(items), 0
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        while True:
            chunk = list(islice(items, 10_000))
            if not chunk:
                return n
            writer.write_table(pa.table({"record": [json.dumps(r, ensure_ascii=False) for r, _ in chunk],
                                         "source": [str(s[0]) for _, s in chunk], "line": [s[1] for _, s in chunk]},
                                        schema=schema))
            n += len(chunk)


def open_source(path: str):
    """The records file `write_source` wrote, memory-mapped (a datasets.Dataset with record/source/line)."""
    from datasets import Dataset

    return Dataset.from_file(path)


def source_chunks(source, indices=None, size: int = 10_000):
    """(records, sources) lists of at most `size` rows of a records file, for the given row indices (all rows when
    None), in that order."""
    idx = range(len(source)) if indices is None else indices
    for start in range(0, len(idx), size):
        part = source.select(idx[start:start + size])
        yield [json.loads(t) for t in part["record"]], list(zip(part["source"], part["line"]))


def released(records: list, sources: list):
    """(record, source) pairs, each record dropped from `records` once taken (the list keeps None)."""
    for i, src in enumerate(sources):
        rec, records[i] = records[i], None
        yield rec, tuple(src)


def encode_rows(encoder: ChatEncoder, records: list[dict], sources: list, path: str, kind: str = "sft",
                strict: bool = True, num_proc: int = 1, consume: bool = False) -> tuple["EncodedRows", dict]:
    """`encode_source` for records in a list. consume: release each record from `records` once written (the list
    is left holding None), so the Python rows and their Arrow copy are never all in memory together."""
    tmp = f"{path}.src-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        items = released(records, sources) if consume else ((r, tuple(s)) for r, s in zip(records, sources))
        write_source(items, os.path.join(tmp, "source.arrow"))
        return encode_source(encoder, open_source(os.path.join(tmp, "source.arrow")), path, kind, strict, num_proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def encode_source(encoder: ChatEncoder, source, path: str, kind: str = "sft", strict: bool = True,
                  num_proc: int = 1) -> tuple["EncodedRows", dict]:
    """Encode a records file (`open_source`) into an Arrow dataset at `path` (replaced atomically) and open it.
    Over-long rows (--truncation_strategy delete) and rows with nothing to train are dropped and counted; bad rows
    too unless `strict`.

    Returns (rows, stats) with stats {"too_long", "nothing_to_train", "bad": row counts, "reasons": the first 5 bad
    rows' messages}. Raises DataError (strict: the first bad row, file:line) and ConfigError from the template."""
    import datasets

    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    n = len(source)
    bars_were_off = datasets.are_progress_bars_disabled()
    if n < 10_000:  # a progress bar only where encoding takes a while
        datasets.disable_progress_bars()
    try:
        if not n:
            return _save_empty(path, kind), {"too_long": 0, "nothing_to_train": 0, "bad": 0, "reasons": []}
        encoded = source.map(_encode_batch, batched=True, batch_size=256, num_proc=num_proc if n >= 256 else None,
                             fn_kwargs={"encoder": encoder, "kind": kind}, remove_columns=source.column_names,
                             features=_features(kind), cache_file_name=os.path.join(tmp, "map.arrow"),
                             new_fingerprint=os.path.basename(path), desc="encoding", disable_nullable=True)
        stats = _stats(encoded, strict)
        ok = [i for i, s in enumerate(encoded["status"]) if s == "ok"]
        if not ok:  # Arrow files of zero rows do not load back
            del encoded
            return _save_empty(path, kind), stats
        kept = encoded.select(ok).remove_columns(["status", "reason"])
        kept.save_to_disk(os.path.join(tmp, "rows"))
        del encoded, kept
        shutil.rmtree(path, ignore_errors=True)
        os.replace(os.path.join(tmp, "rows"), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not bars_were_off:
            datasets.enable_progress_bars()
    return EncodedRows.open(path, kind), stats


EMPTY = "EMPTY"  # the marker of a split with no rows


def _empty(kind: str):
    from datasets import Dataset

    features = _features(kind)
    del features["status"], features["reason"]
    return Dataset.from_dict({k: [] for k in features}, features=features)


def _save_empty(path: str, kind: str) -> "EncodedRows":
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    with open(os.path.join(path, EMPTY), "w", encoding="utf-8"):
        pass
    return EncodedRows(_empty(kind), kind)


def _stats(encoded, strict: bool) -> dict:
    """Drop counts from the status column; the first bad row raised when strict."""
    statuses = encoded["status"]
    stats = {"too_long": statuses.count("too_long"), "nothing_to_train": statuses.count("nothing_to_train"),
             "bad": statuses.count("bad"), "reasons": []}
    if stats["bad"]:
        bad = [i for i, s in enumerate(statuses) if s == "bad"]
        errors = [DataError(*json.loads(r)) for r in encoded.select(bad[:5])["reason"]]
        if strict:
            raise errors[0]
        stats["reasons"] = [str(e) for e in errors]
    return stats


class EncodedRows:
    """The encoded rows of one split as a read-only sequence, read from memory-mapped Arrow on access:
    rows[i] is an Encoded (kind sft), (chosen, rejected) Encoded pair (preference) or (Encoded, desirable) (kto);
    slices give lists. `lengths()` gives every row's tokens without decoding rows."""

    def __init__(self, dataset, kind: str):
        self.dataset, self.kind = dataset, kind

    @classmethod
    def open(cls, path: str, kind: str) -> "EncodedRows":
        """Open the rows saved at `path` (memory-mapped). Raises FileNotFoundError when there are none."""
        from datasets import load_from_disk

        if os.path.isfile(os.path.join(path, EMPTY)):
            return cls(_empty(kind), kind)
        return cls(load_from_disk(path), kind)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            cols = self.dataset[i]  # {column: [values]}
            return [self._row(dict(zip(cols, values))) for values in zip(*cols.values())]
        return self._row(self.dataset[int(i)])

    def __iter__(self):
        for start in range(0, len(self), 1024):
            for r in self.dataset.select(range(start, min(start + 1024, len(self)))):
                yield self._row(r)

    def _row(self, r: dict) -> Any:
        first = Encoded(r["input_ids"], r["labels"])
        if self.kind == "preference":
            return first, Encoded(r["rejected_input_ids"], r["rejected_labels"])
        if self.kind == "kto":
            return first, bool(r["desirable"])
        return first

    def lengths(self) -> list[int]:
        """Tokens per row ([N]; chosen + rejected for pairs), from Arrow's list offsets."""
        import pyarrow.compute as pc

        table = self.dataset.with_format("arrow")[:]
        n = pc.list_value_length(table["input_ids"])
        if self.kind == "preference":
            n = pc.add(n, pc.list_value_length(table["rejected_input_ids"]))
        return n.to_pylist()

    def column(self, name: str) -> list:
        """One stored column as a list (e.g. `desirable` for KTO)."""
        return self.dataset[name]


def cached_rows(path: str, kind: str) -> Optional[EncodedRows]:
    """The rows encoded earlier at `path`, or None when there are none (or they cannot be read)."""
    if not os.path.isdir(path):
        return None
    try:
        return EncodedRows.open(path, kind)
    except (OSError, ValueError, FileNotFoundError):
        return None
