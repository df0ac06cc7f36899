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

STORE_VERSION = 5  # bump when the stored layout or the encoding changes meaning


def datasets_cache() -> str:
    """The datasets cache folder as `datasets` finds it (HF_DATASETS_CACHE, else HF_HOME/datasets, else
    XDG_CACHE_HOME/huggingface/datasets, else ~/.cache/huggingface/datasets), without importing it."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "datasets")


def cache_problem() -> Optional[str]:
    """Why the encoded data cannot be kept under the datasets cache (`unwritable`), as one flag-style problem
    naming HF_DATASETS_CACHE, or None."""
    from tunesmith.files import unwritable

    base = datasets_cache()
    why = unwritable(os.path.join(base, "tunesmith-encoded"), folder=True)
    return (f"HF_DATASETS_CACHE={base}: {why}. tunesmith keeps the encoded data there; set HF_DATASETS_CACHE to "
            f"a writable folder with room") if why else None


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

    cols = {"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
            "images": Sequence(Value("string"))}  # the pictures' references (paths, URLs), never their pixels
    if kind == "preference":
        cols.update(rejected_input_ids=Sequence(Value("int32")), rejected_labels=Sequence(Value("int32")),
                    rejected_images=Sequence(Value("string")),
                    margin=Value("float64"))  # NaN: the row gives none
    if kind == "kto":
        cols["desirable"] = Value("bool")
    if kind == "sft":
        cols["channel"] = Value("string")  # --enable_channel_loss; None: the row gives none
        cols["tag"] = Value("string")  # GKD's teacher routing tag (the record's "tag"); None: none
    return Features({**cols, "status": Value("string"), "reason": Value("string")})


def _encode_batch(batch: dict, records: "RecordsFile", encoder: ChatEncoder, kind: str) -> dict:
    """datasets.map function over ranges of the records file (`batch` holds "start"/"stop" row numbers): its rows ->
    token columns, with status ok | too_long | nothing_to_train | bad and, for bad rows, the DataError's parts as JSON
    [file, line, field, problem, fix]. The records are read here, a range at a time, so a worker never keeps the
    records file mapped (see RecordsFile)."""
    out: dict = {k: [] for k in _features(kind)}
    for start, stop in zip(batch["start"], batch["stop"]):
        texts, places = records.read(range(start, stop), parse=False)
        for text, (src, line) in zip(texts, places):
            status, value = encode_one(encoder, json.loads(text), kind)
            if status != "ok":
                first = second = None
            else:  # sft: one Encoded; preference: (chosen, rejected); kto: (Encoded, desirable)
                first, second = (value, None) if kind == "sft" else value
            out["input_ids"].append(first.input_ids if first else [])
            out["labels"].append(first.labels if first else [])
            out["images"].append(first.images or [] if first else [])
            if kind == "preference":
                out["rejected_input_ids"].append(second.input_ids if first else [])
                out["rejected_labels"].append(second.labels if first else [])
                out["rejected_images"].append(second.images or [] if first else [])
                out["margin"].append(first.margin if first and first.margin is not None else float("nan"))
            if kind == "kto":
                out["desirable"].append(bool(second) if first else False)
            if kind == "sft":
                out["channel"].append(first.channel if first else None)
                out["tag"].append(first.tag if first else None)
            out["status"].append(status)
            out["reason"].append(json.dumps([src, line, value.field, value.problem, value.fix], ensure_ascii=False)
                                 if status == "bad" else "")
    return out


ROWS_PER_BATCH = 2000  # rows per Arrow record batch of a records file: the unit read back


def write_source(items, path: str) -> int:
    """(record, (file, line)) pairs -> an Arrow IPC file at `path` (one JSON text per record, with its file and
    line), written ROWS_PER_BATCH at a time so the records never need to be all in memory. Returns the rows
    written; read it back with RecordsFile."""
    import pyarrow as pa

    schema = pa.schema([("record", pa.large_string()), ("source", pa.string()), ("line", pa.int64())],
                       metadata={"rows_per_batch": str(ROWS_PER_BATCH)})
    items, n = iter(items), 0
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        while True:
            chunk = list(islice(items, ROWS_PER_BATCH))
            if not chunk:
                return n
            writer.write_table(pa.table({"record": [json.dumps(r, ensure_ascii=False) for r, _ in chunk],
                                         "source": [str(s[0]) for _, s in chunk], "line": [s[1] for _, s in chunk]},
                                        schema=schema), max_chunksize=ROWS_PER_BATCH)
            n += len(chunk)


class RecordsFile:
    """The records `write_source` wrote, read a few batches at a time. Each read maps the file, copies out the
    rows asked for and unmaps it again: a file read once from end to end is never all resident in the process
    (a kept memory map would count every page read in the process's RSS, ~1.5 KiB per chat row)."""

    def __init__(self, path: str):
        import pyarrow as pa

        self.path = path
        with pa.memory_map(path) as mm:
            reader = pa.ipc.open_file(mm)
            self.batches = reader.num_record_batches
            self.per_batch = int(reader.schema.metadata[b"rows_per_batch"])
            self.n = (self.batches - 1) * self.per_batch + reader.get_batch(self.batches - 1).num_rows \
                if self.batches else 0

    def __len__(self) -> int:
        return self.n

    def read(self, indices, parse: bool = True) -> tuple[list, list]:
        """(records, [(file, line)]) of the rows `indices` (ascending or not), in that order. parse=False gives
        the records' JSON texts."""
        import numpy as np
        import pyarrow as pa

        idx = np.asarray(indices, dtype=np.int64)
        if not len(idx):
            return [], []
        first, last = int(idx.min()) // self.per_batch, int(idx.max()) // self.per_batch
        with pa.memory_map(self.path) as mm:
            reader = pa.ipc.open_file(mm)
            table = pa.Table.from_batches([reader.get_batch(b) for b in range(first, last + 1)])
            cols = table.take(pa.array(idx - first * self.per_batch)).to_pydict()
            del table, reader
        records = [json.loads(t) for t in cols["record"]] if parse else cols["record"]
        return records, list(zip(cols["source"], cols["line"]))

    def chunks(self, indices=None, size: int = ROWS_PER_BATCH):
        """(records, sources) lists of at most `size` rows, for the given row indices (all rows when None), in
        that order."""
        idx = range(self.n) if indices is None else indices
        for start in range(0, len(idx), size):
            yield self.read(idx[start:start + size])


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
        return encode_source(encoder, RecordsFile(os.path.join(tmp, "source.arrow")), path, kind, strict, num_proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


RANGE = 250  # records per datasets.map input row; divides ROWS_PER_BATCH, so a range reads one record batch
FILES = "files.json"  # the Arrow files of an encoded split, in order


def encode_source(encoder: ChatEncoder, source: RecordsFile, path: str, kind: str = "sft", strict: bool = True,
                  num_proc: int = 1) -> tuple["EncodedRows", dict]:
    """Encode a records file into Arrow files at `path` (replaced atomically) and open them. Over-long rows
    (--truncation_strategy delete) and rows with nothing to train are dropped and counted; bad rows too unless
    `strict`. The map's output is kept as written (with its status column; the rows that are not "ok" are skipped
    on reading), so the encoded tokens are written once and never copied.

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
        starts = list(range(0, n, RANGE))
        ranges = datasets.Dataset.from_dict({"start": starts, "stop": [min(s + RANGE, n) for s in starts]})
        encoded = ranges.map(_encode_batch, batched=True, batch_size=1,
                             num_proc=num_proc if len(starts) > 1 else None,
                             fn_kwargs={"records": source, "encoder": encoder, "kind": kind},
                             remove_columns=ranges.column_names, features=_features(kind),
                             cache_file_name=os.path.join(tmp, "map.arrow"), new_fingerprint=os.path.basename(path),
                             desc=f"encoding {n} rows ({RANGE} a step)", disable_nullable=True)
        stats = _stats(encoded, strict)
        files = [os.path.basename(f["filename"]) for f in encoded.cache_files]
        del encoded
        with open(os.path.join(tmp, FILES), "w", encoding="utf-8") as fh:
            json.dump(files, fh)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not bars_were_off:
            datasets.enable_progress_bars()
    return EncodedRows.open(path, kind), stats


EMPTY = "EMPTY"  # the marker of a split with no rows


def _empty(kind: str):
    from datasets import Dataset

    return Dataset.from_dict({k: [] for k in _features(kind)}, features=_features(kind))


def _save_empty(path: str, kind: str) -> "EncodedRows":
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    with open(os.path.join(path, EMPTY), "w", encoding="utf-8"):
        pass
    return EncodedRows(_empty(kind), kind)


def _stats(encoded, strict: bool) -> dict:
    """Drop counts from the status column (counted in Arrow); the first bad row raised when strict."""
    import numpy as np
    import pyarrow.compute as pc

    status = encoded.data.column("status")
    counts = {c["values"].as_py(): c["counts"].as_py() for c in pc.value_counts(status)}
    stats = {"too_long": counts.get("too_long", 0), "nothing_to_train": counts.get("nothing_to_train", 0),
             "bad": counts.get("bad", 0), "reasons": []}
    if stats["bad"]:
        bad = np.flatnonzero(pc.equal(status, "bad").to_numpy(zero_copy_only=False))[:5]
        errors = [DataError(*json.loads(r)) for r in encoded.data.column("reason").take(bad).to_pylist()]
        if strict:
            raise errors[0]
        stats["reasons"] = [str(e) for e in errors]
    return stats


class EncodedRows:
    """The encoded rows of one split as a read-only sequence, read from memory-mapped Arrow on access:
    rows[i] is an Encoded (kind sft), (chosen, rejected) Encoded pair (preference) or (Encoded, desirable) (kto);
    slices give lists. `lengths()` gives every row's tokens without decoding rows. Only rows whose status is "ok"
    are rows (`keep`: their positions in the stored files; None when all are)."""

    def __init__(self, dataset, kind: str, keep=None):
        self.dataset, self.kind, self.keep = dataset, kind, keep

    @classmethod
    def open(cls, path: str, kind: str) -> "EncodedRows":
        """Open the rows saved at `path` (memory-mapped). Raises FileNotFoundError when there are none."""
        import numpy as np
        import pyarrow.compute as pc
        from datasets import Dataset, concatenate_datasets

        if os.path.isfile(os.path.join(path, EMPTY)):
            return cls(_empty(kind), kind)
        with open(os.path.join(path, FILES), encoding="utf-8") as fh:
            files = json.load(fh)
        dataset = concatenate_datasets([Dataset.from_file(os.path.join(path, f)) for f in files])
        ok = pc.equal(dataset.data.column("status"), "ok").to_numpy(zero_copy_only=False)
        return cls(dataset, kind, None if ok.all() else np.flatnonzero(ok))

    def __len__(self) -> int:
        return len(self.dataset) if self.keep is None else len(self.keep)

    def _at(self, ids) -> list[int]:
        return list(ids) if self.keep is None else self.keep[list(ids)].tolist()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._rows(self._at(range(len(self))[i]))
        return self._row(self.dataset[self._at([range(len(self))[i]])[0]])

    def __iter__(self):
        for start in range(0, len(self), 1024):
            yield from self._rows(self._at(range(start, min(start + 1024, len(self)))))

    def _rows(self, positions: list[int]) -> list:
        if not positions:
            return []
        cols = self.dataset[positions]  # {column: [values]}
        return [self._row(dict(zip(cols, values))) for values in zip(*cols.values())]

    def _row(self, r: dict) -> Any:
        first = Encoded(r["input_ids"], r["labels"], images=r.get("images") or None)
        if self.kind == "preference":
            margin = r.get("margin")
            first.margin = None if margin is None or margin != margin else margin  # NaN: none given
            return first, Encoded(r["rejected_input_ids"], r["rejected_labels"],
                                  images=r.get("rejected_images") or None)
        if self.kind == "kto":
            return first, bool(r["desirable"])
        first.channel, first.tag = r.get("channel"), r.get("tag")
        return first

    def _column(self, array):
        """A per-stored-row Arrow array restricted to the rows."""
        return array if self.keep is None else array.take(self.keep)

    def lengths(self) -> list[int]:
        """Tokens per row ([N]; chosen + rejected for pairs), from Arrow's list offsets."""
        import pyarrow.compute as pc

        n = pc.list_value_length(self.dataset.data.column("input_ids"))
        if self.kind == "preference":
            n = pc.add(n, pc.list_value_length(self.dataset.data.column("rejected_input_ids")))
        return self._column(n).to_pylist()

    def column(self, name: str) -> list:
        """One stored column as a list (e.g. `desirable` for KTO)."""
        return self._column(self.dataset.data.column(name)).to_pylist()


def cache_entries() -> list[dict]:
    """The encoded datasets in the cache, least recently used first: [{"path", "bytes", "last_used" (epoch
    seconds: when last written or reused)}]."""
    root = cache_root()
    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
                   if os.path.isfile(os.path.join(d, f)))
        out.append({"path": path, "bytes": size, "last_used": os.path.getmtime(path)})
    return sorted(out, key=lambda e: e["last_used"])


def mark_used(path: str) -> None:
    """Record that the entry at `path` was reused now (its folder's time; `tunesmith data cache` reads it)."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves
        pass


def cached_rows(path: str, kind: str) -> Optional[EncodedRows]:
    """The rows encoded earlier at `path`, or None when there are none (or they cannot be read)."""
    if not os.path.isdir(path):
        return None
    try:
        return EncodedRows.open(path, kind)
    except (OSError, ValueError, FileNotFoundError):
        return None
