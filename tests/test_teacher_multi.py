"""One teacher server, several models (`opd teacher --model NAME=DIR ...`), and UpdateWeights.

Real gRPC on 127.0.0.1, the session's tiny models: `models` = (teacher, student), distinct
weights, one tokenizer. Sequences of 40 tokens with --max-batch-tokens 64 are one batch each, so
a one-model server and a several-model server run the very same forwards: results compare exact.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import torch

from teacher_server import codec
from teacher_server.client import ScoreSettings, TeacherClient, TeacherRequestError
from teacher_server.service import CHANNEL_OPTIONS, SERVICE
from teacher_server.wire import pb
from tests.teacher_helpers import TeacherProcess, reference_logprobs, running_server

TOKEN = "multi-s3cret"
EXACT = ScoreSettings(top_k=8, statistics=("sampled", "topk", "tail", "logsumexp"), value_encoding="fp32",
                      compression="none")
FIELDS = ("sampled_logprobs", "topk_ids", "topk_logprobs", "tail_logmass", "logsumexp")


def _seqs(seed, n=4, length=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, length) for _ in range(n)], [length // 2] * n


def _score(url, model, seqs, starts, token=TOKEN):
    with TeacherClient(url, token=token, model=model, settings=EXACT) as c:
        return c.score(seqs, starts)


def _assert_same(got, want):
    for g, w in zip(got, want):
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(g, f), getattr(w, f), err_msg=f)


@pytest.fixture(scope="module")
def multi(models):
    """a = teacher, b = student, c = the teacher's directory again (loaded once)."""
    teacher, student = models
    with running_server(None, models=[("a", teacher), ("b", student), ("c", teacher)], max_batch_tokens=64,
                        auth_token=TOKEN) as (srv, url):
        yield srv, url


@pytest.fixture(scope="module")
def single(models):
    """One-model servers of the teacher and of the student, set like `multi`."""
    teacher, student = models
    with running_server(teacher, max_batch_tokens=64) as (sa, ua), \
            running_server(student, max_batch_tokens=64) as (sb, ub):
        yield ua, ub


def test_each_model_answers_as_its_own_server(multi, single):
    url = multi[1]
    seqs, starts = _seqs(0)
    a, b, c = (_score(url, m, seqs, starts) for m in ("a", "b", "c"))
    _assert_same(a, _score(single[0], None, seqs, starts, token=None))
    _assert_same(b, _score(single[1], None, seqs, starts, token=None))
    _assert_same(c, a)
    assert not np.array_equal(a[0].sampled_logprobs, b[0].sampled_logprobs)   # two models indeed
    assert all(r.weight_version == 0 for r in a + b + c)


def test_info_lists_every_model_and_the_default_keeps_the_old_fields(multi, models):
    from transformers import AutoTokenizer

    from teacher_server.fingerprint import model_hash, tokenizer_fingerprint

    srv, url = multi
    teacher, student = models
    with TeacherClient(url, token=TOKEN) as c:
        info = c.info()
    assert info.default_model == "a" and info.model_name == "a"        # top level: the default model
    assert [m.model_name for m in info.models] == ["a", "b", "c"]
    by = {m.model_name: m for m in info.models}
    assert by["a"].model_hash == by["c"].model_hash == model_hash(teacher) != by["b"].model_hash == model_hash(student)
    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(teacher))
    assert all(m.tokenizer_fingerprint == fp and m.vocab_size == 512 and m.max_batch_tokens == 64 and
               m.weight_version == 0 and not m.models for m in info.models)
    assert info.model_hash == by["a"].model_hash and info.vocab_size == 512
    with TeacherClient(url, token=TOKEN, model="b", tokenizer=AutoTokenizer.from_pretrained(student)) as c:
        assert c.info().model_name == "b" and c.info().model_hash == model_hash(student)
    # the same checkpoint under two names is loaded once
    assert srv.engine.engine_for("a") is srv.engine.engine_for("c") is srv.engine
    assert len(srv.engine.engines()) == 2


