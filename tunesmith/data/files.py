"""Read one local data file into rows, each with the line it came from: .jsonl (or a file that is one JSON list),
.json (a list, one object, or JSON lines), .csv (a header line, then a row per record; a quoted cell may span lines),
.txt (a row {"text": line} per non-blank line) and .parquet (row numbers instead of lines).

JSON/JSONL/CSV/TXT are read here rather than through `datasets` because every row must keep the line it came from:
a bad row is reported as file:line, and `datasets`' json loader also refuses rows whose schemas differ (common in
chat data, where some messages carry `loss` or `reasoning_content`). A row that cannot be read (broken JSON, invalid
UTF-8, a CSV row with the wrong number of cells) comes back as a bad row (`RawRow.error`), not a failed file; what
leaves the whole file unreadable (UTF-16, binary data, a broken JSON list, broken CSV quoting, not parquet) raises
DataError.

What must not live here: which files a --dataset entry names, hub data, sampling (`tunesmith.data.load`), format
rules (`tunesmith.data.formats`). No torch import; pyarrow only when parquet is read.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from tunesmith.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass
class RawRow:
    """One row as read, before normalisation: the decoded object and where it came from. `error`: the row could not
    be read (broken JSON, invalid UTF-8, a CSV row with the wrong number of cells): a bad row, dropped or raised
    like any other when the rows are normalised."""
    row: Any
    source: str
    line: Optional[int]  # 1-based line in the file, or row number for parquet/hub data
    error: Optional[DataError] = None


_FIX_UTF8 = "save the file as UTF-8 (most editors: Save with Encoding > UTF-8)."


def _check_text_file(path: str) -> None:
    """Refuse what is not UTF-8 text before reading it: a UTF-16/UTF-32 file, or binary data (NUL bytes)."""
    with open(path, "rb") as fh:
        head = fh.read(8192)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(path, None, "", "is a UTF-16 (or UTF-32) file; tunesmith reads UTF-8 text.", _FIX_UTF8)
    if b"\x00" in head:
        raise DataError(path, None, "", "is not a text file (it holds NUL bytes: binary data, or UTF-16 without a "
                        "byte-order mark).", f"pass UTF-8 text ({', '.join(LOCAL_SUFFIXES[:3])}, .txt) or parquet.")


def _utf8_error(path: str, e: UnicodeDecodeError, line: int) -> DataError:
    """The DataError for the invalid UTF-8 of `e` (its bytes begin at the start of `line`)."""
    data = e.object
    before = data[:e.start]
    line += before.count(b"\n")
    col = e.start - (before.rfind(b"\n") + 1) + 1
    return DataError(path, line, "", f"is not valid UTF-8 (byte 0x{data[e.start]:02x}, the line's byte {col}).",
                     _FIX_UTF8)


def _read_text(path: str) -> str:
    """The whole file as text (UTF-8, a byte-order mark dropped). Raises DataError naming the first invalid byte."""
    _check_text_file(path)
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e, 1) from None


def _lines(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, text) of each line (UTF-8, a leading byte-order mark dropped, line ends kept), or
    (line number, DataError) for a line that is not valid UTF-8: that one line is a bad row, not the whole file."""
    _check_text_file(path)
    lineno = 0
    with open(path, "rb") as fh:
        for chunk in fh:
            for data in chunk.splitlines(keepends=True):  # \n, \r\n and a lone \r end a line, as in text mode
                lineno += 1
                if lineno == 1 and data.startswith(b"\xef\xbb\xbf"):
                    data = data[3:]
                try:
                    yield lineno, data.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, _utf8_error(path, e, lineno)


FIX_NESTING = "rows are objects holding messages, not deeply nested lists or objects."


