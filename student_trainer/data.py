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
    def __init__(self, train: list[Prompt], eval_: list[Prompt], reward: Callable[[str, Prompt], float], seed: int = 0,
                 shuffle: bool = True):
        if not train:
            raise ValueError("data: no training prompts (all filtered out or an empty file)")
        self.train, self.eval, self.reward_fn, self.seed, self.shuffle = train, eval_, reward, seed, shuffle

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


def arithmetic_source(tokenizer, seed: int = 0, n_train: int = 4096, n_eval: int = 128, digits: int = 2,
                      style: str = "worked") -> PromptSource:
    """The built-in task of `opd demo` (rollout.tasks.arithmetic): addition with a worked answer."""
    from rollout.tasks import arithmetic as T
    from rollout.tasks.encoding import prompt_ids

    def mk(ex):
        return Prompt(prompt_ids(tokenizer, ex), str(ex.answer), "arithmetic", {"a": ex.a, "b": ex.b})

    train = LazyPrompts(T.make_examples("train", n_train, seed=seed, digits=digits, style=style), mk)
    ev = LazyPrompts(T.make_examples("eval", n_eval, seed=seed, digits=digits, style=style), mk)
    return PromptSource(train, ev, lambda text, p: T.grade(text, {"answer": p.answer}), seed=seed)


def file_source(data_cfg, tokenizer, reward_name: str = "math") -> PromptSource:
    """Prompts from a JSONL/Parquet file (rollout.data layouts); graded by a named reward."""
    from rollout.data import DataConfig, load_prompts
    from rollout.grading import get_reward_fn

    exs, counts = load_prompts(DataConfig(path=data_cfg.path, prompt_key=data_cfg.prompt_key or None,
                                          answer_key=data_cfg.answer_key or None,
                                          max_prompt_tokens=data_cfg.max_prompt_tokens), tokenizer)
    prompts = [Prompt(e.prompt_ids, e.answer, e.source, dict(e.metadata)) for e in exs]
    fn = get_reward_fn(reward_name or "math")
    rng = random.Random(data_cfg.seed)
    held = sorted(rng.sample(range(len(prompts)), k=min(len(prompts) // 10, 256))) if len(prompts) >= 20 else []
    held_set = set(held)
    train = [p for i, p in enumerate(prompts) if i not in held_set]
    return PromptSource(train, [prompts[i] for i in held], lambda text, p: fn(text, p.answer), seed=data_cfg.seed,
                        shuffle=data_cfg.shuffle)


def task_source(tokenizer, task: str, seed: int = 0, n_train: int = 4096, n_eval: int = 128) -> PromptSource:
    """A built-in synthetic task of `rollout.tasks` ("sort", "reverse", ...), graded by its own grader."""
    from rollout.tasks import get_task
    from rollout.tasks.encoding import prompt_ids

    t = get_task(task)

    def mk(ex):
        return Prompt(prompt_ids(tokenizer, ex), str(ex.answer), task, {})

    train = LazyPrompts(t.make_examples("train", n_train, seed=seed), mk)
    ev = LazyPrompts(t.make_examples("eval", n_eval, seed=seed), mk)
    return PromptSource(train, ev, lambda text, p: t.grade(text, {"answer": p.answer}), seed=seed)
