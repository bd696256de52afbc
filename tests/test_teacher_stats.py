"""Every statistic the teacher server returns equals a float64 reference from a direct forward."""

import threading
import time

import numpy as np
import pytest

from teacher_server import codec
from teacher_server.client import ScoreSettings, TeacherClient
from teacher_server.engine import ScoreItem, ScoringEngine
from teacher_server.model import load_model
from tests.teacher_helpers import reference_logprobs, running_server

ALL = ("sampled", "topk", "tail", "logsumexp", "entropy", "extra", "full")


def _seqs(rng, lengths, vocab=512):
    return [rng.integers(0, vocab, size=n) for n in lengths]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, chunk_size=7, max_batch_tokens=256) as s:
        yield s


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_statistics_match_float64_reference(server, tiny_model_dir, temperature):
    _, url = server
    rng = np.random.default_rng()
    seqs = _seqs(rng, [9, 40, 23, 64])
    starts = [1, 17, 5, 60]
    k = 16
    extra = [rng.integers(0, 512, size=(len(s) - st, 5)) for s, st in zip(seqs, starts)]
    with TeacherClient(url) as c:
        got = c.score(seqs, starts, extra_ids=extra,
                      settings=ScoreSettings(top_k=k, statistics=ALL, temperature=temperature, value_encoding="fp32"))
    for ids, st, ex, g in zip(seqs, starts, extra, got):
        ref = reference_logprobs(tiny_model_dir, ids, temperature)[st - 1: len(ids) - 1]  # [P, V]
        P = len(ids) - st
        assert g.num_positions == P
        np.testing.assert_allclose(g.sampled_logprobs, ref[np.arange(P), ids[st:]], atol=1e-5)
        np.testing.assert_allclose(g.full_logprobs, ref, atol=1e-5)
        np.testing.assert_allclose(g.extra_logprobs, np.take_along_axis(ref, ex, 1), atol=1e-5)
        p = np.exp(ref)
        np.testing.assert_allclose(g.entropy, -(p * ref).sum(-1), atol=1e-5)
        top = np.argsort(-ref, axis=1)[:, :k]
        assert (np.diff(g.topk_ids, axis=1) > 0).all(), "ids must come sorted ascending"
        np.testing.assert_array_equal(g.topk_ids, np.sort(top, axis=1))
        np.testing.assert_allclose(g.topk_logprobs, np.take_along_axis(ref, g.topk_ids, 1), atol=1e-5)
        rest = p.sum(-1) - np.take_along_axis(p, top, 1).sum(-1)
        np.testing.assert_allclose(g.tail_logmass, np.log(rest), atol=1e-5)
        # logsumexp of the tempered logits: log p + lse must reproduce the logits up to a row constant
        assert g.logsumexp.shape == (P,) and np.isfinite(g.logsumexp).all()


@pytest.mark.parametrize("encoding", ["bf16", "fp16", "q16", "q8"])
def test_lossy_encodings_within_documented_bounds(server, tiny_model_dir, encoding):
    _, url = server
    rng = np.random.default_rng()
    ids = rng.integers(0, 512, size=48)
    with TeacherClient(url) as c:
        exact = c.score([ids], [1], settings=ScoreSettings(top_k=32, value_encoding="fp32"))[0]
        lossy = c.score([ids], [1], settings=ScoreSettings(top_k=32, value_encoding=encoding))[0]
    np.testing.assert_array_equal(exact.topk_ids, lossy.topk_ids)
    x = exact.topk_logprobs
    err = np.abs(lossy.topk_logprobs - x)
    if encoding == "q8":
        bound = ((x.max(1) - x.min(1)) / 510 + 1e-6)[:, None]
    else:
        bound = codec.error_bound(codec.ENCODINGS[encoding], x) + 1e-7
    assert (err <= bound).all(), f"max err {err.max()} over bound"
    np.testing.assert_allclose(lossy.tail_logmass, exact.tail_logmass, atol=0)  # scalars stay fp32
    assert lossy.wire_bytes < exact.wire_bytes


def _engine(model_dir, chunk, budget):
    return ScoringEngine(load_model(model_dir, "fp32"), chunk_size=chunk, max_batch_tokens=budget)


def _items(seqs, starts, k=8):
    return [ScoreItem(f"r{i}", s.astype(np.int64), st, len(s), top_k=k,
                      stats=frozenset({"sampled", "topk", "tail", "entropy"})) for i, (s, st) in enumerate(zip(seqs, starts))]


