"""The scoring engine's queue and batching policy: which waiting sequences form the next forward.

`BatchQueue` and `BatchPolicy` are pure: no model, no device, no threads (the engine holds the
lock around every call), so they are tested on queues of `ScoreItem`s alone
(tests/test_teacher_batching.py). `QueuedEngine` is what both engines (`ScoringEngine` in
engine.py, `SGLangScoringEngine` in sglang_engine.py) build on them: the settings as attributes,
submit (a cache hit at once, else admission with a wait for room), the cache split of `score()`,
and the worker's wait for its next batch (with the linger for a stream's next request).

- Admission (`BatchQueue.admits`): a sequence enters while the queued tokens stay within
  `max_queue_tokens`; one always enters an empty queue, however long.
- One model per batch: the oldest waiting sequence opens the batch and only sequences naming the
  same model (`ScoreItem.model`) may join it, so several models served from one queue never
  share a forward.
- Padded batches (`BatchPolicy.pick_padded`): the opener, then sequences sharing its first
  `prefix_min_tokens` tokens, then the sequences closest to it in length, while
  (longest length x count) fits `max_batch_tokens`.
- One request per batch (`BatchPolicy.pick_prompt_group`, the SGLang engine's /generate calls):
  the opener's prompt group whole, then the others in queue order, while the tokens sent fit
  `max_batch_tokens`.
- Packed batches (`BatchPolicy.pick_packed`): prompt groups (`group_key`) kept whole, each
  sequence costing its tokens after the prefix it shares with its group's first member taken.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from teacher_server import prefix as PX


class QueueFull(Exception):
    """The engine's queue is at its token limit."""


@dataclass
class ScoreItem:
    """One validated sequence to score (see proto/ for the span semantics)."""
    request_id: str
    token_ids: np.ndarray             # int64 [L]
    target_start: int
    target_end: int
    top_k: int
    stats: frozenset[str]
    temperature: float = 1.0
    extra_ids: np.ndarray | None = None   # int64 [P, M]
    deliver: Callable[["ScoreItem", dict | BaseException], None] | None = None
    is_cancelled: Callable[[], bool] = lambda: False
    enqueued_at: float = field(default_factory=time.monotonic)
    cache_key: str | None = None
    group_key: bytes | None = field(default=None, repr=False)   # see BatchPolicy.group_key
    model: str = ""                   # served model name; "" = the engine's default model

    @property
    def num_positions(self) -> int:
        return self.target_end - self.target_start

    @property
    def cost(self) -> int:
        return len(self.token_ids)


