"""Load datasets: local files (.jsonl, .json, .csv, .parquet, .txt, folders of them) and hub ids, `path#N` sampling,
several datasets mixed, --columns renames, validation splits.

What lives here: what a --dataset entry names (a file, a folder of them, a hub id; `#N`), reading its rows (local
files through `tunesmith.data.files`, with their lines; parquet and hub data through pyarrow and `datasets`, with
row numbers) and handing each to `formats.normalise_row`, all at once (`load_datasets`) or, for --streaming, one
row at a time as they are asked for (`stream_records`, the same readers and rules); the rows a training method reads
(`rows_for`) and validation splits. What must not: decoding a file's format (`tunesmith.data.files`), format rules
(`tunesmith.data.formats`), tokenisation (`tunesmith.data.encode`), shuffling (the trainer's job). No torch import;
pyarrow, `datasets` and modelscope are imported only when parquet or hub data is read.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

from tunesmith.data.files import FIX_NESTING, LOCAL_SUFFIXES, READERS, RawRow
from tunesmith.data.formats import extra_columns, normalise_row
from tunesmith.errors import DataError, FlagError


@dataclass
class LoadResult:
    """Canonical records with their (source, line) each, and how many bad rows were dropped (non-strict loads).

    strict: whether a bad row found later (a row the training method cannot use, see `rows_for`) raises, as at
    load time; max_reasons: how many drop messages `reasons` keeps."""
    records: list[dict]
    sources: list[tuple[str, Optional[int]]]
    dropped: int = 0
    reasons: list[str] = field(default_factory=list)  # first few reasons for dropped rows
    strict: bool = True
    max_reasons: int = 5

    def __len__(self):
        return len(self.records)

    def drop(self, error: DataError) -> None:
        """A bad row: raised when strict, else counted (and its reason kept while there is room)."""
        if self.strict:
            raise error
        self.dropped += 1
        if len(self.reasons) < self.max_reasons:
            self.reasons.append(str(error))


def parse_spec(spec: str) -> tuple[str, Optional[str], Optional[int]]:
    """`[hf::|ms::]path_or_id[:subset][#N]` -> (path_or_id, hub prefix, N).

    path_or_id keeps any `:subset`; hub prefix is "hf", "ms" or None; N (rows to sample) is None without a numeric
    `#N` suffix (a non-numeric `#...` stays part of the path; read_spec refuses it). Never raises."""
    hub = None
    if spec.startswith(("hf::", "ms::")):
        hub, spec = spec[:2], spec[4:]
    n = None
    if "#" in spec and not os.path.exists(spec):  # a file whose name holds a '#' is that file
        base, _, num = spec.rpartition("#")
        if num.isascii() and num.isdigit():
            spec, n = base, int(num)
    return spec, hub, n


def _read_local(path: str) -> list[RawRow]:
    return list(_iter_local(path))


def folder_files(path: str) -> list[str]:
    """The data files of a folder (its tree, sorted, dot-files left out). Raises DataError when there is none, or
    when the folder or one below it cannot be read (its data would be missed without a word)."""
    refused: list[OSError] = []
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(path, onerror=refused.append) for f in fs
                   if f.lower().endswith(LOCAL_SUFFIXES) and not f.startswith("."))
    if refused:
        e = refused[0]
        raise DataError(e.filename or path, None, "", f"the folder cannot be read ({e.strerror or e}), so its data "
                        f"files cannot be listed.", "fix its permissions (chmod a+rx), or pass readable files.")
    if not files:
        raise DataError(path, None, "", "the folder holds no data files.",
                        f"put {', '.join(LOCAL_SUFFIXES)} files in it, or pass the files themselves.")
    return files


def _iter_local(path: str) -> Iterator[RawRow]:
    """The rows of a local file, or of every data file in a folder (sorted), one at a time."""
    import stat

    if os.path.isdir(path):
        for f in folder_files(path):
            yield from _iter_local(f)
        return
    try:
        mode = os.stat(path).st_mode
    except OSError as e:  # a broken link, a file removed meanwhile
        raise DataError(path, None, "", f"cannot be read ({e.strerror or e}).",
                        "check the file (a link whose target is gone?), or remove it from the folder.") from None
    if not stat.S_ISREG(mode):  # a named pipe or a device would block or never end
        raise DataError(path, None, "", "is not a regular file (a named pipe, socket or device).",
                        "pass a regular data file, or remove it from the folder.")
    suffix = os.path.splitext(path)[1].lower()
    reader = READERS.get(suffix)
    if reader is None:
        raise DataError(path, None, "", f"unsupported file type {suffix or '(none)'}.",
                        f"use one of {', '.join(LOCAL_SUFFIXES)}.")
    try:
        yield from reader(path)
    except OSError as e:  # unreadable: permissions, a special file, an I/O error
        raise DataError(path, None, "", f"cannot be read ({e.strerror or e}).",
                        "check the file's permissions, or copy it somewhere readable.") from None


def _read_hub(dataset_id: str, hub: Optional[str], use_hf: bool, hub_token: Optional[str] = None) -> list[RawRow]:
    """Rows of a hub dataset (every `:subset/subset` given, split "train"), from ModelScope (an `ms::` id, or a
    plain id unless use_hf / USE_HF=1) or the Hugging Face hub. Raises DataError when it cannot be loaded."""
    return list(_iter_hub(dataset_id, hub, use_hf, hub_token))


def _iter_hub(dataset_id: str, hub: Optional[str], use_hf: bool, hub_token: Optional[str] = None,
              streaming: bool = False) -> Iterator[RawRow]:
    """_read_hub's rows one at a time; streaming: read as they download (`datasets.load_dataset(...,
    streaming=True)`, ModelScope's use_streaming), nothing stored first."""
    name, _, subset = dataset_id.partition(":")
    subsets = [s for s in subset.split("/") if s] or [None]
    use_ms = hub == "ms" or (hub is None and not use_hf and os.environ.get("USE_HF", "0").lower() not in ("1", "true"))
    if use_ms:
        try:
            from modelscope.msdatasets import MsDataset
        except ImportError:
            if hub == "ms":
                raise DataError(f"ms::{dataset_id}", None, "", "ModelScope datasets need the modelscope package, "
                                "which is not installed.", f"pip install modelscope, or load it from the Hugging "
                                f"Face hub: hf::{dataset_id}.") from None
            from tunesmith.log import note
            note(f"--dataset {dataset_id}: modelscope is not installed; loading it from the Hugging Face hub "
                 f"instead (pip install modelscope to use ModelScope, or write hf::{dataset_id})")
            use_ms = False
    hub_name = "ModelScope" if use_ms else "the Hugging Face hub"
    for sub in subsets:
        label = f"{'ms' if use_ms else 'hf'}::{name}" + (f":{sub}" if sub else "")
        try:
            if use_ms:
                ds = MsDataset.load(name, subset_name=sub or "default", split="train", use_streaming=streaming)
                ds = ds if streaming else getattr(ds, "to_hf_dataset", lambda: ds)()
            else:
                import datasets

                ds = datasets.load_dataset(name, sub, split="train", token=hub_token, streaming=streaming)
            for i, r in enumerate(ds, 1):
                yield RawRow(r, label, i)
        except Exception as e:  # noqa: BLE001 - network, auth, not-found and format errors all end here
            first = str(e).splitlines()[0] if str(e) else ""
            local = "" if hub else "not a local file or folder, and "
            raise DataError(label, None, "", f"{local}loading it from {hub_name} failed ({type(e).__name__}: "
                            f"{first}).", "check the path, or the dataset id and your network (offline, only "
                            "datasets already in the cache load).") from None


def _looks_local(path: str) -> bool:
    return os.path.exists(path) or path.lower().endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~"))


def read_spec(spec: str, seed: int = 42, use_hf: bool = False, hub_token: Optional[str] = None,
              what: str = "--dataset") -> list[RawRow]:
    """Rows of one --dataset entry, with `#N` sampling applied (without replacement below the size, else repeated).

    Rows that cannot be read (broken JSON, invalid UTF-8, a CSV row with the wrong number of cells) come back with
    RawRow.error set: bad rows for `normalise_rows` to raise or drop.
    seed: the `#N` sampling seed; use_hf, hub_token: for hub ids (ModelScope by default, unless USE_HF=1); what: the
    flag the spec came from, named in errors.
    Returns the rows in file order (sampled rows keep their order).
    Raises:
        DataError: file not found, unsupported or unreadable file (binary, UTF-16, not parquet, broken JSON list,
            broken CSV quoting), a folder without data files, a `#N` that is not a whole number >= 1, no rows, or
            a hub id that does not load (not found, no access, no network, modelscope missing for `ms::`)."""
    path, hub, n, local = check_spec(spec, what)
    rows = _read_local(path) if local else _read_hub(path, hub, use_hf, hub_token)
    if not rows:
        raise DataError(path, None, "", "the dataset is empty.", f"add rows, or remove it from {what}.")
    if n is not None:
        rng = random.Random(seed)
        if n <= len(rows):
            rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
        else:  # ms-swift repeats the data, then samples the remainder
            reps, rem = divmod(n, len(rows))
            rows = rows * reps + [rows[i] for i in sorted(rng.sample(range(len(rows)), rem))]
    return rows


def check_spec(spec: str, what: str = "--dataset") -> tuple[str, Optional[str], Optional[int], bool]:
    """(path or id, hub prefix, N of `#N`, whether it is local) for one --dataset entry. Raises DataError for a `#N`
    that is not a whole number >= 1 and a local file that does not exist."""
    path, hub, n = parse_spec(spec)
    if not path.strip():
        raise FlagError(f"an empty dataset name ({spec!r}) in --dataset or --val_dataset; give a data file, a "
                        f"folder or a hub id (or leave the empty value out)")
    if n is None and "#" in path and not os.path.exists(path):
        base, _, num = path.rpartition("#")
        if base and not (_looks_local(base) and not os.path.exists(base)):
            raise DataError(spec, None, "", f"'#{num}' is not a number of rows: `PATH#N` samples N rows.",
                            "write a whole number >= 1 after the #, e.g. data.jsonl#500, or drop the #.")
        if base:
            path = base  # a missing file: say so below
    if n == 0:
        raise DataError(spec, None, "", "'#0' samples no rows.", "use #N with N >= 1, or drop the #0.")
    local = hub is None and _looks_local(path)
    if local and not os.path.exists(path):
        raise DataError(path, None, "", "file not found.", f"check the path given to {what}.")
    return path, hub, n, local


def iter_spec(spec: str, use_hf: bool = False, hub_token: Optional[str] = None) -> Iterator[RawRow]:
    """--streaming: the rows of one --dataset entry, read one at a time as they are asked for (local files row by
    row, hub datasets as they download). `path#N` takes the first N rows, from the start again while there are
    fewer (the size of a stream is not known up front, so it is not sampled as read_spec samples it).

    The spec is checked now (read_spec's errors: a bad `#N`, a missing file); reading errors, and an empty
    dataset, raise DataError when the rows are read."""
    path, hub, n, local = check_spec(spec)

    def rows() -> Iterator[RawRow]:
        return _iter_local(path) if local else _iter_hub(path, hub, use_hf, hub_token, streaming=True)
    return _take(rows, n, path)


def _take(rows: Callable[[], Iterator[RawRow]], n: Optional[int], path: str) -> Iterator[RawRow]:
    """The rows of `rows()`, or its first n (reading it again from the start while there are fewer)."""
    count = 0
    while True:
        before = count
        for rr in rows():
            yield rr
            count += 1
            if count == n:
                return
        if count == 0:
            raise DataError(path, None, "", "the dataset is empty.", "add rows, or remove it from --dataset.")
        if n is None or count == before:
            return


def normalise_rows(raw: Iterable[RawRow], strict: bool = True, columns: Optional[dict] = None,
                   need_reply: bool = True, max_reasons: int = 5, keep_columns: bool = False) -> LoadResult:
    """Normalise every row. strict: the first bad row raises. Otherwise bad rows are dropped and counted.
    keep_columns: each record also carries "columns", the row's other columns (see formats.extra_columns).

    columns, need_reply: as formats.normalise_row. max_reasons: how many drop messages to keep in `reasons`.
    A row that could not be read (RawRow.error) is a bad row like one that does not normalise.
    Raises DataError (strict only): the first bad row."""
    result = LoadResult([], [], strict=strict, max_reasons=max_reasons)
    for rr in raw:
        try:
            rec = normalise_one(rr, columns, need_reply)
        except DataError as e:
            result.drop(e)
            continue
        if keep_columns:
            rec["columns"] = extra_columns(rr.row, columns)
        result.records.append(rec)
        result.sources.append((rr.source, rr.line))
    return result


def normalise_one(rr: RawRow, columns: Optional[dict] = None, need_reply: bool = True) -> dict:
    """One row as read -> its canonical record (formats.normalise_row). Raises DataError: a row that could not be
    read (RawRow.error), does not normalise, or is nested too deeply."""
    if rr.error is not None:
        raise rr.error
    try:
        return normalise_row(rr.row, rr.source, rr.line, columns=columns, need_reply=need_reply)
    except RecursionError:
        raise DataError(rr.source, rr.line, "", "nested too deeply to read.", FIX_NESTING) from None


def stream_records(specs: list[str], tally: LoadResult, *, columns: Optional[dict] = None, use_hf: bool = False,
                   hub_token: Optional[str] = None, shape: Optional[Callable[[LoadResult], LoadResult]] = None,
                   keep_columns: bool = False) -> Iterator[tuple[dict, tuple]]:
    """--streaming: (record, (source, line)) for every row of `specs` in order, read, normalised and shaped one row
    at a time, never all in memory. shape: the training method's rules on a LoadResult (`method.shape_records`,
    e.g. rows_for), applied to each row alone. Bad rows go to `tally`: raised when `tally.strict` (file:line),
    else dropped and counted there. Every spec is checked now (iter_spec); the rows are read as asked for.
    keep_columns: each record carries the row's other columns under "columns" (as load_datasets')."""
    streams = [iter_spec(spec, use_hf=use_hf, hub_token=hub_token) for spec in specs]
    return _records(streams, tally, columns, shape, keep_columns)


def _records(streams: list, tally: LoadResult, columns: Optional[dict], shape,
             keep_columns: bool = False) -> Iterator[tuple[dict, tuple]]:
    for stream in streams:
        for rr in stream:
            try:
                rec = normalise_one(rr, columns)
            except DataError as e:
                tally.drop(e)
                continue
            if keep_columns:
                rec["columns"] = extra_columns(rr.row, columns)
            one = LoadResult([rec], [(rr.source, rr.line)], strict=tally.strict)
            shaped = shape(one) if shape else one
            tally.dropped += shaped.dropped
            tally.reasons += shaped.reasons[:max(0, tally.max_reasons - len(tally.reasons))]
            yield from zip(shaped.records, shaped.sources)


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
        raw.extend(read_spec(spec, seed=seed, use_hf=use_hf, hub_token=hub_token, what=what))
    result = normalise_rows(raw, strict=strict, columns=columns, need_reply=need_reply, keep_columns=keep_columns)
    if not result.records:
        detail = f" All {result.dropped} rows were bad; first reasons:\n  " + "\n  ".join(result.reasons) \
            if result.dropped else ""
        raise DataError(" ".join(specs), None, "", f"no usable rows in {what}.{detail}",
                        "fix the rows above (run `tunesmith data validate --dataset ...` to list every problem).")
    return result


def map_records(loaded: LoadResult, fn: Callable[[dict, tuple], list]) -> LoadResult:
    """A new LoadResult of `fn(record, (source, line))` for every record: the records to keep in its place (none,
    the record, a rewrite, several). A DataError from fn is a bad row: raised when `loaded.strict`, else dropped and
    counted on top of `loaded`'s drops."""
    out = LoadResult([], [], loaded.dropped, list(loaded.reasons), loaded.strict, loaded.max_reasons)
    for rec, src in zip(loaded.records, loaded.sources):
        try:
            new = fn(rec, src)
        except DataError as e:
            out.drop(e)
            continue
        out.records += new
        out.sources += [src] * len(new)
    return out


