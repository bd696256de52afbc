"""`opd teacher --engine sglang --sglang-url URL[,URL...]`: teacher statistics from an SGLang server.

For teachers only a cluster serves: SGLang runs the model (with its own tensor / expert
parallelism, across nodes) and this engine asks it for input-token log-probs through `/generate`
(SGLang 0.5.23; docs/sglang-scoring.md): `input_ids` up to the end of the scored span,
`sampling_params.max_new_tokens` 0 (prefill only), `return_logprob` true, `logprob_start_len`
= target_start - 1, `top_logprobs_num` = k, `token_ids_logprob` = the requested extra ids.
The opd side stays as it is: the gRPC service, handshake (GetInfo: tokenizer fingerprint and
config from `--model DIR`), validation, statistics cache, compression, auth, metrics, and
prefix grouping (samples of one prompt go to SGLang together, in one batched request, to one
URL, so its radix cache runs their prompt once; the queue and that policy are batching.py's
`BatchQueue` and `BatchPolicy.pick_prompt_group`). Flags, their checks and the server's assembly
are in sglang_app.py.

What SGLang returns, read from the 0.5.23 source (scheduler's logprob_result_processor,
layers/logprob_processor.py, tokenizer_manager.add_logprob_to_meta_info, http_server):
- `meta_info.input_token_logprobs` runs over input_ids[s:] (s = logprob_start_len); entry 0 is
  a placeholder with a null log-prob, entry i is log p(input_ids[s+i] | input_ids[:s+i]).
  `input_top_logprobs` / `input_token_ids_logprobs` hold null at entry 0, then per position k
  entries [logprob, id, text] (top-k highest first; the requested ids in their order).
- Values: float32 log_softmax of float32 logits (the lm-head output cast to fp32), taken to
  Python floats exactly; JSON carries them exactly. -inf is written as null (orjson).
- Input log-probs ignore `temperature` (no division on the prefill path; there is no field for
  it in 0.5.23): requests with temperature != 1 are refused.
- No log-sum-exp, entropy or full distribution: LOGSUMEXP, ENTROPY and FULL_LOGPROBS are
  refused (INVALID_ARGUMENT naming the statistic). TAIL_LOGMASS is derived from the top-k:
  log(1 - sum_k exp(v)), computed in float64 as log(-expm1(logsumexp(v))); its error is
  bounded in docs/sglang-scoring.md; tails below k * 2^-24 (under float32 resolution) are
  reported as log(k * 2^-24).

Failures: a URL that refuses connections or answers 5xx is marked down (and retried on another
URL); a health monitor polls every URL's /health and takes the teacher's gRPC health to
NOT_SERVING while none answers (back to SERVING when one does). Work sent while every URL is
down fails at once with UNAVAILABLE (clients retry or move to another replica).
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import zlib
from concurrent import futures
from urllib.parse import urlparse

import grpc
import numpy as np

from teacher_server import head as H
from teacher_server.batching import BatchPolicy, BatchQueue, QueuedEngine
from teacher_server.engine import EngineStats, ScoreItem
from teacher_server.validate import InvalidRequest, echo

log = logging.getLogger("opd.teacher")

# What SGLang's input log-probs cannot give exactly, and why (the INVALID_ARGUMENT text).
REFUSED = {
    H.LSE: ("LOGSUMEXP", "SGLang returns normalised log-probs only, not the logits' log-sum-exp"),
    H.ENTROPY: ("ENTROPY", "SGLang returns the top-k, not the whole distribution an exact entropy needs"),
    H.FULL: ("FULL_LOGPROBS", "SGLang returns at most top_logprobs_num entries per position"),
}
SUPPORTED = ("SAMPLED_LOGPROB", "TOPK", "TAIL_LOGMASS", "EXTRA_LOGPROBS")
MAX_UNION_IDS = 1024        # token_ids_logprob ids per SGLang request (per-position extra ids are unioned)
FP32_RESOLUTION = 2.0 ** -24


class SGLangUnavailable(RuntimeError):
    """No SGLang URL answered (connection refused, 5xx, aborted by the server): retryable."""
    grpc_status = grpc.StatusCode.UNAVAILABLE


class SGLangFailed(RuntimeError):
    """SGLang answered with an error or a response that does not fit the request."""
    grpc_status = grpc.StatusCode.INTERNAL


# ---- HTTP ------------------------------------------------------------------------------------------
class SGLangHttp:
    """JSON over keep-alive connections, one per (thread, URL)."""

    def __init__(self, api_key: str | None, timeout_s: float):
        self.api_key, self.timeout_s = api_key, timeout_s
        self._local = threading.local()

    def _conn(self, url: str, timeout: float):
        conns = self._local.__dict__.setdefault("conns", {})
        c = conns.get(url)
        if c is None or c.timeout != timeout:
            p = urlparse(url)
            cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
            c = conns[url] = cls(p.hostname, p.port, timeout=timeout)
        return c

    def request(self, url: str, path: str, body=None, method: str = "POST", timeout: float | None = None):
        """(status, parsed JSON or text). Raises OSError / http.client errors when the server is
        unreachable (after one reconnect: a keep-alive connection the server closed)."""
        timeout = self.timeout_s if timeout is None else timeout
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in (0, 1):
            c = self._conn(url, timeout)
            try:
                c.request(method, path, body=data, headers=headers)
                resp = c.getresponse()
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException):
                c.close()
                self._local.conns.pop(url, None)
                if attempt:
                    raise
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")


# ---- results ---------------------------------------------------------------------------------------
def _lp(v) -> float:
    """One JSON log-prob: null (orjson's -inf) -> -inf."""
    return float("-inf") if v is None else float(v)


def tail_from_topk(vals: np.ndarray) -> np.ndarray:
    """log(1 - sum_k exp(v)) per row, in float64 from the top-k log-probs `vals` [P, k]: computed
    as log(-expm1(logsumexp(v))) (no cancellation in 1 - sum), floored at log(k * 2^-24), the
    resolution of a sum of k float32 probabilities."""
    v = np.asarray(vals, dtype=np.float64)
    lse = np.logaddexp.reduce(v, axis=1)            # -inf rows (all null) stay -inf
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(-np.expm1(lse), v.shape[1] * FP32_RESOLUTION))


