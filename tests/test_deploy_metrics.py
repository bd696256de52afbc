"""Prometheus metrics: the generic registry's text format, and the teacher's /metrics after scoring."""

from __future__ import annotations

import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from teacher_server import codec
from teacher_server.app import TeacherConfig, build_server
from teacher_server.client import TeacherClient
from teacher_server.metrics import CONTENT_TYPE, TeacherMetrics, parse_text
from teacher_server.service import CHANNEL_OPTIONS, SERVICE, ServerConfig
from teacher_server.wire import pb


def _scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode(), r.headers["Content-Type"]


def test_exposition_is_prometheus_clients_with_process_metrics():
    """Served by prometheus_client: its content type, HELP/TYPE lines, process and platform series."""
    metrics = TeacherMetrics()
    metrics.error("INVALID_ARGUMENT")
    metrics.error("INVALID_ARGUMENT")
    port = metrics.serve("127.0.0.1", 0)
    try:
        text, ctype = _scrape(port)
        assert ctype == CONTENT_TYPE
        assert "# TYPE opd_teacher_requests_total counter" in text
        assert "# TYPE opd_teacher_request_latency_seconds histogram" in text
        assert "# HELP opd_teacher_errors_total calls ended with an error, by gRPC status code" in text
        v = parse_text(text)
        assert v['opd_teacher_errors_total{code="INVALID_ARGUMENT"}'] == 2
        assert v["process_resident_memory_bytes"] > 0 and "python_info" in text
        assert [v[f'opd_teacher_request_latency_seconds_bucket{{le="{le}"}}'] for le in ("0.005", "+Inf")] == [0, 0]
    finally:
        metrics.shutdown()
    with pytest.raises(urllib.error.URLError):
        _scrape(port)


def test_teacher_metrics_after_scoring(tiny_model_dir):
    metrics = TeacherMetrics()
    cfg = TeacherConfig(model=tiny_model_dir, dtype="fp32", max_batch_tokens=256, max_queue_tokens=4096,
                        max_top_k=64, server=ServerConfig(port=0))
    srv = build_server(cfg, metrics)
    metrics.attach(srv.engine)
    port = metrics.serve("127.0.0.1", 0)
    srv.start()
    srv.warm_up_and_serve()
    url = f"127.0.0.1:{srv.port}"
    try:
        before = parse_text(_scrape(port)[0])
        assert before["opd_teacher_requests_total"] == 0
        assert before["opd_teacher_engine_sequences_total"] == 1  # the warm-up forward
        assert before["opd_teacher_queue_tokens"] == 0 and before["opd_teacher_max_queue_tokens"] == 4096
        lengths = [10, 20, 30, 40, 50]
        rng = np.random.default_rng(1)
        with TeacherClient(url) as c:
            got = c.score([rng.integers(0, 512, size=n) for n in lengths], [1] * 5)
        nbytes = sum(g.wire_bytes for g in got)
        # one bad request: INVALID_ARGUMENT is counted by code
        ch = grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
        bad = pb.ScoreRequest(request_id="bad", token_ids=codec.encode_plain_ids(np.asarray([1, 2, 999])),
                              target_start=1, options=pb.ScoreOptions(top_k=4))
        with pytest.raises(grpc.RpcError):
            list(ch.stream_stream(f"/{SERVICE}/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                                  response_deserializer=pb.ScoreResult.FromString)(iter([bad]), timeout=10))
        ch.close()

        v = parse_text(_scrape(port)[0])
        assert v["opd_teacher_requests_total"] == 5
        assert v["opd_teacher_request_tokens_total"] == sum(lengths)
        assert v["opd_teacher_positions_total"] == sum(n - 1 for n in lengths)
        assert v["opd_teacher_response_bytes_total"] == nbytes
        assert v['opd_teacher_errors_total{code="INVALID_ARGUMENT"}'] == 1
        assert v['opd_teacher_request_latency_seconds_bucket{le="+Inf"}'] == 5
        assert v["opd_teacher_request_latency_seconds_count"] == 5 and v["opd_teacher_request_latency_seconds_sum"] > 0
        assert v["opd_teacher_sequence_tokens_sum"] == sum(lengths)
        assert v["opd_teacher_result_bytes_count"] == 5
        st = srv.engine.stats
        assert v["opd_teacher_engine_sequences_total"] == st.sequences >= 6
        assert v["opd_teacher_engine_tokens_total"] == st.tokens
        assert v["opd_teacher_engine_batches_total"] == st.batches
        assert v["opd_teacher_engine_scored_positions_total"] == st.scored_positions
        assert v["opd_teacher_engine_padded_tokens_total"] == st.padded_tokens
        assert v["opd_teacher_engine_busy_seconds_total"] == pytest.approx(st.busy_seconds)
        assert v["opd_teacher_engine_cancelled_total"] == 0
        for field, value in vars(st).items():  # every engine counter is exported, new ones included
            assert v.get(f"opd_teacher_engine_{field}_total", v.get(f"opd_teacher_engine_{field}")) == pytest.approx(value), field
        assert v["opd_teacher_batch_tokens"] > 0
        assert v["opd_teacher_max_batch_tokens"] == 256
        assert v["opd_teacher_device_memory_allocated_bytes"] == 0  # CPU
        # counters never go down between scrapes
        for k, x in before.items():
            if k.endswith("_total"):
                assert v[k] >= x, k
    finally:
        srv.stop(1)
        metrics.shutdown()
