"""Answer normalisation for exact match, shared by the evaluation (:mod:`evip.eval`) and the demo's data writers
(which must not state an answer before it is asked); plain Python, no torch."""

from __future__ import annotations

from typing import Optional

__all__ = ["TRAILING_PUNCTUATION", "normalize_answer"]

TRAILING_PUNCTUATION = ".,;:!?"

_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
         "seventeen eighteen nineteen".split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}


def _number_word_value(text: str) -> Optional[int]:
    """``"seven"`` -> 7, ``"twenty-one"`` / ``"twenty one"`` -> 21; None for anything else."""
    if text in _UNITS:
        return _UNITS.index(text)
    parts = text.replace("-", " ").split()
    if parts and parts[0] in _TENS:
        if len(parts) == 1:
            return _TENS[parts[0]]
        if len(parts) == 2 and parts[1] in _UNITS[1:10]:
            return _TENS[parts[0]] + _UNITS.index(parts[1])
    return None


def normalize_answer(text: str, *, numeric: bool = False) -> str:
    """Canonical form for exact match: lower case, whitespace collapsed, trailing ``.,;:!?`` dropped.

    With ``numeric`` (counting and digit tasks) a number word becomes its numeral and a numeral loses leading
    zeros, so ``"Three."``, ``"3"`` and ``"03"`` all give ``"3"``; only whole answers are converted ("3 cats"
    stays as it is: exact match means the answer is the number).
    """
    out = " ".join(text.lower().split()).rstrip(TRAILING_PUNCTUATION).strip()
    if numeric:
        value = _number_word_value(out)
        if value is not None:
            return str(value)
        if out.isdigit():
            return str(int(out))
    return out