def _chunks(it: ScoreItem) -> list[tuple[int, int, list[int] | None]]:
    """The SGLang requests one item needs: position ranges [lo, hi) of its span with the union of
    their extra ids (SGLang takes one list of ids for every position of a request), at most
    MAX_UNION_IDS ids each."""
    ts, te = it.target_start, it.target_end
    ex = it.extra_ids
    if ex is None:
        return [(ts, te, None)]
    if (ex == ex[0]).all():
        u = np.unique(ex[0]).tolist()
        if len(u) <= MAX_UNION_IDS:
            return [(ts, te, u)]
    out, lo, cur = [], ts, set()
    for p in range(ts, te):
        row = set(ex[p - ts].tolist())
        if cur and len(cur | row) > MAX_UNION_IDS:
            out.append((lo, p, sorted(cur)))
            lo, cur = p, set()
        cur |= row
    out.append((lo, te, sorted(cur)))
    return out


# ---- the engine ------------------------------------------------------------------------------------
class SGLangScoringEngine(QueuedEngine):
    """The `ScoringEngine` interface the service, the HTTP front and the metrics use (submit,
    score, queue_tokens, stats, start, stop, max_batch_tokens, cache), scoring through SGLang."""

    def __init__(self, urls, *, vocab_size: int, api_key: str | None = None, timeout_s: float = 600.0,
                 max_batch_tokens: int = 16384, max_queue_tokens: int = 1 << 20, max_inflight: int = 0,
                 prefix_sharing: bool = True, prefix_min_tokens: int = 16, cache=None, model_id: str = "",
                 health_interval_s: float = 2.0, batch_wait_s: float = 0.002):
        self.urls = tuple(urls)
        self.vocab_size = vocab_size
        self.http = SGLangHttp(api_key, timeout_s)
        # the queue and the batching policy (batching.py): one prompt group per /generate
        self.policy = BatchPolicy(max_batch_tokens, prefix_sharing, prefix_min_tokens)
        self.queue = BatchQueue(max_queue_tokens)
        self.max_inflight = max_inflight or 4 * len(self.urls)
        self.cache, self.model_id = cache, model_id
        self.health_interval_s = health_interval_s
        self.batch_wait_s = batch_wait_s
        self.on_health = None            # callback(bool): some URL answers / none does
        self.stats = EngineStats()
        self.requests_sent = 0           # /generate calls made (tests, benchmarks)
        self._stats_lock = threading.Lock()
        self._up = {u: True for u in self.urls}
        self._healthy = True
        self._cv = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._pool: futures.ThreadPoolExecutor | None = None
        self._slots = threading.Semaphore(self.max_inflight)
        self._stopped = threading.Event()

    # ---- interface shared with ScoringEngine -------------------------------------------------
    def check(self, item: ScoreItem) -> None:
        """INVALID_ARGUMENT for what SGLang cannot give exactly."""
        for key, (name, why) in REFUSED.items():
            if key in item.stats:
                raise InvalidRequest(f"request_id={echo(item.request_id)}: options.statistics: {name} is not available "
                                     f"from this teacher (--engine sglang): {why}; this server gives "
                                     f"{', '.join(SUPPORTED)}")
        if float(item.temperature) != 1.0:
            raise InvalidRequest(f"request_id={echo(item.request_id)}: options.temperature: {item.temperature:g} is not "
                                 f"available from this teacher (--engine sglang): SGLang 0.5.23 computes input "
                                 f"log-probs from unscaled logits; send 0 or 1")

    def _cached(self, item: ScoreItem) -> dict | None:
        if self.cache is None:
            item.cache_key = None
            return None
        from teacher_server.cache import item_key

        item.cache_key = item_key(self.model_id, item)
        res = self.cache.get(item.cache_key)
        c = self.cache.counters
        s = self.stats
        s.cache_hits, s.cache_misses, s.cache_bytes, s.cache_entries = c.hits, c.misses, c.bytes, c.entries
        if res is not None:
            res["_server_seconds"] = 0.0
            res["_batch_sequences"] = 0
        return res

    def _admit(self, item: ScoreItem) -> None:
        self.check(item)

    def prepare(self) -> None:
        pass

    def start(self) -> None:
        self._pool = futures.ThreadPoolExecutor(self.max_inflight, thread_name_prefix="opd-sglang")
        for target, name in ((self._run, "opd-sglang-dispatch"), (self._monitor, "opd-sglang-health")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float | None = None) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._stopped.set()
        for t in self._threads:
            t.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)   # after the drain: do not wait out a hung SGLang

    def score(self, items: list[ScoreItem], use_cache: bool = True) -> list[dict]:
        """Score on the caller's thread (warm-up, tests): the same requests the worker sends."""
        out, waiting = self._split_cached(items, use_cache)
        while waiting:
            batch = self.policy.pick_prompt_group(waiting.items)
            waiting.remove(batch)
            for it, res in zip(batch, self._run_batch(batch, deliver=False)):
                if isinstance(res, BaseException):
                    raise res
                out[id(it)] = res
        return [out[id(it)] for it in items]

    # ---- the worker (the queue's waits: batching.QueuedEngine) ------------------------------------
    def _take_batch(self) -> list[ScoreItem]:
        """Called with the lock held and a non-empty queue: one /generate's batch, dequeued."""
        batch = self.policy.pick_prompt_group(self.queue.items)
        self.queue.remove(batch)
        self._cv.notify_all()
        return batch

    def _run(self) -> None:
        while True:
            live = self._next_batch(self._slots, self._take_batch)
            if live is None:
                return
            self._pool.submit(self._run_batch_released, live)

    def _run_batch_released(self, batch: list[ScoreItem]) -> None:
        try:
            self._run_batch(batch, deliver=True)
        except Exception as exc:  # noqa: BLE001 - never lose a batch's callers
            log.exception("SGLang batch of %d sequences failed", len(batch))
            for it in batch:
                if it.deliver is not None:
                    it.deliver(it, exc)
        finally:
            self._slots.release()

    # ---- one batch -----------------------------------------------------------------------------
    def _urls_for(self, batch: list[ScoreItem]) -> list[str]:
        """URLs to try, the batch's own first: a prompt group always goes to the same URL (its
        radix cache holds the prompt), then the others that are up."""
        key = self.policy.group_key(batch[0]) or batch[0].token_ids[:self.prefix_min_tokens].tobytes()
        n = len(self.urls)
        start = zlib.crc32(key) % n
        order = [self.urls[(start + i) % n] for i in range(n)]
        return [u for u in order if self._up[u]]

    def _run_batch(self, batch: list[ScoreItem], deliver: bool) -> list:
        t0 = time.perf_counter()
        plans = [_chunks(it) for it in batch]
        rows, owners = [], []
        for b, (it, chunks) in enumerate(zip(batch, plans)):
            k = it.top_k if (H.TOPK in it.stats or H.TAIL in it.stats) else 0
            for lo, hi, union in chunks:
                rows.append((it.token_ids[:hi].tolist(), lo - 1, k, union))
                owners.append(b)
        body = {"input_ids": [r[0] for r in rows], "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True, "logprob_start_len": [r[1] for r in rows],
                "top_logprobs_num": [r[2] for r in rows]}
        if any(r[3] is not None for r in rows):
            body["token_ids_logprob"] = [r[3] or [] for r in rows]
        try:
            answers = self._post(batch, body)
        except (SGLangUnavailable, SGLangFailed) as exc:
            results = [exc] * len(batch)
        else:
            results = []
            for b, it in enumerate(batch):
                parts = [(rows[j], answers[j]) for j in range(len(rows)) if owners[j] == b]
                try:
                    results.append(self._item_result(it, plans[b], parts))
                except Exception as exc:  # noqa: BLE001 - this item's answer does not fit its request
                    results.append(SGLangFailed(f"request_id={echo(it.request_id)}: SGLang's answer does not fit "
                                                f"the request: {exc}"))
        now = time.perf_counter()
        for it, res in zip(batch, results):
            if isinstance(res, dict):
                res["_server_seconds"] = now - t0
                res["_batch_sequences"] = len(batch)
                if self.cache is not None and it.cache_key is not None:
                    self.cache.put(it.cache_key, res)
        with self._stats_lock:
            s = self.stats
            s.sequences += len(batch)
            s.batches += 1
            s.tokens += sum(len(it.token_ids) for it in batch)
            s.forward_tokens += sum(len(r[0]) for r in rows)
            s.scored_positions += sum(it.num_positions for it in batch)
            s.busy_seconds += now - t0
            if self.cache is not None:
                c = self.cache.counters
                s.cache_hits, s.cache_misses, s.cache_bytes, s.cache_entries = c.hits, c.misses, c.bytes, c.entries
        if deliver:
            for it, res in zip(batch, results):
                if it.deliver is not None:
                    it.deliver(it, res)
        return results

    def _post(self, batch: list[ScoreItem], body: dict) -> list[dict]:
        urls = self._urls_for(batch)
        if not urls:
            raise SGLangUnavailable(f"no SGLang server is up ({', '.join(self.urls)}); retry later or use another "
                                    f"teacher replica")
        last = ""
        for url in urls:
            with self._stats_lock:
                self.requests_sent += 1
            try:
                status, out = self.http.request(url, "/generate", body)
            except TimeoutError:  # slow, not dead: the URL stays up, the caller may retry
                raise SGLangUnavailable(f"{url}/generate did not answer within --sglang-timeout-s "
                                        f"{self.http.timeout_s:g}") from None
            except (OSError, http.client.HTTPException) as exc:
                last = f"{url}: {type(exc).__name__}: {exc}"
                self._mark(url, False, last)
                continue
            if status >= 500:
                last = f"{url}: HTTP {status}: {str(out)[:300]}"
                self._mark(url, False, last)
                continue
            if status == 401:
                raise SGLangFailed(f"{url} refused the API key (HTTP 401): set --sglang-api-key to its --api-key")
            if status != 200:
                raise SGLangFailed(f"{url}/generate answered HTTP {status}: {str(out)[:500]}")
            if not isinstance(out, list) or len(out) != len(body["input_ids"]):
                raise SGLangFailed(f"{url}/generate answered {type(out).__name__} for a batch of "
                                   f"{len(body['input_ids'])}")
            for o in out:
                fr = (o.get("meta_info") or {}).get("finish_reason") or {}
                if fr.get("type") == "abort":  # paused with abort, or its /abort_request: retryable
                    raise SGLangUnavailable(f"{url} aborted the request: {fr.get('message')}")
            return out
        raise SGLangUnavailable(f"no SGLang server answered: {last}")

    def _item_result(self, it: ScoreItem, chunks, parts) -> dict:
        P = it.num_positions
        want_k = it.top_k if (H.TOPK in it.stats or H.TAIL in it.stats) else 0
        sampled = np.empty(P, dtype=np.float32)
        topv = np.empty((P, want_k), dtype=np.float32)
        topi = np.empty((P, want_k), dtype=np.int64)
        extra = np.empty((P, it.extra_ids.shape[1]), dtype=np.float32) if it.extra_ids is not None else None
        for (lo, hi, union), ((_, start, k, _u), ans) in zip(chunks, parts):
            meta = ans.get("meta_info") or {}
            n = hi - lo
            itl = meta.get("input_token_logprobs")
            if not isinstance(itl, list) or len(itl) != n + 1:
                raise ValueError(f"input_token_logprobs has {len(itl) if isinstance(itl, list) else itl!r} entries "
                                 f"for logprob_start_len {start} of {hi} tokens (expected {n + 1})")
            sampled[lo - it.target_start: hi - it.target_start] = [_lp(e[0]) for e in itl[1:]]
            if want_k:
                top = meta.get("input_top_logprobs")
                if not isinstance(top, list) or len(top) != n + 1 or any(len(r) != k for r in top[1:]):
                    raise ValueError(f"input_top_logprobs does not hold {n} rows of {k} after its placeholder")
                topv[lo - it.target_start: hi - it.target_start] = [[_lp(e[0]) for e in r] for r in top[1:]]
                topi[lo - it.target_start: hi - it.target_start] = [[int(e[1]) for e in r] for r in top[1:]]
            if extra is not None:
                tid = meta.get("input_token_ids_logprobs")
                if not isinstance(tid, list) or len(tid) != n + 1:
                    raise ValueError(f"input_token_ids_logprobs does not hold {n} rows after its placeholder")
                vals = np.array([[_lp(e[0]) for e in r] for r in tid[1:]], dtype=np.float64).reshape(n, len(union))
                got_ids = [int(e[1]) for e in tid[1]] if n else union
                if got_ids != union:
                    raise ValueError(f"input_token_ids_logprobs ids {got_ids[:8]}... are not the requested ones")
                col = np.searchsorted(np.asarray(union), it.extra_ids[lo - it.target_start: hi - it.target_start])
                extra[lo - it.target_start: hi - it.target_start] = np.take_along_axis(vals, col, 1)
        res: dict[str, np.ndarray] = {}
        if H.SAMPLED in it.stats:
            res[H.SAMPLED] = sampled
        if H.TOPK in it.stats and it.top_k > 0:
            order = np.argsort(topi, axis=1, kind="stable")  # ids ascending, as ScoringEngine sends them
            res["topk_ids"] = np.take_along_axis(topi, order, 1)
            res["topk_logprobs"] = np.take_along_axis(topv, order, 1)
        if H.TAIL in it.stats:
            res[H.TAIL] = (tail_from_topk(topv) if want_k else np.zeros(P)).astype(np.float32)
        if extra is not None and H.EXTRA in it.stats:
            res[H.EXTRA] = extra
        return res

    # ---- health --------------------------------------------------------------------------------
    def _mark(self, url: str, up: bool, why: str = "") -> None:
        with self._stats_lock:
            was = self._up[url]
            self._up[url] = up
            healthy = any(self._up.values())
            changed, self._healthy = healthy != self._healthy, healthy
        if was != up:
            (log.info if up else log.warning)("SGLang %s is %s%s", url, "up" if up else "down", f" ({why})" if why else "")
        if changed and self.on_health is not None:
            self.on_health(healthy)

    def probe(self, url: str, timeout: float = 5.0) -> bool:
        try:
            status, _ = self.http.request(url, "/health", None, method="GET", timeout=timeout)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    def _monitor(self) -> None:
        while not self._stopped.wait(self.health_interval_s):
            for url in self.urls:
                up = self.probe(url)
                if up != self._up[url]:
                    self._mark(url, up, "" if up else "/health does not answer 200")
