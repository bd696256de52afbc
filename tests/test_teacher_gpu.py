"""CUDA-only checks of the compiled paths (torch.compile with Inductor): the compiled body and
head give the eager engine's statistics, every warmed-up graph is reused, and a server built on
CUDA compiles by default and matches the float64 reference. Skipped without a CUDA device."""

import numpy as np
import pytest

from teacher_server.engine import ScoreItem, ScoringEngine
from teacher_server.model import load_model, uncompile_body
from tests.teacher_helpers import reference_logprobs, running_server

pytestmark = pytest.mark.gpu
STATS = frozenset({"sampled", "topk", "tail", "entropy", "lse"})


def _workload(rng, vocab=512):
    p1 = rng.integers(0, vocab, 40)
    seqs, starts = [], []
    for n in (7, 30, 19):
        seqs.append(np.concatenate([p1, rng.integers(0, vocab, n)]))
        starts.append(len(p1))
    for n in (100, 77, 2, 64, 128, 129):
        seqs.append(rng.integers(0, vocab, n))
        starts.append(1)
    return seqs, starts


def _items(seqs, starts, temps=None):
    return [ScoreItem(f"r{i}", s.astype(np.int64), st, len(s), top_k=16, stats=STATS,
                      temperature=1.0 if temps is None else temps[i % len(temps)])
            for i, (s, st) in enumerate(zip(seqs, starts))]


@pytest.mark.parametrize("dtype,atol,temps", [("fp32", 2e-4, [0.7, 1.0]), ("bf16", 0.1, None)])
def test_compiled_engine_equals_eager_on_cuda(tiny_model_dir, dtype, atol, temps):
    import torch

    model = load_model(tiny_model_dir, dtype, "cuda")
    rng = np.random.default_rng(0)
    seqs, starts = _workload(rng)
    eager = ScoringEngine(model, device="cuda", chunk_size=50, compile="off", prefix_min_tokens=8)
    ref = eager.score(_items(seqs, starts, temps))
    eng = ScoringEngine(model, device="cuda", chunk_size=50, compile="auto", prefix_min_tokens=8,
                        split_min_tokens=64)
    try:
        got = eng.score(_items(seqs, starts, temps))
        assert eng.resolved_compile() == "all" and eng.compiled_body and eng.compiled_head
        assert eng.stats.compile_seconds > 0 and eng.stats.shared_prefix_tokens > 0
        assert eng.packing_active(), "packed batches (FlexAttention) were switched off in the warm-up"
        for a, b in zip(ref, got):
            for key in ("sampled", "tail", "entropy", "lse"):
                np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=0, err_msg=key)
            if dtype == "fp32":
                np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
                np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=atol, rtol=0)
            else:  # bf16: near-ties may swap an id at the k-th place; the values must agree
                np.testing.assert_allclose(-np.sort(-a["topk_logprobs"]), -np.sort(-b["topk_logprobs"]),
                                           atol=atol, rtol=0)
                overlap = np.mean([len(np.intersect1d(x, y)) / len(x) for x, y in zip(a["topk_ids"], b["topk_ids"])])
                assert overlap > 0.9, overlap
        # new shapes after the warm-up: no failure, still compiled
        more = [rng.integers(0, 512, n) for n in (300, 301, 5, 211)]
        again = eng.score(_items(more, [1] * len(more)))
        assert eng.compiled_body and eng.compiled_head
        base = eager.score(_items(more, [1] * len(more)))
        for a, b in zip(base, again):
            np.testing.assert_allclose(a["sampled"], b["sampled"], atol=atol, rtol=0)
    finally:
        uncompile_body(eng.body)
        torch.cuda.empty_cache()


def test_compiled_head_equals_reference_on_cuda_bf16_large_vocab():
    import torch

    from teacher_server import head as H

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, hid, V = 300, 256, 151936
    hidden = torch.randn(rows, hid, device="cuda", generator=g).bfloat16()
    W = (torch.randn(V, hid, device="cuda", generator=g) * 0.2).bfloat16()
    req = H.HeadRequest(hidden=hidden, targets=torch.randint(0, V, (rows,), device="cuda", generator=g),
                        temperature=None, top_k=64, row_k=None, extra_ids=None,
                        stats=frozenset({H.SAMPLED, H.TOPK, H.TAIL, H.LSE, H.ENTROPY}))
    ref = H.head_statistics_reference(req, W, chunk_size=128)
    for compiled in (False, True):
        got = H.head_statistics(req, W, chunk_size=128, compiled=compiled)
        for key in (H.SAMPLED, H.LSE, H.ENTROPY, "topk_vals"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=2e-5, msg=key)
        torch.testing.assert_close(got[H.TAIL].exp(), ref[H.TAIL].exp(), rtol=1e-4, atol=1e-7)


def test_server_on_cuda_compiles_by_default_and_matches_reference(tiny_model_dir):
    from teacher_server.client import ScoreSettings, TeacherClient

    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 512, n) for n in (9, 40, 23, 64)]
    starts = [1, 17, 5, 60]
    with running_server(tiny_model_dir, device="cuda", chunk_size=7, max_batch_tokens=256) as (srv, url):
        assert srv.engine.compiled_body and srv.engine.compiled_head
        with TeacherClient(url) as c:
            got = c.score(seqs, starts, settings=ScoreSettings(top_k=16, statistics=("sampled", "topk", "tail", "entropy"),
                                                               value_encoding="fp32"))
        uncompile_body(srv.engine.body)
    for ids, st, g in zip(seqs, starts, got):
        ref = reference_logprobs(tiny_model_dir, ids)[st - 1: len(ids) - 1]
        np.testing.assert_allclose(g.sampled_logprobs, ref[np.arange(len(ids) - st), ids[st:]], atol=2e-4)
        p = np.exp(ref)
        np.testing.assert_allclose(g.entropy, -(p * ref).sum(-1), atol=2e-4)
        np.testing.assert_array_equal(g.topk_ids, np.sort(np.argsort(-ref, axis=1)[:, :16], axis=1))
