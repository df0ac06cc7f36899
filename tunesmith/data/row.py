"""One row under normalisation (`tunesmith.data.formats`): the column names the formats read, a case-insensitive view
of the row that builds its DataErrors (source:line, field, problem, fix), and the checks of its text fields.

Pure Python; nothing of tunesmith but its errors.
"""
from __future__ import annotations

import ast
from typing import Any, Optional

from tunesmith.errors import DataError

ROLE_MAP = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
    "tool": "tool", "tool_response": "tool", "function_response": "tool", "observation": "tool", "observations": "tool",
    "tool_call": "assistant", "function_call": "assistant",
}
QUERY_KEYS = ("query", "prompt", "input", "instruction", "question", "problem")
RESPONSE_KEYS = ("response", "answer", "output", "targets", "target", "answer_key", "answers", "solution", "text",
                 "completion", "content")
SYSTEM_KEYS = ("system", "system_prompt")
MESSAGE_KEYS = ("messages", "conversation", "conversations")
THINK_KEYS = ("reasoning_content", "thinking", "reasoning")

TOOL_CALL_ROLES = ("tool_call", "function_call")


def rename_columns(row: dict, columns: Optional[dict]) -> dict:
    """The row with --columns renames {"their column": "ours"} applied (their names matched case-insensitively)."""
    if not columns:
        return row
    lower = {k.lower(): k for k in row}
    out = dict(row)
    for src, dst in columns.items():
        key = lower.get(str(src).lower())
        if key is not None and key != dst:
            out[dst] = out.pop(key)
    return out


def lower_keys(row: dict) -> dict:
    """Case-insensitive view: lower-case key -> original key (first one wins)."""
    out: dict[str, str] = {}
    for k in row:
        out.setdefault(str(k).lower(), k)
    return out


class Row:
    """One row being normalised, with where it came from for error messages."""

    def __init__(self, row: dict, source: str, line):
        self.row, self.source, self.line, self.keys = row, source, line, lower_keys(row)

    def err(self, field: str, problem: str, fix: str = "") -> DataError:
        """A DataError for `field` of this row (returned, not raised: callers `raise r.err(...)`)."""
        return DataError(self.source, self.line, field, problem, fix)

    def get(self, *names: str):
        """(original key, value) of the first of `names` (lower-case) the row has, else (None, None)."""
        for n in names:
            if n in self.keys:
                return self.keys[n], self.row[self.keys[n]]
        return None, None

    def has(self, name: str) -> bool:
        """Whether the row has column `name` (lower-case) with a non-null value."""
        return name in self.keys and self.row[self.keys[name]] is not None


def as_text(r: Row, field: str, value: Any, allow_empty: bool = True) -> str:
    """A text field's value as a string (OpenAI text content parts joined); DataError for null, a non-string, or
    (allow_empty False) blank text."""
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise r.err(field, "is empty.", "give it text, or drop the row.")
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts, text only
    if value is None:
        raise r.err(field, "is null; expected a string.", "give it text, or drop the row.")
    raise r.err(field, f"expected a string, got {type(value).__name__} ({short(value)}).",
                "write the text as a JSON string.")


def short(v: Any, n: int = 40) -> str:
    """repr(v) cut to n characters, for error messages."""
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def parse_maybe_literal(r: Row, field: str, value: Any):
    """A messages value written as a Python/JSON string decoded (as ms-swift accepts it); anything else as is."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)  # ms-swift accepts messages written as a Python/JSON string
        except (ValueError, SyntaxError):
            raise r.err(field, "is a string that is not a list of messages.",
                        "write it as a JSON list of {\"role\", \"content\"} objects.") from None
    return value
