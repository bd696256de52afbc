"""`opd teacher --http-port`: the HTTP front answers vLLM's completions-with-prompt-logprobs subset
(run through TRL's own client and parser) and SGLang 0.5.23's input-log-prob subset (checked
against the shapes SGLang's source builds, and read the way slime and miles read it), with the
same numbers as gRPC from the same server and a float64 reference; the 400s, 401 and 404s; the
flag's validation."""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
import requests

from teacher_server.client import ScoreSettings, TeacherClient
from tests.teacher_helpers import TeacherProcess, reference_logprobs

TOKEN = "http-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
K = 5
TOL = 2e-5


def _teacher(model_dir):
    """`opd teacher --http-port 0` as a user starts it; ready once both its ports are printed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    t = TeacherProcess("--model", model_dir, "--port", "0", "--http-port", "0", "--dtype", "fp32",
                       "--max-top-k", "32", "--served-model-name", "teacher-x", "--metrics-port", metrics_port,
                       env=dict(os.environ, OPD_TEACHER_TOKEN=TOKEN), need_http=True)
    t.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    return t


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    with _teacher(tiny_model_dir) as t:   # stopped at the end; it must exit with status 0
        yield t


def _seqs():
    rng = np.random.default_rng(7)
    prompt = rng.integers(3, 512, size=24).tolist()
    seqs = [prompt + rng.integers(3, 512, size=n).tolist() for n in (9, 14, 5)]  # samples of one prompt
    seqs.append(rng.integers(3, 512, size=11).tolist())
    return seqs, [len(prompt)] * 3 + [4]


def _grpc(teacher, seqs, k, temperature=1.0, extra=None, starts=None):
    stats = ("sampled", "topk") + (("extra",) if extra is not None else ())
    with TeacherClient(teacher.grpc, token=TOKEN) as c:
        return c.score(seqs, starts or [1] * len(seqs), extra_ids=extra,
                       settings=ScoreSettings(top_k=k, statistics=stats, temperature=temperature,
                                              value_encoding="fp32", compression="none"))


def _by_value(ids, vals):
    o = np.lexsort((ids, -vals.astype(np.float64)), axis=-1)
    return np.take_along_axis(ids, o, -1), np.take_along_axis(vals, o, -1)


def test_trl_clients_read_the_vllm_subset_with_grpc_numbers(teacher, tiny_model_dir, monkeypatch):
    import trl.generation.vllm_client as vc
    from transformers import AutoTokenizer
    from trl.experimental.async_distillation.async_rollout_worker import _parse_teacher_logprobs_at_position

    seqs, plens = _seqs()
    # TRL's VLLMClient checks for a local vLLM install it does not use for HTTP calls, and has no
    # api-key option: its session gets the bearer header, as a user's proxy or patch would add
    monkeypatch.setattr(vc, "is_vllm_available", lambda: True)

    class _Session(requests.Session):
        def __init__(self):
            super().__init__()
            self.headers.update(AUTH)

    monkeypatch.setattr(vc.requests, "Session", _Session)
    client = vc.VLLMClient(base_url=teacher.http)
    assert client.model == "teacher-x"          # GET /health, then GET /v1/models data[0].id
    got = client.get_sequence_logprobs(seqs, plens, top_logprobs=K, temperature=1.0)   # one batched POST
    ref = _grpc(teacher, seqs, K)
    for b, (ids, p) in enumerate(zip(seqs, plens)):
        r = ref[b]
        want_ids, want_lp = _by_value(r.topk_ids[p - 1:], r.topk_logprobs[p - 1:])
        np.testing.assert_array_equal(np.asarray(got["logprob_token_ids"][b]), want_ids)
        np.testing.assert_allclose(np.asarray(got["logprobs"][b]), want_lp, atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(got["actual_logprobs"][b])[:, 0], r.sampled_logprobs[p - 1:],
                                   atol=TOL, rtol=0)
        ref64 = reference_logprobs(tiny_model_dir, ids)
        np.testing.assert_allclose(np.asarray(got["actual_logprobs"][b])[:, 0],
                                   ref64[np.arange(p - 1, len(ids) - 1), ids[p:]], atol=1e-4, rtol=0)

    # the raw reply, as the async trainer's `_score_with_teacher` asks for it, at a temperature
    T = 2.0
    ids, p = seqs[0], plens[0]
    body = {"model": "teacher-x", "prompt": ids, "max_tokens": 1, "temperature": T, "prompt_logprobs": K}
    out = requests.post(f"{teacher.http}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert out.status_code == 200, out.text
    out = out.json()
    assert out["object"] == "text_completion" and out["model"] == "teacher-x"
    assert out["usage"]["prompt_tokens"] == len(ids)
    ch = out["choices"][0]
    assert ch["index"] == 0 and ch["text"] == "" and ch["finish_reason"] == "length" and ch["logprobs"] is None
    plp = ch["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    r = _grpc(teacher, [ids], K, temperature=T)[0]
    ref64 = reference_logprobs(tiny_model_dir, ids, temperature=T)
    for j in range(1, len(ids)):
        pos = plp[j]
        assert next(iter(pos)) == str(ids[j])                  # realised token first (vLLM's dict order)
        assert all(isinstance(v["rank"], int) and v["decoded_token"] == tok.decode([int(t)]) for t, v in pos.items())
        top_ids, top_lp = _by_value(r.topk_ids[j - 1], r.topk_logprobs[j - 1])
        tops = sorted(((v["rank"], int(t), v["logprob"]) for t, v in pos.items() if int(t) in set(top_ids.tolist())))
        assert [x[0] for x in tops] == list(range(1, K + 1))    # ranks 1..k, from the log-probs
        assert [x[1] for x in tops] == top_ids.tolist()
        np.testing.assert_allclose([x[2] for x in tops], top_lp, atol=TOL, rtol=0)
        real = pos[str(ids[j])]
        assert math.isclose(real["logprob"], ref64[j - 1, ids[j]], abs_tol=1e-4)
        assert real["rank"] == (top_ids.tolist().index(ids[j]) + 1 if ids[j] in top_ids else K + 1)
        assert len(pos) == K + (ids[j] not in top_ids)
        # the async trainer's own per-position parser: rank order, realised token kept
        pids, plps = _parse_teacher_logprobs_at_position(pos)
        assert pids[:K] == top_ids.tolist() and ids[j] in pids
        np.testing.assert_allclose(plps[:K], top_lp, atol=TOL, rtol=0)
    assert _parse_teacher_logprobs_at_position(plp[0]) == ([], [])


def test_trl_async_trainer_teacher_call(teacher):
    """The async trainer's whole teacher call (`_score_with_teacher`: aiohttp POST + its parser)."""
    aiohttp = pytest.importorskip("aiohttp", reason="TRL's async trainer talks through aiohttp")
    import asyncio

    from trl.experimental.async_distillation.async_rollout_worker import _AsyncRolloutLoop

    seqs, plens = _seqs()
    ids, p, T = seqs[0], plens[0], 2.0
    r = _grpc(teacher, [ids], K, temperature=T)[0]
    worker = object.__new__(_AsyncRolloutLoop)   # just the state `_score_with_teacher` reads
    worker.teacher_top_k, worker.teacher_temperature, worker.request_timeout = K, T, 60
    worker._counters = {"rollout/vllm_retry_total": 0}

    async def call():
        async with aiohttp.ClientSession(headers=AUTH) as session:   # TRL sends no token: a proxy's job
            worker.session = session
            return await worker._score_with_teacher(ids[:p], ids[p:], teacher.http, "teacher-x")

    tids, tlps = asyncio.run(call())
    assert len(tids) == len(ids) - p
    for i, (t, v) in enumerate(zip(tids, tlps)):
        top_ids, top_lp = _by_value(r.topk_ids[p + i - 1], r.topk_logprobs[p + i - 1])
        assert t[:K] == top_ids.tolist() and ids[p + i] in t
        np.testing.assert_allclose(v[:K], top_lp, atol=TOL, rtol=0)


