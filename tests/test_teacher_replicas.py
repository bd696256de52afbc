"""Two teacher processes behind one client; one is SIGKILLed mid-stream. Every request must be
answered exactly once, and correctly (checked against a float64 forward of the same model)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from teacher_server.client import ScoreSettings, TeacherClient
from teacher_server.metrics import parse_text
from tests.teacher_helpers import reference_logprobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    def __init__(self, model_dir: str, *extra: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        self.proc = subprocess.Popen([sys.executable, "-m", "opd", "teacher", "--model", model_dir, "--port", "0",
                                      "--dtype", "fp32", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.log: list[str] = []
        self.url: str | None = None
        self.ready = threading.Event()
        # read the output on a thread (the child never blocks on a full pipe); the port line marks ready
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.log.append(line)
            if self.url is None and "serving" in line and "on 127.0.0.1:" in line:
                self.url = f"127.0.0.1:{int(line.rsplit(':', 1)[1])}"
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float = 180) -> "Replica":
        if not self.ready.wait(timeout) or self.url is None:
            self.kill()
            raise RuntimeError("teacher replica did not start:\n" + "".join(self.log[-30:]))
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from opd.tiny import build_model

    return str(build_model(tmp_path_factory.mktemp("replicas") / "model", size="test", seed=0))


@pytest.fixture
def replicas(model_dir):
    metrics_port = _free_port()
    # small batches make each stream take long enough to be cut in the middle
    args = ("--max-batch-tokens", "128")
    reps = [Replica(model_dir, *args, "--metrics-port", str(metrics_port)), Replica(model_dir, *args)]
    reps[0].metrics_port = metrics_port
    try:
        yield [r.wait_ready() for r in reps]  # both start at once
    finally:
        for r in reps:
            r.kill()


def _check(model_dir, seqs, got):
    for ids, g in zip(seqs, got):
        ref = reference_logprobs(model_dir, ids)[:-1]
        assert g.num_positions == len(ids) - 1
        np.testing.assert_allclose(g.sampled_logprobs, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-5)


def test_sigkill_of_one_replica_mid_stream_loses_and_duplicates_nothing(model_dir, replicas):
    rng = np.random.default_rng(7)
    n = 120
    seqs = [rng.integers(0, 512, size=int(rng.integers(60, 120))) for _ in range(n)]
    victim = None
    seen: dict[int, object] = {}
    by_endpoint: dict[str, int] = {}
    with TeacherClient([r.url for r in replicas], backoff_s=0.05, max_retries=20) as c:
        for i, st in c.score_iter(seqs, [1] * n, settings=ScoreSettings(value_encoding="fp32", top_k=4)):
            assert i not in seen, f"sequence {i} answered twice"
            seen[i] = st
            by_endpoint[st.endpoint] = by_endpoint.get(st.endpoint, 0) + 1
            if victim is None and len(seen) == 5:
                victim = next(r for r in replicas if r.url == st.endpoint)  # the one streaming right now
                victim.kill()
        retries = c.retries
    assert victim is not None and victim.proc.returncode == -signal.SIGKILL
    assert sorted(seen) == list(range(n))  # each answered exactly once
    survivor = next(r for r in replicas if r is not victim)
    assert by_endpoint.get(survivor.url, 0) > 0 and retries >= 1
    assert by_endpoint.get(victim.url, 0) < n  # the stream really was cut
    _check(model_dir, seqs, [seen[i] for i in range(n)])


def test_concurrent_clients_survive_a_replica_kill_metrics_and_dns_target(model_dir, replicas,
                                                                          _record_channel_options):
    # the CLI's --metrics-port serves Prometheus text while replica 0 works
    rng = np.random.default_rng(11)
    work = [[rng.integers(0, 512, size=int(rng.integers(30, 90))) for _ in range(15)] for _ in range(4)]
    results, errors = {}, []

    def worker(k):
        try:
            with TeacherClient([r.url for r in replicas], backoff_s=0.05, max_retries=20) as c:
                results[k] = c.score(work[k], [1] * 15, settings=ScoreSettings(value_encoding="fp32", top_k=4))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until replica 0 has answered something, then scrape and kill it
        with urllib.request.urlopen(f"http://127.0.0.1:{replicas[0].metrics_port}/metrics", timeout=10) as r:
            m = parse_text(r.read().decode())
        if m["opd_teacher_requests_total"] > 0:
            break
        time.sleep(0.05)
    assert m["opd_teacher_engine_tokens_total"] > 0 and m["opd_teacher_request_latency_seconds_count"] > 0
    replicas[0].kill()
    [t.join(180) for t in threads]
    assert not errors, errors
    for k in range(4):
        assert len(results[k]) == 15 and all(s is not None for s in results[k])
        _check(model_dir, work[k], results[k])

    # a dns:/// target (what a Kubernetes headless Service gives) is resolved by gRPC, round_robin
    port = replicas[1].url.rsplit(":", 1)[1]
    with TeacherClient(f"dns:///localhost:{port}") as c:
        assert ("grpc.lb_policy_name", "round_robin") in _channel_options(c)
        seqs = [np.arange(1, 40) % 512]
        got = c.score(seqs, [1], settings=ScoreSettings(value_encoding="fp32"))
        _check(model_dir, seqs, got)


def _channel_options(client):
    # the options are recorded by a patched constructor below; grpc channels do not expose them
    return client._test_options


@pytest.fixture
def _record_channel_options(monkeypatch):
    import grpc

    from teacher_server import client as client_mod

    real = grpc.insecure_channel
    seen = []

    def recording(target, options=None, **kw):
        seen.append(list(options or ()))
        return real(target, options=options, **kw)

    monkeypatch.setattr(client_mod.grpc, "insecure_channel", recording)
    real_init = client_mod.TeacherClient.__init__

    def init(self, *a, **kw):
        seen.clear()
        real_init(self, *a, **kw)
        self._test_options = [o for opts in seen for o in opts]

    monkeypatch.setattr(client_mod.TeacherClient, "__init__", init)
