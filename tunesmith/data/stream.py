"""--streaming: training rows read, encoded and (with --packing) packed on the fly, one pass per epoch, for corpora
that do not fit on disk or in memory once encoded.

`StreamingRows` is the training data when it streams: it has no length (its size is known only at the end of a
pass), and `epoch(seed, shuffle)` reads the --dataset specs again from the start (load.stream_records: the same
readers, row normaliser and method rules as up-front loading), optionally shuffles within a buffer (datasets'
IterableDataset.shuffle), encodes each row (encode.encode_one, as the Arrow store does) and, with packing, packs a
buffer of rows at a time (collate.pack_groups). The loop cuts what it yields into batches (train/loop.py).

What lives here: the per-pass pipeline and its drop counts. What must not: reading files (load.py), tokenisation
(encode.py), batching (collate.py, the loop).
"""
from __future__ import annotations

import random
from itertools import islice
from typing import Any, Callable, Iterator, Optional

from tunesmith.data.collate import pack_groups
from tunesmith.data.encode import ChatEncoder, encode_one
from tunesmith.data.load import LoadResult
from tunesmith.errors import DataError

PACK_BUFFER_ROWS = 1000  # --packing with --streaming packs this many encoded rows at a time


def buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """`items` shuffled within a buffer of `size` (datasets' IterableDataset.shuffle(buffer_size)): once the buffer
    is full, each new item replaces a random one, which is yielded; the rest come out shuffled at the end."""
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf


def pack_stream(rows: Iterator, capacity: int, length: Callable[[Any], int], rng: Optional[random.Random] = None,
                buffer: int = PACK_BUFFER_ROWS) -> Iterator[list]:
    """--packing on a stream: groups of rows filling `capacity` tokens (pack_groups, best-fit decreasing), packed
    `buffer` rows at a time; each group is a list of rows. rng: the groups of each buffer come out in a shuffled
    order (else pack_groups' order)."""
    while True:
        buf = list(islice(rows, buffer))
        if not buf:
            return
        groups = pack_groups([length(r) for r in buf], capacity)
        if rng is not None:
            rng.shuffle(groups)
        for g in groups:
            yield [buf[i] for i in g]


class StreamingRows:
    """The training rows of --streaming, never all in memory and without a length.

    records(tally) -> iterator of (record, (source, line)): a fresh pass over the shaped records (bad rows counted
    in, or raised from, `tally`: load.stream_records). kind: the method's `rows` kind (encode_one). strict: the
    first bad row raises with its file:line, else bad rows are dropped and counted. report(drops): called once,
    after the first complete pass, with the counts prepare._report_drops prints. capacity/length: set by `packed`."""

    def __init__(self, records: Callable[[LoadResult], Iterator], encoder: ChatEncoder, kind: str, strict: bool,
                 shuffle_buffer: int = 1000, report: Optional[Callable[[dict], None]] = None):
        self.records, self.encoder, self.kind, self.strict = records, encoder, kind, strict
        self.shuffle_buffer, self.report = max(1, shuffle_buffer), report
        self.capacity: Optional[int] = None
        self.length: Optional[Callable[[Any], int]] = None

    def packed(self, capacity: int, length: Callable[[Any], int]) -> "StreamingRows":
        """The same stream yielding packed groups (lists of rows filling `capacity` tokens) instead of rows."""
        out = StreamingRows(self.records, self.encoder, self.kind, self.strict, self.shuffle_buffer, self.report)
        out.capacity, out.length = capacity, length
        return out

    def epoch(self, seed: int, shuffle: bool, skip_units: int = 0) -> Iterator:
        """One pass: the training units (rows, or packed groups) in order, shuffled within buffers with `seed`
        (--seed + epoch) when `shuffle`, after the first `skip_units` (read, not returned: a resumed run). Raises
        DataError: a bad row (strict), or no usable row in the whole pass."""
        rng = random.Random(seed) if shuffle else None
        rows = self.rows(rng)
        units = rows if self.capacity is None else pack_stream(rows, self.capacity, self.length, rng)
        return islice(units, skip_units, None)

    def rows(self, rng: Optional[random.Random] = None) -> Iterator:
        """One pass over the encoded rows (records shuffled in a buffer with `rng` first when given); over-long
        rows (--truncation_strategy delete), rows with nothing to train and bad rows are counted, not yielded."""
        loading = LoadResult([], [], strict=self.strict)
        encoding = LoadResult([], [], strict=self.strict)
        skipped = {"too_long": 0, "nothing_to_train": 0}
        items = self.records(loading)
        if rng is not None:
            items = buffer_shuffle(items, self.shuffle_buffer, rng)
        kept = 0
        for rec, (src, line) in items:
            status, value = encode_one(self.encoder, rec, self.kind)
            if status == "ok":
                kept += 1
                yield value
            elif status == "bad":
                encoding.drop(DataError(src, line, value.field, value.problem, value.fix))
            else:
                skipped[status] += 1
        drops = {"dropped": loading.dropped, "reasons": loading.reasons, **skipped, "bad": encoding.dropped,
                 "encode_reasons": encoding.reasons}
        if not kept:
            raise DataError("--dataset", None, "", f"no usable rows to train on in a pass over the stream "
                            f"({drops['dropped']} bad, {drops['bad']} failed to encode, {drops['too_long']} too "
                            f"long, {drops['nothing_to_train']} with nothing to train); first reasons:\n  "
                            + "\n  ".join(drops["reasons"] + drops["encode_reasons"]),
                            "fix the rows (`tunesmith data validate` lists every problem), raise --max_length, or "
                            "check --loss_scale.")
        if self.report is not None:
            self.report(drops)
            self.report = None

    def probe(self) -> None:
        """Read up to the first usable row, so that a missing file, a hub id that does not load, a template problem
        or an early bad row (strict) fails before training starts. Raises DataError / ConfigError."""
        next(iter(self.rows()), None)
