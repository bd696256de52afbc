"""`opd teacher --engine sglang`: teacher statistics from an SGLang server's input log-probs.

SGLang cannot run here: `opd rollout-server`'s service (the stand-in, in-process on 127.0.0.1)
answers the prefill-only /generate requests, shaped as SGLang 0.5.23 shapes them and held to
SGLang's own request/response classes (tests/sglang_reference.py: the wheel's api_types and
SamplingParams; nothing was recorded from a running SGLang). Its log-probs come from its HF
model, so the SGLang-fronted teacher (launched through `opd teacher`, served over real gRPC) is
compared with the HF engine (`build_server`, the same tiny model, fp32) and with a float64
forward, within the bound docs/sglang-scoring.md states for fp32 teachers.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rollout.local_engine import LocalEngine
from rollout.server import RolloutService, make_server
from rollout.sglang_client import http_json
from teacher_server import codec
from teacher_server import head as H
from teacher_server import sglang_app as SA
from teacher_server import sglang_engine as SE
from teacher_server.client import ScoreSettings, TeacherClient
from teacher_server.engine import ScoreItem
from teacher_server.service import CHANNEL_OPTIONS, SERVICE
from teacher_server.wire import pb
from tests import sglang_reference
from tests.teacher_helpers import TeacherProcess, reference_logprobs, running_server

K = 8
BOUND = 1e-4      # |SGLang-fronted - HF engine| for an fp32 teacher (docs/sglang-scoring.md)
VOCAB = 512


class StandIn:
    """The rollout-server service on a thread, recording the /generate bodies; stop() and start()
    again on the same port (an SGLang server that goes down and comes back)."""

    def __init__(self, model_dir):
        self.engine = LocalEngine.from_pretrained(model_dir)
        self.svc = RolloutService(self.engine, model_dir)
        self.bodies: list[dict] = []
        real = self.svc.generate

        def generate(body):
            self.bodies.append(body)
            return real(body)

        self.svc.generate = generate
        self.port = 0
        self.start()

    def start(self):
        self.server = make_server(self.svc, "127.0.0.1", self.port)
        self.conns = []
        accept = self.server.process_request

        def process_request(request, client_address):  # kept, so stop() can cut keep-alive connections
            self.conns.append(request)
            accept(request, client_address)

        self.server.process_request = process_request
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        """Down as a crashed server is: not listening, open connections cut."""
        self.server.shutdown()
        self.server.server_close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture(scope="module")
def standin(tiny_model_dir):
    s = StandIn(tiny_model_dir)
    yield s
    s.stop()
    s.engine.close()


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    with running_server(tiny_model_dir, max_top_k=32) as (_, url):
        yield url


def _teacher(model_dir, url, *extra):
    """`opd teacher --engine sglang` as a user starts it, in front of the stand-in at `url`."""
    from rollout.launcher import free_port

    metrics_port = free_port("127.0.0.1")
    t = TeacherProcess("--model", model_dir, "--engine", "sglang", "--sglang-url", url, "--port", "0",
                       "--max-top-k", "32", "--cache-mb", "16", "--batch-wait-ms", "100", "--grace-s", "2",
                       "--http-port", "0", "--metrics-port", metrics_port, *extra, timeout=120)
    t.metrics_port = metrics_port
    return t


@pytest.fixture(scope="module")
def teacher(standin, tiny_model_dir):
    with _teacher(tiny_model_dir, standin.url) as t:   # stopped at the end; it must exit with status 0
        yield t


def _seqs():
    """Three samples of one 24-token prompt (scored from the prompt's end), a sequence scored from
    position 5 to 2 before its end, one whose targets include the last vocabulary id."""
    rng = np.random.default_rng(11)
    prompt = rng.integers(3, VOCAB, size=24).tolist()
    seqs = [prompt + rng.integers(3, VOCAB, size=n).tolist() for n in (9, 14, 5)]
    seqs.append(rng.integers(3, VOCAB, size=17).tolist())
    seqs.append([1, 2, VOCAB - 1, 7, VOCAB - 1, 9])
    starts = [24, 24, 24, 5, 1]
    ends = [len(s) for s in seqs]
    ends[3] -= 2
    extra = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        P = e - s
        extra.append(np.tile([7, 300, VOCAB - 1], (P, 1)) if i % 2 else rng.integers(0, VOCAB, size=(P, 3)))
    return seqs, starts, ends, extra


def _score(url, seqs, starts, ends, extra, stats=("sampled", "topk", "tail", "extra"), **kw):
    with TeacherClient(url, max_retries=0) as c:
        return c.score(seqs, starts, ends, extra_ids=extra,
                       settings=ScoreSettings(top_k=K, statistics=stats, value_encoding="fp32", **kw))


def test_statistics_equal_the_hf_engine_within_the_bound(teacher, hf, standin, tiny_model_dir):
    seqs, starts, ends, extra = _seqs()
    n_before = len(standin.bodies)
    got = _score(teacher.grpc, seqs, starts, ends, extra)
    want = _score(hf, seqs, starts, ends, extra)
    for b, (g, w) in enumerate(zip(got, want)):
        assert g.num_positions == ends[b] - starts[b]
        np.testing.assert_allclose(g.sampled_logprobs, w.sampled_logprobs, atol=BOUND, rtol=0)
        np.testing.assert_array_equal(g.topk_ids, w.topk_ids)           # ascending ids, as the HF engine sends
        np.testing.assert_allclose(g.topk_logprobs, w.topk_logprobs, atol=BOUND, rtol=0)
        np.testing.assert_allclose(g.tail_logmass, w.tail_logmass, atol=BOUND, rtol=0)
        np.testing.assert_allclose(g.extra_logprobs, w.extra_logprobs, atol=BOUND, rtol=0)
        # ... and the definition, in float64
        ids = seqs[b]
        ref = reference_logprobs(tiny_model_dir, ids)
        rows = np.arange(starts[b] - 1, ends[b] - 1)
        np.testing.assert_allclose(g.sampled_logprobs, ref[rows, np.asarray(ids)[rows + 1]], atol=BOUND, rtol=0)
        np.testing.assert_allclose(g.extra_logprobs, np.take_along_axis(ref[rows], extra[b], 1), atol=BOUND, rtol=0)
        top = np.sort(ref[rows], axis=1)[:, ::-1][:, :K]
        np.testing.assert_allclose(np.sort(g.topk_logprobs, axis=1)[:, ::-1], top, atol=BOUND, rtol=0)
        tail = np.log1p(-np.exp(top).sum(1))
        np.testing.assert_allclose(g.tail_logmass, tail, atol=BOUND, rtol=0)
    # Prefix grouping: the three samples of the prompt went to SGLang in one batched request,
    # each as input_ids up to its span's end with logprob_start_len = target_start - 1.
    bodies = standin.bodies[n_before:]
    sent = [(ids, s) for body in bodies for ids, s in zip(body["input_ids"], body["logprob_start_len"])]
    assert sorted(sent) == sorted((seq[:e], s - 1) for seq, s, e in zip(seqs, starts, ends))
    assert any(sum(ids[:24] == seqs[0][:24] for ids in body["input_ids"]) == 3 for body in bodies)
    # The statistics cache answers a repeat without SGLang.
    again = _score(teacher.grpc, seqs, starts, ends, extra)
    assert len(standin.bodies) == n_before + len(bodies)
    for g, a in zip(got, again):
        np.testing.assert_array_equal(g.topk_logprobs, a.topk_logprobs)


def test_handshake_lists_what_sglang_gives(teacher, hf):
    with TeacherClient(teacher.grpc) as c, TeacherClient(hf) as h:
        got, want = c.info(), h.info()
    assert got.tokenizer_fingerprint == want.tokenizer_fingerprint and got.tokenizer_fingerprint
    assert got.vocab_size == want.vocab_size == VOCAB and got.chat_template == want.chat_template
    assert list(got.statistics) == ["SAMPLED_LOGPROB", "TOPK", "TAIL_LOGMASS", "EXTRA_LOGPROBS"]
    assert not got.full_distribution_allowed and got.dtype == "sglang:float32"
    status, text = http_json(f"http://127.0.0.1:{teacher.metrics_port}/metrics", method="GET")
    sequences = [ln for ln in text.splitlines() if ln.startswith("opd_teacher_engine_sequences_total ")]
    assert status == 200 and sequences and float(sequences[0].split()[1]) >= 1   # the engine's counters


def test_http_front_over_sglang(teacher):
    """slime / miles -> opd's HTTP front -> SGLang: the same numbers as gRPC; a temperature SGLang
    cannot apply is a 400 there too."""
    seqs, starts, ends, extra = _seqs()
    ids = seqs[3][:ends[3]]
    (g,) = _score(teacher.grpc, [ids], [1], [len(ids)], None, stats=("sampled", "topk"))
    status, out = http_json(teacher.http + "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 0},
                                                        "return_logprob": True, "logprob_start_len": 0,
                                                        "top_logprobs_num": K})
    assert status == 200
    np.testing.assert_array_equal([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]], g.sampled_logprobs)
    status, out = http_json(teacher.http + "/v1/completions", {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2,
                                                              "temperature": 2.0})
    assert status == 400 and "options.temperature: 2 is not available" in str(out)


def _raw(url, reqs):
    ch = grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
    call = ch.stream_stream(f"/{SERVICE}/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                            response_deserializer=pb.ScoreResult.FromString)
    try:
        return list(call(iter(reqs), timeout=30))
    finally:
        ch.close()


def _req(ids=(1, 2, 3, 4, 5), **opts):
    opts.setdefault("top_k", 4)
    return pb.ScoreRequest(request_id="r", token_ids=codec.encode_plain_ids(np.asarray(ids)), target_start=1,
                           options=pb.ScoreOptions(**opts))


@pytest.mark.parametrize("opts,needle", [
    ({"statistics": [pb.SAMPLED_LOGPROB, pb.LOGSUMEXP]}, "options.statistics: LOGSUMEXP is not available"),
    ({"statistics": [pb.ENTROPY]}, "options.statistics: ENTROPY is not available"),
    ({"statistics": [pb.FULL_LOGPROBS]}, "options.statistics: FULL_LOGPROBS is not available"),
    ({"temperature": 2.0}, "options.temperature: 2 is not available"),
])
def test_what_sglang_cannot_give_is_invalid_argument(teacher, opts, needle):
    with pytest.raises(grpc.RpcError) as e:
        _raw(teacher.grpc, [_req(**opts)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()
    assert "SAMPLED_LOGPROB, TOPK, TAIL_LOGMASS, EXTRA_LOGPROBS" in e.value.details() or "temperature" in needle
    (ok,) = _raw(teacher.grpc, [_req(temperature=1.0)])     # the server keeps serving
    assert ok.num_positions == 4


def _health(url):
    ch = grpc.insecure_channel(url)
    try:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    finally:
        ch.close()


def _until(fn, want, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn() == want:
            return True
        time.sleep(0.2)
    return False


def test_sglang_down_is_not_serving_and_unavailable_then_back(teacher, standin):
    """Last on the shared servers (it stops the stand-in): while SGLang is down the teacher keeps
    running, reports NOT_SERVING and answers Score with UNAVAILABLE (clients retry elsewhere);
    when SGLang is back it serves again."""
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(teacher.grpc) == SERVING
    standin.stop()
    try:
        with pytest.raises(grpc.RpcError) as e:   # before or after the monitor notices: UNAVAILABLE
            _raw(teacher.grpc, [_req(ids=(5, 6, 7, 8, 9, 10))])
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "SGLang" in e.value.details()
        assert _until(lambda: _health(teacher.grpc), NOT_SERVING)
    finally:
        standin.start()
    assert _until(lambda: _health(teacher.grpc), SERVING)
    (ok,) = _raw(teacher.grpc, [_req(ids=(5, 6, 7, 8, 9, 10))])
    assert ok.num_positions == 5


@pytest.mark.parametrize("argv,needle", [
    (["--engine", "sglang"], "--engine sglang: needs --sglang-url"),
    (["--engine", "sglang", "--sglang-url", "localhost:30000"], "--sglang-url 'localhost:30000': expected http://"),
    (["--engine", "sglang", "--sglang-url", "http://a:1,http://a:1"], "a URL is listed twice"),
    (["--engine", "sglang", "--sglang-url", "http://127.0.0.1:9", "--quantize", "fp8"], "--quantize fp8: not available"),
    (["--engine", "sglang", "--sglang-url", "http://127.0.0.1:9", "--random-weights-seed", "3"],
     "--random-weights-seed 3: not available"),
    (["--engine", "sglang", "--sglang-url", "http://127.0.0.1:9", "--sglang-timeout-s", "0"], "--sglang-timeout-s 0"),
    (["--sglang-url", "http://127.0.0.1:9"], "--sglang-url http://127.0.0.1:9: only used with --engine sglang"),
    (["--engine", "sglang", "--sglang-url", "http://127.0.0.1:9", "--model", "b=/nowhere"],
     "--engine sglang: 2 --model flags"),
])
def test_config_errors_exit_2_naming_the_flag(argv, needle, capsys, tmp_path):
    from opd.cli import main

    try:
        rc = main(["teacher", "--model", str(tmp_path / "no-such-model"), *argv])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_tp_is_refused_and_an_unreachable_sglang_exits_1(capsys, tiny_model_dir):
    ns = argparse.Namespace(engine="sglang", sglang_url="http://127.0.0.1:9", quantize="none", tp=2,
                            random_weights_seed=None, sglang_timeout_s=1.0, sglang_wait_s=0.0)
    assert SA.check_args(ns).startswith("--tp 2: not available with --engine sglang")
    ns.tp = 1
    assert SA.check_args(ns) is None
    from opd.cli import main
    from rollout.launcher import free_port

    url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    rc = main(["teacher", "--model", tiny_model_dir, "--engine", "sglang", "--sglang-url", url, "--sglang-wait-s", "0"])
    assert rc == 1
    assert f"--sglang-url: no SGLang server answered /model_info within --sglang-wait-s 0: {url}" in capsys.readouterr().err


def test_a_dead_url_is_skipped_and_marked_down(standin):
    """Two URLs, the first refusing connections: the batch goes to the other; the dead one is
    marked down (health stays up while one answers), and with none up the work fails UNAVAILABLE."""
    from rollout.launcher import free_port

    dead = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    seen = []
    eng = SE.SGLangScoringEngine([dead, standin.url], vocab_size=VOCAB)
    eng.on_health = seen.append
    eng._urls_for = lambda batch: [u for u in eng.urls if eng._up[u]]   # the dead URL first
    item = ScoreItem("d", np.arange(3, 13, dtype=np.int64), 1, 10, 2, frozenset({H.SAMPLED, H.TOPK}))
    (res,) = eng.score([item], use_cache=False)
    assert res[H.SAMPLED].shape == (9,) and eng._up == {dead: False, standin.url: True} and seen == []
    eng._mark(standin.url, False)
    assert seen == [False]
    with pytest.raises(SE.SGLangUnavailable, match="no SGLang server is up"):
        eng.score([item], use_cache=False)
    assert SE.SGLangUnavailable.grpc_status == grpc.StatusCode.UNAVAILABLE
    assert eng.probe(standin.url) and not eng.probe(dead)


def test_sglang_api_key(standin, monkeypatch):
    """--sglang-api-key goes as SGLang's bearer token; a refused key is named at start and per request."""
    monkeypatch.setattr(standin.svc, "api_key", "sk-sgl")
    item = ScoreItem("k", np.arange(3, 9, dtype=np.int64), 1, 6, 0, frozenset({H.SAMPLED}))
    with pytest.raises(ValueError, match="--sglang-api-key"):
        SA.wait_for([standin.url], SE.SGLangHttp(None, 5.0), 0)
    assert SA.wait_for([standin.url], SE.SGLangHttp("sk-sgl", 5.0), 0)[standin.url]["model_path"]
    with pytest.raises(SE.SGLangFailed, match="refused the API key .* --sglang-api-key"):
        SE.SGLangScoringEngine([standin.url], vocab_size=VOCAB).score([item], use_cache=False)
    (res,) = SE.SGLangScoringEngine([standin.url], vocab_size=VOCAB, api_key="sk-sgl").score([item], use_cache=False)
    assert res[H.SAMPLED].shape == (5,)


def test_tail_from_topk_from_the_definition():
    with np.errstate(divide="ignore"):
        v = np.log(np.array([[0.5, 0.25, 0.125], [0.9, 0.05, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    got = SE.tail_from_topk(v.astype(np.float32))
    want = [np.log(0.125), np.log(0.05), np.log(3 * 2.0 ** -24), 0.0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)   # (1 - covered) floored at k * 2^-24; -inf rows: 0


# ---- the stand-in held to SGLang 0.5.23's own classes ----------------------------------------------
@pytest.fixture(scope="module")
def sgl():
    try:
        root = sglang_reference.ensure_source()
    except RuntimeError as e:
        pytest.fail(f"{e}\nThese tests check the stand-in against SGLang's own classes; they need PyPI once "
                    "(or OPD_SGLANG_CACHE pointing at an unpacked sglang 0.5.23 wheel).")
    return sglang_reference.load_modules(root)


def test_stand_in_answers_input_logprobs_as_sglang(sgl, standin, tiny_model_dir, monkeypatch):
    """What the engine sends parses in SGLang's GenerateRequest and SamplingParams; the stand-in's
    answers decode in SGLang's response structs, line up as SGLang's scheduler lines them up (entry 0
    a placeholder, entry i scoring input_ids[s+i]), and the edges refuse or answer as SGLang does."""
    at = sgl.api_types
    url = standin.url
    # 1. The requests the engine builds (batched, per-item start / k / ids, union chunks).
    monkeypatch.setattr(SE, "MAX_UNION_IDS", 4)   # per-position extra ids split into several requests
    eng = SE.SGLangScoringEngine([url], vocab_size=VOCAB)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, VOCAB, 30).astype(np.int64)
    stats = frozenset({H.SAMPLED, H.TOPK, H.TAIL, H.EXTRA})
    items = [ScoreItem("a", ids, 5, 30, 4, stats, extra_ids=rng.integers(0, VOCAB, (25, 3))),
             ScoreItem("b", ids[:12], 1, 12, 0, frozenset({H.SAMPLED, H.TAIL}))]
    n0 = len(standin.bodies)
    res = eng.score(items, use_cache=False)
    bodies = standin.bodies[n0:]
    assert len(bodies) == 1 and len(bodies[0]["input_ids"]) > 2     # item a's extra ids took several chunks
    for body in bodies:
        at.GenerateRequest.from_json_value(body)                     # SGLang's JSON contract admits it
        assert set(body) <= sgl.request_fields["GenerateReqInput"]
        sgl.sampling_params.SamplingParams(**body["sampling_params"]).verify(VOCAB)
    ref = reference_logprobs(tiny_model_dir, ids)
    rows = np.arange(4, 29)
    np.testing.assert_allclose(res[0][H.EXTRA], np.take_along_axis(ref[rows], items[0].extra_ids, 1), atol=1e-5)
    np.testing.assert_allclose(res[0][H.SAMPLED], ref[rows, ids[rows + 1]], atol=1e-5)
    np.testing.assert_array_equal(res[1][H.TAIL], 0.0)               # k = 0: everything is tail, as the HF engine

    # 2. Alignment, decoded with SGLang's own structs.
    seq = [3, 9, VOCAB - 1, 40, 7, VOCAB - 1, 12]
    s = 2
    status, out = http_json(url + "/generate", {"input_ids": seq, "sampling_params": {"max_new_tokens": 0},
                                                "return_logprob": True, "logprob_start_len": s,
                                                "top_logprobs_num": 3, "token_ids_logprob": [5, VOCAB - 1]})
    assert status == 200
    decoded = at.GenerateResponse.from_json_value(out)
    assert set(out) <= set(at.GenerateResponse.__struct_fields__)
    assert {"input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs", "output_token_logprobs",
            "output_top_logprobs", "output_token_ids_logprobs"} <= set(out["meta_info"])
    m = decoded.meta_info
    assert m.finish_reason == at.FinishLength(length=0) and decoded.output_ids == [] and m.completion_tokens == 0
    ref = reference_logprobs(tiny_model_dir, seq)
    assert len(m.input_token_logprobs) == len(m.input_top_logprobs) == len(m.input_token_ids_logprobs) == len(seq) - s
    assert m.input_token_logprobs[0].logprob is None and m.input_top_logprobs[0] is None
    assert m.input_token_ids_logprobs[0] is None
    # SGLang's scheduler reports ids >= vocab_size - 1 as 0 in input_token_logprobs
    assert [e.token_id for e in m.input_token_logprobs] == [t if t < VOCAB - 1 else 0 for t in seq[s:]]
    for i in range(1, len(seq) - s):
        p = s + i
        assert m.input_token_logprobs[i].logprob == pytest.approx(ref[p - 1, seq[p]], abs=1e-5)
        top = m.input_top_logprobs[i]
        assert [e.token_id for e in top] == np.argsort(-ref[p - 1])[:3].tolist()       # highest first
        assert [e.logprob for e in top] == pytest.approx(np.sort(ref[p - 1])[::-1][:3].tolist(), abs=1e-5)
        assert [e.token_id for e in m.input_token_ids_logprobs[i]] == [5, VOCAB - 1]
        assert [e.logprob for e in m.input_token_ids_logprobs[i]] == pytest.approx(ref[p - 1, [5, VOCAB - 1]], abs=1e-5)
    # 3. Edges, as SGLang answers them.
    base = {"input_ids": seq, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True}
    _, at_end = http_json(url + "/generate", {**base, "logprob_start_len": len(seq), "top_logprobs_num": 2})
    assert at_end["meta_info"]["input_token_logprobs"] == [] and at_end["meta_info"]["input_top_logprobs"] == []
    _, default = http_json(url + "/generate", base)                    # -1: output log-probs only
    assert default["meta_info"]["input_token_logprobs"] == []
    assert http_json(url + "/generate", {**base, "logprob_start_len": 8}) == (400, {"error": {"message": (
        "req.logprob_start_len=8 is higher than the number of input tokens len(req.origin_input_ids)=7. "
        "Please use a smaller logprob_start_len.")}})
    assert http_json(url + "/generate", {**base, "logprob_start_len": 0, "token_ids_logprob": [VOCAB]}) == (
        400, {"error": {"message": f"token_ids_logprob contains out-of-vocabulary token id {VOCAB}; valid range is "
                                   f"[0, {VOCAB})."}})
    # Known difference, on purpose: input log-probs of a generation request are not implemented here.
    st, r = http_json(url + "/generate", {**base, "sampling_params": {"max_new_tokens": 2}, "logprob_start_len": 0})
    assert st == 400 and "prompt scoring only" in r["error"]["message"]
    # -inf goes out as null (orjson), and the engine reads null back as -inf.
    real = standin.engine.prompt_logprobs

    def masked(prompt):
        lp = real(prompt)
        lp[:, 5] = -torch.inf
        return lp

    monkeypatch.setattr(standin.engine, "prompt_logprobs", masked)
    _, out = http_json(url + "/generate", {**base, "logprob_start_len": 0, "token_ids_logprob": [5, 6]})
    assert all(row[0][0] is None and row[1][0] is not None for row in out["meta_info"]["input_token_ids_logprobs"][1:])
    got = eng.score([ScoreItem("c", np.asarray(seq, dtype=np.int64), 1, len(seq), 0, frozenset({H.EXTRA}),
                               extra_ids=np.tile([5, 6], (len(seq) - 1, 1)))], use_cache=False)[0]
    assert np.isneginf(got[H.EXTRA][:, 0]).all() and np.isfinite(got[H.EXTRA][:, 1]).all()
