"""The shared teacher server under faults (issue 16), over real 127.0.0.1 sockets: cancelled and
broken streams, garbage bytes, a decompression bomb, float ids, long request ids, one poisoned
item in a shared batch, health under full load, a client that never reads, SIGTERM, and a fuzz
run. docs/teacher-faults.md lists what each test guarantees.

Most checks share one `opd teacher` subprocess (module fixture `proc`): its memory is measured
from /proc/PID/status, and it ends with SIGTERM in the last test of this group."""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_server import codec
from teacher_server.client import ScoreSettings, TeacherClient
from teacher_server.service import CHANNEL_OPTIONS, SERVICE
from teacher_server.wire import pb
from tests.teacher_helpers import TeacherProcess, reference_logprobs, running_server

OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
GRACE_S = 20
UNREAD_MB = 4


# ---- helpers ---------------------------------------------------------------------------------

def _req(ids, start=1, end=0, rid="x", extra=None, **opts) -> pb.ScoreRequest:
    opts.setdefault("top_k", 4)
    r = pb.ScoreRequest(request_id=rid, token_ids=codec.encode_plain_ids(np.asarray(ids)), target_start=start,
                        target_end=end, options=pb.ScoreOptions(**opts))
    if extra is not None:
        r.extra_ids.CopyFrom(codec.encode_plain_ids(np.asarray(extra)))
    return r


def _raw(ch):
    """Score with raw bytes in (so tests can send anything) and parsed results out."""
    return ch.stream_stream(f"/{SERVICE}/Score", request_serializer=None,
                            response_deserializer=pb.ScoreResult.FromString)


def _score(url, msgs, timeout=60):
    """Send messages (ScoreRequest or bytes) on one stream: (results, status code, details)."""
    ch = grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
    got = []
    try:
        for r in _raw(ch)(iter([m if isinstance(m, bytes) else m.SerializeToString() for m in msgs]), timeout=timeout):
            got.append(r)
        return got, grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return got, exc.code(), exc.details() or ""
    finally:
        ch.close()


def _health(url, timeout=5.0):
    ch = grpc.insecure_channel(url)
    try:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout).status
    finally:
        ch.close()


def _sampled_ref(model_dir, ids, start=1, end=0):
    ids = np.asarray(ids)
    end = end or len(ids)
    ref = reference_logprobs(model_dir, ids)
    pos = np.arange(start, end)
    return ref[pos - 1, ids[pos]]


def _check_sampled(model_dir, res: pb.ScoreResult, ids, start=1, end=0, atol=1e-4):
    np.testing.assert_allclose(codec.decode_values(res.sampled_logprobs), _sampled_ref(model_dir, ids, start, end),
                               atol=atol)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (peak RSS) of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


