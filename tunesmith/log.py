"""Which process this is, and the one way a process speaks about itself.

- `rank()`, `world_size()`, `is_main()`: read once here from torchrun's RANK and WORLD_SIZE (absent: one process,
  rank 0), so that no other module parses those variables.
- `note(msg)`: a line on stderr from rank 0 only, so that N training processes print it once, not N times.

Standard library only: the CLI imports this before any command runs, and `tunesmith --help` must stay instant.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, TextIO

PREFIX = "[tunesmith] "


def rank() -> int:
    """This process's global rank under torchrun (RANK), 0 when not launched by it."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """How many processes take part (WORLD_SIZE), 1 when not launched by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    """True on rank 0: the process that writes files, logs and speaks."""
    return rank() == 0


def note(msg: str, *, file: Optional[TextIO] = None, prefix: str = PREFIX) -> None:
    """Print `prefix + msg` on rank 0 only; other ranks stay silent.

    file: where to print (default stderr, looked up at call time so that test capture and redirection see it);
    progress lines meant for the user's stdout pass sys.stdout and prefix="". Flushed at once, so that the line
    is in order with tqdm bars and with the output of the other processes."""
    if not is_main():
        return
    print(prefix + msg, file=file if file is not None else sys.stderr, flush=True)
