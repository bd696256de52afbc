"""Graders of the built-in tasks: the last ``Answer: ...`` of a response against the reference.

- `grade_int` (arithmetic, calc): the integer after the last ``Answer:`` equals the reference
  integer (tool responses are not answers: they carry no ``Answer:``);
- `grade_list` (sort, reverse): the digits after the last ``Answer:`` equal the reference digits.

A grader is ``grade(response_text, example_or_dict) -> 1.0 | 0.0``; the reference is
``example.answer`` or ``example["answer"]``.
"""

from __future__ import annotations

import re

_INT_RE = re.compile(r"Answer:\s*(-?\d+)")
_DIGITS_RE = re.compile(r"Answer:((?:\s*\d)+)")


def _reference(example) -> str:
    return str(example.answer if hasattr(example, "answer") else example["answer"])


def extract_int(text: str) -> int | None:
    """The integer after the last ``Answer:`` in `text` (eos and trailing text ignored), or None."""
    found = _INT_RE.findall(text)
    return int(found[-1]) if found else None


def grade_int(response_text: str, example) -> float:
    """1.0 when the last ``Answer: N`` is the reference integer, else 0.0."""
    got = extract_int(response_text)
    return 1.0 if got is not None and got == int(_reference(example)) else 0.0


def extract_digits(text: str) -> str | None:
    """The digits after the last ``Answer:`` as a space-separated string ("1 3 9"), or None."""
    found = _DIGITS_RE.findall(text)
    if not found:
        return None
    return " ".join(ch for ch in found[-1] if ch.isdigit())


def grade_list(response_text: str, example) -> float:
    """1.0 when the digits after the last ``Answer:`` are the reference digits, else 0.0."""
    got = extract_digits(response_text)
    return 1.0 if got is not None and got == _reference(example).strip() else 0.0