def test_chunk_size_batching_and_order_do_not_change_results(tiny_model_dir):
    rng = np.random.default_rng()
    seqs = _seqs(rng, [5, 31, 17, 64, 8, 30])
    starts = [1, 3, 16, 2, 7, 29]
    alone = [_engine(tiny_model_dir, 1024, 64).score([it])[0] for it in _items(seqs, starts)]
    chunked = _engine(tiny_model_dir, 3, 10_000).score(_items(seqs, starts))          # all in one padded batch
    reordered = _engine(tiny_model_dir, 5, 100).score(_items(seqs[::-1], starts[::-1]))[::-1]
    for a, b, c in zip(alone, chunked, reordered):
        for key in ("sampled", "topk_logprobs", "tail", "entropy"):
            np.testing.assert_allclose(a[key], b[key], atol=2e-5)
            np.testing.assert_allclose(a[key], c[key], atol=2e-5)
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_array_equal(a["topk_ids"], c["topk_ids"])


def test_topk_equal_to_vocab_leaves_no_tail(server, tiny_model_dir):
    _, url = server
    ids = np.random.default_rng().integers(0, 512, size=12)
    with TeacherClient(url) as c:
        got = c.score([ids], [1], settings=ScoreSettings(top_k=256, value_encoding="fp32"))[0]
    ref = reference_logprobs(tiny_model_dir, ids)[:-1]
    rest = np.log(np.exp(np.sort(ref, 1)[:, :-256]).sum(1))
    np.testing.assert_allclose(got.tail_logmass, rest, atol=1e-5)


def test_tail_is_exact_for_tiny_and_large_tails():
    """Both tail paths (log1p of the covered mass, and the exact complement log-sum-exp for
    tails below TAIL_EXACT_BELOW) against float64, on logits built to have tails of 1e-12..0.9."""
    import torch

    from teacher_server import head as H

    g = torch.Generator().manual_seed(0)
    V, k, rows = 300, 8, 40
    logits = torch.randn(rows, V, generator=g, dtype=torch.float64)
    boost = torch.linspace(0, 40, rows, dtype=torch.float64)[:, None]   # larger boost -> smaller tail
    logits[:, :k] += boost
    W = torch.eye(V, dtype=torch.float32)
    req = H.HeadRequest(hidden=logits.float(), targets=torch.zeros(rows, dtype=torch.long),
                        temperature=torch.ones(rows), top_k=k, row_k=None, extra_ids=None,
                        stats=frozenset({H.TAIL, H.TOPK}))
    got = H.head_statistics(req, W, chunk_size=7)[H.TAIL].double()
    lp = torch.log_softmax(logits.float().double(), -1)
    top = lp.topk(k, -1).indices
    ref = torch.logsumexp(lp.scatter(1, top, float("-inf")), -1)
    assert ref.min() < -20 and ref.max() > -1   # both regimes are covered
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _head_case(dtype, softcap, temps, seed=0):
    import torch

    from teacher_server import head as H

    g = torch.Generator().manual_seed(seed)
    rows, hid, V, k = 37, 24, 300, 12
    hidden = torch.randn(rows, hid, generator=g).to(dtype)
    W = (torch.randn(V, hid, generator=g) * 0.7).to(dtype)
    W[:, 0] *= torch.linspace(0, 30, V).to(dtype)      # some rows get very peaked (tiny tails)
    t = None if temps is None else torch.tensor(temps * rows)[:rows].float()
    row_k = torch.randint(1, k + 1, (rows,), generator=g)
    req = H.HeadRequest(hidden=hidden, targets=torch.randint(0, V, (rows,), generator=g), temperature=t,
                        top_k=k, row_k=row_k, extra_ids=torch.randint(0, V, (rows, 5), generator=g),
                        stats=frozenset({H.SAMPLED, H.TOPK, H.TAIL, H.LSE, H.ENTROPY, H.EXTRA, H.FULL}))
    return req, W


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("temps", [None, [1.0], [0.7, 1.3, 1.0]])
def test_fast_head_equals_reference_head(softcap, temps):
    """The default head (top-k on raw logits, fused lse + entropy, no division at T = 1) gives
    the statistics of the former head, chunking included."""
    import torch

    from teacher_server import head as H

    req, W = _head_case(torch.float32, softcap, temps)
    for chunk in (7, 1, 1024):  # (same chunking on both sides: the matmul's rounding depends on it)
        ref = H.head_statistics_reference(req, W, chunk_size=chunk, softcap=softcap)
        got = H.head_statistics(req, W, chunk_size=chunk, softcap=softcap)
        assert set(got) == set(ref)
        for key in ref:
            if key == "topk_ids":  # ids carry the reference's values (softcap ties may swap order)
                torch.testing.assert_close(ref[H.FULL].gather(1, got[key]), got["topk_vals"], rtol=1e-5, atol=1e-5)
                if not softcap:
                    torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)
            elif key == H.TAIL:  # log(1 - covered) is ill-conditioned near its 1e-3 switch: compare masses
                torch.testing.assert_close(got[key].exp(), ref[key].exp(), rtol=1e-4, atol=1e-7)
            else:
                torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
        assert torch.isfinite(got[H.ENTROPY]).all() and got[H.TAIL].min() < -7  # both tail regimes hit


