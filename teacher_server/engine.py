"""The scoring engine: a bounded queue of sequences, batched under a token budget, one model
forward per batch, and the chunked statistics head on the scored positions only.

Transport-free: `ScoringEngine.score(items)` runs the same path the gRPC service uses, so the
core is testable without a server.

Two parts: the queue and the batching policy (admission, prompt groups, the token budget, which
waiting sequences form the next batch) live in `batching.py`, pure and tested without a model;
this module is the pipeline that runs a batch (forward, head parts, copy-out, finisher).

Batching (`batching.BatchPolicy`): the oldest waiting sequence opens a batch; the waiting
sequences closest to it in length join while (longest length x count) stays within
`max_batch_tokens`. Sequences are right padded to the longest in the batch, so grouping by length keeps padding small; the padding
count is reported (`padded_tokens`). Right padding never changes a real token's result (causal
attention, positions start at 0 for every row).

Pipeline (the worker, `start()`): the worker thread takes a batch, queues its device work (body,
then the head part by part, each part's statistics copied to pinned host memory without waiting)
and goes on to the next batch; a finisher thread waits for each part's copy, splits it per item
and delivers it, so a part's results are encoded and sent while the head computes the next part,
and a batch's results while the next batch runs. At most `pipeline_depth` (2) batches are
launched and not finished; the next batch is formed only when there is room, and the worker
lingers `batch_wait_s` (2 ms) for a stream's next request while the queue is below one batch.
`score()` runs the same steps on the caller's thread, one batch after the other.

Prompt-prefix sharing (`prefix.py`, on by default): sequences of one batch that share a prefix of
>= `prefix_min_tokens` tokens (n samples of a prompt, multi-turn histories) run the prefix once;
the opener of a batch pulls sequences with its first tokens in first. Two ways to run it:
- packed (`packed.py`; `packing`: "auto" = on CUDA with the compiled body): the whole batch is
  one row of tokens, each shared prefix once, no padding, with a tree-shaped attention mask
  (FlexAttention on CUDA); it also takes batches of uneven lengths. The batch's token budget
  then counts packed tokens (a sequence sharing a prefix with one already taken costs only its
  tokens after it). "on" packs on CPU too (a dense [T, T] mask: tests, small batches).
  A packed warm-up batch that fails or differs from eager, or a packed batch that fails while
  serving, turns packing off (logged) and leaves the rest as it is.
- KV cache (`prefix.shared_forward`; CPU, eager, or packing off): the prefixes run first, then
  the continuations against their cache.
Results equal the unshared path (tests/test_teacher_prefix.py, tests/test_teacher_packed.py).

Speed levers (each an attribute, so the benchmark can flip them on one engine):
- `compile` ("auto" | "off" | "body" | "head" | "all"; auto = all on CUDA, off elsewhere):
  regional torch.compile of the body (`model.compile_body`) and of the head's fused row reduction
  (`head.compiled_row_stats`); compiled and warmed up by `prepare()` (the worker thread runs it
  before taking work, `score` waits for it), falling back to eager if compilation fails.
- `head` ("fast" | "reference"): the statistics head (`head.HEADS`).
- `split_uneven`: the plain (unshared) path forwards a batch of uneven lengths as sub-batches of
  similar length (sorted, cut where padding would pass `split_max_pad` of a sub-batch holding
  >= `split_min_tokens` real tokens) instead of padding everything to the longest.
- `timing`: synchronise the device after the body and after the head so `stats.body_seconds` /
  `stats.head_seconds` attribute the time (benchmarks; costs a little overlap).

Statistics cache (`cache.py`, off unless `cache` is given): keyed by the teacher's model id, the
token ids, the span and every option that changes the result; a hit is delivered at `submit` /
`score` without queueing (`_batch_sequences` = 0). Counters: `stats.cache_*`.

Several models, one queue (`add_model`): the engine that is started (the default model's) queues
every model's items (`ScoreItem.model` names the model); the policy opens a batch with the oldest
item and takes only items of its model, and the batch runs on that model's engine (its own
pipeline, stats, compile state), never started itself. `update_weights` copies new weights in
place while no batch is being launched (`_weights_lock`); every result carries the weight version
it was computed with (`_weight_version`), and the cache key of updated weights names the update.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from teacher_server import head as H
from teacher_server import packed as PK
from teacher_server import prefix as PX
from teacher_server.batching import BatchPolicy, BatchQueue, QueuedEngine, QueueFull, ScoreItem  # noqa: F401 (re-exported)
from teacher_server.cache import StatsCache, item_key
from teacher_server.fp8 import FP8Linear, dequantized
from teacher_server.model import compile_body, uncompile_body

log = logging.getLogger("opd.teacher")


COMPILE_MODES = ("auto", "off", "body", "head", "all")
PACKING_MODES = ("auto", "on", "off")


@dataclass
class EngineStats:
    sequences: int = 0
    batches: int = 0
    tokens: int = 0
    scored_positions: int = 0
    padded_tokens: int = 0
    busy_seconds: float = 0.0
    cancelled: int = 0
    forward_tokens: int = 0           # token positions the body actually ran (incl. padding)
    shared_prefix_tokens: int = 0     # tokens NOT recomputed thanks to prompt-prefix sharing
    cache_hits: int = 0
    cache_misses: int = 0
    cache_bytes: int = 0              # bytes held by the in-memory statistics cache
    cache_entries: int = 0
    body_seconds: float = 0.0         # time in the body forward (device-synchronised only with `timing`)
    head_seconds: float = 0.0         # time in the statistics head (same)
    sub_batches: int = 0              # body forwards of the plain path (split_uneven may cut a batch)
    compile_seconds: float = 0.0      # torch.compile + warm-up time spent by `prepare()`


class ScoringEngine(QueuedEngine):
    updatable_weights = True          # `update_weights` (the UpdateWeights RPC) applies to this engine

    def __init__(self, model, *, device: str | torch.device = "cpu", max_batch_tokens: int = 16384,
                 chunk_size: int = 1024, max_queue_tokens: int = 1 << 20, pad_id: int = 0,
                 prefix_sharing: bool = True, prefix_min_tokens: int = 16,
                 cache: StatsCache | None = None, model_id: str = "", compile: str = "auto",
                 compile_backend: str = "inductor", head: str = "fast", split_uneven: bool = True,
                 split_min_tokens: int = 4096, split_max_pad: float = 0.1, timing: bool = False,
                 packing: str = "auto", head_part_rows: int | None = None, pipeline_depth: int = 2,
                 batch_wait_s: float = 0.002):
        self.model = model
        self.device = torch.device(device)
        self.body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self.weight = model.get_output_embeddings().weight
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        # the batching policy and the queue (batching.py); `max_batch_tokens`, `prefix_sharing`,
        # `prefix_min_tokens` and `max_queue_tokens` are properties over them
        self.policy = BatchPolicy(max_batch_tokens, prefix_sharing, prefix_min_tokens)
        self.queue = BatchQueue(max_queue_tokens)
        self.chunk_size = chunk_size
        self.pad_id = pad_id
        self.cache = cache            # statistics cache (None = off); may be swapped at run time
        self.model_id = model_id      # identity of the teacher in cache keys (model hash + dtype)
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: expected one of {COMPILE_MODES}")
        if head not in H.HEADS:
            raise ValueError(f"head={head!r}: expected one of {sorted(H.HEADS)}")
        self.compile = compile        # requested mode; `prepare()` applies it
        self.compile_backend = compile_backend
        self.head = head
        self.split_uneven = split_uneven
        self.split_min_tokens = split_min_tokens
        self.split_max_pad = split_max_pad
        self.timing = timing
        self.head_part_rows = head_part_rows or 1024  # rows per head part, at least (see `_head_parts`)
        self.pipeline_depth = pipeline_depth  # batches launched and not yet finished, at most
        self.batch_wait_s = batch_wait_s      # linger for a stream's next request (see `_linger`)
        if packing not in PACKING_MODES:
            raise ValueError(f"packing={packing!r}: expected one of {PACKING_MODES}")
        self.packing = packing        # "auto" | "on" | "off"
        self._packing_broken = False  # packed warm-up failed or differed: not used again
        if packing != "off" and not PK.install(model):
            log.info("packing: not available for this model (attention %r); prefixes share a KV cache",
                     getattr(model.config, "_attn_implementation", None))
            self._packing_broken = True
        self.compiled_body = False    # what is active now
        self.compiled_head = False
        self._prepared: str | None = None
        self._prepare_lock = threading.Lock()
        self.quantized = any(isinstance(m, FP8Linear) for m in self.body.modules())
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._busy_until = 0.0
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        # several models, one queue (`add_model`): this engine's queue and worker serve them all,
        # each batch run by the engine of its model; {} = this engine's model only
        self.models: dict[str, ScoringEngine] = {}
        self.default_model = ""       # the name of this engine's own model once `add_model` gave one
        self.weight_version = 0       # 0 = the weights loaded at start (`update_weights`)
        self._weight_nonce = ""       # in cache keys of updated weights: versions are the caller's numbers
        self._weights_lock = threading.Lock()   # held while a batch is launched and while weights change

    # ---- models ---------------------------------------------------------------------------------
    def add_model(self, name: str, engine: "ScoringEngine | None" = None) -> None:
        """Serve `engine`'s model (default: this engine's own) as `name` from this engine's queue:
        items naming `name` (`ScoreItem.model`) are batched with each other only and run by
        `engine`. The first name given to this engine itself is the default (items naming none).
        `engine` is never started; this engine's worker runs its batches."""
        engine = self if engine is None else engine
        with self._weights_lock:
            self.models[name] = engine
            if engine is self and not self.default_model:
                self.default_model = name

    def engine_for(self, name: str) -> "ScoringEngine":
        """The engine running model `name` ("" = the default)."""
        if not name or not self.models:
            return self
        eng = self.models.get(name)
        if eng is None:
            raise ValueError(f"model {name!r} is not served here; served: {sorted(self.models)}")
        return eng

    def engines(self) -> list["ScoringEngine"]:
        """Every distinct engine serving from this queue (this one first)."""
        out = [self]
        for eng in self.models.values():
            if all(eng is not e for e in out):
                out.append(eng)
        return out

    def names_of(self, engine: "ScoringEngine") -> list[str]:
        return [n for n, e in self.models.items() if e is engine]

    def replace_model(self, name: str, engine: "ScoringEngine") -> None:
        """Serve `name` by `engine` from the next batch on (between batches)."""
        with self._weights_lock:
            if name not in self.models:
                raise ValueError(f"model {name!r} is not served here; served: {sorted(self.models)}")
            self.models[name] = engine

    def cache_model_id(self) -> str:
        """This model's identity in cache keys: the checkpoint's, plus the update for updated weights."""
        if self.weight_version == 0 and not self._weight_nonce:
            return self.model_id
        return f"{self.model_id}@v{self.weight_version}:{self._weight_nonce}"

    def parameters_by_name(self) -> dict[str, torch.Tensor]:
        """The model's parameters by every name they have (tied weights appear under each)."""
        return dict(self.model.named_parameters(remove_duplicate=False))

    def update_weights(self, tensors: dict[str, torch.Tensor], version: int, owner: "ScoringEngine | None" = None) -> float:
        """Copy `tensors` (validated by the caller: names, shapes) into the model's parameters in
        place, between two batches (`owner`'s worker launches none meanwhile; on CUDA the copies are
        ordered after the batches already launched), and set the weight version. Returns the
        seconds the swap held the engine."""
        if self.quantized:
            raise ValueError("weights of an fp8-quantised model (--quantize fp8) cannot be updated")
        import uuid

        params = self.parameters_by_name()
        lock = (owner or self)._weights_lock
        with lock, torch.no_grad():
            t0 = time.perf_counter()
            for name, t in tensors.items():
                params[name].copy_(t)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.weight_version = int(version)
            self._weight_nonce = uuid.uuid4().hex[:16]
            return time.perf_counter() - t0

    def _policy_for(self, opener: ScoreItem) -> tuple[BatchPolicy, bool]:
        eng = self.engine_for(opener.model)
        return eng.policy, eng.packing_active()

    # ---- queue --------------------------------------------------------------------------------
    def _cached(self, item: ScoreItem) -> dict | None:
        cache = self.cache
        if cache is None:
            item.cache_key = None
            return None
        eng = self.engine_for(item.model)
        version = eng.weight_version
        item.cache_key = item_key(eng.cache_model_id(), item)
        res = cache.get(item.cache_key)
        self._sync_cache_stats()
        if res is not None:
            res["_server_seconds"] = 0.0
            res["_batch_sequences"] = 0   # 0 = served from the statistics cache
            res["_weight_version"] = version
        return res

    def _sync_cache_stats(self) -> None:
        c = self.cache.counters if self.cache is not None else None
        if c is not None:
            s = self.stats
            s.cache_hits, s.cache_misses, s.cache_bytes, s.cache_entries = c.hits, c.misses, c.bytes, c.entries

    def _admit(self, item: ScoreItem) -> None:
        item.model = item.model or self.default_model

    # the waiting items and their tokens (tests fill the queue by hand)
    _pending = property(lambda self: self.queue.items, lambda self, v: setattr(self.queue, "items", v))
    _pending_tokens = property(lambda self: self.queue.tokens, lambda self, v: setattr(self.queue, "tokens", v))

    def _take_batch(self) -> list[ScoreItem]:
        """Called with the lock held and a non-empty queue: pick a batch and dequeue it."""
        batch = self.queue.take(self._policy_for)
        self._cv.notify_all()
        return batch

    def packing_active(self) -> bool:
        """Whether batches are packed now: "on", or "auto" with the compiled body on CUDA (the
        packed path needs FlexAttention compiled on CUDA; elsewhere it runs a dense mask)."""
        if self.packing == "off" or self._packing_broken:
            return False
        if self.packing == "on":
            return True
        return self.device.type == "cuda" and self.compiled_body

    # ---- worker ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="opd-teacher-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        """The worker: take a batch, launch its device work, hand it to the finisher, repeat. The
        finisher (a second thread) waits for each launched batch's copy to the host and delivers
        its results, part by part, while the next batch already runs on the device. At most
        `pipeline_depth` batches are launched and not finished: the next batch is formed only
        when there is room, so it takes everything that arrived meanwhile."""
        for eng in self.engines():
            eng.prepare()
        finishing: queue.Queue = queue.Queue()
        slots = threading.Semaphore(max(1, self.pipeline_depth))
        finisher = threading.Thread(target=self._finish_loop, args=(finishing, slots), name="opd-teacher-finish",
                                    daemon=True)
        finisher.start()
        try:
            while True:
                live = self._next_batch(slots, self._take_batch)
                if live is None:
                    return
                launched = None
                try:
                    launched = self._launch_on_model(live)
                except Exception as exc:  # a failed batch fails its items, not the server
                    log.exception("batch of %d sequences failed", len(live))
                    self._isolate(live, exc)
                if launched is None:
                    slots.release()
                else:
                    finishing.put(launched)
        finally:
            finishing.put(None)
            finisher.join()

    def _isolate(self, items: list[ScoreItem], exc: BaseException) -> None:
        """A batch failed as a whole: score its items one by one (on this thread), so only the
        items that fail on their own get an error and the others (often other clients' requests
        that happened to share the batch) get their results."""
        if len(items) == 1:
            _deliver_all(items, exc)
            return
        for it in items:
            if it.is_cancelled():
                continue
            try:
                launched = self._launch_on_model([it])
                launched.engine._finish(launched, deliver=True)
            except Exception as one_exc:  # noqa: BLE001 - this item is at fault
                log.warning("request_id %.64r failed on its own: %s", it.request_id, one_exc)
                _deliver_all([it], one_exc)

    def _finish_loop(self, finishing: queue.Queue, slots: threading.Semaphore) -> None:
        while True:
            launched = finishing.get()
            if launched is None:
                return
            try:
                launched.engine._finish(launched, deliver=True)
            except Exception as exc:  # noqa: BLE001 - fail what was not delivered yet
                log.exception("batch of %d sequences failed", len(launched.batch))
                _deliver_all([it for it in launched.batch if id(it) not in launched.delivered], exc)
            finally:
                slots.release()

    def score(self, items: list[ScoreItem], use_cache: bool = True) -> list[dict]:
        """Score items synchronously on the caller's thread (batched like the worker does).
        use_cache=False neither reads nor fills the statistics cache (warm-up, benchmarks)."""
        for eng in self.engines():
            eng.prepare()
        out, waiting = self._split_cached(items, use_cache)
        while waiting:
            batch = waiting.take(self._policy_for)
            launched = self._launch_on_model(batch)
            for it, res in zip(batch, launched.engine._finish(launched, deliver=False)):
                out[id(it)] = res
        return [out[id(it)] for it in items]

    # ---- compile / warm-up ---------------------------------------------------------------------
    def resolved_compile(self) -> str:
        if self.compile == "auto":
            return "all" if self.device.type == "cuda" else "off"
        return self.compile

    def prepare(self) -> None:
        """Apply the compile mode (idempotent; re-applies after `compile` changed): compile the
        body / head and warm every graph the server uses (batch 1, batch > 1, padded batch,
        shared-prefix batch), so the first real request pays no compile. Eager on failure."""
        mode = self.resolved_compile()
        if self._prepared == mode:
            return
        with self._prepare_lock:
            if self._prepared == mode:
                return
            want_body, want_head = mode in ("body", "all"), mode in ("head", "all")
            if not want_body and self.compiled_body:
                uncompile_body(self.body)
                self.compiled_body = False
            if not (want_body or want_head):
                self.compiled_head = False
                self._prepared = mode
                return
            batches = self._warm_batches()
            reference = None
            if (want_body or want_head) and not self.compiled_body:
                self.compiled_head = False
                with dequantized(self.body):  # (an fp8 body: see `_warm_check`)
                    reference = self._run_warm(batches)  # eager results, to check the compiled ones
            self.compiled_head = want_head
            if want_body and not self.compiled_body:
                self.compiled_body = compile_body(self.body, backend=self.compile_backend)
                if not self.compiled_body:
                    log.warning("compile: the body has no uniform `layers`; it stays eager")
            if self.compiled_body or self.compiled_head:
                t = time.perf_counter()
                problem = self._warm_check(batches, reference)
                if problem and self.packing_active():  # try once more without packed batches
                    log.error("packing: %s; batches are not packed", problem)
                    self._packing_broken = True
                    problem = self._warm_check(batches, reference)
                if problem:
                    log.error("compile: %s; serving eager", problem)
                    self._disable_compile()
                dt = time.perf_counter() - t
                self.stats.compile_seconds += dt
                log.info("compile (%s, body %s, head %s): %.1fs", mode, self.compiled_body, self.compiled_head, dt)
            self._prepared = mode

    def _warm_check(self, batches, reference) -> str:
        """Run the warm-up batches on the current path; what went wrong, or ''. An fp8 body is
        compared with its weights dequantised to the model dtype and no activation rounding
        (fp8.dequantized), against a reference run the same way: fp8 activation rounding is a
        step function, and a deep random-weight model turns compile's reordered bf16 rounding
        into log-prob differences as large as a broken graph's. The real fp8 graphs then run
        the batches once more (compiling them), and must give finite results."""
        try:
            with dequantized(self.body):
                got = self._run_warm(batches)
            if reference is not None and self.quantized:
                real = self._run_warm(batches)
                bad = [k for b in real for r in b for k, v in r.items()
                       if isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all()
                       and k != H.TAIL]
                if bad:
                    return f"fp8 warm-up gave non-finite {sorted(set(bad))}"
        except Exception as exc:  # noqa: BLE001 - any failure means: not this path
            log.exception("warm-up failed")
            return f"warm-up failed ({type(exc).__name__}: {exc})"
        if reference is None:
            return ""
        problem = compare_results(reference, got, self.weight.dtype)
        return f"results differ from eager ({problem})" if problem else ""

    def _disable_compile(self) -> None:
        if self.compiled_body:
            uncompile_body(self.body)
        self.compiled_body = self.compiled_head = False
        self.compile = "off"

    def _warm_batches(self) -> list[list[ScoreItem]]:
        vocab = int(self.weight.shape[0])
        rng = np.random.default_rng(0)
        # odd sizes: a dynamic dim whose warm-up size equals a model dim (hidden 64, head_dim
        # 128, ...) would be duck-sized onto it and specialised; batch 1 is a graph of its own
        p = max(181, self.prefix_min_tokens + 7)

        def item(ids, start=1, stats=(H.SAMPLED, H.TOPK, H.TAIL)):
            return ScoreItem("warmup", np.asarray(ids, dtype=np.int64), start, len(ids), top_k=min(8, vocab),
                             stats=frozenset(stats))

        def seq(n):
            return rng.integers(0, vocab, size=n)

        prompt = seq(p)
        batches = [[item(seq(53))],                                   # batch 1
                   [item(seq(53)), item(seq(53), stats=(H.SAMPLED, H.TOPK, H.TAIL, H.ENTROPY)),
                    item(seq(53))],                                   # batch > 1
                   [item(seq(253)), item(seq(241)), item(seq(129))]]  # padded batch (mask); packed: 640
        if self.prefix_sharing:                                       # shared prefix, uneven continuations
            c = max(1, (621 - p) // 3)                                # packed: 640 tokens
            batches.append([item(np.concatenate([prompt, seq(n)]), p) for n in (c + 2, c - 2, c)])
        return batches

    def _run_warm(self, batches: list[list[ScoreItem]]) -> list[list[dict]]:
        from tqdm import tqdm

        saved, split = self.stats, self.split_uneven
        self.stats, self.split_uneven = EngineStats(), False   # (the padded batch must stay one forward)
        path = "compiled" if self.compiled_body or self.compiled_head else "eager"
        # compiling takes tens of seconds before SERVING: a bar on a terminal (off in logs and pipes)
        bar = tqdm(batches, desc=f"teacher warm-up ({path})", unit="batch", disable=None, leave=False)
        try:
            out = [self._run_batch(b) for b in bar]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return out
        finally:
            bar.close()
            self.stats, self.split_uneven = saved, split

    # ---- compute -----------------------------------------------------------------------------
    def _launch_on_model(self, batch: list[ScoreItem]) -> "_Launched":
        """Launch a batch (one model's items) on its model's engine, its weights held still."""
        eng = self.engine_for(batch[0].model)
        with self._weights_lock:
            return eng.launch_batch(batch)

    def run_batch(self, batch: list[ScoreItem]) -> list[dict]:
        """Score one batch on the caller's thread: launch it, wait for it, return its results."""
        return self._finish(self.launch_batch(batch), deliver=False)

    def launch_batch(self, batch: list[ScoreItem]) -> "_Launched":
        """`_launch_batch`, falling back (packing off, then compile off) when it raises."""
        try:
            return self._launch_batch(batch)
        except Exception:
            if self.packing_active() and self._prepared is not None:
                log.exception("packed batch failed; batches are not packed from now on")
                self._packing_broken = True
                return self.launch_batch(batch)
            if not (self.compiled_body or self.compiled_head) or self._prepared is None:
                raise
            log.exception("compiled batch failed; falling back to eager for good")
            with self._prepare_lock:
                self._disable_compile()
                self._prepared = "off"
            return self._launch_batch(batch)

    def _run_batch(self, batch: list[ScoreItem]) -> list[dict]:
        return self._finish(self._launch_batch(batch), deliver=False)

    def _sync(self) -> None:
        if self.timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _head_parts(self, batch: list[ScoreItem]) -> list[tuple[int, int]]:
        """Consecutive item ranges [lo, hi) of about `head_part_rows` scored rows or more each:
        the head runs and copies out part by part, so a part's results can be encoded and sent
        while the head computes the next one."""
        parts, lo, rows = [], 0, 0
        for i, it in enumerate(batch):
            rows += it.num_positions
            if rows >= self.head_part_rows:
                parts.append((lo, i + 1))
                lo, rows = i + 1, 0
        if lo < len(batch):
            parts.append((lo, len(batch)))
        return parts

    @torch.inference_mode()
    def _launch_batch(self, batch: list[ScoreItem]) -> "_Launched":
        """Queue a batch's device work: the body, then the head and the copy to the host part by
        part (pinned memory, non-blocking, an event per part). Returns without waiting for the
        device unless `timing` is on."""
        t0 = time.perf_counter()
        dev = self.device
        hidden_rows = self._hidden_rows(batch)
        self._sync()
        t_body = time.perf_counter()
        rows = hidden_rows[0] if len(hidden_rows) == 1 else torch.cat(hidden_rows)
        cuda = dev.type == "cuda"
        parts, r0 = [], 0
        for lo, hi in self._head_parts(batch):
            items = batch[lo:hi]
            n = sum(it.num_positions for it in items)
            res, sorted_ids = self._head(items, rows[r0:r0 + n])
            r0 += n
            if cuda:  # into pinned host memory without waiting; the finisher waits on the event
                host = {}
                for k, v in res.items():
                    host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                    host[k].copy_(v, non_blocking=True)
                event = torch.cuda.Event(blocking=True)  # the finisher sleeps, not spins, while it waits
                event.record()
            else:
                host, event = res, None
            parts.append(_Part(lo, hi, host, event, sorted_ids))
        self._sync()
        return _Launched(batch, parts, t0, t_body, time.perf_counter(), engine=self, version=self.weight_version,
                         cache_id=self.cache_model_id())

    def _head(self, items: list[ScoreItem], hidden: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
        """The statistics of `items` (in order) from their final hidden states at the scored rows,
        and whether the top-k came out sorted by id already (one k for every item)."""
        dev = self.device
        targets, temps, row_k, extra = [], [], [], []
        max_m = max((it.extra_ids.shape[1] for it in items if it.extra_ids is not None), default=0)
        for it in items:
            targets.append(torch.from_numpy(it.token_ids[it.target_start:it.target_end]))
            temps.append(torch.full((it.num_positions,), float(it.temperature)))
            row_k.append(torch.full((it.num_positions,), it.top_k, dtype=torch.long))
            if max_m:
                e = torch.zeros((it.num_positions, max_m), dtype=torch.long)
                if it.extra_ids is not None:
                    e[:, : it.extra_ids.shape[1]] = torch.from_numpy(it.extra_ids)
                extra.append(e)
        uniform_t = all(float(it.temperature) == 1.0 for it in items)
        req = H.HeadRequest(
            hidden=hidden, targets=torch.cat(targets).to(dev, non_blocking=True),
            temperature=None if uniform_t else torch.cat(temps).to(dev, non_blocking=True),
            top_k=max(it.top_k for it in items), row_k=torch.cat(row_k).to(dev, non_blocking=True),
            extra_ids=torch.cat(extra).to(dev, non_blocking=True) if max_m else None,
            stats=frozenset().union(*(it.stats for it in items)))
        res = self._head_fn(req)
        sorted_ids = "topk_ids" in res and len({it.top_k for it in items}) == 1
        if sorted_ids:  # ids ascending on the device (for delta coding): no host-side argsort
            res["topk_ids"], order = res["topk_ids"].sort(dim=1)
            res["topk_vals"] = res["topk_vals"].gather(1, order)
        return res, sorted_ids

    def _head_fn(self, req: H.HeadRequest) -> dict[str, torch.Tensor]:
        """The statistics head over the whole vocabulary (tp.TPScoringEngine: over its shard, merged)."""
        return H.HEADS[self.head](req, self.weight, self.chunk_size, self.softcap, compiled=self.compiled_head,
                                  compile_backend=self.compile_backend)

    def _finish(self, launched: "_Launched", deliver: bool) -> list[dict]:
        """Wait for each part's copy, split it into per-item results, fill the cache and (if
        `deliver`) deliver them part by part; then count the batch. Returns the results."""
        batch, results = launched.batch, []
        for part in launched.parts:
            if part.event is not None:
                part.event.synchronize()
            res = {k: v.numpy() for k, v in part.host.items()}
            now = time.perf_counter()
            r0 = 0
            for it in batch[part.lo:part.hi]:
                r1 = r0 + it.num_positions
                try:
                    one = _split(it, res, r0, r1, part.uniform_k)
                except Exception as exc:  # noqa: BLE001 - this item's results are broken, not the batch's
                    if not deliver:
                        raise
                    log.warning("request_id %.64r: splitting its results failed: %s", it.request_id, exc)
                    results.append(exc)
                    r0 = r1
                    continue
                one["_server_seconds"] = now - launched.t0
                one["_batch_sequences"] = len(batch)
                one["_weight_version"] = launched.version
                if self.cache is not None and it.cache_key is not None:
                    if launched.cache_id != self.model_id:   # updated weights: keyed by the update it ran on
                        it.cache_key = item_key(launched.cache_id, it)
                    self.cache.put(it.cache_key, one)
                results.append(one)
                r0 = r1
            if deliver:
                for it, one in zip(batch[part.lo:part.hi], results[part.lo:part.hi]):
                    launched.delivered.add(id(it))
                    if it.deliver is not None:
                        it.deliver(it, one)
        t_end = time.perf_counter()
        with self._stats_lock:
            s = self.stats
            s.sequences += len(batch)
            s.batches += 1
            s.tokens += sum(len(it.token_ids) for it in batch)
            s.scored_positions += sum(it.num_positions for it in batch)
            # busy = wall time with a batch in flight: overlapping batches count once
            s.busy_seconds += max(0.0, t_end - max(launched.t0, self._busy_until))
            self._busy_until = max(self._busy_until, t_end)
            s.body_seconds += launched.t_body - launched.t0
            s.head_seconds += launched.t_head - launched.t_body
            if self.cache is not None:
                self._sync_cache_stats()
        return results

    def _hidden_rows(self, batch: list[ScoreItem]) -> list[torch.Tensor]:
        """Final hidden states at the items' scored rows, in batch order (a list of [rows, H]
        tensors to concatenate): one packed forward of the batch, or one padded forward of the
        unshared sequences (split_uneven: a few) and one shared-prefix forward of the groups."""
        dev, s = self.device, self.stats
        seqs = [it.token_ids for it in batch]
        if self.prefix_sharing and len(batch) > 1:
            groups = PX.plan_groups(seqs, self.prefix_min_tokens)
        else:
            groups = [(0, [i]) for i in range(len(batch))]
        shared = any(p > 0 for p, _ in groups)
        if self.packing_active() and len(batch) > 1 and (shared or len({len(q) for q in seqs}) > 1):
            layout = PK.plan_layout(seqs, groups, self.pad_id)
            hidden = PK.packed_forward(self.body, layout, dev, flex=dev.type == "cuda")
            idx = np.concatenate([layout.where[i][it.target_start - 1: it.target_end - 1]
                                  for i, it in enumerate(batch)])
            s.sub_batches += 1
            s.forward_tokens += layout.tokens
            s.padded_tokens += layout.tokens - layout.real_tokens
            s.shared_prefix_tokens += sum(p * (len(m) - 1) for p, m in groups)
            return [hidden.index_select(0, torch.from_numpy(idx).to(dev, non_blocking=True))]
        out: list[torch.Tensor | None] = [None] * len(batch)
        plain = [m[0] for p, m in groups if p == 0]
        if len(plain) < len(batch):
            shared, cnt = PX.shared_forward(self.body, seqs, groups, dev, self.pad_id)
            s.forward_tokens += cnt["forward_tokens"]
            s.padded_tokens += cnt["padded_tokens"]
            s.shared_prefix_tokens += cnt["shared_prefix_tokens"]
            for i, (ph, ch, p) in shared.items():
                out[i] = PX.rows_for(ph, ch, p, batch[i].target_start, batch[i].target_end)
        for sub in self._plain_groups(plain, [len(seqs[i]) for i in plain]):
            s.sub_batches += 1
            lengths = [len(seqs[i]) for i in sub]
            longest = max(lengths)
            ids = torch.full((len(sub), longest), self.pad_id, dtype=torch.long)
            for b, i in enumerate(sub):
                ids[b, : lengths[b]] = torch.from_numpy(seqs[i])
            ids = ids.to(dev, non_blocking=True)
            mask = None
            if min(lengths) != longest:
                mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long().to(dev)
            hidden = self.body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            s.forward_tokens += longest * len(sub)
            s.padded_tokens += longest * len(sub) - sum(lengths)
            for b, i in enumerate(sub):
                it = batch[i]
                out[i] = hidden[b, it.target_start - 1: it.target_end - 1]
        return out  # type: ignore[return-value]

    def _plain_groups(self, idx: list[int], lengths: list[int]) -> list[list[int]]:
        """Sub-batches of the plain path: everything in one padded forward, or (split_uneven)
        longest first, a new sub-batch once adding the next sequence would make padding more
        than `split_max_pad` of a sub-batch that already holds `split_min_tokens` real tokens."""
        if not idx:
            return []
        if not self.split_uneven or min(lengths) == max(lengths):
            return [idx]
        order = sorted(range(len(idx)), key=lambda b: -lengths[b])
        groups, cur, real = [], [], 0
        for b in order:
            n = lengths[b]
            if cur:
                padded = lengths[cur[0]] * (len(cur) + 1)
                if padded - (real + n) > self.split_max_pad * padded and real >= self.split_min_tokens:
                    groups.append(cur)
                    cur, real = [], 0
            cur.append(b)
            real += n
        groups.append(cur)
        return [[idx[b] for b in g] for g in groups]



@dataclass
class _Part:
    """Items [lo, hi) of a launched batch: their statistics on the host once `event` is done."""
    lo: int
    hi: int
    host: dict[str, torch.Tensor]
    event: "torch.cuda.Event | None"
    uniform_k: bool       # the top-k ids came sorted from the device (one k for the part)


@dataclass
class _Launched:
    batch: list[ScoreItem]
    parts: list[_Part]
    t0: float
    t_body: float
    t_head: float
    delivered: set[int] = field(default_factory=set)
    engine: "ScoringEngine | None" = None   # the engine that ran it (its model's)
    version: int = 0                          # the weight version it ran with
    cache_id: str = ""                        # its engine's `cache_model_id()` at launch



def _deliver_all(items: list[ScoreItem], res: BaseException) -> None:
    for it in items:
        if it.deliver is not None:
            it.deliver(it, res)


def _split(it: ScoreItem, res: dict[str, np.ndarray], r0: int, r1: int, uniform_k: bool) -> dict[str, np.ndarray]:
    """One item's statistics: rows [r0, r1) of its part's arrays, only what it asked for. Copies,
    so a result waiting to be sent holds its own rows and not its whole batch part's arrays."""
    one: dict[str, np.ndarray] = {}
    for key in (H.SAMPLED, H.LSE, H.ENTROPY, H.TAIL):
        if key in it.stats and key in res:
            one[key] = res[key][r0:r1].copy()
    if H.EXTRA in it.stats and it.extra_ids is not None:
        one[H.EXTRA] = res[H.EXTRA][r0:r1, : it.extra_ids.shape[1]].copy()
    if H.FULL in it.stats:
        one[H.FULL] = res[H.FULL][r0:r1].copy()
    if H.TOPK in it.stats and it.top_k > 0:
        vals = res["topk_vals"][r0:r1, : it.top_k]
        tid = res["topk_ids"][r0:r1, : it.top_k]
        if uniform_k:
            one["topk_ids"], one["topk_logprobs"] = tid.copy(), vals.copy()
        else:
            order = np.argsort(tid, axis=1, kind="stable")  # ids ascending, for delta coding
            one["topk_ids"] = np.take_along_axis(tid, order, 1)
            one["topk_logprobs"] = np.take_along_axis(vals, order, 1)
    return one


def compare_results(reference: list[list[dict]], got: list[list[dict]], dtype: torch.dtype) -> str:
    """'' if the compiled warm-up results match the eager ones within the dtype's rounding, else
    what differs. Fusion reorders bf16 arithmetic, so log-probs move by ~1e-2; a wrong graph
    (a layer skipped, a stale shape) moves them by whole units. Top-k log-probs are compared
    sorted by value, since a near-tie at the k-th place may bring in another id (the arrays come
    ordered by id, so one swapped id would misalign the rest)."""
    tol_max, tol_mean = (1e-3, 1e-4) if dtype == torch.float32 else (0.5, 0.05)
    for b, (rb, gb) in enumerate(zip(reference, got)):
        for i, (r, g) in enumerate(zip(rb, gb)):
            for key in (H.SAMPLED, "topk_logprobs"):
                if key not in r:
                    continue
                want, have = np.asarray(r[key], np.float64), np.asarray(g[key], np.float64)
                if key == "topk_logprobs":  # by value: near-ties may swap ids at the k-th place
                    want, have = -np.sort(-want, axis=-1), -np.sort(-have, axis=-1)
                d = np.abs(want - have)
                # deep random-weight models spread bf16 rounding further: the mean may reach a
                # tenth of the values' own spread (a wrong graph moves them by about the spread)
                mean_tol = max(tol_mean, 0.1 * float(want.std())) if dtype != torch.float32 else tol_mean
                if d.size and (not np.isfinite(d).all() or d.max() > tol_max or d.mean() > mean_tol):
                    return (f"warm-up batch {b} item {i} {key}: max |diff| {d.max():.3g}, mean {d.mean():.3g} "
                            f"(allowed {tol_max:g} / {mean_tol:.3g})")
    return ""