@dataclass
class BatchPolicy:
    """How a batch is picked from the waiting sequences (the settings of one model's engine)."""
    max_batch_tokens: int = 16384
    prefix_sharing: bool = True
    prefix_min_tokens: int = 16

    def pick(self, pending: list[ScoreItem], packed: bool) -> list[ScoreItem]:
        """The next batch (not dequeued): opened by `pending[0]`, only items of its model."""
        first = pending[0]
        same = pending if all(it.model == first.model for it in pending) else \
            [it for it in pending if it.model == first.model]
        return self.pick_packed(same) if packed else self.pick_padded(same)

    def pick_padded(self, pending: list[ScoreItem]) -> list[ScoreItem]:
        """Padded batches: the opener, its prefix mates first, then the sequences closest to it in
        length, while (longest x count) fits `max_batch_tokens`."""
        first = pending[0]
        if self.prefix_sharing:  # sequences sharing the opener's first tokens join first
            head = first.token_ids[: self.prefix_min_tokens]
            others = sorted(pending[1:], key=lambda it: (
                not (len(it.token_ids) > len(head) and np.array_equal(it.token_ids[: len(head)], head)),
                abs(it.cost - first.cost)))
        else:
            others = sorted(pending[1:], key=lambda it: abs(it.cost - first.cost))
        batch, longest = [first], first.cost
        for it in others:
            new_longest = max(longest, it.cost)
            if new_longest * (len(batch) + 1) > self.max_batch_tokens:
                continue
            batch.append(it)
            longest = new_longest
        return batch

    def pick_packed(self, pending: list[ScoreItem]) -> list[ScoreItem]:
        """Packed batches have no padding: the opener's prompt group (the waiting sequences with
        its prompt, `group_key`) first, then the other groups and lone sequences in
        queue order, while the packed tokens fit `max_batch_tokens`. A sequence that shares the
        first tokens of one already taken costs only its tokens after their common prefix.
        Groups are kept whole: a group that does not fit what is left of the batch but would fit
        an empty one waits for the next batch (cutting it would run its prefix twice); one larger
        than a whole batch (and the opener's) is cut, members in queue order."""
        n, budget, pend = self.prefix_min_tokens, self.max_batch_tokens, pending
        groups: dict[bytes, list[int]] = {}
        order: list[list[int]] = []            # groups in order of their first member
        for j, it in enumerate(pend):
            k = self.group_key(it) if self.prefix_sharing else None
            if k is None:
                order.append([j])
            elif k in groups:
                groups[k].append(j)
            else:
                groups[k] = [j]
                order.append(groups[k])

        def cost(it: ScoreItem, ref: ScoreItem | None) -> int:
            if ref is None:
                return it.cost
            lcp = PX.common_prefix(it.token_ids, ref.token_ids)
            return max(1, it.cost - lcp) if lcp >= n else it.cost

        batch, total = [], 0
        for g in order:
            if total >= budget:
                break
            head = pend[g[0]]
            costs = [head.cost] + [cost(pend[j], head) for j in g[1:]]   # with the head taken
            whole = sum(costs)
            if batch and len(g) > 1 and total + whole > budget and whole <= budget:
                continue                       # whole in a later batch
            ref = None                         # the group's first member taken
            for j, c in zip(g, costs):
                it = pend[j]
                if ref is not head:            # the head was not taken: cost against what was
                    c = cost(it, ref)
                if batch and total + c > budget:
                    continue
                batch.append(it)
                total += c
                if ref is None and len(g) > 1:
                    ref = it
        return batch

    def pick_prompt_group(self, pending: list[ScoreItem]) -> list[ScoreItem]:
        """One request per batch (the SGLang engine's /generate): the opener, its prompt group
        (`group_key`, samples of one prompt) whole, then the others in queue order, while the
        tokens sent (each sequence up to its span's end) fit `max_batch_tokens`; the opener
        always goes."""
        first = pending[0]
        key = self.group_key(first) if self.prefix_sharing else None
        mates = [it for it in pending[1:] if key is not None and self.group_key(it) == key]
        mate_ids = {id(it) for it in mates}
        rest = [it for it in pending[1:] if id(it) not in mate_ids]
        batch, total = [first], first.target_end
        for it in mates + rest:
            if total + it.target_end <= self.max_batch_tokens:
                batch.append(it)
                total += it.target_end
        return batch

    def group_key(self, it: ScoreItem) -> bytes | None:
        """What makes sequences one prompt group when batches are picked: their tokens before
        the scored span (the prompt; at least `prefix_min_tokens` of them). Samples of one prompt
        share it; prompts that only share a chat template or system prompt do not, so each
        prompt's samples stay together (`plan_groups` still shares what the batch has in common).
        None: too short to share. Computed once per item."""
        if it.group_key is None:
            m = max(self.prefix_min_tokens, it.target_start)
            it.group_key = it.token_ids[:m].tobytes() if len(it.token_ids) > m else b""
        return it.group_key or None


class BatchQueue:
    """Waiting sequences in arrival order and their token count. Not thread-safe: the engine
    calls it with its lock held."""

    def __init__(self, max_queue_tokens: int = 1 << 20):
        self.max_queue_tokens = max_queue_tokens
        self.items: list[ScoreItem] = []
        self.tokens = 0

    def __len__(self) -> int:
        return len(self.items)

    def admits(self, item: ScoreItem) -> bool:
        """Whether `item` may enter now: within `max_queue_tokens`, or the queue is empty."""
        return not self.items or self.tokens + item.cost <= self.max_queue_tokens

    def full_message(self) -> str:
        return f"teacher queue holds {self.tokens} tokens (limit {self.max_queue_tokens}); retry later"

    def push(self, item: ScoreItem) -> None:
        self.items.append(item)
        self.tokens += item.cost

    def take(self, policy_for: Callable[[ScoreItem], tuple[BatchPolicy, bool]]) -> list[ScoreItem]:
        """Pick the next batch and dequeue it. `policy_for(opener)` gives the policy of the
        opener's model and whether its batches are packed. The queue must not be empty."""
        policy, packed = policy_for(self.items[0])
        batch = policy.pick(self.items, packed)
        self.remove(batch)
        return batch

    def remove(self, batch: list[ScoreItem]) -> None:
        taken = {id(it) for it in batch}
        self.items = [it for it in self.items if id(it) not in taken]
        self.tokens -= sum(it.cost for it in batch)


