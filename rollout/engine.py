"""The engine interface the trainer talks to, and a synchronous wrapper for scripts.

Two engines implement it: `LocalEngine` (transformers, CPU or one GPU) and `SGLangEngine`
(SGLang's HTTP API). `generate` yields each rollout as soon as it finishes, so a streaming trainer
can start on early groups while stragglers are still decoding.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from rollout.types import Rollout, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
    @property
    def policy_version(self) -> int: ...

    def generate(self, prompt_ids_list: Sequence[Sequence[int]], params: SamplingParams, *,
                 group_ids: Sequence[int] | None = None,
                 metadata: Sequence[dict] | None = None) -> AsyncIterator[Rollout]:
        """n = params.n samples per prompt; yields in completion order (not input order)."""
        ...

    async def update_weights_from_state_dict(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None: ...

    async def update_weights_from_disk(self, path: str, version: int) -> None: ...


def group_rollouts(rollouts: Iterable[Rollout]) -> list[list[Rollout]]:
    """Rollouts grouped by group_id, groups in first-seen order, samples by sample_index."""
    groups: dict[int, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(r.group_id, []).append(r)
    return [sorted(g, key=lambda r: r.sample_index) for g in groups.values()]


class SyncEngine:
    """Blocking facade over an async engine: runs its own event loop in a daemon thread, so it
    also works from code that already has a running loop (notebooks, other frameworks)."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="rollout-sync-loop")
        self._thread.start()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def generate(self, prompt_ids_list, params: SamplingParams, **kw) -> list[Rollout]:
        """All rollouts, sorted by (prompt_index, sample_index)."""
        async def collect():
            return [r async for r in self.engine.generate(prompt_ids_list, params, **kw)]
        out = self._run(collect())
        return sorted(out, key=lambda r: (r.prompt_index, r.sample_index))

    def update_weights_from_state_dict(self, state_dict, version: int) -> None:
        self._run(self.engine.update_weights_from_state_dict(state_dict, version))

    def update_weights_from_disk(self, path: str, version: int) -> None:
        self._run(self.engine.update_weights_from_disk(path, version))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
