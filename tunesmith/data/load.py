"""Load datasets: local files (.jsonl, .json, .csv, .parquet, .txt, folders of them) and hub ids, `path#N` sampling,
several datasets mixed, --columns renames, validation splits.

Local JSON/JSONL/CSV/TXT are read here rather than through `datasets` because every row must keep the line it came
from: a bad row is reported as file:line, and `datasets`' json loader also refuses rows whose schemas differ
(common in chat data, where some messages carry `loss` or `reasoning_content`). Parquet and hub data go through
`datasets` (row numbers are reported instead of lines).

What lives here: reading rows and handing each to `formats.normalise_row`. What must not: format rules
(`tunesmith.data.formats`), tokenisation (`tunesmith.data.encode`), shuffling (the trainer's job). No torch import;
pyarrow, `datasets` and modelscope are imported only when parquet or hub data is read.
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from tunesmith.data.formats import extra_columns, normalise_row
from tunesmith.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass
class RawRow:
    """One row as read, before normalisation: the decoded object and where it came from."""
    row: Any
    source: str
    line: Optional[int]  # 1-based line in the file, or row number for parquet/hub data


@dataclass
class LoadResult:
    """Canonical records with their (source, line) each, and how many bad rows were dropped (non-strict loads)."""
    records: list[dict]
    sources: list[tuple[str, Optional[int]]]
    dropped: int = 0
    reasons: list[str] = field(default_factory=list)  # first few reasons for dropped rows

    def __len__(self):
        return len(self.records)


def parse_spec(spec: str) -> tuple[str, Optional[str], Optional[int]]:
    """`[hf::|ms::]path_or_id[:subset][#N]` -> (path_or_id, hub prefix, N).

    path_or_id keeps any `:subset`; hub prefix is "hf", "ms" or None; N (rows to sample) is None without a numeric
    `#N` suffix (a non-numeric `#...` stays part of the path). Never raises."""
    hub = None
    if spec.startswith(("hf::", "ms::")):
        hub, spec = spec[:2], spec[4:]
    n = None
    if "#" in spec:
        base, _, num = spec.rpartition("#")
        if num.isdigit():
            spec, n = base, int(num)
    return spec, hub, n


# ----------------------------------------------------------------- readers

def _read_jsonl(path: str, errors: Optional[list] = None) -> Iterator[RawRow]:
    """JSON lines. With `errors`, broken lines are collected there and reading goes on (for `data validate`)."""
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                yield RawRow(json.loads(text), path, lineno)
            except json.JSONDecodeError as e:
                err = DataError(path, lineno, "", f"broken JSON at column {e.colno}: {e.msg}.",
                                "each line must be one complete JSON object (check quotes, commas and brackets).")
                if errors is None:
                    raise err from None
                errors.append(err)


def _read_json(path: str) -> Iterator[RawRow]:
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped[0] != "[":
        # either one object, or JSON lines in a .json file (ms-swift accepts both)
        try:
            obj = json.loads(text)
            yield RawRow(obj, path, text[: len(text) - len(stripped)].count("\n") + 1)
            return
        except json.JSONDecodeError:
            yield from _read_jsonl(path)
            return
    # A JSON list: decode element by element so that every row knows its line.
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)

    def skip_ws(p):
        """The first offset at or after p that is not JSON whitespace."""
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        line = text.count("\n", 0, pos) + 1
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, "", f"broken JSON at column {e.colno}: {e.msg}.",
                            "check quotes, commas and brackets around this line.") from None
        yield RawRow(obj, path, line)
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        raise DataError(path, line, "", "broken JSON: expected ',' or ']' between list items.",
                        "separate the objects with commas and close the list with ].")


def _read_csv(path: str) -> Iterator[RawRow]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            # like ms-swift (na_filter=False): empty cells stay empty strings
            yield RawRow({k: v for k, v in row.items() if k is not None}, path, reader.line_num)


def _read_txt(path: str) -> Iterator[RawRow]:
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, text in enumerate(fh, 1):
            text = text.rstrip("\n")
            if text.strip():
                yield RawRow({"text": text}, path, lineno)


def _read_parquet(path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist(), 1):
        yield RawRow(row, path, i)


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_txt,
           ".parquet": _read_parquet}


def _read_local(path: str) -> list[RawRow]:
    if os.path.isdir(path):
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs
                       if f.lower().endswith(LOCAL_SUFFIXES) and not f.startswith("."))
        if not files:
            raise DataError(path, None, "", "the folder holds no data files.",
                            f"put {', '.join(LOCAL_SUFFIXES)} files in it, or pass the files themselves.")
        rows = []
        for f in files:
            rows.extend(_read_local(f))
        return rows
    suffix = os.path.splitext(path)[1].lower()
    reader = READERS.get(suffix)
    if reader is None:
        raise DataError(path, None, "", f"unsupported file type {suffix or '(none)'}.",
                        f"use one of {', '.join(LOCAL_SUFFIXES)}.")
    return list(reader(path))


def _read_hub(dataset_id: str, hub: Optional[str], use_hf: bool, hub_token: Optional[str] = None) -> list[RawRow]:
    name, _, subset = dataset_id.partition(":")
    subsets = [s for s in subset.split("/") if s] or [None]
    use_ms = hub == "ms" or (hub is None and not use_hf and os.environ.get("USE_HF", "0") not in ("1", "true"))
    rows: list[RawRow] = []
    for sub in subsets:
        if use_ms:
            try:
                from modelscope.msdatasets import MsDataset
            except ImportError:
                use_ms = False
            else:
                ds = MsDataset.load(name, subset_name=sub or "default", split="train")
                ds = getattr(ds, "to_hf_dataset", lambda: ds)()
        if not use_ms:
            import datasets

            ds = datasets.load_dataset(name, sub, split="train", token=hub_token)
        label = f"{'ms' if use_ms else 'hf'}::{name}" + (f":{sub}" if sub else "")
        rows.extend(RawRow(r, label, i) for i, r in enumerate(ds, 1))
    return rows


def read_spec(spec: str, seed: int = 42, use_hf: bool = False, hub_token: Optional[str] = None,
              errors: Optional[list] = None) -> list[RawRow]:
    """Rows of one --dataset entry, with `#N` sampling applied (without replacement below the size, else repeated).

    With `errors`, broken JSON lines of .jsonl files are collected there instead of stopping the read.
    seed: the `#N` sampling seed; use_hf, hub_token: for hub ids (ModelScope by default, unless USE_HF=1).
    Returns the rows in file order (sampled rows keep their order).
    Raises:
        DataError: file not found, unsupported file type, a folder without data files, broken JSON, or no rows.
        Hub ids: whatever `datasets.load_dataset` / `MsDataset.load` raise (not found, no access, no network)."""
    path, hub, n = parse_spec(spec)
    if hub is None and (os.path.exists(path) or path.lower().endswith(LOCAL_SUFFIXES) or path.startswith((".", "/"))):
        if not os.path.exists(path):
            raise DataError(path, None, "", "file not found.", "check the path given to --dataset.")
        if errors is not None and path.lower().endswith(".jsonl"):
            rows = list(_read_jsonl(path, errors))
        else:
            rows = _read_local(path)
    else:
        rows = _read_hub(path, hub, use_hf, hub_token)
    if not rows and not errors:
        raise DataError(path, None, "", "the dataset is empty.", "add rows, or remove it from --dataset.")
    if n is not None and rows:
        rng = random.Random(seed)
        if n <= len(rows):
            rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
        else:  # ms-swift repeats the data, then samples the remainder
            reps, rem = divmod(n, len(rows))
            rows = rows * reps + [rows[i] for i in sorted(rng.sample(range(len(rows)), rem))]
    return rows


def normalise_rows(raw: Iterable[RawRow], strict: bool = True, columns: Optional[dict] = None,
                   need_reply: bool = True, max_reasons: int = 5, keep_columns: bool = False) -> LoadResult:
    """Normalise every row. strict: the first bad row raises. Otherwise bad rows are dropped and counted.
    keep_columns: each record also carries "columns", the row's other columns (see formats.extra_columns).

    columns, need_reply: as formats.normalise_row. max_reasons: how many drop messages to keep in `reasons`.
    Raises DataError (strict only): the first row that does not normalise."""
    result = LoadResult([], [])
    for rr in raw:
        try:
            rec = normalise_row(rr.row, rr.source, rr.line, columns=columns, need_reply=need_reply)
        except DataError as e:
            if strict:
                raise
            result.dropped += 1
            if len(result.reasons) < max_reasons:
                result.reasons.append(str(e))
            continue
        if keep_columns:
            rec["columns"] = extra_columns(rr.row, columns)
        result.records.append(rec)
        result.sources.append((rr.source, rr.line))
    return result


def load_datasets(specs: list[str], *, strict: bool = True, columns: Optional[dict] = None, seed: int = 42,
                  need_reply: bool = True, use_hf: bool = False, hub_token: Optional[str] = None,
                  what: str = "--dataset", keep_columns: bool = False) -> LoadResult:
    """Load and normalise several dataset specs into one list (in order; shuffling is the trainer's job).
    keep_columns: records carry the rows' other columns under "columns" (for `tunesmith infer`).

    specs: --dataset entries (see read_spec); what: the flag named in errors. Other arguments as read_spec and
    normalise_rows.
    Raises DataError: any read error (read_spec), the first bad row when strict, or no usable rows at all."""
    raw: list[RawRow] = []
    for spec in specs:
        raw.extend(read_spec(spec, seed=seed, use_hf=use_hf, hub_token=hub_token))
    result = normalise_rows(raw, strict=strict, columns=columns, need_reply=need_reply, keep_columns=keep_columns)
    if not result.records:
        detail = f" All {result.dropped} rows were bad; first reasons:\n  " + "\n  ".join(result.reasons) \
            if result.dropped else ""
        raise DataError(" ".join(specs), None, "", f"no usable rows in {what}.{detail}",
                        "fix the rows above (run `tunesmith data validate --dataset ...` to list every problem).")
    return result


def split_train_val(result: LoadResult, ratio: float, seed: int) -> tuple[LoadResult, LoadResult]:
    """Split off max(int(n * ratio), 1) validation rows, seeded (ms-swift's rule).

    ratio: validation fraction (0-1). Returns (train, val), each in the original order; `dropped`/`reasons` are not
    carried over. Raises DataError when the split would leave no training rows."""
    n = len(result.records)
    n_val = max(int(n * ratio), 1)
    if n_val >= n:
        raise DataError("--split_dataset_ratio", None, "",
                        f"splitting {n} rows at ratio {ratio} leaves no training rows.",
                        "add data, lower the ratio, or pass --val_dataset.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    pick = lambda idx: LoadResult([result.records[i] for i in idx], [result.sources[i] for i in idx])  # noqa: E731
    return pick(train_idx), pick(val_idx)


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write records atomically (temp file, then rename): a crash never leaves half a file.

    One JSON object per line, UTF-8, non-ASCII kept as is; parent folders are created. Raises OSError (and
    TypeError for a record that is not JSON-serialisable)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
