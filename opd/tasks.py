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
- ``calc``: a multi-turn task that needs the calculator tool. ``Compute 347*28`` -> the model calls
  ``<tool_call>{"name": "calculator", "arguments": {"expression": "347*28"}}</tool_call>``, ends its
  turn, gets ``<tool_response>9716</tool_response>`` back (tool tokens: loss mask 0), then answers
  ``Answer: 9716``. Operands are 2-3 digits, the operator one of + - *; a model this small cannot
  multiply 3-digit numbers in its head, so the answer has to come from the tool.

Multi-turn examples also have ``encode(tokenizer) -> (prompt_ids, response_ids, loss_mask)``
(the exact token trajectory of the rollout tool loop, `rollout.agent.ToolAgent`), and their task
has ``tools`` set (the tool names the rollout must offer).
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
class CalcExample:
    a: int
    op: str              # "+" | "-" | "*"
    b: int

    @property
    def expression(self) -> str:
        return f"{self.a}{self.op}{self.b}"

    @property
    def answer(self) -> str:
        return str({"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op])

    @property
    def question(self) -> str:
        return f"Compute {self.expression}"

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    @property
    def tool_call(self) -> str:
        return ('<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'
                % self.expression)

    @property
    def final(self) -> str:
        return f"Answer: {self.answer}"

    @property
    def response(self) -> str:
        """The whole trajectory as text (model turn, tool turn, model turn; eos between turns)."""
        return (f"{self.tool_call}<|im_end|>\n<|im_start|>user\n<tool_response>\n{self.answer}\n"
                f"</tool_response><|im_end|>\n<|im_start|>assistant\n{self.final}")

    def encode(self, tokenizer) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, response ids through the final eos, loss mask over the response: 0 on tool tokens)."""
        from rollout.chat import ToolTurnFormatter
        from rollout.tools import calculator

        eos = tokenizer.eos_token_id
        prompt = demo_task.prompt_ids(tokenizer, self)
        turn1 = list(tokenizer.encode(self.tool_call, add_special_tokens=False)) + [eos]
        tool = ToolTurnFormatter(tokenizer).tool_turn_ids([calculator(self.expression)])
        turn2 = list(tokenizer.encode(self.final, add_special_tokens=False)) + [eos]
        return prompt, turn1 + tool + turn2, [1] * len(turn1) + [0] * len(tool) + [1] * len(turn2)

    def to_dict(self) -> dict:
        return {"messages": self.messages, "answer": self.answer, "response": self.response,
                "expression": self.expression}


_INT_RE = re.compile(r"Answer:\s*(-?\d+)")


def grade_int(response_text: str, example) -> float:
    """1.0 when the last ``Answer: N`` is the reference integer (tool responses are not answers)."""
    found = _INT_RE.findall(response_text)
    want = example.answer if hasattr(example, "answer") else str(example["answer"])
    return 1.0 if found and int(found[-1]) == int(want) else 0.0


def _make_calc_examples(split: str, n: int, seed: int = 0, sample_seed: int | None = None) -> list[CalcExample]:
    if split not in ("train", "eval"):
        raise ValueError("split must be 'train' or 'eval'")
    want_eval = split == "eval"
    rng = random.Random(f"calc:{split}:{seed if sample_seed is None else sample_seed}")
    out: list[CalcExample] = []
    seen: set = set()
    while len(out) < n:
        a, b, op = rng.randint(10, 999), rng.randint(10, 999), rng.choice("+-*")
        if _in_eval("calc", (a, op, b), seed) != want_eval:
            continue
        if want_eval:
            if (a, op, b) in seen:
                continue
            seen.add((a, op, b))
        out.append(CalcExample(a, op, b))
    return out


@dataclass(frozen=True)
class Task:
    name: str
    make: callable       # (split, n, seed=0, sample_seed=None) -> list of examples
    grade: callable      # (text, example | {"answer": ...}) -> float
    description: str
    tools: tuple = ()    # tool names the rollout must offer (multi-turn tasks)

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
    "calc": Task("calc", _make_calc_examples, grade_int,
                 "2-3 digit + - * through a calculator tool call (multi-turn)", tools=("calculator",)),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; built in: {', '.join(TASKS)}")
    return TASKS[name]