def test_sglang_subset_shapes_and_grpc_numbers(teacher, tiny_model_dir):
    from transformers import AutoTokenizer

    seqs, plens = _seqs()
    vocab_ids = [7, 300, 42]
    body = {"input_ids": seqs, "sampling_params": {"temperature": 0, "max_new_tokens": 0, "skip_special_tokens": False},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": K, "token_ids_logprob": vocab_ids}
    out = requests.post(f"{teacher.http}/generate", json=body, headers=AUTH, timeout=60)
    assert out.status_code == 200, out.text
    out = out.json()
    assert isinstance(out, list) and len(out) == len(seqs)     # a batch answers a list, in input order
    P = [len(s) - 1 for s in seqs]
    ref = _grpc(teacher, seqs, K, extra=[np.tile(vocab_ids, (n, 1)) for n in P])
    for b, (ids, item) in enumerate(zip(seqs, out)):
        assert item["text"] == "" and item["output_ids"] == []
        m = item["meta_info"]
        assert m["finish_reason"] == {"type": "length", "length": 0}
        assert m["prompt_tokens"] == len(ids) and m["completion_tokens"] == 0
        assert m["output_token_logprobs"] == [] and m["output_top_logprobs"] == []
        itl, itop, iids = m["input_token_logprobs"], m["input_top_logprobs"], m["input_token_ids_logprobs"]
        assert len(itl) == len(itop) == len(iids) == len(ids)
        assert itl[0] == [None, ids[0], None] and itop[0] is None and iids[0] is None   # the placeholder
        assert [e[1] for e in itl] == ids and all(e[2] is None for e in itl)
        r = ref[b]
        np.testing.assert_allclose([e[0] for e in itl[1:]], r.sampled_logprobs, atol=TOL, rtol=0)
        ref64 = reference_logprobs(tiny_model_dir, ids)
        np.testing.assert_allclose([e[0] for e in itl[1:]], ref64[np.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
        top_ids, top_lp = _by_value(r.topk_ids, r.topk_logprobs)
        np.testing.assert_array_equal([[e[1] for e in row] for row in itop[1:]], top_ids)
        np.testing.assert_allclose([[e[0] for e in row] for row in itop[1:]], top_lp, atol=TOL, rtol=0)
        assert all(e[2] is None for row in itop[1:] for e in row)
        assert all([e[1] for e in row] == vocab_ids for row in iids[1:])    # the requested ids, in order
        np.testing.assert_allclose([[e[0] for e in row] for row in iids[1:]], r.extra_logprobs, atol=TOL, rtol=0)
        # slime and miles read it as `values[1:][-response_length:]`
        n = len(ids) - plens[b]
        np.testing.assert_allclose([e[0] for e in itl[1:][-n:]], r.sampled_logprobs[-n:], atol=TOL, rtol=0)

    # one request (an object back), logprob_start_len > 0, text in log-probs, temperature ignored
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, s = seqs[3], 4
    one = {"input_ids": ids, "sampling_params": {"max_new_tokens": 0, "temperature": 2.0}, "return_logprob": True,
           "logprob_start_len": s, "top_logprobs_num": 2, "return_text_in_logprobs": True, "rid": "r-1"}
    m = requests.post(f"{teacher.http}/generate", json=one, headers=AUTH, timeout=60).json()["meta_info"]
    assert m["id"] == "r-1"
    itl = m["input_token_logprobs"]
    assert len(itl) == len(ids) - s and itl[0] == [None, ids[s], tok.decode([ids[s]])]
    assert [e[2] for e in itl] == [tok.decode([t]) for t in ids[s:]]
    np.testing.assert_allclose([e[0] for e in itl[1:]], ref[3].sampled_logprobs[s:], atol=TOL, rtol=0)  # T=1
    assert m["input_top_logprobs"][0] is None and len(m["input_top_logprobs"]) == len(ids) - s
    assert "input_token_ids_logprobs" not in m


@pytest.mark.parametrize("path,body,status,field", [
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 16, "prompt_logprobs": 2}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 0, "prompt_logprobs": 2}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 2, 3], "prompt_logprobs": 2}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hello", "max_tokens": 1, "prompt_logprobs": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 2, "top_p": 0.9}, 400, "top_p"),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 2, "stream": True}, 400, "stream"),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 99}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": [1, 2, 9999], "max_tokens": 1, "prompt_logprobs": 2}, 400, "prompt"),
    ("/v1/completions", {"model": "other", "prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 2}, 404, "model"),
    ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 8}, "return_logprob": True,
                   "logprob_start_len": 0}, 400, "sampling_params.max_new_tokens"),
    ("/generate", {"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 0}, 400,
     "sampling_params.max_new_tokens"),
    ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0, "regex": "a"},
                   "return_logprob": True, "logprob_start_len": 0}, 400, "sampling_params.regex"),
    ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                   "logprob_start_len": 0, "token_ids_logprob_positions": [[1]]}, 400, "token_ids_logprob_positions"),
    ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                   "logprob_start_len": -1}, 400, "logprob_start_len"),
    ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}, "logprob_start_len": 0},
     400, "return_logprob"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 0}}, 400, "text"),
    ("/nope", {}, 404, None),
])
def test_outside_the_subset_is_a_clear_error_and_the_server_keeps_serving(teacher, path, body, status, field):
    r = requests.post(f"{teacher.http}{path}", json=body, headers=AUTH, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    msg = err["message"] if isinstance(err, dict) else err
    if path.startswith("/v1"):  # vLLM's ErrorResponse names the parameter
        assert err["code"] == status and err["param"] == field
    if field:
        assert msg.startswith(field + ":") or f"`{body.get('model')}`" in msg, msg
    ok = requests.post(f"{teacher.http}/generate", headers=AUTH, timeout=60, json={
        "input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True, "logprob_start_len": 0})
    assert ok.status_code == 200 and len(ok.json()["meta_info"]["input_token_logprobs"]) == 3


def test_bearer_token_guards_everything_but_health(teacher):
    assert requests.get(f"{teacher.http}/health", timeout=30).status_code == 200
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/generate")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = requests.request(method, f"{teacher.http}{path}", headers=headers, timeout=30,
                                 json={"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 1})
            assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}, (path, r.text)
    assert requests.get(f"{teacher.http}/v1/models", headers=AUTH, timeout=30).json()["data"][0]["id"] == "teacher-x"
    r = requests.post(f"{teacher.http}/v1/completions", data=b"{not json", headers=AUTH, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_edges_one_token_prompts_and_k_zero(teacher, tiny_model_dir):
    post = lambda path, body: requests.post(f"{teacher.http}{path}", json=body, headers=AUTH, timeout=60)  # noqa: E731
    r = post("/v1/completions", {"prompt": [[5], [5, 6, 7]], "max_tokens": 1, "prompt_logprobs": 0}).json()
    assert r["choices"][0]["prompt_logprobs"] == [None]            # nothing to score in one token
    plp = r["choices"][1]["prompt_logprobs"]
    ref64 = reference_logprobs(tiny_model_dir, [5, 6, 7])
    assert [list(p) for p in plp[1:]] == [["6"], ["7"]]             # k = 0: the realised token alone
    assert math.isclose(plp[2]["7"]["logprob"], ref64[1, 7], abs_tol=1e-4)
    greedy = post("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 0,
                                      "temperature": 0}).json()["choices"][0]["prompt_logprobs"]
    assert greedy == plp                                            # vLLM: temperature 0 leaves logits unscaled
    cold = post("/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 0,
                                    "temperature": 1e-4}).json()["choices"][0]["prompt_logprobs"]
    want = reference_logprobs(tiny_model_dir, [5, 6, 7], temperature=0.01)[1, 7]   # raised to 0.01, as vLLM
    assert math.isclose(cold[2]["7"]["logprob"], want, rel_tol=1e-3, abs_tol=1e-3)
    m = post("/generate", {"input_ids": [5], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                           "logprob_start_len": 0, "top_logprobs_num": 2}).json()["meta_info"]
    assert m["input_token_logprobs"] == [[None, 5, None]] and m["input_top_logprobs"] == [None]


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_http_scoring_counts_in_the_servers_metrics(teacher):
    before = requests.get(teacher.metrics, timeout=30).text
    body = {"input_ids": [[1, 2, 3, 4], [5, 6, 7]], "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3}
    r = requests.post(f"{teacher.http}/generate", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200
    requests.post(f"{teacher.http}/generate", json={"input_ids": [1]}, headers=AUTH, timeout=60)   # a 400
    after = requests.get(teacher.metrics, timeout=30).text
    assert _metric(after, "opd_teacher_requests_total") - _metric(before, "opd_teacher_requests_total") == 2
    grown = _metric(after, "opd_teacher_response_bytes_total") - _metric(before, "opd_teacher_response_bytes_total")
    assert len(r.content) - 2 <= grown <= len(r.content)     # the reply's bytes, shared over its 2 sequences
    assert _metric(after, "opd_teacher_errors_total") - _metric(before, "opd_teacher_errors_total") == 1


@pytest.mark.parametrize("argv,needle", [
    (["--http-port", "70000"], "--http-port"),
    (["--http-port", "web"], "--http-port"),
    (["--http-port", "-1"], "--http-port"),
    (["--http-port", "50999", "--port", "50999"], "--http-port 50999: the same port as --port"),
])
def test_http_port_is_checked_before_the_model_loads(argv, needle, capsys, tmp_path):
    from opd.cli import main

    try:
        rc = main(["teacher", "--model", str(tmp_path / "no-such-model"), *argv])
    except SystemExit as exc:  # argparse's own exit
        rc = exc.code
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_sigterm_lets_http_work_in_flight_finish(teacher):
    """The last test on the shared server (it stops it): an HTTP scoring call in flight when
    SIGTERM arrives is answered in full, and the process exits 0."""
    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, 512, size=1000).tolist() for _ in range(12)]
    got = {}

    def call():
        try:
            got["r"] = requests.post(f"{teacher.http}/v1/completions", headers=AUTH, timeout=300, json={
                "prompt": seqs, "max_tokens": 1, "prompt_logprobs": 16})
        except requests.RequestException as exc:   # cut off by the shutdown
            got["r"] = exc

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    teacher.proc.send_signal(signal.SIGTERM)
    t.join(300)
    assert teacher.proc.wait(60) == 0
    r = got["r"]
    assert not isinstance(r, Exception), f"the call in flight was cut off: {r!r}"
    assert r.status_code == 200, r.text[:500]
    choices = r.json()["choices"]
    assert len(choices) == 12 and all(len(c["prompt_logprobs"]) == 1000 for c in choices)


def test_a_full_queue_answers_503_in_each_dialect(tiny_model_dir):
    """The front shares the engine's queue and its limits: with the queue at --max-queue-tokens,
    new HTTP work waits --queue-wait-s and then gets 503 (the peers' clients retry 5xx)."""
    from teacher_server.app import TeacherConfig, build_server
    from teacher_server.engine import ScoreItem
    from teacher_server.http_front import HttpFront
    from teacher_server.service import ServerConfig

    srv = build_server(TeacherConfig(model=tiny_model_dir, dtype="fp32", max_queue_tokens=8,
                                     server=ServerConfig(port=0, queue_wait_s=0.2)))
    front = HttpFront(srv, "127.0.0.1", 0).start()   # the engine's worker is not started: the queue stays full
    try:
        srv.engine.submit(ScoreItem("filler", np.arange(1, 9), 1, 8, top_k=0, stats=frozenset({"sampled"})))
        url = f"http://127.0.0.1:{front.port}"
        r = requests.post(f"{url}/generate", timeout=30, json={
            "input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
            "logprob_start_len": 0})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "queue" in r.json()["error"]
        r = requests.post(f"{url}/v1/completions", timeout=30, json={"prompt": [1, 2, 3], "max_tokens": 1,
                                                                     "prompt_logprobs": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == 503 and "queue" in r.json()["error"]["message"]
        assert requests.get(f"{url}/health", timeout=30).status_code == 200   # full, not down
    finally:
        front.stop(0)
        srv.engine.stop(1)