def test_fast_head_bf16_logits_equal_reference():
    """bf16 model: top-k taken on the bf16 logits equals the top-k of the fp32 log-probs of the same
    logits (values compared sorted: bf16 ties may come in another order)."""
    import torch

    from teacher_server import head as H

    req, W = _head_case(torch.bfloat16, None, [0.8])
    ref = H.head_statistics_reference(req, W, chunk_size=8)
    got = H.head_statistics(req, W, chunk_size=8)
    for key in (H.SAMPLED, H.LSE, H.ENTROPY, H.EXTRA, H.FULL, H.TAIL, "topk_vals"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)
    same = (got["topk_ids"] == ref["topk_ids"]).float().mean()
    assert same > 0.95


def test_engine_options_equal_default_path(tiny_model_dir):
    """head='reference', split_uneven on/off and T != 1 give the default engine's results."""
    rng = np.random.default_rng(3)
    seqs = _seqs(rng, [5, 31, 17, 64, 8, 30, 63, 2])
    starts = [1, 3, 16, 2, 7, 29, 10, 1]
    model = load_model(tiny_model_dir, "fp32")

    def run(**kw):
        eng = ScoringEngine(model, chunk_size=6, max_batch_tokens=10_000, **kw)
        items = _items(seqs, starts)
        for i, it in enumerate(items):
            it.temperature = 0.7 if i % 3 == 0 else 1.0
        return eng, eng.score(items)

    base_eng, base = run()
    assert base_eng.stats.sub_batches == 1   # split needs >= split_min_tokens real tokens per sub-batch
    variants = [run(head="reference"), run(split_uneven=False), run(split_min_tokens=20, split_max_pad=0.05)]
    split_eng = variants[-1][0]
    assert split_eng.stats.sub_batches > 1 and split_eng.stats.padded_tokens < base_eng.stats.padded_tokens
    for _, res in variants:
        for a, b in zip(base, res):
            for key in ("sampled", "topk_logprobs", "tail", "entropy"):
                np.testing.assert_allclose(a[key], b[key], atol=2e-5)
            np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])


def test_bf16_encoding_rounds_like_torch():
    """The wire's fp32 -> bf16 conversion is round-to-nearest-even, bit for bit the same as
    torch's on random bit patterns and on the edge cases (infinities, the largest finite values,
    exact ties, signed zeros); NaN becomes the canonical quiet NaN."""
    import torch

    from teacher_server import codec as C

    rng = np.random.default_rng(1)
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7FC00000, 0xFFFFFFFF,
                      0x00008000, 0x00018000, 0x3F808000, 0x3F818000, 0x7F7F8000], dtype=np.uint32)
    u = np.concatenate([rng.integers(0, 2 ** 32, size=200_000, dtype=np.uint64).astype(np.uint32), edges])
    x = u.view(np.float32)
    got = C._f32_to_bf16_bits(x)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(got[finite], ref[finite])
    assert (got[~finite] == 0x7FC0).all()


def _worker_run(eng, items, gap_s=0.0):
    """Submit items to the engine's worker (one by one, `gap_s` apart); their results in order."""
    got, done = {}, threading.Event()

    def deliver(it, res):
        got[it.request_id] = (res, time.perf_counter())
        if len(got) == len(items):
            done.set()

    eng.start()
    try:
        for it in items:
            it.deliver = deliver
            eng.submit(it)
            time.sleep(gap_s)
        assert done.wait(60)
    finally:
        eng.stop(10)
    return [got[it.request_id] for it in items]