def _json_problem(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "JSON nested too deeply to read."
    if isinstance(e, UnicodeEncodeError):
        return "holds an unpaired surrogate escape (e.g. \\ud800, half of an emoji cut off): not valid Unicode."
    if not isinstance(e, json.JSONDecodeError):  # e.g. an integer of more than 4,300 digits
        return f"cannot be read: {e}."
    if e.msg.startswith("Unterminated string"):
        return f"broken JSON at column {e.colno}: a string starts there and is never closed (a missing \"?)."
    return f"broken JSON at column {e.colno}: {e.msg.removesuffix(' at')}."  # json's "Invalid control character at"


def _loads(text: str):
    """json.loads, refusing strings that are not valid Unicode (lone surrogate escapes: the tokenizer and Arrow
    cannot take them). Raises ValueError (JSONDecodeError, UnicodeEncodeError, too-long integers)."""
    obj = json.loads(text)
    if "\\u" in text:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return obj


def _read_jsonl(path: str) -> Iterator[RawRow]:
    """JSON lines; a line that does not decode is a bad row (RawRow.error). A file that is one JSON list (as
    `datasets`' json loader accepts, so ms-swift too) is read as one."""
    if _starts_with_list(path):
        yield from _read_json(path)
        return
    for lineno, text in _lines(path):
        if isinstance(text, DataError):
            yield RawRow(None, path, lineno, text)
            continue
        if not text.strip():
            continue
        try:  # without its line end, so that an error at the end of the line gets the column an editor shows
            yield RawRow(_loads(text.rstrip("\r\n")), path, lineno)
        except (ValueError, RecursionError) as e:
            yield RawRow(None, path, lineno, DataError(
                path, lineno, "", _json_problem(e), FIX_NESTING if isinstance(e, RecursionError) else
                "each line must be one complete JSON object (check quotes, commas and brackets)."))


def _starts_with_list(path: str) -> bool:
    """Whether the whole file decodes as one JSON list (only tried when its first character is '[')."""
    with open(path, "rb") as fh:
        first = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first != b"[":
        return False
    try:
        return isinstance(json.loads(_read_text(path)), list)
    except (ValueError, RecursionError, DataError):
        return False


def _read_json(path: str) -> Iterator[RawRow]:
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped[0] != "[":
        # either one object, or JSON lines in a .json file (ms-swift accepts both)
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            yield from _read_jsonl(path)
            return
        yield RawRow(obj, path, text[: len(text) - len(stripped)].count("\n") + 1)
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
        end = pos + 1
    else:
        while True:
            pos = skip_ws(pos)
            line = text.count("\n", 0, pos) + 1
            try:
                obj, end = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(path, e.lineno, "", _json_problem(e),
                                "check quotes, commas and brackets around this line.") from None
            except RecursionError as e:
                raise DataError(path, line, "", _json_problem(e), FIX_NESTING) from None
            yield RawRow(obj, path, line)
            pos = skip_ws(end)
            if pos < n and text[pos] == ",":
                pos += 1
                continue
            if pos < n and text[pos] == "]":
                end = pos + 1
                break
            if pos >= n:
                raise DataError(path, text.count("\n", 0, len(text.rstrip())) + 1, "", "broken JSON: the list is "
                                "never closed.", "end the file with ] (and check that no object is cut off).")
            raise DataError(path, text.count("\n", 0, pos) + 1, "", "broken JSON: expected ',' or ']' between "
                            "list items.", "separate the objects with commas and close the list with ].")
    rest = skip_ws(end)
    if rest < n:
        raise DataError(path, text.count("\n", 0, rest) + 1, "", "text after the end of the JSON list.",
                        "a .json file holds one list of objects (or use .jsonl: one object per line).")


def _read_text_escaped(path: str) -> tuple[bytes, str]:
    """(the file's bytes, its text) with each byte that is not valid UTF-8 kept as a lone surrogate
    (surrogateescape), so that one bad row does not make the whole file unreadable; a byte-order mark dropped."""
    _check_text_file(path)
    with open(path, "rb") as fh:
        data = fh.read()
    return data, data.decode("utf-8-sig", errors="surrogateescape")


def _escaped(cells: list[str]) -> bool:
    """Whether a cell holds a byte that was not valid UTF-8 (surrogateescape keeps it as U+DC80..U+DCFF)."""
    return any(not c.isascii() and _SURROGATE.search(c) for c in cells)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _utf8_error_in(path: str, data: bytes, first: int, last: int) -> DataError:
    """The DataError for the first invalid UTF-8 in lines first..last (1-based) of the file's bytes."""
    lines = data.split(b"\n")
    for i in range(first - 1, min(last, len(lines))):
        try:
            lines[i].decode("utf-8")
        except UnicodeDecodeError as e:
            return _utf8_error(path, e, i + 1)
    return DataError(path, first, "", "is not valid UTF-8.", _FIX_UTF8)


def _read_csv(path: str) -> Iterator[RawRow]:
    data, text = _read_text_escaped(path)
    csv.field_size_limit(2 ** 31 - 1)  # ms-swift (pandas) has no limit on a cell's size
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((cells for cells in reader if cells), None)  # the first line that is not blank
        if header is None:
            return
        if _escaped(header):  # without its header no row of the file can be read
            raise _utf8_error_in(path, data, 1, reader.line_num)
        end = reader.line_num
        for cells in reader:
            start, end = end + 1, reader.line_num  # the row's lines (a quoted cell may span several)
            if not cells:  # a blank line
                continue
            line = reader.line_num
            if _escaped(cells):  # a bad row, like an invalid line of a .jsonl file
                yield RawRow(None, path, line, _utf8_error_in(path, data, start, end))
                continue
            if len(cells) != len(header):
                yield RawRow(None, path, line, DataError(
                    path, line, "", f"has {len(cells)} cells but the header has {len(header)} columns "
                    f"({', '.join(header)}).", "quote cells that contain commas (\"a, b\"), and give every row "
                    "one cell per column."))
                continue
            # like ms-swift (na_filter=False): empty cells stay empty strings
            yield RawRow(dict(zip(header, cells)), path, line)
    except csv.Error as e:
        raise DataError(path, reader.line_num, "", f"is not valid CSV ({e}).",
                        "check the quoting around this line (a quote inside a cell is written \"\").") from None


def _read_txt(path: str) -> Iterator[RawRow]:
    for lineno, text in _lines(path):
        if isinstance(text, DataError):
            yield RawRow(None, path, lineno, text)
            continue
        text = text.rstrip("\r\n")
        if text.strip():
            yield RawRow({"text": text}, path, lineno)


def _read_parquet(path: str) -> Iterator[RawRow]:
    import pyarrow as pa  # a dependency of `datasets`
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):  # a batch at a time (--streaming)
            for row in batch.to_pylist():
                i += 1
                yield RawRow(row, path, i)
    except (pa.ArrowException, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(path, None, "", f"cannot be read as parquet ({first}).",
                        "check that it is a complete parquet file (or give the file its real suffix).") from None


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_txt,
           ".parquet": _read_parquet}
