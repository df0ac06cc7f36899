"""Answer checking for the accuracy rewards (`tunesmith.train.rl.rewards`): the final answer of a completion or
solution, and whether two answers are equal.

Two checkers: ms-swift's MathAccuracy on HuggingFace's Math-Verify (`math_verify_accuracy`, imported only when
called) and tunesmith's own fallback (`fallback_accuracy`: the <answer> tag, the last \\boxed{...} or the final
number, compared as exact numbers, else as normalised strings). Pure Python; no torch.
"""
from __future__ import annotations

import re
from fractions import Fraction

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:\s*/\s*-?\d+(?:\.\d+)?)?")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None if there is none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0) if text[i - 1] != "\\" else 0
        if depth == 0:
            return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion or solution, for the fallback checker: inside <answer>...</answer> if
    present (as ms-swift's MathAccuracy), the last \\boxed{...}; else the whole tag content if there was a tag;
    else the last number (\\frac{a}{b} counts as a/b); else None."""
    tag = _ANSWER_TAG.search(text)
    inner = tag.group(1).strip() if tag else text
    boxed = last_boxed(inner)
    if boxed is not None:
        return boxed
    if tag:
        return inner
    numbers_ = _NUMBER.findall(_FRAC.sub(r"\1/\2", inner))
    return numbers_[-1] if numbers_ else None


def _normalise(answer: str) -> str:
    """LaTeX and formatting noise removed: $, \\left/\\right, spacing commands, \\text{}, degrees, percent,
    a leading `x =`, a trailing full stop, spaces; lower case."""
    s = answer.strip().strip("$")
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:| )", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|\\%|%|\\\$", "", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    s = _FRAC.sub(r"\1/\2", s)
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def to_number(answer: str) -> Fraction | None:
    """An answer as an exact number (integers, decimals, fractions a/b or \\frac{a}{b}, thousands separators
    1,234), or None when it is not one."""
    s = _normalise(answer)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"^\((-?[\d.]+)\)/\((-?[\d.]+)\)$", r"\1/\2", s)
    try:
        num, _, den = s.partition("/")
        value = Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def answers_match(predicted: str, gold: str) -> bool:
    """Whether two extracted answers are equal: as exact numbers when both are numbers, else as normalised
    strings (see _normalise)."""
    a, b = to_number(predicted), to_number(gold)
    if a is not None and b is not None:
        return a == b
    return _normalise(predicted) == _normalise(gold)


def fallback_accuracy(content: str, solution: str, unparseable_gold=0.0):
    """1.0 / 0.0 by the fallback checker; `unparseable_gold` when the solution has no answer to compare with."""
    gold = extract_answer(solution)
    if gold is None:
        stripped = solution.strip()
        if not stripped or len(stripped) > 100:  # a bare short solution ("B", "x + 1") is its own answer
            return unparseable_gold
        gold = stripped
    predicted = extract_answer(content)
    return float(predicted is not None and answers_match(predicted, gold))


def math_verify_accuracy(content: str, solution: str) -> float:
    """ms-swift 4.6 MathAccuracy.__call__ for one completion (swift/rewards/orm.py:78-120), the same logic."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify
    match = _ANSWER_TAG.search(content)
    to_parse = match.group(1).strip() if match else content
    sol_match = _ANSWER_TAG.search(solution)
    gold = parse(sol_match.group(1).strip() if sol_match else solution, extraction_mode="first_match")
    if len(gold) == 0:
        return 0.0  # an unparseable solution gets 0, as ms-swift (it "skips" the example)
    if match:
        answer = parse(to_parse, extraction_mode="first_match")
    else:
        norm = NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True, boxed=True, units=True)
        answer = parse(to_parse, extraction_config=[LatexExtractionConfig(
            normalization_config=norm, boxed_match_priority=0, try_extract_without_anchor=False)],
            extraction_mode="first_match")
    try:
        return float(verify(gold, answer))
    except Exception:  # noqa: BLE001 — ms-swift scores a verifier failure 0
        return 0.0
