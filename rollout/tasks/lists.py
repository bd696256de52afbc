"""Tasks "sort" and "reverse": a list of single digits, sorted ascending or reversed.

``Sort 3 9 1 3`` -> ``min 1, 3, 3, 9. Answer: 1 3 3 9`` (the worked part lists the digits in
order, then the answer repeats them); ``Reverse 4 7 2`` -> ``Answer: 2 7 4``. Graded by
`rollout.tasks.answers.grade_list`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rollout.tasks.encoding import UserQuestion
from rollout.tasks.split import check_split, in_eval


@dataclass(frozen=True)
class ListExample(UserQuestion):
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
    def response(self) -> str:
        if self.kind == "sort":
            return f"min {', '.join(map(str, self.result))}. Answer: {self.answer}"
        return f"Answer: {self.answer}"

    def to_dict(self) -> dict:
        return {"messages": self.messages, "answer": self.answer, "response": self.response,
                "digits": list(self.digits)}


def make_list_examples(kind: str, lengths: tuple[int, int], split: str, n: int, seed: int = 0,
                        sample_seed: int | None = None) -> list[ListExample]:
    want_eval = check_split(split)
    rng = random.Random(f"{kind}:{split}:{seed if sample_seed is None else sample_seed}")
    out: list[ListExample] = []
    seen: set = set()
    while len(out) < n:
        k = rng.randint(*lengths)
        digits = tuple(rng.randint(0, 9) for _ in range(k))
        if in_eval(f"{kind}:{seed}:{digits}") != want_eval:
            continue
        if want_eval:  # eval problems without replacement (the spaces are far larger than eval sizes)
            if digits in seen:
                continue
            seen.add(digits)
        out.append(ListExample(kind, digits))
    return out
