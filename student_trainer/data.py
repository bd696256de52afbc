"""Prompt sources for training and evaluation, with rewards.

A source yields `Prompt`s (token ids + what grading needs) in a deterministic order: step s of a
run takes prompts [s*B, (s+1)*B) of an endless sequence of seeded epoch permutations, so a resumed
run continues at exactly the same data position from the step number alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

from rollout.tasks import BUILTIN_TASKS  # noqa: F401  (re-exported: the trainer's and the config's list)


@dataclass
class Prompt:
    prompt_ids: list[int]
    answer: str | None
    source: str = "train"
    metadata: dict = field(default_factory=dict)


class LazyPrompts(Sequence):
    """`make(item)` on first access, then kept: a built-in task has 4,096 training prompts and the
    chat template takes about a millisecond each, while a run of a few steps reads a few dozen."""

    def __init__(self, items: list, make: Callable):
        self._items, self._make = items, make
        self._made: dict[int, Prompt] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self._items))[i]  # negative indices; IndexError past the end
        p = self._made.get(i)
        if p is None:
            p = self._made[i] = self._make(self._items[i])
        return p


class PromptSource:
    """`rows`: the data row of each training prompt (a dict: a file's record, a built-in task's
    fields), what teacher routing and prompt templates read; a prompt carries its own row as
    ``metadata["row"]`` too. `where` and `labels`: how messages name the data and each training
    row ("record 17" of "data.path x.jsonl")."""

    def __init__(self, train: list[Prompt], eval_: list[Prompt], reward: Callable[[str, Prompt], float], seed: int = 0,
                 shuffle: bool = True, rows: Sequence[dict] | None = None, where: str = "data",
                 labels: Sequence[str] | None = None):
        if not train:
            raise ValueError("data: no training prompts (all filtered out or an empty file)")
        self.train, self.eval, self.reward_fn, self.seed, self.shuffle = train, eval_, reward, seed, shuffle
        self.rows, self.where, self.labels = rows, where, labels

    def row_label(self, i: int) -> str:
        """How an error names training row i ("record 17 of data.path x.jsonl")."""
        return f"{self.labels[i] if self.labels else f'row {i}'} of {self.where}"

    def _order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.train)))
        if self.shuffle:
            random.Random(self.seed * 7919 + epoch).shuffle(idx)
        return idx

    def batch(self, step: int, size: int) -> list[Prompt]:
        out = []
        for k in range(step * size, (step + 1) * size):
            epoch, pos = divmod(k, len(self.train))
            out.append(self.train[self._order(epoch)[pos]])
        return out

    def reward(self, text: str, prompt: Prompt) -> float:
        return float(self.reward_fn(text, prompt))


# The fields of a built-in task's data row (for teacher.route_key and prompt templates): the task's
# name (twice: `data_source` is the route key files use), the question as the student sees it, the
# reference answer and the worked target response ("solution"; for calc the whole tool trajectory).
TASK_ROW_FIELDS = ("task", "data_source", "question", "answer", "solution")


def task_row(task: str, ex) -> dict:
    from rollout.tasks import get_task

    return {"task": task, "data_source": task, "question": ex.question, **get_task(task).metadata(ex)}


@dataclass(frozen=True)
class PromptedExample:
    """A built-in task example asked with another user message (`text`), with the same response,
    answer and grading as `base`: what a teacher with a prompt template is shown, as an example to
    train or evaluate a model on (e.g. a self-distillation teacher that must read the reference in
    its prompt). Its own `encode` is the plain prompt + response one: `base`'s multi-turn or masked
    `encode`, if any, is not used."""
    base: object
    text: str

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.text}]

    def __getattr__(self, name: str):
        if name in ("base", "text", "encode") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)  # response, answer, solution, digits, ...: the grader's fields


def privileged_example(task: str, ex, template: str) -> PromptedExample:
    """`ex` of built-in task `task` asked with `template` filled from its data row (`task_row`): the
    same text the trainer puts in a teacher's prompt with ``teacher.prompt_template`` (the producer
    renders it as one user message through the chat template, as `rollout.tasks.encoding.prompt_ids`
    does for this example)."""
    return PromptedExample(ex, template.format_map(task_row(task, ex)))


def builtin_source(tokenizer, tasks: str | Sequence[str], seed: int = 0, n_train: int = 4096,
                   n_eval: int = 128) -> PromptSource:
    """Built-in tasks of `rollout.tasks` ("arithmetic", "sort", ...; several: "arithmetic,sort"),
    each prompt graded by its own task's grader. Several tasks are interleaved (one example of each
    in turn, in the order given; `n_train` / `n_eval` per task); a run's order is then the source's
    seeded permutation, as for one task."""
    from rollout.tasks import get_task
    from rollout.tasks.encoding import prompt_ids

    names = [x.strip() for x in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    graders = {name: get_task(name).grade for name in names}

    def mk(item):
        name, ex, row = item
        meta = {"a": ex.a, "b": ex.b} if name == "arithmetic" else {}
        return Prompt(prompt_ids(tokenizer, ex), str(ex.answer), name, {**meta, "task": name, "row": row})

    def items(split, n):
        per = [[(name, ex, task_row(name, ex)) for ex in get_task(name).make_examples(split, n, seed=seed)]
               for name in names]
        return [it for group in zip(*per) for it in group]

    train_items = items("train", n_train)
    train = LazyPrompts(train_items, mk)
    ev = LazyPrompts(items("eval", n_eval), mk)
    return PromptSource(train, ev, lambda text, p: graders[p.metadata["task"]](text, {"answer": p.answer}), seed=seed,
                        rows=[row for _, _, row in train_items], where=f"data.task {','.join(names)}")


def file_source(data_cfg, tokenizer, reward_name: str = "math", rows: bool = False) -> PromptSource:
    """Prompts from a JSONL/Parquet file (rollout.data layouts); graded by a named reward.
    `rows`: keep each prompt's record (teacher routing / prompt templates read it), with
    ``data_source`` set as rollout.data sets the source when the record has none (the file stem)."""
    from rollout.data import DataConfig, load_prompts, read_records
    from rollout.grading import get_reward_fn

    exs, counts = load_prompts(DataConfig(path=data_cfg.path, prompt_key=data_cfg.prompt_key or None,
                                          answer_key=data_cfg.answer_key or None,
                                          max_prompt_tokens=data_cfg.max_prompt_tokens), tokenizer)
    records = read_records(data_cfg.path) if rows else None

    def row(e):
        rec = dict(records[e.index])
        if not rec.get("data_source"):
            rec["data_source"] = e.source
        return rec

    prompts = [Prompt(e.prompt_ids, e.answer, e.source, {**e.metadata, **({"row": row(e)} if rows else {})})
               for e in exs]
    fn = get_reward_fn(reward_name or "math")
    rng = random.Random(data_cfg.seed)
    held = sorted(rng.sample(range(len(prompts)), k=min(len(prompts) // 10, 256))) if len(prompts) >= 20 else []
    held_set = set(held)
    train = [p for i, p in enumerate(prompts) if i not in held_set]
    return PromptSource(train, [prompts[i] for i in held], lambda text, p: fn(text, p.answer), seed=data_cfg.seed,
                        shuffle=data_cfg.shuffle, rows=[p.metadata["row"] for p in train] if rows else None,
                        where=f"data.path {data_cfg.path}", labels=[f"record {p.metadata['index']}" for p in train])