def test_worker_pipeline_delivers_part_by_part_with_the_synchronous_results(tiny_model_dir):
    """The worker launches batches and a finisher delivers them in head parts of ~head_part_rows
    rows; the results equal the synchronous `score` path's, and the parts of one batch arrive in
    order (their server times grow)."""
    rng = np.random.default_rng(5)
    seqs = _seqs(rng, [40, 33, 57, 21, 64, 45, 38, 50, 29, 61])
    starts = [1, 5, 2, 9, 1, 3, 30, 7, 1, 12]
    model = load_model(tiny_model_dir, "fp32")
    ref = ScoringEngine(model, chunk_size=16).score(_items(seqs, starts))
    PARTS = [(0, 2), (2, 3), (3, 5), (5, 7), (7, 9), (9, 10)]  # positions 39 28 | 55 | 12 63 | 42 8 | 43 28 | 49
    eng = ScoringEngine(model, chunk_size=16, head_part_rows=50, max_batch_tokens=10_000, batch_wait_s=0.2)
    assert [(lo, hi) for lo, hi in eng._head_parts(_items(seqs, starts))] == PARTS
    out = _worker_run(eng, _items(seqs, starts))
    assert eng.stats.batches == 1 and eng.stats.sequences == len(seqs)
    for a, (b, _) in zip(ref, out):
        for key in ("sampled", "topk_logprobs", "tail", "entropy"):
            np.testing.assert_allclose(a[key], b[key], atol=2e-5)
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        assert b["_batch_sequences"] == len(seqs)
    # the batch (in the picker's order) went out in parts of >= 50 positions (the last may be
    # less), each part with its own server time
    by_time = {}
    for it, (b, _) in zip(_items(seqs, starts), out):
        by_time.setdefault(b["_server_seconds"], []).append(it.num_positions)
    sizes = [sum(v) for _, v in sorted(by_time.items())]
    assert len(sizes) >= 5 and all(n >= 50 for n in sizes[:-1]) and sum(sizes) == 367


def test_worker_lingers_for_a_stream_and_keeps_batches_apart_without(tiny_model_dir):
    """Items arriving within batch_wait_s of each other form one batch; with batch_wait_s=0 and
    pipeline_depth=1 the worker takes the first item alone (its results are the same)."""
    rng = np.random.default_rng(6)
    seqs = _seqs(rng, [30, 31, 32, 33])
    model = load_model(tiny_model_dir, "fp32")
    eng = ScoringEngine(model, max_batch_tokens=10_000, batch_wait_s=0.3)
    eng.prepare()
    together = _worker_run(eng, _items(seqs, [1] * 4), gap_s=0.01)
    assert eng.stats.batches == 1 and [r["_batch_sequences"] for r, _ in together] == [4] * 4
    eng2 = ScoringEngine(model, max_batch_tokens=10_000, batch_wait_s=0.0, pipeline_depth=1)
    apart = _worker_run(eng2, _items(seqs, [1] * 4), gap_s=0.5)
    assert eng2.stats.batches == 4 and [r["_batch_sequences"] for r, _ in apart] == [1] * 4
    for (a, _), (b, _) in zip(together, apart):
        np.testing.assert_allclose(a["sampled"], b["sampled"], atol=2e-5)
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])


def test_an_item_that_fails_in_the_finisher_fails_alone(tiny_model_dir, monkeypatch):
    """An item whose results cannot be split out gets the exception; every other item of its
    batch (the parts before and after it) gets its results; the worker goes on with the next batch."""
    import teacher_server.engine as E

    rng = np.random.default_rng(8)
    model = load_model(tiny_model_dir, "fp32")
    eng = ScoringEngine(model, head_part_rows=1, max_batch_tokens=10_000, batch_wait_s=0.2)
    real_split = E._split

    def split(it, *a):
        if it.request_id == "bad":
            raise RuntimeError("split failed")
        return real_split(it, *a)

    monkeypatch.setattr(E, "_split", split)
    got, lock = [], threading.Lock()

    def deliver(it, res):
        with lock:
            got.append((it.request_id, res))

    items = _items(_seqs(rng, [40, 41, 42, 43]), [1] * 4)
    items[2].request_id = "bad"
    later = _items(_seqs(rng, [30]), [1])[0]
    later.request_id = "later"
    eng.start()
    try:
        for it in items:
            it.deliver = deliver
            eng.submit(it)
            time.sleep(0.01)
        deadline = time.monotonic() + 60
        while len(got) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        later.deliver = deliver
        eng.submit(later)   # the worker still serves
        while len(got) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        eng.stop(10)
    order = [k for k, _ in got]
    res = dict(got)
    assert order[-1] == "later" and isinstance(res["later"], dict) and len(order) == 5
    for k in order:
        if k == "bad":
            assert isinstance(res[k], RuntimeError) and "split failed" in str(res[k])
        else:
            assert isinstance(res[k], dict) and np.isfinite(res[k]["sampled"]).all()
    assert eng.stats.batches == 2   # the batch with the bad item finished too, and the later one