def test_one_checkpoint_beside_two_tokenizers_is_loaded_once_and_described_per_name(models, tmp_path):
    """Same config and weights (the model hash) in two directories, another chat template in the
    second: one engine, but each name reports its own directory's tokenizer."""
    import shutil

    teacher, _ = models
    other = tmp_path / "other-template"
    shutil.copytree(teacher, other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with running_server(None, models=[("x", teacher), ("y", str(other))]) as (srv, url):
        assert srv.engine.engine_for("x") is srv.engine.engine_for("y")
        with TeacherClient(url) as c:
            by = {m.model_name: m for m in c.info().models}
    assert by["x"].model_hash == by["y"].model_hash
    assert by["x"].tokenizer_fingerprint != by["y"].tokenizer_fingerprint
    assert by["y"].chat_template == "{{ messages[0]['content'] }}" != by["x"].chat_template


def test_unknown_model_is_invalid_argument_naming_the_models(multi):
    url = multi[1]
    seqs, starts = _seqs(1, n=1)
    with pytest.raises(TeacherRequestError, match=r"model: 'nope' is not served here; this server serves "
                                                  r"\['a', 'b', 'c'\] \(default 'a'\)"):
        _score(url, "nope", seqs, starts)
    with pytest.raises(TeacherRequestError, match=r"GetInfoRequest.model: 'nope' is not served here"):
        TeacherClient(url, token=TOKEN, model="nope").info()
    req = pb.ScoreRequest(request_id="x", token_ids=codec.encode_plain_ids(seqs[0]), target_start=1, model="nope")
    with pytest.raises(grpc.RpcError) as err:
        _raw_call(url, [req])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == ("requests[0] (request_id='x').model: 'nope' is not served here; this server "
                                   "serves ['a', 'b', 'c'] (default 'a')")
    assert _score(url, "b", seqs, starts)[0].num_positions == 20   # still serving


def test_a_client_naming_a_model_refuses_a_server_that_takes_no_names(multi, monkeypatch):
    """A server from before several models ignores ScoreRequest.model: the client finds no
    `models` in its GetInfo answer and refuses, instead of getting the server's one model."""
    srv, url = multi
    old_info = srv.servicer.info_for

    def old_server(name=""):
        info = old_info("")
        del info.models[:]
        info.default_model = ""
        return info

    monkeypatch.setattr(srv.servicer, "info_for", old_server)
    seqs, starts = _seqs(8, n=1)
    with pytest.raises(TeacherRequestError, match=r"model 'b': the teacher serves one model \('a'\) and does not "
                                                  r"take model names"):
        _score(url, "b", seqs, starts)
    assert _score(url, None, seqs, starts)[0].num_positions == 20   # naming none still works


def _raw_call(url, requests):
    """Requests as an old client sends them (no `model` field anywhere)."""
    with grpc.insecure_channel(url, options=CHANNEL_OPTIONS) as ch:
        md = (("authorization", f"Bearer {TOKEN}"),)
        info = ch.unary_unary(f"/{SERVICE}/GetInfo", request_serializer=pb.GetInfoRequest.SerializeToString,
                              response_deserializer=pb.TeacherInfo.FromString)(pb.GetInfoRequest(), metadata=md)
        score = ch.stream_stream(f"/{SERVICE}/Score", request_serializer=pb.ScoreRequest.SerializeToString,
                                 response_deserializer=pb.ScoreResult.FromString)
        return info, list(score(iter(requests), metadata=md))


def test_a_request_naming_no_model_goes_to_the_default(multi):
    url = multi[1]
    seqs, starts = _seqs(2, n=2)
    opts = pb.ScoreOptions(top_k=8, value_encoding=pb.FP32)
    reqs = [pb.ScoreRequest(request_id=f"r{i}", token_ids=codec.encode_plain_ids(s), target_start=st, options=opts)
            for i, (s, st) in enumerate(zip(seqs, starts))]
    info, out = _raw_call(url, reqs)
    assert info.model_name == "a" and info.vocab_size == 512
    want = _score(url, "a", seqs, starts)
    for m in out:
        i = int(m.request_id[1:])
        np.testing.assert_array_equal(codec.decode_values(m.sampled_logprobs), want[i].sampled_logprobs)


def test_a_mixed_stream_never_batches_across_models(multi, models):
    """Two clients per model at once, short sequences (several per batch): every forward holds
    one model's sequences, and each result is its model's (float64 reference)."""
    srv, url = multi
    batches = []
    originals = {}
    for eng in srv.engine.engines():
        originals[eng] = eng.launch_batch

        def spy(batch, _orig=originals[eng], _eng=eng):
            batches.append(({it.model for it in batch}, _eng, len(batch)))
            return _orig(batch)

        eng.launch_batch = spy
    rng = np.random.default_rng(3)
    work = {m: [rng.integers(0, 512, 10) for _ in range(12)] for m in ("a", "b", "c", "b2")}
    got = {}

    def run(m):
        got[m] = _score(url, m.rstrip("2"), work[m], [5] * len(work[m]))

    try:
        threads = [threading.Thread(target=run, args=(m,)) for m in work]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for eng, orig in originals.items():
            eng.launch_batch = orig
    assert len(got) == 4 and batches
    for names, eng, _ in batches:
        assert len(names) == 1, f"a batch mixed models {names}"
        assert srv.engine.engine_for(next(iter(names))) is eng
    assert max(n for _, _, n in batches) > 1     # batching did happen
    teacher, student = models
    for m, res in got.items():
        ref_dir = student if m.startswith("b") else teacher
        for ids, r in zip(work[m], res):
            ref = reference_logprobs(ref_dir, ids)
            np.testing.assert_allclose(r.sampled_logprobs, ref[np.arange(4, 9), ids[5:]], atol=2e-5, rtol=0)


# ---- UpdateWeights -------------------------------------------------------------------------------

def _params(model_dir):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).named_parameters())