class QueuedEngine:
    """The part of an engine around its `policy` (BatchPolicy) and `queue` (BatchQueue), shared
    by `ScoringEngine` and `SGLangScoringEngine`. The engine provides `policy`, `queue`, `_cv`
    (the condition whose lock guards the queue), `_stop`, `batch_wait_s`, `stats` (its
    `cancelled` count), `_cached(item)` and optionally `_admit(item)`."""

    # the policy's and the queue's settings, as attributes of the engine (benchmarks and tests set them)
    max_batch_tokens = property(lambda self: self.policy.max_batch_tokens,
                                lambda self, v: setattr(self.policy, "max_batch_tokens", v))
    prefix_sharing = property(lambda self: self.policy.prefix_sharing,
                              lambda self, v: setattr(self.policy, "prefix_sharing", v))
    prefix_min_tokens = property(lambda self: self.policy.prefix_min_tokens,
                                 lambda self, v: setattr(self.policy, "prefix_min_tokens", v))
    max_queue_tokens = property(lambda self: self.queue.max_queue_tokens,
                                lambda self, v: setattr(self.queue, "max_queue_tokens", v))

    @property
    def queue_tokens(self) -> int:
        return self.queue.tokens

    def _admit(self, item: ScoreItem) -> None:
        """What the engine does to an item before its cache lookup (fill defaults, refuse what it
        cannot score). The engine's `_cached(item)` gives the cached statistics or None."""

    def submit(self, item: ScoreItem, wait_s: float = 0.0) -> None:
        """Queue an item; waits up to `wait_s` for room, then raises QueueFull. An item whose
        statistics are cached is delivered at once, on the caller's thread."""
        self._admit(item)
        res = self._cached(item)
        if res is not None:
            if item.deliver is not None:
                item.deliver(item, res)
            return
        self._enqueue(item, wait_s)

    def _split_cached(self, items: list[ScoreItem], use_cache: bool) -> tuple[dict, BatchQueue]:
        """`score()`'s first step: the cached results by `id(item)`, and the other items in a queue
        of their own (batched by the same policy). use_cache=False neither reads nor fills the
        statistics cache."""
        out: dict[int, dict] = {}
        waiting = BatchQueue()
        for it in items:
            self._admit(it)
            res = self._cached(it) if use_cache else None
            if not use_cache:
                it.cache_key = None
            if res is None:
                waiting.push(it)
            else:
                out[id(it)] = res
        return out, waiting

    def _enqueue(self, item: ScoreItem, wait_s: float) -> None:
        """Queue `item`, waiting up to `wait_s` for room; QueueFull when the time is up or the
        engine stops first. A sequence always enters an empty queue."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            while not self.queue.admits(item):
                left = deadline - time.monotonic()
                if left <= 0 or self._stop:
                    raise QueueFull(self.queue.full_message())
                self._cv.wait(left)
            item.enqueued_at = time.monotonic()
            self.queue.push(item)
            self._cv.notify_all()

    def _next_batch(self, slots, take: Callable[[], list[ScoreItem]]) -> list[ScoreItem] | None:
        """The worker's next batch: wait for a queued item (None once the engine stops with
        nothing queued), then for one of `slots` (a semaphore: batches in flight) and the linger;
        `take()` dequeues the batch with the lock held. Cancelled items are counted and dropped;
        when all were, the slot is given back and the wait starts again."""
        while True:
            with self._cv:
                while not self.queue and not self._stop:
                    self._cv.wait()
                if not self.queue and self._stop:
                    return None
            slots.acquire()
            with self._cv:
                self._linger()
                if not self.queue:
                    slots.release()
                    continue
                batch = take()
            live = [it for it in batch if not it.is_cancelled()]
            self.stats.cancelled += len(batch) - len(live)
            if live:
                return live
            slots.release()

    def _linger(self) -> None:
        """Called with the lock held: while the queue is below one batch, wait for more items as
        long as they keep arriving within `batch_wait_s` of each other (a stream's requests come
        one by one), at most 10 x `batch_wait_s` in all."""
        if self.batch_wait_s <= 0:
            return
        end = time.monotonic() + 10 * self.batch_wait_s
        while self.queue and self.queue.tokens < self.max_batch_tokens and not self._stop:
            n = len(self.queue)
            left = min(self.batch_wait_s, end - time.monotonic())
            if left <= 0:
                return
            self._cv.wait(left)
            if len(self.queue) <= n:  # nothing new arrived
                return
