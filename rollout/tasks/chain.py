"""Task "chain": a long addition chain with a worked running sum, where early errors compound.

``Add 3 8 5 2 9`` -> ``3+8=11, 11+5=16, 16+2=18, 18+9=27. Answer: 27``: the response carries the
running sum from one step to the next, so a single wrong digit in an early step is copied into
every later step and into the answer (the model never sees a correction). With the default 16
operands a worked response is 15 steps and 131-143 tokens (eos included) of the tiny tokenizer (digits are one
token each, `opd.tiny.build_tokenizer`), long enough that a student's own early mistakes put it
in states the teacher's samples never visit.

Graded by `rollout.tasks.answers.grade_int`, exactly: 1.0 when the integer after the last
``Answer:`` is the sum, else 0.0 (no partial credit for correct steps). The worked reference
response is also exposed as ``solution`` (`ChainExample.solution`, ``to_dict()["solution"]``)
for a teacher prompt that shows the reference (privileged-context self-distillation).

Operands are single digits 1-9 (a 0 would make steps like ``11+0=11`` that teach nothing). Train
and eval problems are disjoint (`split.py`, keyed by the whole operand tuple).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rollout.tasks.split import check_split, in_eval

LENGTHS = (16, 16)   # operands per problem of the built-in task (min, max)


@dataclass(frozen=True)
class ChainExample:
    digits: tuple

    @property
    def partial_sums(self) -> list[int]:
        out, total = [], 0
        for d in self.digits:
            total += d
            out.append(total)
        return out

    @property
    def answer(self) -> str:
        return str(sum(self.digits))

    @property
    def question(self) -> str:
        return "Add " + " ".join(map(str, self.digits))

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    @property
    def response(self) -> str:
        sums = self.partial_sums
        steps = [f"{sums[i - 1]}+{self.digits[i]}={sums[i]}" for i in range(1, len(self.digits))]
        return ", ".join(steps) + f". Answer: {self.answer}"

    @property
    def solution(self) -> str:
        """The worked reference response (the same text as `response`), for a privileged teacher prompt."""
        return self.response

    def to_dict(self) -> dict:
        return {"messages": self.messages, "answer": self.answer, "response": self.response,
                "solution": self.solution, "digits": list(self.digits)}


def make_chain_examples(split: str, n: int, seed: int = 0, sample_seed: int | None = None,
                        lengths: tuple[int, int] = LENGTHS) -> list[ChainExample]:
    """`n` problems of `split`: `lengths[0]`..`lengths[1]` operands, each 1-9. Eval problems are
    drawn without replacement; train problems with replacement."""
    want_eval = check_split(split)
    lo, hi = lengths
    if not 2 <= lo <= hi:
        raise ValueError(f"lengths must satisfy 2 <= min <= max, got {lengths}")
    rng = random.Random(f"chain:{split}:{seed if sample_seed is None else sample_seed}:{lo}-{hi}")
    out: list[ChainExample] = []
    seen: set = set()
    while len(out) < n:
        digits = tuple(rng.randint(1, 9) for _ in range(rng.randint(lo, hi)))
        if in_eval(f"chain:{seed}:{digits}") != want_eval:
            continue
        if want_eval:  # 9**16 problems: far more than any eval size
            if digits in seen:
                continue
            seen.add(digits)
        out.append(ChainExample(digits))
    return out
