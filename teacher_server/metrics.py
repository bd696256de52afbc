"""Prometheus metrics in the text exposition format, served on HTTP `/metrics`, standard library only.

A small registry (`Registry` with `Counter`, `Gauge`, `Histogram`) that any process can reuse
(the trainer included), and `TeacherMetrics`, which the teacher server fills:

    metrics = TeacherMetrics()
    metrics.attach(server.engine)          # queue depth, engine counters, device memory at scrape time
    metrics.serve("0.0.0.0", 9400)         # daemon thread; GET /metrics
    metrics.scored(item, latency_s, nbytes) / metrics.error("INVALID_ARGUMENT")   # from the servicer

Counters only ever go up; rates (tokens/s, requests/s) are the scraper's job, e.g.
`rate(opd_teacher_tokens_total[1m])`.
"""

from __future__ import annotations

import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BYTE_BUCKETS = tuple(float(1 << s) for s in range(10, 31, 2))  # 1 KiB .. 1 GiB


def _fmt(v: float) -> str:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = list(zip(names, values)) + list(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}",
                f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """Monotonic counter; `name` should end in `_total`."""
    kind = "counter"

    def __init__(self, name, help, labelnames=()):
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0}

    def inc(self, amount: float = 1, **labels) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up")
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0) + amount

    def value(self, **labels) -> float:
        return self._values.get(self._key(labels), 0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down; `set_function` makes it read a callable at scrape time."""
    kind = "gauge"

    def __init__(self, name, help, labelnames=()):
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0}
        self._fn: Callable[[], float] | None = None

    def set(self, value: float, **labels) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = value

    def inc(self, amount: float = 1, **labels) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0) + amount

    def dec(self, amount: float = 1, **labels) -> None:
        self.inc(-amount, **labels)

    def set_function(self, fn: Callable[[], float]) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name}: set_function needs a gauge without labels")
        self._fn = fn

    def value(self, **labels) -> float:
        if self._fn is not None:
            return self._fn()
        return self._values.get(self._key(labels), 0)

    def render(self) -> list[str]:
        if self._fn is not None:
            try:
                items = [((), float(self._fn()))]
            except Exception:  # a failing reader leaves the gauge out of this scrape
                items = []
        else:
            with self._lock:
                items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class Histogram(_Metric):
    """Cumulative buckets (`_bucket{le=...}`), `_sum` and `_count`, as Prometheus expects."""
    kind = "histogram"

    def __init__(self, name, help, labelnames=(), buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labelnames)
        b = sorted(float(x) for x in buckets)
        if not b or any(x == y for x, y in zip(b, b[1:])):
            raise ValueError(f"{self.name}: buckets must be distinct and non-empty")
        if b[-1] != math.inf:
            b.append(math.inf)
        self.buckets = tuple(b)
        self._series: dict[tuple[str, ...], list] = {}  # key -> [per-bucket counts, sum, count]
        if not labelnames:
            self._series[()] = [[0] * len(self.buckets), 0.0, 0]

    def observe(self, value: float, **labels) -> None:
        k = self._key(labels)
        with self._lock:
            s = self._series.setdefault(k, [[0] * len(self.buckets), 0.0, 0])
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    s[0][i] += 1
                    break
            s[1] += value
            s[2] += 1

    def count(self, **labels) -> int:
        s = self._series.get(self._key(labels))
        return s[2] if s else 0

    def render(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, ([*s[0]], s[1], s[2])) for k, s in self._series.items())
        for k, (counts, total, n) in items:
            cum = 0
            for upper, c in zip(self.buckets, counts):
                cum += c
                le = "+Inf" if upper == math.inf else _fmt(upper)
                out.append(f"{self.name}_bucket{_labels(self.labelnames, k, (('le', le),))} {cum}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, k)} {_fmt(total)}")
            out.append(f"{self.name}_count{_labels(self.labelnames, k)} {n}")
        return out


class Registry:
    """A set of metrics rendered together; `serve(host, port)` exposes them on HTTP /metrics."""

    def __init__(self):
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()
        self._collectors: list[Callable[[], None]] = []
        self.httpd: ThreadingHTTPServer | None = None

    def register(self, metric: _Metric) -> _Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} registered twice")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name, help, labelnames=()) -> Counter:
        return self.register(Counter(name, help, labelnames))

    def gauge(self, name, help, labelnames=()) -> Gauge:
        return self.register(Gauge(name, help, labelnames))

    def histogram(self, name, help, labelnames=(), buckets=LATENCY_BUCKETS) -> Histogram:
        return self.register(Histogram(name, help, labelnames, buckets))

    def add_collector(self, fn: Callable[[], None]) -> None:
        """`fn` runs before every render (to copy values from elsewhere into gauges/counters)."""
        self._collectors.append(fn)

    def render(self) -> str:
        for fn in self._collectors:
            try:
                fn()
            except Exception:  # a scrape must not fail because one source did
                pass
        with self._lock:
            metrics = list(self._metrics.values())
        return "\n".join(line for m in metrics for line in m.render()) + "\n"

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve GET /metrics (and /healthz) from a daemon thread; returns the bound port."""
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = registry.render().encode(), CONTENT_TYPE, 200
                elif path == "/healthz":
                    body, ctype, code = b"ok\n", "text/plain", 200
                else:
                    body, ctype, code = b"not found; try /metrics\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds would flood the log
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, name="opd-metrics-http", daemon=True).start()
        return self.httpd.server_address[1]

    @property
    def port(self) -> int | None:
        return self.httpd.server_address[1] if self.httpd else None

    def shutdown(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


_ENGINE_COUNTERS = (
    ("sequences", "opd_teacher_engine_sequences_total", "sequences scored by the engine"),
    ("batches", "opd_teacher_engine_batches_total", "model forwards (batches) run"),
    ("tokens", "opd_teacher_engine_tokens_total", "tokens forwarded (unpadded), the basis of tokens/s"),
    ("scored_positions", "opd_teacher_engine_scored_positions_total", "positions for which statistics were computed"),
    ("padded_tokens", "opd_teacher_engine_padded_tokens_total", "padding tokens added to batches"),
    ("forward_tokens", "opd_teacher_engine_forward_tokens_total",
     "token positions the body ran (padding included, shared prefixes once)"),
    ("shared_prefix_tokens", "opd_teacher_engine_shared_prefix_tokens_total",
     "tokens not recomputed thanks to prompt-prefix sharing"),
    ("busy_seconds", "opd_teacher_engine_busy_seconds_total", "seconds the engine spent computing batches"),
    ("cancelled", "opd_teacher_engine_cancelled_total", "queued sequences dropped because their call was cancelled"),
)


_LEVEL_SUFFIXES = ("_bytes", "_entries", "_size")


class _Mirror(Counter):
    """A counter whose value is copied from a source that only ever grows (engine.stats)."""

    def set_total(self, value: float) -> None:
        with self._lock:
            self._values[()] = value


class TeacherMetrics(Registry):
    """The teacher server's metrics (names prefixed `opd_teacher_`)."""

    def __init__(self):
        super().__init__()
        self.requests = self.counter("opd_teacher_requests_total", "sequences answered")
        self.tokens = self.counter("opd_teacher_request_tokens_total", "tokens of the answered sequences")
        self.positions = self.counter("opd_teacher_positions_total", "scored positions answered")
        self.response_bytes = self.counter("opd_teacher_response_bytes_total", "encoded ScoreResult bytes sent")
        self.errors = self.counter("opd_teacher_errors_total", "calls ended with an error, by gRPC status code", ("code",))
        self.latency = self.histogram("opd_teacher_request_latency_seconds",
                                      "time from entering the queue to the result being encoded, per sequence")
        self.request_tokens = self.histogram("opd_teacher_sequence_tokens", "tokens per answered sequence",
                                             buckets=TOKEN_BUCKETS)
        self.result_bytes = self.histogram("opd_teacher_result_bytes", "encoded bytes per answered sequence",
                                           buckets=BYTE_BUCKETS)
        self.queue_tokens = self.gauge("opd_teacher_queue_tokens", "tokens waiting in the engine's queue")
        self.max_queue_tokens = self.gauge("opd_teacher_max_queue_tokens", "queue limit before new work waits")
        self.max_batch_tokens = self.gauge("opd_teacher_max_batch_tokens", "token budget of one forward")
        self.batch_tokens = self.gauge("opd_teacher_batch_tokens",
                                       "mean forward size (tokens incl. padding) of the batches since the previous scrape")
        self.device_memory = self.gauge("opd_teacher_device_memory_allocated_bytes",
                                        "torch.cuda.memory_allocated on the engine's device (0 on CPU)")
        self.device_memory_reserved = self.gauge("opd_teacher_device_memory_reserved_bytes",
                                                 "torch.cuda.memory_reserved on the engine's device (0 on CPU)")
        self.engine_counters = {field: self.register(_Mirror(name, help)) for field, name, help in _ENGINE_COUNTERS}
        self.engine = None
        self._last = (0, 0)  # (batches, tokens + padded) at the previous scrape

    # ---- called by the servicer --------------------------------------------------------------
    def scored(self, item, latency_seconds: float, response_bytes: int) -> None:
        self.requests.inc()
        self.tokens.inc(int(item.cost))
        self.positions.inc(int(item.num_positions))
        self.response_bytes.inc(int(response_bytes))
        self.latency.observe(float(latency_seconds))
        self.request_tokens.observe(int(item.cost))
        self.result_bytes.observe(int(response_bytes))

    def error(self, code: str) -> None:
        self.errors.inc(code=str(code))

    # ---- engine state, read at scrape time -----------------------------------------------------
    def attach(self, engine) -> "TeacherMetrics":
        self.engine = engine
        self.queue_tokens.set_function(lambda: engine.queue_tokens)
        self.max_queue_tokens.set(getattr(engine, "max_queue_tokens", 0))
        self.max_batch_tokens.set(getattr(engine, "max_batch_tokens", 0))
        self.add_collector(self._collect_engine)
        return self

    def _collect_engine(self) -> None:
        st = self.engine.stats
        fields = getattr(st, "__dataclass_fields__", None) or vars(st)
        for field in fields:  # counters the engine grows later are exported without a change here
            if field not in self.engine_counters and isinstance(getattr(st, field), (int, float)):
                if field.endswith(_LEVEL_SUFFIXES):  # sizes (bytes held, entries) go up and down
                    self.engine_counters[field] = self.gauge(f"opd_teacher_engine_{field}", f"engine.stats.{field}")
                else:
                    self.engine_counters[field] = self.register(
                        _Mirror(f"opd_teacher_engine_{field}_total", f"engine.stats.{field}"))
        for field, metric in self.engine_counters.items():
            value = getattr(st, field, 0)
            metric.set_total(value) if isinstance(metric, _Mirror) else metric.set(value)
        fwd = st.forward_tokens if hasattr(st, "forward_tokens") else st.tokens + st.padded_tokens
        batches = st.batches
        if batches > self._last[0]:
            self.batch_tokens.set((fwd - self._last[1]) / (batches - self._last[0]))
        self._last = (batches, fwd)
        dev = getattr(self.engine, "device", None)
        if dev is not None and getattr(dev, "type", "") == "cuda":
            import torch

            self.device_memory.set(torch.cuda.memory_allocated(dev))
            self.device_memory_reserved.set(torch.cuda.memory_reserved(dev))


def parse_text(text: str) -> dict[str, float]:
    """Parse the exposition format back into {'name{labels}': value} (for tests and quick checks)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
