"""Task "calc": a multi-turn task that needs the calculator tool.

``Compute 347*28`` -> the model calls
``<tool_call>{"name": "calculator", "arguments": {"expression": "347*28"}}</tool_call>``, ends its
turn, gets ``<tool_response>9716</tool_response>`` back (tool tokens: loss mask 0), then answers
``Answer: 9716``. Operands are 2-3 digits, the operator one of + - *; a model this small cannot
multiply 3-digit numbers in its head, so the answer has to come from the tool. Graded by
`rollout.tasks.answers.grade_int`; rollouts run through `rollout.tasks.tool_engine.ToolEngine`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rollout.tasks.encoding import UserQuestion, prompt_ids
from rollout.tasks.split import check_split, in_eval


@dataclass(frozen=True)
class CalcExample(UserQuestion):
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
        prompt = prompt_ids(tokenizer, self)
        turn1 = list(tokenizer.encode(self.tool_call, add_special_tokens=False)) + [eos]
        tool = ToolTurnFormatter(tokenizer).tool_turn_ids([calculator(self.expression)])
        turn2 = list(tokenizer.encode(self.final, add_special_tokens=False)) + [eos]
        return prompt, turn1 + tool + turn2, [1] * len(turn1) + [0] * len(tool) + [1] * len(turn2)

    def to_dict(self) -> dict:
        return {"messages": self.messages, "answer": self.answer, "response": self.response,
                "expression": self.expression}


def make_calc_examples(split: str, n: int, seed: int = 0, sample_seed: int | None = None) -> list[CalcExample]:
    want_eval = check_split(split)
    rng = random.Random(f"calc:{split}:{seed if sample_seed is None else sample_seed}")
    out: list[CalcExample] = []
    seen: set = set()
    while len(out) < n:
        a, b, op = rng.randint(10, 999), rng.randint(10, 999), rng.choice("+-*")
        if in_eval(f"calc:{seed}:{(a, op, b)}") != want_eval:
            continue
        if want_eval:
            if (a, op, b) in seen:
                continue
            seen.add((a, op, b))
        out.append(CalcExample(a, op, b))
    return out
