"""Value checks shared by every command: a range check that appends a problem, and raising all problems in one message."""
from __future__ import annotations

import math
from tunesmith.config.parser import problems_message


MAX_COUNT = 2 ** 31 - 1  # the largest count (steps, sizes, tokens, ...) a flag takes: beyond it nothing finishes


def between(problems: list, name: str, value, lo, hi, lo_open=False, hi_open=False, hint: str = "") -> None:
    """Append a problem unless lo (<|≤) value (<|≤) hi, with value a finite number; None bounds are open ends,
    except that an integer (a count) is never above MAX_COUNT: a larger one overflows or never finishes."""
    if hi is None and isinstance(value, int) and not isinstance(value, bool) and value > MAX_COUNT:
        problems.append(f"--{name} {value}: expected at most {MAX_COUNT}; a count this large would never finish")
        return
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


def empty_names(problems: list, name: str, values) -> None:
    """Append a problem for each empty entry of a list flag of names (--dataset ""): nothing to load, and a hub
    lookup of "" fails with a misleading error."""
    for v in values or []:
        if not str(v).strip() or str(v).strip() in ("hf::", "ms::"):
            problems.append(f"--{name} {v!r}: an empty name; give a data file, a folder or a hub id (or leave the "
                            f"empty value out)")


ATTN_IMPLS = ("sdpa", "eager", "flash_attn", "flash_attention_2", "flash_attention_3", "flex_attention")
DTYPE_NAMES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")
SEED_MAX = 2 ** 32 - 1  # numpy's and CUDA's seeds are 32-bit


def model_problems(args) -> list[str]:
    """The model flags of every command that loads one (a ModelArgs and QuantArgs): --attn_impl among the
    implementations transformers has, --bnb_4bit_compute_dtype a dtype name, --max_model_len at least 1."""
    out: list[str] = []
    if args.attn_impl is not None and args.attn_impl not in ATTN_IMPLS:
        out.append(f"--attn_impl {args.attn_impl}: expected one of {', '.join(ATTN_IMPLS)}")
    dtype = getattr(args, "bnb_4bit_compute_dtype", None)
    if dtype is not None and dtype not in DTYPE_NAMES:
        out.append(f"--bnb_4bit_compute_dtype {dtype}: expected one of {', '.join(DTYPE_NAMES)} (or leave it out for "
                   f"--torch_dtype)")
    if args.max_model_len is not None:
        between(out, "max_model_len", args.max_model_len, 1, None, hint="tokens; leave it out for the model's own")
    return out


def empty_problem(name: str, value, instead: str) -> list[str]:
    """[the problem] when a text flag was given as '' (or spaces), else []: instead says what to give."""
    if value is not None and not str(value).strip():
        return [f"--{name} is empty; {instead}"]
    return []
