"""Value checks shared by every command: a range check that appends a problem, and raising all problems in one message."""
from __future__ import annotations

import math
from tunesmith.config.parser import problems_message


def between(problems: list, name: str, value, lo, hi, lo_open=False, hi_open=False, hint: str = "") -> None:
    """Append a problem unless lo (<|≤) value (<|≤) hi, with value a finite number; None bounds are open ends."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        lo_s = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
        hi_s = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
        problems.append(f"--{name} {value}: expected {lo_s}{name}{hi_s}" + (f"; {hint}" if hint else ""))


def raise_problems(found: list[str]) -> None:
    """Raise one FlagError (a ConfigError) naming every problem (a single problem is raised as its own message)."""
    from tunesmith.errors import FlagError

    if found:
        raise FlagError(problems_message(found))
