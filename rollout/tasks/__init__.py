"""The built-in tasks: synthetic problems with checkable answers, their graders and tools.

Data for rollouts, below the trainer: `student_trainer.data` turns them into prompt sources,
`opd demo` and the quality bench train and evaluate on them.

Every task has the same interface:

- examples are frozen dataclasses with ``messages`` (one user chat message), ``response`` (the
  target worked response, without eos) and ``answer``; multi-turn examples also have
  ``encode(tokenizer) -> (prompt_ids, response_ids, loss_mask)`` (the exact token trajectory of
  the rollout tool loop, `rollout.agent.ToolAgent`);
- ``Task.make_examples(split, n, seed=0, sample_seed=None)`` draws `n` examples of "train" or
  "eval"; train and eval problems are disjoint on every machine (`split.py`); everything is
  deterministic in the seeds;
- ``Task.grade(response_text, example_or_dict)`` is 1.0 when the last ``Answer: ...`` of the
  response equals the reference answer, else 0.0 (`answers.py`);
- ``Task.tools`` names the tools the rollout must offer (`tool_engine.ToolEngine`);
- ``Task.metadata(example)`` is what a prompt of the task carries besides its token ids: the
  reference ``answer`` and, where the task has a worked reference solution, ``solution`` (for a
  teacher prompt template over data-row fields).

Modules: `arithmetic` (the demo task), `lists` (sort, reverse), `calc` (tool calls), `chain` (long
addition chains), `answers`
(graders), `split`, `encoding` (token layout), `tool_engine` (the tool loop as a rollout engine).
A new task: a module with its example class and generator, one entry in `TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rollout.tasks import arithmetic
from rollout.tasks.answers import grade_int, grade_list
from rollout.tasks.calc import make_calc_examples
from rollout.tasks.chain import make_chain_examples
from rollout.tasks.lists import make_list_examples


@dataclass(frozen=True)
class Task:
    name: str
    make: callable       # (split, n, seed=0, sample_seed=None) -> list of examples
    grade: callable      # (text, example | {"answer": ...}) -> float
    description: str
    tools: tuple = ()    # tool names the rollout must offer (multi-turn tasks)

    def make_examples(self, split: str, n: int, seed: int = 0, sample_seed: int | None = None):
        return self.make(split, n, seed=seed, sample_seed=sample_seed)

    def metadata(self, example) -> dict:
        """The fields a prompt of this task exposes besides its question (data-row fields for
        teacher routing and teacher prompt templates): ``answer`` and ``solution``, the worked
        reference response (for calc the whole tool trajectory)."""
        return {"answer": str(example.answer), "solution": example.response}


def _arith(split, n, seed=0, sample_seed=None):
    return arithmetic.make_examples(split, n, seed=seed, digits=2, style="worked", sample_seed=sample_seed)


TASKS: dict[str, Task] = {
    "arithmetic": Task("arithmetic", _arith, grade_int, "2-digit addition, worked column by column"),
    "sort": Task("sort", lambda split, n, seed=0, sample_seed=None: make_list_examples(
        "sort", (3, 5), split, n, seed, sample_seed), grade_list, "sort 3-5 single digits ascending"),
    "reverse": Task("reverse", lambda split, n, seed=0, sample_seed=None: make_list_examples(
        "reverse", (3, 6), split, n, seed, sample_seed), grade_list, "reverse a list of 3-6 single digits"),
    "calc": Task("calc", make_calc_examples, grade_int,
                 "2-3 digit + - * through a calculator tool call (multi-turn)", tools=("calculator",)),
    "chain": Task("chain", make_chain_examples, grade_int,
                  "sum of 16 digits with a worked running sum (131-143 response tokens; early errors compound)"),
}


BUILTIN_TASKS = tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; built in: {', '.join(TASKS)}")
    return TASKS[name]