@pytest.fixture()
def updatable(models):
    """a = teacher, c = the teacher again (loaded once), with a statistics cache."""
    teacher, _ = models
    with running_server(None, models=[("a", teacher), ("c", teacher)], max_batch_tokens=64, auth_token=TOKEN,
                        cache_mb=16) as (srv, url):
        yield srv, url


def test_update_weights_answers_as_a_fresh_server_on_the_new_weights(updatable, single, models, tmp_path):
    srv, url = updatable
    teacher, student = models
    seqs, starts = _seqs(4)
    before = _score(url, "a", seqs, starts)                 # (now in the cache, keyed by version 0)
    _assert_same(before, _score(single[0], None, seqs, starts, token=None))
    new = _params(student)
    with TeacherClient(url, token=TOKEN, model="a") as c:
        # bf16 tensors (the wire carries them as they are) in small buckets: every tensor travels
        # in several pieces
        (resp,) = c.update_weights(((n, t.to(torch.bfloat16)) for n, t in new.items()), version=7, bucket_mb=0.01)
        assert resp.model == "a" and resp.version == 7 and resp.tensors == len(new)
        assert c.info().weight_version == 7
    after = _score(url, "a", seqs, starts)
    # the reference: a fresh one-model server loaded with the same (bf16-rounded) weights
    from transformers import AutoModelForCausalLM

    ref_dir = str(tmp_path / "student-bf16-rounded")
    m = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    m.save_pretrained(ref_dir)
    with running_server(ref_dir, max_batch_tokens=64) as (_, ref_url):
        _assert_same(after, _score(ref_url, None, seqs, starts, token=None))
    assert all(r.weight_version == 7 for r in after)
    # "c" was the same checkpoint loaded once: it got no update (a copy took it) and still
    # answers as the teacher
    c_now = _score(url, "c", seqs, starts)
    _assert_same(c_now, before)
    assert all(r.weight_version == 0 for r in c_now)
    assert srv.engine.engine_for("a") is not srv.engine.engine_for("c")
    with TeacherClient(url, token=TOKEN) as c:
        assert {m.model_name: m.weight_version for m in c.info().models} == {"a": 7, "c": 0}
    # a second update goes in place (a no longer shares), as fp32 exactly
    with TeacherClient(url, token=TOKEN, model="a") as c:
        c.update_weights(_params(teacher).items(), version=8)
    again = _score(url, "a", seqs, starts)
    _assert_same(again, before)
    assert all(r.weight_version == 8 for r in again)