class Proc(TeacherProcess):
    """An `opd teacher` subprocess (tests.teacher_helpers.TeacherProcess: its output is drained by a
    thread, a full pipe would block it) and its metrics."""

    def __init__(self, model_dir, *extra):
        self.metrics_port = _free_port()
        super().__init__("--model", model_dir, "--port", "0", "--dtype", "fp32", "--grace-s", GRACE_S,
                         "--max-sequence-length", "512", "--metrics-port", self.metrics_port, *extra,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.p, self.lines, self.url = self.proc, self.log, self.grpc

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def wait_metric(self, name: str, pred, timeout=30.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            v = self.metric(name)
            if pred(v) or time.monotonic() > deadline:
                return v
            time.sleep(0.1)


@pytest.fixture(scope="module")
def proc(tiny_model_dir):
    p = Proc(tiny_model_dir, "--max-unread-mb-per-stream", str(UNREAD_MB))
    try:
        yield p
    finally:
        if p.p.poll() is None:
            p.p.kill()
            p.p.wait(10)


@pytest.fixture(scope="module")
def inproc(tiny_model_dir):
    with running_server(tiny_model_dir, max_sequence_length=64, max_top_k=8, max_extra_ids=4) as s:
        yield s


# ---- bad bytes and bad fields ----------------------------------------------------------------

def _bf16_ids():
    r = _req([1, 2, 3])
    r.token_ids.dtype = pb.BFLOAT16   # tiny bf16 numbers whose bits read as uint16 are ids 1, 2, 3
    r.token_ids.data = np.asarray([1, 2, 3], dtype="<u2").tobytes()
    return r


def _float_extra():
    r = _req([1, 2, 3], statistics=[pb.EXTRA_LOGPROBS], extra=np.zeros((2, 1), np.int32))
    r.extra_ids.dtype = pb.FLOAT32
    return r


BAD = [
    ("garbage bytes", b"\xff\xff\xff\xff\x0f", "requests[1]: cannot parse ScoreRequest"),
    ("truncated message", _req(list(range(1, 40))).SerializeToString()[:-7], "requests[1]: cannot parse ScoreRequest"),
    ("bfloat16 token ids", _bf16_ids(), "token_ids: cannot decode: dtype BFLOAT16 is not an integer dtype"),
    ("float32 extra ids", _float_extra(), "extra_ids: cannot decode: dtype FLOAT32 is not an integer dtype"),
    ("zero extra ids per position", _req([1, 2, 3], statistics=[pb.SAMPLED_LOGPROB, pb.EXTRA_LOGPROBS],
                                         extra=np.zeros((2, 0), np.int32)), "extra_ids: shape [2, 0] has no ids"),
    ("long request_id", _req([1, 2, 3], rid="r" * 100_000), "request_id: 100000 bytes; at most 256 allowed"),
    ("shape larger than the data", pb.ScoreRequest(token_ids=pb.Tensor(data=b"\x01\x00\x00\x00", shape=[3],
                                                                       dtype=pb.INT32)), "needs 12"),
    ("negative shape", pb.ScoreRequest(token_ids=pb.Tensor(data=b"", shape=[-4], dtype=pb.INT32)), "non-negative"),
]


def _until_none(feed: queue.Queue):
    """The messages put on `feed`, as a request stream that ends at a None."""
    while (m := feed.get()) is not None:
        yield m


@pytest.mark.parametrize("name,msg,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_bytes_and_fields_get_invalid_argument_naming_the_field(proc, tiny_model_dir, name, msg, expect):
    good = [5, 6, 7, 8, 9]
    got, code, details = _score(proc.url, [_req(good, rid="ok"), msg])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert expect in details
    assert len(details) <= 1024 and ("r" * 100) not in details   # the echo is cut, the reply fits metadata
    assert [r.request_id for r in got] in ([], ["ok"])   # (the abort may overtake the answer before it)
    if got:
        _check_sampled(tiny_model_dir, got[0], good)


def test_garbage_get_info_gets_invalid_argument(proc):
    ch = grpc.insecure_channel(proc.url)
    try:
        raw = ch.unary_unary(f"/{SERVICE}/GetInfo", request_serializer=None,
                             response_deserializer=pb.TeacherInfo.FromString)
        with pytest.raises(grpc.RpcError) as ei:
            raw(b"\xff\xff\xff", timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot parse GetInfoRequest" in ei.value.details()
        assert raw(b"", timeout=10).vocab_size == 512   # an empty GetInfoRequest is valid
    finally:
        ch.close()


def _bomb(nbytes: int, content_size: bool) -> bytes:
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=content_size)
    obj = cctx.compressobj(size=nbytes if content_size else -1)
    chunk = bytes(1 << 20)
    out = [obj.compress(chunk) for _ in range(nbytes >> 20)]
    out.append(obj.flush())
    return b"".join(out)


def test_decompression_bomb_is_refused_without_inflating(proc, tiny_model_dir):
    """8 KB on the wire that would inflate to 256 MiB, declaring a 16-id shape: refused, and the
    server's peak RSS does not grow by anything like it (with and without a size in the frame)."""
    pid = proc.p.pid
    before = _proc_status(pid)
    answers = []
    for content_size in (True, False):
        bomb = _bomb(256 << 20, content_size)
        assert len(bomb) < 16 << 10
        t = pb.Tensor(data=bomb, shape=[16], dtype=pb.INT32, compression=pb.ZSTD)
        answers.append(("token_ids", "need 64", _score(proc.url, [pb.ScoreRequest(request_id="bomb", token_ids=t)])))
        e = _req([1, 2, 3], statistics=[pb.EXTRA_LOGPROBS], extra=np.zeros((2, 1), np.int32))
        e.extra_ids.CopyFrom(pb.Tensor(data=bomb, shape=[2, 1], dtype=pb.INT32, compression=pb.ZSTD))
        answers.append(("extra_ids", "need 8", _score(proc.url, [e])))
    after = _proc_status(pid)
    assert after["VmHWM"] - before["VmHWM"] < 48 << 20, (before, after)   # 256 MiB if inflated
    for field, need, (_, code, details) in answers:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{field}: cannot decode: zstd" in details and need in details, details
    # a well-formed zstd tensor still works
    ids = np.arange(3, 40)
    r = _req(ids)
    r.token_ids.CopyFrom(codec.encode_plain_ids(ids, compression=pb.ZSTD))
    got, code, _ = _score(proc.url, [r])
    assert code == grpc.StatusCode.OK
    _check_sampled(tiny_model_dir, got[0], ids)


# ---- leaks, capacity, health -----------------------------------------------------------------

def test_cancelled_and_broken_streams_leak_no_threads_then_64_streams_and_health(proc, tiny_model_dir):
    """160 streams cancelled with work queued and 150 whose next message does not parse free their
    handler threads; then 64 streams (the default --max-workers) are served at once, and health
    and GetInfo answer while all 64 are open."""
    work = [_req(list(range(1, 120)), rid=f"q{i}").SerializeToString() for i in range(20)]

    def cancel_some(n):
        ch = grpc.insecure_channel(proc.url, options=CHANNEL_OPTIONS)
        try:
            for _ in range(n):
                it = _raw(ch)(iter(work), timeout=60)
                next(it)          # the handler runs and the stream's work is queued
                it.cancel()
        finally:
            ch.close()

    def broken_some(n):
        for _ in range(n):
            _, code, _ = _score(proc.url, [work[0], work[1], b"\xff\xff\xff\xff"])
            assert code == grpc.StatusCode.INVALID_ARGUMENT

    threads = [threading.Thread(target=cancel_some, args=(40,)) for _ in range(4)]
    threads += [threading.Thread(target=broken_some, args=(50,)) for _ in range(3)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert proc.wait_metric("opd_teacher_score_streams", lambda v: v == 0) == 0   # every handler ended

    n = 64
    first, last = threading.Barrier(n + 1, timeout=60), threading.Barrier(n + 1, timeout=60)
    errors, results = [], {}
    ids = np.arange(7, 50)

    def one_stream(i):
        feed: queue.Queue = queue.Queue()

        ch = grpc.insecure_channel(proc.url, options=CHANNEL_OPTIONS)
        try:
            it = _raw(ch)(_until_none(feed), timeout=90)
            feed.put(_req(ids, rid=f"a{i}").SerializeToString())
            a = next(it)
            first.wait()          # all 64 streams are open and answered at once
            last.wait()
            feed.put(_req(ids, rid=f"b{i}").SerializeToString())
            b = next(it)
            feed.put(None)
            assert list(it) == []
            results[i] = (a, b)
        except Exception as exc:  # reported below
            errors.append(repr(exc))
            for bar in (first, last):
                bar.abort()
        finally:
            ch.close()

    threads = [threading.Thread(target=one_stream, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    try:
        first.wait()
        assert proc.metric("opd_teacher_score_streams") == n
        assert _health(proc.url, timeout=5) == health_pb2.HealthCheckResponse.SERVING   # health under full load
        with TeacherClient(proc.url, max_retries=0) as c:
            assert c.info().vocab_size == 512
    finally:
        try:
            last.wait()
        except threading.BrokenBarrierError:
            pass
        [t.join(120) for t in threads]
    assert not errors, errors[:3]
    assert len(results) == n
    _check_sampled(tiny_model_dir, results[0][1], ids)
    want = codec.decode_values(results[0][0].sampled_logprobs)
    for a, b in results.values():
        np.testing.assert_allclose(codec.decode_values(a.sampled_logprobs), want, atol=1e-5)
        np.testing.assert_allclose(codec.decode_values(b.sampled_logprobs), want, atol=1e-5)


def test_a_client_that_never_reads_holds_bounded_memory_and_others_are_served(proc, tiny_model_dir):
    """300 requests for full distributions (512 KiB of results each: ~150 MiB in all) on a stream
    whose client reads nothing: the server computes only what fits --max-unread-mb-per-stream (4)
    and its RSS stays bounded; another client is served meanwhile; once the slow client reads,
    everything arrives, correct."""
    n, L = 300, 257
    rng = np.random.default_rng(16)
    seqs = [rng.integers(0, 512, size=L) for _ in range(3)]
    msgs = [_req(seqs[i % 3], rid=f"s{i}", statistics=[pb.SAMPLED_LOGPROB, pb.FULL_LOGPROBS], top_k=0,
                 compression=pb.COMPRESSION_NONE).SerializeToString() for i in range(n)]
    pid = proc.p.pid
    rss0 = _proc_status(pid)["VmRSS"]
    seq0 = proc.metric("opd_teacher_engine_sequences_total")
    # no BDP probing: the client's receive window stays at 64 KiB, so what the server computes
    # is what it holds itself, not what the client's transport buffered
    ch = grpc.insecure_channel(proc.url, options=CHANNEL_OPTIONS + [("grpc.http2.bdp_probe", 0)])
    try:
        it = _raw(ch)(iter(msgs), timeout=300)
        # wait until the server stops computing this stream's work (back-pressure), then measure
        last, stable, deadline = -1.0, 0, time.monotonic() + 60
        while stable < 5 and time.monotonic() < deadline:
            time.sleep(0.3)
            cur = proc.metric("opd_teacher_engine_sequences_total")
            stable = stable + 1 if cur == last else 0
            last = cur
        computed = last - seq0
        rss = _proc_status(pid)["VmRSS"]
        print(f"never-reading client: {computed:.0f} of {n} results computed, server RSS +{(rss - rss0) / 2**20:.1f} MiB")
        assert computed >= 1
        assert computed <= 4 * UNREAD_MB, computed     # ~8 results of 512 KiB fit 4 MiB; 256+ without the bound
        assert rss - rss0 < 64 << 20, (rss0, rss)
        # another client is served while the slow one is stalled
        with TeacherClient(proc.url, max_retries=0) as c:
            other = c.score([seqs[0]], [1], settings=ScoreSettings(value_encoding="fp32", top_k=0,
                                                                  statistics=("sampled", "full")))
        np.testing.assert_allclose(other[0].sampled_logprobs, _sampled_ref(tiny_model_dir, seqs[0]), atol=1e-4)
        # the slow client now reads everything
        got = list(it)
    finally:
        ch.close()
    by_id = {g.request_id: g for g in got}   # (answers come as batches finish; ids match them up)
    assert len(got) == n and sorted(by_id) == sorted(f"s{i}" for i in range(n))
    for i in (0, 1, 2, n - 1):
        _check_sampled(tiny_model_dir, by_id[f"s{i}"], seqs[i % 3])
        full = codec.decode_values(by_id[f"s{i}"].full_logprobs).reshape(L - 1, 512)
        np.testing.assert_allclose(full, reference_logprobs(tiny_model_dir, seqs[i % 3])[:-1], atol=1e-4)


def test_sigterm_drains_with_health_not_serving_and_exits_zero(proc, tiny_model_dir):
    """Runs last on `proc` (after the cancellations above): SIGTERM under load; while draining,
    health answers NOT_SERVING and new calls get UNAVAILABLE; open streams finish with correct
    results; the process exits 0 within the grace period."""
    ids = np.arange(11, 90)
    started, errors, done = [], [], {}
    feeds, draining = [], threading.Event()

    def loaded(i):
        feed: queue.Queue = queue.Queue()
        feeds.append(feed)

        ch = grpc.insecure_channel(proc.url, options=CHANNEL_OPTIONS)
        try:
            it = _raw(ch)(_until_none(feed), timeout=90)
            for k in range(10):
                feed.put(_req(ids, rid=f"{i}-{k}").SerializeToString())
            out = [next(it)]
            started.append(i)
            out += [next(it) for _ in range(9)]
            assert draining.wait(60)      # the stream stays open into the drain
            feed.put(_req(ids, rid=f"{i}-late").SerializeToString())   # sent during the drain
            out.append(next(it))
            feed.put(None)
            out += list(it)
            done[i] = out
        except Exception as exc:  # reported below
            errors.append(repr(exc))
        finally:
            ch.close()

    threads = [threading.Thread(target=loaded, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    deadline = time.monotonic() + 60
    while len(started) < 6 and time.monotonic() < deadline and not errors:
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.p.send_signal(signal.SIGTERM)
    statuses = []
    while time.monotonic() - t0 < 10:
        try:
            statuses.append(_health(proc.url, timeout=2))
        except grpc.RpcError as exc:
            statuses.append(exc.code())
        if statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.05)
    try:
        assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, statuses
        _, code, details = _score(proc.url, [_req(ids)])
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in details
        ch = grpc.insecure_channel(proc.url)
        try:
            with pytest.raises(grpc.RpcError) as ei:
                ch.unary_unary(f"/{SERVICE}/GetInfo")(b"", timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in ei.value.details()
        finally:
            ch.close()
    finally:
        draining.set()
    [t.join(60) for t in threads]
    assert proc.p.wait(GRACE_S + 10) == 0
    assert time.monotonic() - t0 < GRACE_S + 5
    assert not errors, errors
    assert sorted(done) == list(range(6)) and all(len(v) == 11 for v in done.values())
    _check_sampled(tiny_model_dir, done[0][-1], ids)
    assert any("opd teacher: stopped" in line for line in proc.lines)


@pytest.mark.slow
def test_sigterm_under_plain_load_exits_zero_every_time(tiny_model_dir):
    """Five fresh servers, each stopped by SIGTERM while four clients stream work: every run exits
    0 within the grace period, and each client either got all its results or was refused cleanly."""
    from teacher_server.client import TeacherUnavailableError

    seqs = [list(range(1, 150))] * 30
    for run in range(5):
        p = Proc(tiny_model_dir)
        try:
            outcomes = []

            def load():
                try:
                    with TeacherClient(p.url, max_retries=0) as c:
                        got = c.score(seqs, [1] * len(seqs))
                    outcomes.append(len(got) == len(seqs) and all(g.num_positions == 148 for g in got))
                except TeacherUnavailableError:
                    outcomes.append(True)   # refused (draining or stopped): the client moves on

            threads = [threading.Thread(target=load) for _ in range(4)]
            [t.start() for t in threads]
            time.sleep(0.3 + 0.2 * run)
            t0 = time.monotonic()
            p.p.send_signal(signal.SIGTERM)
            assert p.p.wait(GRACE_S + 10) == 0, f"run {run}"
            assert time.monotonic() - t0 < GRACE_S + 5
            [t.join(60) for t in threads]
            assert outcomes == [True] * 4, (run, outcomes)
        finally:
            if p.p.poll() is None:
                p.p.kill()
                p.p.wait(10)


# ---- batch isolation (in-process server: a test-only way to poison one item) -------------------

def _gate_batch(engine, n, monkeypatch):
    """Test hook: a batch forms only once `n` items wait, so they share one batch."""
    monkeypatch.setattr(engine, "_linger", lambda: engine._cv.wait_for(lambda: len(engine._pending) >= n, 30))


@pytest.mark.parametrize("where", ["split", "forward"])
def test_a_poisoned_request_fails_alone_beside_other_clients(inproc, tiny_model_dir, monkeypatch, where):
    """Four clients' requests share one batch; one of them breaks it (in its result split, or in
    the batch forward, which then fails whenever the poisoned item is in it): only that client's
    stream fails; the other three get correct results."""
    import teacher_server.engine as E

    srv, url = inproc
    eng = srv.engine
    batches = []
    real_launch = eng.launch_batch
    monkeypatch.setattr(eng, "launch_batch", lambda b: batches.append([it.request_id for it in b]) or real_launch(b))
    if where == "split":
        real_split = E._split
        monkeypatch.setattr(E, "_split", lambda it, *a: (_ for _ in ()).throw(RuntimeError("poisoned split"))
                            if it.request_id == "poison" else real_split(it, *a))
    else:
        real_rows = eng._hidden_rows
        monkeypatch.setattr(eng, "_hidden_rows", lambda b: (_ for _ in ()).throw(RuntimeError("poisoned forward"))
                            if any(it.request_id == "poison" for it in b) else real_rows(b))
    _gate_batch(eng, 4, monkeypatch)
    rng = np.random.default_rng(3)
    seqs = {rid: rng.integers(0, 512, size=int(rng.integers(10, 60))) for rid in ("a", "b", "poison", "c")}
    out = {}

    def client(rid):
        out[rid] = _score(url, [_req(seqs[rid], rid=rid, value_encoding=pb.FP32)])

    threads = [threading.Thread(target=client, args=(rid,)) for rid in seqs]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sorted(batches[0]) == sorted(seqs)          # all four shared the first batch
    got, code, details = out["poison"]
    assert code == grpc.StatusCode.INTERNAL and "request_id='poison'" in details and "poisoned" in details
    for rid in ("a", "b", "c"):
        got, code, details = out[rid]
        assert code == grpc.StatusCode.OK, (rid, code, details)
        _check_sampled(tiny_model_dir, got[0], seqs[rid], atol=1e-5)


# ---- fuzz ------------------------------------------------------------------------------------

DTYPES = list(pb.DType.values()) + [99]
STATS = list(pb.Statistic.values()) + [42]


def _random_tensor(rng, n_max=70):
    n = int(rng.integers(0, n_max))
    ids = rng.integers(-3, 520, size=n)
    dtype = int(rng.choice(DTYPES))
    t = codec.encode_plain_ids(np.clip(ids, -(1 << 31), (1 << 31) - 1), compression=int(rng.integers(0, 2)))
    if rng.random() < 0.3:
        t.dtype = dtype
    if rng.random() < 0.2:
        t.shape[:] = [int(x) for x in rng.integers(-2, 80, size=int(rng.integers(0, 3)))]
    if rng.random() < 0.1:
        t.compression = int(rng.integers(0, 4))
    if rng.random() < 0.1:
        t.byte_shuffled = True
    if rng.random() < 0.1:
        t.delta_coded = True
    return t


def _random_request(rng) -> pb.ScoreRequest:
    r = pb.ScoreRequest(request_id="".join(chr(int(c)) for c in rng.integers(32, 0x3000, size=int(rng.integers(0, 300)))))
    if rng.random() < 0.95:
        r.token_ids.CopyFrom(_random_tensor(rng))
    r.target_start = int(rng.integers(-2, 70))
    r.target_end = int(rng.integers(-2, 70)) if rng.random() < 0.5 else 0
    o = r.options
    o.top_k = int(rng.integers(-2, 12))
    o.statistics[:] = [int(s) for s in rng.choice(STATS, size=int(rng.integers(0, 4)))]
    o.temperature = float(rng.choice([0.0, 1.0, 0.5, 2.0, -1.0, np.nan, np.inf, 1e-30, 1e30, 1e-45]))
    o.value_encoding = int(rng.integers(0, 6))
    o.compression = int(rng.integers(0, 3))
    o.zstd_level = int(rng.integers(-1, 24))
    if rng.random() < 0.3:
        r.extra_ids.CopyFrom(_random_tensor(rng, 40))
        if rng.random() < 0.5:
            r.extra_ids.shape[:] = [int(x) for x in rng.integers(0, 6, size=2)]
    return r


def _mutate(rng, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        op = rng.integers(0, 4)
        if op == 0 and b:
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        elif op == 1 and b:
            del b[int(rng.integers(0, len(b))):]
        elif op == 2:
            at = int(rng.integers(0, len(b) + 1))
            b[at:at] = rng.integers(0, 256, size=int(rng.integers(1, 8))).astype(np.uint8).tobytes()
        elif b:
            i, j = sorted(int(x) for x in rng.integers(0, len(b), size=2))
            b[i:j] = b[i:j][::-1]
    return bytes(b)


def _valid(rng, k):
    ids = rng.integers(0, 512, size=int(rng.integers(2, 64)))
    start = int(rng.integers(1, len(ids)))
    enc = int(rng.choice([pb.FP32, pb.BF16, pb.Q16]))
    return ids, start, _req(ids, start=start, rid=f"valid-{k}", value_encoding=enc, compression=int(rng.integers(0, 2)),
                           statistics=[pb.SAMPLED_LOGPROB, pb.TOPK, pb.TAIL_LOGMASS, pb.ENTROPY], top_k=8), enc


def _fuzz(url, model_dir, seed, streams):
    rng = np.random.default_rng(seed)
    codes = {}
    k = 0
    for s in range(streams):
        msgs, valid = [], {}
        for _ in range(int(rng.integers(1, 7))):
            kind = rng.random()
            if kind < 0.35:
                ids, start, r, enc = _valid(rng, k)
                valid[len(msgs)] = (ids, start, enc, r.request_id)
                msgs.append(r.SerializeToString())
                k += 1
            elif kind < 0.65:
                msgs.append(_random_request(rng).SerializeToString())
            elif kind < 0.9:
                m = _valid(rng, k)[2]
                m.request_id = f"mut-{k}"
                msgs.append(_mutate(rng, m.SerializeToString()))
            else:
                msgs.append(rng.integers(0, 256, size=int(rng.integers(0, 200))).astype(np.uint8).tobytes())
        got, code, details = _score(url, msgs, timeout=60)
        codes[code] = codes.get(code, 0) + 1
        assert code == grpc.StatusCode.OK or code in OK_CODES, (s, code, details)
        assert len(details) <= 1024
        assert len(got) <= len(msgs)
        by_id = {v[3]: v for v in valid.values()}
        for res in got:   # answers come as batches finish, matched by request_id; the valid ones are checked
            if res.request_id in by_id:
                ids, start, enc, rid = by_id.pop(res.request_id)
                assert res.num_positions == len(ids) - start
                atol = {pb.FP32: 1e-4, pb.BF16: 0.06, pb.Q16: 2e-3}[enc]
                _check_sampled(model_dir, res, ids, start, atol=atol)
        if code == grpc.StatusCode.OK:
            assert not by_id and len(got) == len(msgs)   # every request answered once
    # afterwards the server is alive and answers a valid request correctly
    assert _health(url) == health_pb2.HealthCheckResponse.SERVING
    ids = np.arange(20, 60)
    got, code, _ = _score(url, [_req(ids, value_encoding=pb.FP32)])
    assert code == grpc.StatusCode.OK
    _check_sampled(model_dir, got[0], ids, atol=1e-5)
    return codes


def test_fuzz_short(inproc, tiny_model_dir):
    """Random, mutated and raw messages mixed with valid ones in each stream (60 streams): only OK,
    INVALID_ARGUMENT or RESOURCE_EXHAUSTED; every valid answer matches the float64 reference."""
    codes = _fuzz(inproc[1], tiny_model_dir, seed=16, streams=60)
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 10 and codes.get(grpc.StatusCode.OK, 0) > 5


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_long(inproc, tiny_model_dir, seed):
    _fuzz(inproc[1], tiny_model_dir, seed=1000 + seed, streams=2000)


# ---- flags -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--max-unread-mb-per-stream", "0", "--max-unread-mb-per-stream 0: expected a number of MiB in (0, 1048576]"),
    ("--max-unread-mb-per-stream", "nan", "--max-unread-mb-per-stream nan: expected a number of MiB"),
    ("--max-workers", "0", "--max-workers 0: expected at least 1"),
    ("--grace-s", "-1", "--grace-s -1: expected >= 0 seconds"),
], ids=["unread-zero", "unread-nan", "workers-zero", "grace-negative"])
def test_bad_fault_flags_exit_2_before_the_model_loads(tmp_path, monkeypatch, capsys, flag, value, message):
    from opd.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    missing = tmp_path / "no-such-model"      # never read: the flags are checked first
    assert main(["teacher", "--model", str(missing), flag, value]) == 2
    assert message in capsys.readouterr().err