def _pair_only(rec: dict, src: tuple) -> list[dict]:
    if "rejected_messages" not in rec:
        if "label" in rec:  # an unpaired, labelled reply: KTO's data, not a pair
            raise DataError(src[0], src[1], "rejected_response", "is missing: this row is a single reply with a "
                            "label (KTO's unpaired form), and this method trains on pairs.",
                            "train it with --rlhf_type kto, or give each row a rejected reply.")
        raise DataError(src[0], src[1], "rejected_response", "is missing or null: preference training needs a "
                        "rejected reply for every row.", "add rejected_response (or use prompt/chosen/rejected).")
    return [rec]


def _kto_rows(rec: dict, src: tuple) -> list[dict]:
    if "label" in rec:
        return [{k: v for k, v in rec.items() if k not in ("rejected_messages", "rejected_images")}]
    if "rejected_messages" in rec:
        tools = {"tools": rec["tools"]} if "tools" in rec else {}
        images = rec.get("images")
        rejected_images = rec.get("rejected_images", images)
        return [{"messages": rec["messages"], "label": True, **tools, **({"images": images} if images else {})},
                {"messages": rec["rejected_messages"], "label": False, **tools,
                 **({"images": rejected_images} if rejected_images else {})}]
    raise DataError(src[0], src[1], "label", "is missing or null: KTO needs each reply labelled desirable or not.",
                    'add "label": true or false (or give chosen/rejected pairs).')


