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


@dataclass(frozen=True)
class ChainRecoveryExample:
    """A teacher training example that shows how to steer back after a mistake: the worked response
    through step `step` (1-based; step k adds the (k+1)-th operand) with that step's sum off by
    `delta`, then the rest of the response from the true sums (the next step's left operand is the
    right sum, not the wrong one just written) and the true answer. `encode` masks the corrupted
    prefix out of the loss, so a model learns the continuation only: after `a+d=W` with W != a + d,
    go on from a + d. Same prompt, answer and grader as `ChainExample`."""
    digits: tuple
    step: int
    delta: int

    def __post_init__(self):
        if not 1 <= self.step <= len(self.digits) - 2:
            raise ValueError(f"step must be in 1..{len(self.digits) - 2} (a step must follow it), got {self.step}")
        if self.delta == 0 or sum(self.digits[: self.step + 1]) + self.delta < 0:
            raise ValueError(f"delta must be non-zero and leave the wrong sum >= 0, got {self.delta}")

    question = ChainExample.question
    messages = ChainExample.messages
    answer = ChainExample.answer
    partial_sums = ChainExample.partial_sums

    @property
    def prefix(self) -> str:
        """The corrupted start of the response, through the wrong sum and ", "."""
        sums, k = self.partial_sums, self.step
        steps = [f"{sums[i - 1]}+{self.digits[i]}={sums[i]}" for i in range(1, k)]
        steps.append(f"{sums[k - 1]}+{self.digits[k]}={sums[k] + self.delta}")
        return ", ".join(steps) + ", "

    @property
    def continuation(self) -> str:
        """The rest of the response from the true sums, with the true answer."""
        sums = self.partial_sums
        steps = [f"{sums[i - 1]}+{self.digits[i]}={sums[i]}" for i in range(self.step + 1, len(self.digits))]
        return ", ".join(steps) + f". Answer: {self.answer}"

    @property
    def response(self) -> str:
        return self.prefix + self.continuation

    def encode(self, tokenizer) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, response ids through eos, loss mask: 0 on the corrupted prefix, 1 after)."""
        from rollout.tasks.encoding import prompt_ids

        head = list(tokenizer.encode(self.prefix, add_special_tokens=False))
        tail = list(tokenizer.encode(self.continuation, add_special_tokens=False)) + [tokenizer.eos_token_id]
        return prompt_ids(tokenizer, self), head + tail, [0] * len(head) + [1] * len(tail)


def with_recovery(examples: list, fraction: float, seed: int = 0, max_delta: int = 3) -> list:
    """`examples` with a `fraction` of them (chosen at random) replaced by `ChainRecoveryExample`s
    of the same problem: an error at a random step (1..n-2) of +-1..`max_delta` in that step's sum."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = random.Random(f"chain-recovery:{seed}")
    out = []
    for ex in examples:
        if rng.random() >= fraction:
            out.append(ex)
            continue
        step = rng.randint(1, len(ex.digits) - 2)
        delta = rng.choice([d for d in range(-max_delta, max_delta + 1) if d != 0])
        if sum(ex.digits[: step + 1]) + delta < 0:
            delta = -delta
        out.append(ChainRecoveryExample(ex.digits, step, delta))
    return out


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