@pytest.mark.parametrize("case,message", [
    ("name", r"tensors\[0\]\.name: 'model\.nope' is not a parameter of model 'a'"),
    ("shape", r"tensors\[0\]\.shape: \[3, 3\] for 'lm_head\.weight'; the loaded parameter has shape \[512, 64\]"),
    ("dtype", r"\.data \('lm_head\.weight'\): dtype INT32 is not a weight dtype"),
    ("version", r"version: 0; expected an integer greater than the current weight version 0 of model 'a'"),
    ("missing", r"stream: 24 parameters of model 'a' were not sent .*set partial=true"),
    ("nan", r"\('lm_head\.weight'\): holds NaN or infinite values"),
    ("model", r"model: 'zz' is not served here; this server serves \['a', 'c'\]"),
])
def test_a_bad_update_is_refused_and_the_old_weights_keep_serving(updatable, case, message):
    srv, url = updatable
    seqs, starts = _seqs(5, n=2)
    before = _score(url, "a", seqs, starts)
    head = pb.UpdateWeightsRequest(model="zz" if case == "model" else "a", version=0 if case == "version" else 1)
    t = torch.zeros(512, 64)
    if case == "nan":
        t[3, 4] = float("nan")
    data = codec.encode_weight(t)
    if case == "dtype":
        data = codec.encode_plain_ids(np.zeros(512 * 64, np.int32))
    name = "model.nope" if case == "name" else "lm_head.weight"
    shape = [3, 3] if case == "shape" else [512, 64]
    head.tensors.append(pb.TensorPiece(name=name, shape=shape, offset=0, data=data))
    with grpc.insecure_channel(url, options=CHANNEL_OPTIONS) as ch:
        call = ch.stream_unary(f"/{SERVICE}/UpdateWeights", request_serializer=pb.UpdateWeightsRequest.SerializeToString,
                               response_deserializer=pb.UpdateWeightsResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            call(iter([head]), metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.match(message)
    after = _score(url, "a", seqs, starts)
    _assert_same(after, before)
    assert all(r.weight_version == 0 for r in after)


def test_a_broken_update_stream_changes_nothing_and_auth_is_required(updatable, models):
    srv, url = updatable
    seqs, starts = _seqs(6, n=2)
    before = _score(url, "a", seqs, starts)
    new = _params(models[1])

    def breaks():
        for i, kv in enumerate(new.items()):
            if i == 10:
                raise RuntimeError("trainer died mid-update")
            yield kv

    with TeacherClient(url, token=TOKEN, model="a") as c:
        with pytest.raises(Exception):
            c.update_weights(breaks(), version=1, bucket_mb=0.01)
        with pytest.raises(TeacherRequestError, match="were not sent"):   # a stream that just ends short
            c.update_weights(list(new.items())[:10], version=1)
    _assert_same(_score(url, "a", seqs, starts), before)
    for token in (None, "wrong"):
        with TeacherClient(url, token=token, model="a") as c:
            with pytest.raises(grpc.RpcError) as err:
                c.update_weights(new.items(), version=1)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with TeacherClient(url, token=TOKEN) as c:
        assert c.info().weight_version == 0
    # partial=True replaces what is sent (here: the head), nothing else
    with TeacherClient(url, token=TOKEN, model="a") as c:
        (resp,) = c.update_weights([("lm_head.weight", new["lm_head.weight"])], version=2, partial=True)
    assert resp.tensors == 1
    assert srv.engine.engine_for("a").model.lm_head.weight.equal(new["lm_head.weight"])


def test_a_value_that_overflows_the_parameters_dtype_is_refused(models):
    """The finite check runs on the values as stored: float32 3.4e38 is finite but rounds to inf in
    bfloat16 (largest finite 3.3895e38, half-way to the next power 3.3961e38), so a bf16 server
    refuses it, as it refuses NaN."""
    teacher, _ = models
    with running_server(teacher, dtype="bf16") as (srv, url):
        head = srv.engine.model.lm_head.weight
        before = head.detach().clone()
        t = torch.zeros(head.shape)
        t[5, 6] = 3.4e38
        with TeacherClient(url) as c:
            with pytest.raises(TeacherRequestError, match=r"\('lm_head\.weight'\): holds NaN or infinite values "
                                                          r"\(as bfloat16, the parameter's dtype\)"):
                c.update_weights([("lm_head.weight", t)], version=1, partial=True)
            t[5, 6] = 3.39e38   # rounds to bf16's largest finite value: taken
            (resp,) = c.update_weights([("lm_head.weight", t)], version=1, partial=True)
        assert resp.version == 1 and head.dtype == torch.bfloat16
        assert head[5, 6].item() == torch.finfo(torch.bfloat16).max and not head.equal(before)


# ---- the wire format of UpdateWeights --------------------------------------------------------------

@pytest.mark.parametrize("compression", [pb.COMPRESSION_NONE, pb.ZSTD])
def test_weight_messages_are_the_messages_protobuf_builds(compression):
    """The client frames each piece's data into the serialized request itself (one copy); what it
    sends must parse to the very message protobuf would build, hold at most bucket bytes of data a
    message, and carry every element exactly."""
    from teacher_server.client import _weight_messages

    g = torch.Generator().manual_seed(0)
    tensors = [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(1000, generator=g).to(torch.bfloat16)),
               ("c", torch.randn(7, 300, generator=g).half()),
               ("d", torch.randn(300, generator=g, dtype=torch.float64))]   # goes as float32
    for bucket in (16, 1000, 1 << 20):
        msgs = list(_weight_messages(tensors, 3, "m", True, bucket, compression))
        assert len(msgs) == 1 if bucket == 1 << 20 else len(msgs) > 1
        got = {}
        for raw in msgs:
            req = pb.UpdateWeightsRequest.FromString(raw)
            assert (req.model, req.version, req.partial) == ("m", 3, True)
            data_bytes = 0
            for piece in req.tensors:
                whole = dict(tensors)[piece.name]
                flat = whole.reshape(-1).float() if whole.dtype == torch.float64 else whole.reshape(-1)
                out = got.setdefault(piece.name, torch.full((flat.numel(),), float("nan"), dtype=flat.dtype))
                n, _ = codec.decode_weight_into(piece.data, out[piece.offset:])
                want = pb.TensorPiece(name=piece.name, shape=list(whole.shape), offset=piece.offset,
                                      data=codec.encode_weight(flat[piece.offset:piece.offset + n], compression))
                assert piece == want
                assert piece.data.byte_shuffled == (compression == pb.ZSTD and n > 1)   # it only helps zstd
                data_bytes += n * flat.element_size()
            assert data_bytes <= bucket
        for name, whole in tensors:
            want = whole.reshape(-1).float() if whole.dtype == torch.float64 else whole.reshape(-1)
            assert torch.equal(got[name], want), name


def test_weight_messages_read_no_tensor_after_the_next_is_taken():
    """A caller may free or reuse a tensor's memory once the next one is taken (the trainer's ZeRO-3
    buckets do): here each tensor is overwritten with NaN as soon as the next is asked for, and
    the messages still carry the original values (small tensors are copied into the message that
    goes on filling; a large one ends its message)."""
    from teacher_server.client import _weight_messages

    g = torch.Generator().manual_seed(2)
    want = [(f"t{i}", torch.randn(n, generator=g)) for i, n in enumerate([5, 300_000, 7, 11, 400_000, 3])]

    def reused():
        prev = None
        for name, t in want:
            if prev is not None:
                prev.fill_(float("nan"))
            prev = t.clone()
            yield name, prev

    msgs = [pb.UpdateWeightsRequest.FromString(m) for m in _weight_messages(reused(), 1, "m", False, 4 << 20, 0)]
    assert [[p.name for p in m.tensors] for m in msgs] == [["t0", "t1"], ["t2", "t3", "t4"], ["t5"]]
    for m in msgs:
        for p in m.tensors:
            out = torch.empty(int(p.shape[0]))
            codec.decode_weight_into(p.data, out)
            assert torch.equal(out, dict(want)[p.name]), p.name


def test_decode_weight_into_takes_byte_shuffled_pieces_and_converts_dtypes():
    """Pieces from older clients (byte-shuffled without compression) decode to the same values; a
    wire dtype other than the parameter's is converted as torch converts it; a piece longer than
    the room left is refused before it is decoded."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(257, generator=g) * 1000
    for t, wire in ((x.to(torch.bfloat16), pb.BFLOAT16), (x.half(), pb.FLOAT16), (x, pb.FLOAT32)):
        bits = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
        old = codec._pack(bits, wire, pb.COMPRESSION_NONE, 3, True)
        assert old.byte_shuffled
        for into in (torch.bfloat16, torch.float16, torch.float32):
            out = torch.empty(300, dtype=into)
            assert codec.decode_weight_into(old, out) == (257, 257 * t.element_size())
            assert torch.equal(out[:257], t.to(into))
        with pytest.raises(ValueError, match=r"holds 257 elements; at most 256 allowed"):
            codec.decode_weight_into(old, torch.empty(256, dtype=t.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_the_definition_on_every_bit_pattern(dtype):
    """Against the definition (finite unless all exponent bits are set), on every 16-bit pattern:
    all finite ones together are finite; each NaN and infinity alone, at a position that walks
    through the vectorised body and the tail of a 33-element tensor, is not."""
    exp_mask = 0x7F80 if dtype == torch.bfloat16 else 0x7C00
    patterns = np.arange(1 << 16, dtype=np.uint16)
    finite = (patterns & exp_mask) != exp_mask
    assert codec.all_finite(torch.from_numpy(patterns[finite].view(np.int16)).view(dtype))
    base = torch.linspace(-2, 2, 33).to(dtype)
    bad = patterns[~finite].view(np.int16)
    assert len(bad) == (256 if dtype == torch.bfloat16 else 2048)
    for i, p in enumerate(bad):
        x = base.clone()
        x.view(torch.int16)[i % 33] = int(p)
        assert not codec.all_finite(x), hex(int(p) & 0xFFFF)


def test_all_finite_float32_edges():
    f = torch.finfo(torch.float32)
    for v, ok in ((f.max, True), (-f.max, True), (f.tiny, True), (1e-45, True), (-0.0, True), (float("inf"), False),
                  (float("-inf"), False), (float("nan"), False)):
        for where in (0, 16, 1000):
            x = torch.zeros(1001)
            x[where] = v
            assert codec.all_finite(x) == ok, (v, where)
    x = torch.zeros(64)
    x.view(torch.int32)[7] = -1   # a negative NaN with every mantissa bit set
    assert not codec.all_finite(x)


# ---- the entry point -------------------------------------------------------------------------------

def test_opd_teacher_serves_several_models_over_grpc_and_http(models):
    teacher, student = models
    import socket

    from teacher_server.metrics import parse_text

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    proc = TeacherProcess("--model", f"t={teacher}", "--model", f"s={student}", "--port", "0", "--http-port", "0",
                          "--dtype", "fp32", "--max-batch-tokens", "64", "--metrics-port", metrics_port,
                          need_http=True)
    try:
        url, http = proc.grpc, proc.http
        seqs, starts = _seqs(7, n=2)
        for name, d in (("t", teacher), ("s", student)):
            res = _score(url, name, seqs, starts, token=None)
            for ids, r in zip(seqs, res):
                ref = reference_logprobs(d, ids)
                np.testing.assert_allclose(r.sampled_logprobs, ref[np.arange(19, 39), ids[20:]], atol=2e-5, rtol=0)
        with TeacherClient(url) as c:
            assert [m.model_name for m in c.info().models] == ["t", "s"] and c.info().default_model == "t"

        def post(path, body):
            req = urllib.request.Request(http + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        ids = seqs[0].tolist()
        with urllib.request.urlopen(http + "/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["t", "s"]
        for name, d in (("t", teacher), ("s", student)):
            ref = reference_logprobs(d, ids)
            code, out = post("/v1/completions", {"model": name, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0})
            assert code == 200 and out["model"] == name
            lps = [p[str(t)]["logprob"] for p, t in zip(out["choices"][0]["prompt_logprobs"][1:], ids[1:])]
            np.testing.assert_allclose(lps, ref[np.arange(39), ids[1:]], atol=2e-5, rtol=0)
            code, out = post(f"/models/{name}/generate", {"input_ids": ids, "return_logprob": True,
                                                          "logprob_start_len": 0,
                                                          "sampling_params": {"max_new_tokens": 0}})
            assert code == 200, out
            lps = [e[0] for e in out["meta_info"]["input_token_logprobs"][1:]]
            np.testing.assert_allclose(lps, ref[np.arange(39), ids[1:]], atol=2e-5, rtol=0)
        code, out = post("/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                                       "sampling_params": {"max_new_tokens": 0}})     # no prefix: the default, t
        ref = reference_logprobs(teacher, ids)
        np.testing.assert_allclose([e[0] for e in out["meta_info"]["input_token_logprobs"][1:]],
                                   ref[np.arange(39), ids[1:]], atol=2e-5, rtol=0)
        code, out = post("/v1/completions", {"model": "x", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0})
        assert code == 404 and out["error"]["message"] == "model: The model `x` does not exist. Valid aliases: t, s."
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
            m = parse_text(r.read().decode())
        # gRPC: 2 sequences per model; HTTP: t 3 (completions, /models/t/generate, /generate), s 2
        assert m['opd_teacher_model_requests_total{model="t"}'] == 5
        assert m['opd_teacher_model_requests_total{model="s"}'] == 4
        assert m['opd_teacher_model_weight_version{model="s"}'] == 0
        assert m["opd_teacher_engine_sequences_total"] >= 9     # both models' batches count
    finally:
        proc.stop()


@pytest.mark.parametrize("argv,message", [
    (["--model", "a={d}", "--model", "a={d}"], "the name 'a' is already given to"),
    (["--model", "a={d}", "--model", "b={d}/missing"], "--model b={d}/missing: no config.json there"),
    (["--model", "a b={d}"], "expected DIR or NAME=DIR"),
    (["--model", "a={d}", "--model", "b={d}", "--served-model-name", "n"], "only with one --model"),
])
def test_bad_model_flags_exit_2_before_a_model_loads(tiny_model_dir, monkeypatch, capsys, argv, message):
    from opd.cli import main

    monkeypatch.setattr("teacher_server.app.load_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main(["teacher", *(a.format(d=tiny_model_dir) for a in argv), "--dtype", "fp32"]) == 2
    assert message.format(d=tiny_model_dir) in capsys.readouterr().err


def test_model_flag_parsing(tmp_path):
    from teacher_server.app import parse_model_arg

    assert parse_model_arg("math=/models/m") == ("math", "/models/m")
    assert parse_model_arg("Qwen/Qwen3-8B=/models/q") == ("Qwen/Qwen3-8B", "/models/q")
    assert parse_model_arg("/models/teacher/") == ("teacher", "/models/teacher/")
    odd = tmp_path / "run=3"
    odd.mkdir()
    assert parse_model_arg(str(odd)) == ("run=3", str(odd))          # an existing path is a directory
    assert parse_model_arg(f"x={odd}") == ("x", str(odd))
    for bad in ("a b=/m", "=/m", "a=", "-a=/m"):
        with pytest.raises(ValueError, match="expected DIR or NAME=DIR"):
            parse_model_arg(bad)