def rows_for(loaded: LoadResult, kind: str) -> LoadResult:
    """The loaded records as a training method's `rows` kind reads them: "sft" every row as loaded; "preference"
    every row a pair (a row without a rejected reply is a bad row); "kto" single replies labelled desirable or not
    (a labelled row stays, a pair becomes its chosen reply, desirable, and its rejected reply, undesirable, each
    with its pictures: the rejected one's `rejected_images` when it has its own; a row with neither is a bad row).
    Bad rows raise when `loaded.strict`, else are dropped and counted (map_records).
    `tunesmith data validate --rlhf` and training both check rows through here."""
    if kind == "preference":
        return map_records(loaded, _pair_only)
    if kind == "kto":
        return map_records(loaded, _kto_rows)
    return loaded


def split_indices(n: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) row indices, each ascending: max(int(n * ratio), 1) rows split off for validation by a
    seeded shuffle (ms-swift's rule). Raises DataError when the split would leave no training rows."""
    n_val = max(int(n * ratio), 1)
    if n_val >= n:
        raise DataError("--split_dataset_ratio", None, "",
                        f"splitting {n} rows at ratio {ratio} leaves no training rows.",
                        "add data, lower the ratio, or pass --val_dataset.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_train_val(result: LoadResult, ratio: float, seed: int) -> tuple[LoadResult, LoadResult]:
    """Split off max(int(n * ratio), 1) validation rows, seeded (ms-swift's rule; `split_indices`).

    ratio: validation fraction (0-1). Returns (train, val), each in the original order; `dropped`/`reasons` are not
    carried over (`strict` is). Raises DataError when the split would leave no training rows."""
    train_idx, val_idx = split_indices(len(result.records), ratio, seed)

    def pick(idx):
        return LoadResult([result.records[i] for i in idx], [result.sources[i] for i in idx],
                          strict=result.strict, max_reasons=result.max_reasons)
    return pick(train_idx), pick(val_idx)


def interleave_order(groups: list[list[int]], probabilities: list[float], seed: int,
                     stopping_strategy: str = "first_exhausted") -> list[int]:
    """--interleave_prob: the rows (indices) that interleaving the datasets `groups` (each a list of row indices,
    in order) gives, as Hugging Face datasets' `interleave_datasets(…, probabilities, seed, stopping_strategy)`
    does — it is computed by that function over the index lists: each next row comes from dataset k with
    probability p_k (numpy's default_rng(seed)), in each dataset's order; first_exhausted stops when one dataset
    runs out, all_exhausted when every one has run out at least once (the others start over, so rows repeat)."""
    from datasets import Dataset, interleave_datasets

    parts = [Dataset.from_dict({"i": list(g)}) for g in groups]
    mixed = interleave_datasets(parts, probabilities=list(probabilities), seed=seed,
                                stopping_strategy=stopping_strategy)
    return list(mixed["i"])


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write records atomically (temp file, then rename): a crash never leaves half a file.

    One JSON object per line, UTF-8, non-ASCII kept as is; parent folders are created. Raises OSError (and
    TypeError for a record that is not JSON-serialisable)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
