"""The teacher server's Prometheus metrics, served on HTTP `/metrics` by prometheus_client.

`TeacherMetrics` owns a `prometheus_client.CollectorRegistry` with the server's own series, the
engine's counters (read from `engine.stats` at scrape time) and the standard process and platform
collectors (`process_resident_memory_bytes`, `process_cpu_seconds_total`, ...):

    metrics = TeacherMetrics()
    metrics.attach(server.engine)          # queue depth, engine counters, device memory at scrape time
    metrics.serve("0.0.0.0", 9400)         # daemon thread; GET /metrics
    metrics.scored(item, latency_s, nbytes) / metrics.error("INVALID_ARGUMENT")   # from the servicer

Counters only ever go up; rates (tokens/s, requests/s) are the scraper's job, e.g.
`rate(opd_teacher_tokens_total[1m])`.
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest, start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

# What prometheus_client's server answers a scraper that asks for no particular format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BYTE_BUCKETS = tuple(float(1 << s) for s in range(10, 31, 2))  # 1 KiB .. 1 GiB


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


class TeacherMetrics:
    """The teacher server's metrics (names prefixed `opd_teacher_`)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.httpd = None
        self._thread = None
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
        self.streams = self.gauge("opd_teacher_score_streams", "Score streams open now (at most --max-workers)")
        self.queue_tokens = self.gauge("opd_teacher_queue_tokens", "tokens waiting in the engine's queue")
        self.max_queue_tokens = self.gauge("opd_teacher_max_queue_tokens", "queue limit before new work waits")
        self.max_batch_tokens = self.gauge("opd_teacher_max_batch_tokens", "token budget of one forward")
        # per served model (`opd teacher --model NAME=DIR ...`)
        self.model_requests = self.counter("opd_teacher_model_requests_total", "sequences answered, by model", ("model",))
        self.model_positions = self.counter("opd_teacher_model_positions_total", "scored positions answered, by model",
                                            ("model",))
        self.weight_version = self.gauge("opd_teacher_model_weight_version",
                                         "weight version served (0 = as loaded; else the last UpdateWeights)", ("model",))
        self.weight_updates = self.counter("opd_teacher_weight_updates_total", "UpdateWeights applied, by model",
                                           ("model",))
        self.engine = None

    # ---- called by the servicer --------------------------------------------------------------
    def scored(self, item, latency_seconds: float, response_bytes: int) -> None:
        self.requests.inc()
        self.tokens.inc(int(item.cost))
        self.positions.inc(int(item.num_positions))
        self.response_bytes.inc(int(response_bytes))
        self.latency.observe(float(latency_seconds))
        self.request_tokens.observe(int(item.cost))
        self.result_bytes.observe(int(response_bytes))
        model = getattr(item, "model", "") or "default"
        self.model_requests.labels(model=model).inc()
        self.model_positions.labels(model=model).inc(int(item.num_positions))

    def error(self, code: str) -> None:
        self.errors.labels(code=str(code)).inc()

    # ---- engine state, read at scrape time -----------------------------------------------------
    def attach(self, engine) -> "TeacherMetrics":
        self.engine = engine
        self.queue_tokens.set_function(lambda: engine.queue_tokens)
        self.max_queue_tokens.set(getattr(engine, "max_queue_tokens", 0))
        self.max_batch_tokens.set(getattr(engine, "max_batch_tokens", 0))
        self.registry.register(_EngineCollector(engine))
        return self

    # ---- helpers -------------------------------------------------------------------------------
    def counter(self, name: str, help: str, labelnames=()) -> Counter:
        return Counter(name, help, labelnames, registry=self.registry)

    def gauge(self, name: str, help: str, labelnames=()) -> Gauge:
        return Gauge(name, help, labelnames, registry=self.registry)

    def histogram(self, name: str, help: str, labelnames=(), buckets=LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, help, labelnames, buckets=buckets, registry=self.registry)

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve GET /metrics from a daemon thread (prometheus_client's server); returns the bound port."""
        self.httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self.httpd.server_address[1]

    @property
    def port(self) -> int | None:
        return self.httpd.server_address[1] if self.httpd else None

    def shutdown(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


class _EngineCollector:
    """Reads `engine.stats` at scrape time: every numeric field is exported (counters as
    `opd_teacher_engine_<field>_total`, levels ending in _bytes/_entries/_size as gauges), so
    counters the engine grows later need no change here; plus the mean forward size since the
    previous scrape and the device's memory."""

    def __init__(self, engine):
        self.engine = engine
        self._last = (0, 0)  # (batches, forward tokens) at the previous scrape
        self._batch_tokens = 0.0
        self._help = {field: help for field, _, help in _ENGINE_COUNTERS}

    def describe(self):  # nothing up front: registering must not read (and advance) the engine's state
        return []

    def collect(self):
        st = self.engine.stats
        # several models: every engine's batches count (the cache counters live in the queue's engine)
        others = [e.stats for e in getattr(self.engine, "engines", lambda: [self.engine])()[1:]]
        fields = getattr(st, "__dataclass_fields__", None) or vars(st)
        for field in fields:
            value = getattr(st, field)
            if others and not field.startswith("cache_") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                value = value + sum(getattr(o, field, 0) for o in others)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            help = self._help.get(field, f"engine.stats.{field}")
            if field.endswith(_LEVEL_SUFFIXES):  # sizes (bytes held, entries) go up and down
                yield GaugeMetricFamily(f"opd_teacher_engine_{field}", help, value=value)
            else:
                yield CounterMetricFamily(f"opd_teacher_engine_{field}", help, value=value)
        fwd = sum(s.forward_tokens if hasattr(s, "forward_tokens") else s.tokens + s.padded_tokens
                  for s in [st, *others])
        batches = st.batches + sum(o.batches for o in others)
        if batches > self._last[0]:
            self._batch_tokens = (fwd - self._last[1]) / (batches - self._last[0])
        self._last = (batches, fwd)
        yield GaugeMetricFamily("opd_teacher_batch_tokens",
                                "mean forward size (tokens incl. padding) of the batches since the previous scrape",
                                value=self._batch_tokens)
        allocated = reserved = 0
        dev = getattr(self.engine, "device", None)
        if dev is not None and getattr(dev, "type", "") == "cuda":
            import torch

            allocated, reserved = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
        yield GaugeMetricFamily("opd_teacher_device_memory_allocated_bytes",
                                "torch.cuda.memory_allocated on the engine's device (0 on CPU)", value=allocated)
        yield GaugeMetricFamily("opd_teacher_device_memory_reserved_bytes",
                                "torch.cuda.memory_reserved on the engine's device (0 on CPU)", value=reserved)


def parse_text(text: str) -> dict[str, float]:
    """Parse the exposition format back into {'name{labels}': value} (for tests and quick checks)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out
