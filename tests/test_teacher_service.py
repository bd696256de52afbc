"""The gRPC service over real 127.0.0.1 sockets: bad input, load, health, shutdown, failover."""

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_server import codec
from teacher_server.client import (ScoreSettings, TeacherClient, TeacherRequestError, TeacherUnavailableError,
                                   TokenizerMismatchError)
from teacher_server.service import CHANNEL_OPTIONS, SERVICE
from teacher_server.wire import pb
from tests.teacher_helpers import reference_logprobs, running_server


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, max_sequence_length=128, max_top_k=32, max_extra_ids=4) as s:
        yield s


def _raw_score(url, requests, metadata=()):
    ch = grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
    call = ch.stream_stream(f"/{SERVICE}/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                            response_deserializer=pb.ScoreResult.FromString)
    try:
        return list(call(iter(requests), timeout=30, metadata=metadata))
    finally:
        ch.close()


def _req(ids, start=1, end=0, rid="x", **opts):
    opts.setdefault("top_k", 4)
    r = pb.ScoreRequest(request_id=rid, token_ids=codec.encode_plain_ids(np.asarray(ids)), target_start=start,
                        target_end=end, options=pb.ScoreOptions(**opts))
    return r


BAD = [
    ("id out of vocabulary", _req([1, 2, 512]), "token_ids: id 512 at position 2 is outside the vocabulary [0, 512)"),
    ("negative id", _req([1, -3, 5]), "outside the vocabulary"),
    ("empty sequence", _req([]), "token_ids: empty sequence"),
    ("span past the end", _req([1, 2, 3], start=1, end=4), "span [1, 4) is not within [1, 3]"),
    ("span at position 0", _req([1, 2, 3], start=0), "target_start/target_end"),
    ("too long", _req(list(range(129))), "length 129 exceeds the server's max_sequence_length 128"),
    ("top_k too large", _req([1, 2, 3], top_k=33), "options.top_k: 33 is outside [0, 32]"),
    ("unknown statistic", _req([1, 2, 3], statistics=[42]), "options.statistics: 42 is not one of"),
    ("unknown encoding", _req([1, 2, 3], value_encoding=9), "options.value_encoding: 9 is not one of"),
    ("unknown compression", _req([1, 2, 3], compression=5), "options.compression: 5 is not one of"),
    ("negative temperature", _req([1, 2, 3], temperature=-1.0), "options.temperature"),
    ("extra ids missing", _req([1, 2, 3], statistics=[pb.EXTRA_LOGPROBS]), "extra_ids: EXTRA_LOGPROBS requested"),
]


@pytest.mark.parametrize("name,request_,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_invalid_argument_naming_field_and_index(server, name, request_, message):
    srv, url = server
    good = _req([5, 6, 7, 8], rid="ok")
    request_.request_id = "bad"
    with pytest.raises(grpc.RpcError) as ei:
        _raw_score(url, [good, request_])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests[1] (request_id='bad')" in ei.value.details()
    assert message in ei.value.details()
    # the server keeps serving
    assert len(_raw_score(url, [_req([5, 6, 7, 8])])) == 1


def test_client_raises_request_error_without_retrying(server):
    _, url = server
    with TeacherClient(url, max_retries=3) as c:
        with pytest.raises(TeacherRequestError, match="outside the vocabulary"):
            c.score([[1, 2, 999]], [1])
        assert c.retries == 0
        with pytest.raises(ValueError, match="value_encoding: 'bf17'"):
            c.score([[1, 2, 3]], [1], settings=ScoreSettings(value_encoding="bf17"))


def test_many_concurrent_clients_get_correct_results(server, tiny_model_dir):
    _, url = server
    rng = np.random.default_rng()
    work = [[rng.integers(0, 512, size=int(rng.integers(4, 100))) for _ in range(6)] for _ in range(8)]
    results, errors = {}, []

    def worker(i):
        try:
            with TeacherClient(url) as c:
                results[i] = c.score(work[i], [1] * 6, settings=ScoreSettings(top_k=4, value_encoding="fp32"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for i in range(8):
        for ids, st in zip(work[i], results[i]):
            ref = reference_logprobs(tiny_model_dir, ids)[:-1]
            np.testing.assert_allclose(st.sampled_logprobs, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-5)
    assert server[0].engine.stats.batches < server[0].engine.stats.sequences  # requests were batched together


def test_health_reflection_and_info(server, tiny_model_dir):
    from transformers import AutoTokenizer
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from teacher_server.fingerprint import tokenizer_fingerprint

    _, url = server
    ch = grpc.insecure_channel(url)
    h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    ch.close()
    with TeacherClient(url) as c:
        info = c.info()
    assert info.vocab_size == 512 and info.max_top_k == 32 and info.max_sequence_length == 128
    assert info.max_batch_tokens == 16384   # the auto budget on a CPU
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert len(info.model_hash) == 64


def test_auto_batch_budget_takes_32k_only_with_room_for_it():
    from teacher_server.app import pick_batch_tokens

    per_token = 2 * (3 * 12288 + 4 * 4096)            # the 8B shape: 106,496 bytes per token
    assert pick_batch_tokens(63 << 30, per_token) == 32768    # an 80 GB card after 16 GB of weights
    assert pick_batch_tokens(4 * 32768 * per_token, per_token) == 32768
    assert pick_batch_tokens(4 * 32768 * per_token - 1, per_token) == 16384
    assert pick_batch_tokens(1 << 30, per_token) == 16384     # too little for either: the smaller


@pytest.mark.parametrize("field,value,message", [
    ("max_batch_tokens", -5, "--max-batch-tokens -5: expected a positive budget, or 0 for auto"),
    ("pipeline_depth", 0, "--pipeline-depth 0: expected at least 1"),
    ("head_part_rows", 0, "--head-part-rows 0: expected at least 1"),
    ("batch_wait_s", -0.001, "--batch-wait-ms -1: expected >= 0"),
])
def test_bad_engine_settings_are_refused(tiny_model_dir, field, value, message):
    from teacher_server.app import TeacherConfig, build_server

    with pytest.raises(ValueError, match=message):
        build_server(TeacherConfig(model=tiny_model_dir, dtype="fp32", **{field: value}))


def test_engine_settings_reach_the_engine(tiny_model_dir):
    from teacher_server.app import TeacherConfig, build_server

    srv = build_server(TeacherConfig(model=tiny_model_dir, dtype="fp32", pipeline_depth=3, head_part_rows=77,
                                     batch_wait_s=0.0))
    eng = srv.engine
    assert (eng.pipeline_depth, eng.head_part_rows, eng.batch_wait_s) == (3, 77, 0.0)


def test_tokenizer_mismatch_is_refused_with_a_clear_message(server, tmp_path):
    from opd.tiny import build_tokenizer

    _, url = server
    other = build_tokenizer(tmp_path / "tok", vocab_size=400)
    with pytest.raises(TokenizerMismatchError, match="tokenizer mismatch"):
        TeacherClient(url, tokenizer=other)
    TeacherClient(url, tokenizer=other, allow_tokenizer_mismatch=True).close()  # overridable


def test_overload_gets_resource_exhausted_and_server_survives(tiny_model_dir):
    from teacher_server.engine import ScoreItem

    with running_server(tiny_model_dir, max_queue_tokens=64, queue_wait_s=0.2, max_batch_tokens=64) as (srv, url):
        # Hold the engine's finisher inside a delivery callback; the worker launches batches until
        # its hand-over to the finisher is full, then waits; fill the queue behind it to its limit.
        release, held = threading.Event(), threading.Event()

        def block(item, res):
            held.set()
            release.wait(30)

        mk = lambda: ScoreItem("filler", np.arange(1, 60), 1, 59, top_k=0, stats=frozenset({"sampled"}), deliver=block)
        srv.engine.submit(mk())
        assert held.wait(30)
        deadline = time.monotonic() + 30
        while srv.engine.queue_tokens < 59:  # 59 of 64 queue tokens used, once the worker waits
            assert time.monotonic() < deadline
            if srv.engine.queue_tokens == 0:
                srv.engine.submit(mk())
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as ei:
            _raw_score(url, [_req(list(range(1, 60)))])
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue holds 59 tokens (limit 64)" in ei.value.details()
        # the client retries RESOURCE_EXHAUSTED with backoff; once the queue drains it gets everything
        got = {}
        t = threading.Thread(target=lambda: got.update(r=TeacherClient(url, backoff_s=0.1).score(
            [list(range(1, 60))] * 20, [1] * 20)))
        t.start()
        time.sleep(0.5)
        release.set()
        t.join(60)
        assert [g.num_positions for g in got["r"]] == [58] * 20
        # a single stream larger than the queue is throttled, never rejected
        with TeacherClient(url, max_retries=0) as c:
            assert len(c.score([list(range(1, 60))] * 10, [1] * 10)) == 10


def test_cancelled_call_frees_its_work(tiny_model_dir):
    with running_server(tiny_model_dir, max_batch_tokens=32) as (srv, url):
        ch = grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
        call = ch.stream_stream(f"/{SERVICE}/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                                response_deserializer=pb.ScoreResult.FromString)
        reqs = [_req(list(range(1, 120)), rid=f"r{i}") for i in range(300)]
        it = call(iter(reqs), timeout=60)
        next(it)
        it.cancel()
        time.sleep(1.0)
        done_at_cancel = srv.engine.stats.sequences
        time.sleep(1.0)
        assert srv.engine.stats.sequences - done_at_cancel <= 2   # nothing more is computed
        assert srv.engine.stats.sequences < 300
        assert srv.engine.queue_tokens == 0 or srv.engine.stats.cancelled > 0
        ch.close()
        assert len(_raw_score(url, [_req([1, 2, 3])])) == 1


def test_failover_to_a_healthy_replica_answers_each_request_once(tiny_model_dir):
    with running_server(tiny_model_dir) as (a, url_a), running_server(tiny_model_dir) as (b, url_b):
        a.stop(0)  # replica A goes away
        rng = np.random.default_rng()
        seqs = [rng.integers(0, 512, size=20) for _ in range(10)]
        with TeacherClient([url_a, url_b], backoff_s=0.05) as c:
            got = c.score(seqs, [1] * 10, settings=ScoreSettings(value_encoding="fp32"))
        assert all(g.endpoint == url_b for g in got)
        for ids, g in zip(seqs, got):
            ref = reference_logprobs(tiny_model_dir, ids)[:-1]
            np.testing.assert_allclose(g.sampled_logprobs, ref[np.arange(19), ids[1:]], atol=1e-5)
    with TeacherClient(url_a, max_retries=1, backoff_s=0.01) as c:
        with pytest.raises(TeacherUnavailableError):
            c.score([[1, 2, 3]], [1])


def test_bearer_token_auth(tiny_model_dir):
    with running_server(tiny_model_dir, auth_token="s3cret") as (_, url):
        with pytest.raises(grpc.RpcError) as ei:
            _raw_score(url, [_req([1, 2, 3])])
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError):
            _raw_score(url, [_req([1, 2, 3])], metadata=(("authorization", "Bearer wrong"),))
        with TeacherClient(url, token="s3cret") as c:
            assert c.score([[1, 2, 3]], [1])[0].num_positions == 2


def test_sigterm_drains_in_flight_work_and_exits_zero(tiny_model_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "opd", "teacher", "--model", tiny_model_dir, "--port", "0",
                             "--dtype", "fp32", "--grace-s", "20", "--max-batch-tokens", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        port = None
        for line in proc.stdout:
            if "serving" in line and "on 127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        assert port, "server did not start"
        url = f"127.0.0.1:{port}"
        got = {}

        def long_call():
            with TeacherClient(url, max_retries=0) as c:
                got["r"] = c.score([list(range(1, 200))] * 40, [1] * 40)

        t = threading.Thread(target=long_call)
        t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(60) == 0
        assert len(got["r"]) == 40 and all(g.num_positions == 198 for g in got["r"])  # in-flight work finished
    finally:
        proc.kill()


def test_generated_messages_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from teacher_server.wire import gen

    fresh = gen.generate(tmp_path).read_text()
    current = (gen.Path(gen.__file__).with_name("teacher_pb2.py")).read_text()
    assert fresh == current, "teacher_pb2.py is stale: run `make proto`"
