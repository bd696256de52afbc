"""The synthetic task of `opd demo` (task "arithmetic"): multi-digit addition with a checkable answer.

A prompt is one user chat message ("What is 37+85?"); the target response is a short answer
ending in ``Answer: 122`` (style "direct"), or a digit-by-digit worked answer (style "worked":
``7+5=12, 3+8+1=12. Answer: 122``). Graded by `rollout.tasks.answers.grade_int`: the last
``Answer: <int>`` of a response equals the true sum.

Train and eval examples come from disjoint sets of operand pairs: a pair belongs to the eval
split when a stable hash of (seed, a, b) falls in the eval bucket, so the split is the same on
every machine and for every number of examples drawn. Everything is deterministic in `seed`.

A training example as token ids: prompt ids are
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` and response ids are the
encoded response text followed by the eos token (``<|im_end|>``); the loss covers response ids
only (`rollout.tasks.encoding.encode_example`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rollout.tasks.answers import grade_int
from rollout.tasks.encoding import UserQuestion
from rollout.tasks.split import EVAL_BUCKETS, check_split, in_eval

STYLES = ("direct", "worked")
grade = grade_int  # the task's grader (`TASKS["arithmetic"].grade`)


@dataclass(frozen=True)
class Example(UserQuestion):
    a: int
    b: int
    style: str = "direct"

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def question(self) -> str:
        return f"What is {self.a}+{self.b}?"

    @property
    def response(self) -> str:
        """The target response text (without the eos token)."""
        return format_response(self.a, self.b, self.style)

    def to_dict(self) -> dict:
        """A JSON-able record: messages, the reference answer and the target response."""
        return {"messages": self.messages, "answer": str(self.answer), "response": self.response,
                "a": self.a, "b": self.b}


def format_response(a: int, b: int, style: str = "direct") -> str:
    total = a + b
    if style == "direct":
        return f"Answer: {total}"
    if style == "worked":
        # Column addition from the ones digit up: "7+5=12, 3+8+1=12. Answer: 122".
        da, db = str(a)[::-1], str(b)[::-1]
        steps, carry = [], 0
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            s = x + y + carry
            steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
            carry = s // 10
        return ", ".join(steps) + f". Answer: {total}"
    raise ValueError(f"unknown style {style!r}; choose from {STYLES}")


def _operand_range(digits: int) -> tuple[int, int]:
    if digits < 1:
        raise ValueError("digits must be >= 1")
    return (10 ** (digits - 1) if digits > 1 else 0), 10 ** digits - 1


def make_examples(split: str, n: int, seed: int = 0, digits: int = 2, style: str = "direct",
                  sample_seed: int | None = None) -> list[Example]:
    """`n` examples of `split` ("train" or "eval"): operands with exactly `digits` digits.

    `seed` fixes the train/eval partition of operand pairs; `sample_seed` (default: `seed`) fixes
    which pairs are drawn. Eval examples are drawn without replacement (as long as the eval
    split has enough pairs); train examples with replacement.
    """
    want_eval = check_split(split)
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
    lo, hi = _operand_range(digits)
    rng = random.Random(f"{split}:{seed if sample_seed is None else sample_seed}:{digits}")
    space = (hi - lo + 1) ** 2
    out: list[Example] = []
    seen: set[tuple[int, int]] = set()
    unique = want_eval and n <= space // (2 * EVAL_BUCKETS)
    while len(out) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if in_eval(f"{seed}:{a}+{b}") != want_eval:
            continue
        if unique:
            if (a, b) in seen:
                continue
            seen.add((a, b))
        out.append(Example(a, b, style))
    return out
