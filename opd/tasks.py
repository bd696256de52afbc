"""Synthetic task families with checkable answers, for the distillation quality benchmark.

Every family has the interface of `opd.demo_task` (so `opd.demo_prep.sft_train`, `collate`,
`generate_responses` work on its examples unchanged):

- examples are frozen dataclasses with ``messages`` (one user chat message), ``response`` (the
  target worked response, without eos) and ``answer`` (a string);
- ``make_examples(split, n, seed=0, sample_seed=None)`` draws `n` examples of "train" or "eval";
  the split is a stable hash of (seed, problem), so train and eval problems are disjoint on every
  machine; everything is deterministic in the seeds;
- ``grade(response_text, example_or_dict)`` is 1.0 when the last ``Answer: ...`` of the response
  equals the reference answer, else 0.0.

Families (`TASKS`):

- ``arithmetic``: the demo task (2-digit addition, worked column by column), from `demo_task`;
- ``sort``: sort 3-5 single digits ascending. ``Sort 3 9 1 3`` -> ``min 1, 3, 3, 9. Answer: 1 3 3 9``
  (the worked part lists the digits in order, then the answer repeats them);
- ``reverse``: reverse a list of 3-6 single digits. ``Reverse 4 7 2`` -> ``Answer: 2 7 4``.

A multi-turn task that needs the calculator tool is not here yet (see docs/quality.md).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from opd import demo_task

EVAL_BUCKETS = 10
_ANSWER_RE = re.compile(r"Answer:((?:\s*\d)+)")


def extract_digits(text: str) -> str | None:
    """The digits after the last ``Answer:`` as a space-separated string ("1 3 9"), or None."""
    found = _ANSWER_RE.findall(text)
    if not found:
        return None
    return " ".join(ch for ch in found[-1] if ch.isdigit())


def _in_eval(name: str, digits: tuple, seed: int) -> bool:
    h = hashlib.blake2b(f"{name}:{seed}:{digits}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % EVAL_BUCKETS == 0


@dataclass(frozen=True)
class ListExample:
    kind: str            # "sort" | "reverse"
    digits: tuple

    @property
    def result(self) -> tuple:
        return tuple(sorted(self.digits)) if self.kind == "sort" else tuple(reversed(self.digits))

    @property
    def answer(self) -> str:
        return " ".join(map(str, self.result))

    @property
    def question(self) -> str:
        return f"{self.kind.capitalize()} {' '.join(map(str, self.digits))}"

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    @property
    def response(self) -> str:
        if self.kind == "sort":
            return f"min {', '.join(map(str, self.result))}. Answer: {self.answer}"
        return f"Answer: {self.answer}"

    def to_dict(self) -> dict:
        return {"messages": self.messages, "answer": self.answer, "response": self.response,
                "digits": list(self.digits)}


def grade_list(response_text: str, example) -> float:
    got = extract_digits(response_text)
    want = example.answer if hasattr(example, "answer") else str(example["answer"])
    return 1.0 if got is not None and got == str(want).strip() else 0.0


def _make_list_examples(kind: str, lengths: tuple[int, int], split: str, n: int, seed: int = 0,
                        sample_seed: int | None = None) -> list[ListExample]:
    if split not in ("train", "eval"):
        raise ValueError("split must be 'train' or 'eval'")
    want_eval = split == "eval"
    rng = random.Random(f"{kind}:{split}:{seed if sample_seed is None else sample_seed}")
    out: list[ListExample] = []
    seen: set = set()
    while len(out) < n:
        k = rng.randint(*lengths)
        digits = tuple(rng.randint(0, 9) for _ in range(k))
        if _in_eval(kind, digits, seed) != want_eval:
            continue
        if want_eval:  # eval problems without replacement (the spaces are far larger than eval sizes)
            if digits in seen:
                continue
            seen.add(digits)
        out.append(ListExample(kind, digits))
    return out


@dataclass(frozen=True)
class Task:
    name: str
    make: callable       # (split, n, seed=0, sample_seed=None) -> list of examples
    grade: callable      # (text, example | {"answer": ...}) -> float
    description: str

    def make_examples(self, split: str, n: int, seed: int = 0, sample_seed: int | None = None):
        return self.make(split, n, seed=seed, sample_seed=sample_seed)


def _arith(split, n, seed=0, sample_seed=None):
    return demo_task.make_examples(split, n, seed=seed, digits=2, style="worked", sample_seed=sample_seed)


TASKS: dict[str, Task] = {
    "arithmetic": Task("arithmetic", _arith, demo_task.grade, "2-digit addition, worked column by column"),
    "sort": Task("sort", lambda split, n, seed=0, sample_seed=None: _make_list_examples(
        "sort", (3, 5), split, n, seed, sample_seed), grade_list, "sort 3-5 single digits ascending"),
    "reverse": Task("reverse", lambda split, n, seed=0, sample_seed=None: _make_list_examples(
        "reverse", (3, 6), split, n, seed, sample_seed), grade_list, "reverse a list of 3-6 single digits"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; built in: {', '.join(TASKS)}")
    return TASKS[name]
