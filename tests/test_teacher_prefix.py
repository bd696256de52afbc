"""Prompt-prefix sharing: sequences with a common prefix scored through one prefix forward + a
KV cache give the same statistics as scoring each sequence on its own."""

import numpy as np
import pytest

from teacher_server import prefix as PX
from teacher_server.engine import ScoreItem, ScoringEngine
from teacher_server.model import load_model

STATS = frozenset({"sampled", "topk", "tail", "entropy", "lse"})


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, "fp32")


def _engine(model, sharing, budget=100_000, min_prefix=4):
    return ScoringEngine(model, chunk_size=5, max_batch_tokens=budget, prefix_sharing=sharing,
                         prefix_min_tokens=min_prefix)


def _items(seqs, starts, k=8, ends=None):
    return [ScoreItem(f"r{i}", s.astype(np.int64), st, ends[i] if ends else len(s), top_k=k, stats=STATS)
            for i, (s, st) in enumerate(zip(seqs, starts))]


def _assert_same(a, b):
    for key in ("sampled", "topk_logprobs", "tail", "entropy", "lse"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])


def _workload(rng):
    p1, p2 = rng.integers(0, 512, 23), rng.integers(0, 512, 9)
    seqs, starts = [], []
    for _ in range(3):                                   # 3 samples of prompt 1, different lengths
        seqs.append(np.concatenate([p1, rng.integers(0, 512, int(rng.integers(1, 30)))]))
        starts.append(len(p1))
    for _ in range(2):                                   # 2 samples of prompt 2
        seqs.append(np.concatenate([p2, rng.integers(0, 512, 12)]))
        starts.append(len(p2))
    seqs.append(rng.integers(0, 512, 17)); starts.append(1)          # unrelated
    # multi-turn: turn-1 history shared with prompt 1's first sample, scored from inside the prompt
    seqs.append(np.concatenate([seqs[0], rng.integers(0, 512, 6)])); starts.append(3)
    seqs.append(seqs[1].copy()); starts.append(1)                    # an exact duplicate
    return seqs, starts


def test_plan_groups_finds_prefix_groups():
    rng = np.random.default_rng(0)
    seqs, _ = _workload(rng)
    groups = PX.plan_groups(seqs, min_prefix=4)
    shared = [(p, m) for p, m in groups if p]
    covered = sorted(i for _, m in groups for i in m)
    assert covered == list(range(len(seqs)))
    assert any(set(m) >= {0, 1, 2, 6, 7} for _, m in shared)
    assert any(set(m) == {3, 4} and p == 9 for p, m in shared)
    assert (0, [5]) in groups
    for p, m in shared:
        for i in m:
            assert len(seqs[i]) > p and np.array_equal(seqs[i][:p], seqs[m[0]][:p])
    # nothing shared below the threshold
    assert all(p == 0 for p, _ in PX.plan_groups(seqs, min_prefix=1000))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_prefix_equals_unshared(model, seed):
    rng = np.random.default_rng(seed)
    seqs, starts = _workload(rng)
    plain = _engine(model, False).score(_items(seqs, starts))
    eng = _engine(model, True)
    shared = eng.score(_items(seqs, starts))
    assert eng.stats.shared_prefix_tokens > 0
    assert eng.stats.forward_tokens < sum(len(s) for s in seqs) + eng.stats.padded_tokens
    for a, b in zip(plain, shared):
        _assert_same(a, b)


def test_equal_lengths_and_spans_inside_the_prompt(model):
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, 512, 20)
    seqs = [np.concatenate([prompt, rng.integers(0, 512, 10)]) for _ in range(4)]
    starts, ends = [1, 10, 20, 21], [30, 21, 22, 30]          # spans before, across and after P
    plain = _engine(model, False).score(_items(seqs, starts, ends=ends))
    eng = _engine(model, True)
    shared = eng.score(_items(seqs, starts, ends=ends))
    assert eng.stats.shared_prefix_tokens == 20 * 3
    for a, b in zip(plain, shared):
        _assert_same(a, b)


def test_batching_budget_keeps_groups_together(model):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 512, 16) for _ in range(3)]
    seqs, starts = [], []
    for j in range(4):            # interleaved arrival: p0, p1, p2, p0, p1, p2, ...
        for p in prompts:
            seqs.append(np.concatenate([p, rng.integers(0, 512, 16)]))
            starts.append(16)
    eng = _engine(model, True, budget=32 * 4)
    shared = eng.score(_items(seqs, starts))
    assert eng.stats.batches == 3 and eng.stats.shared_prefix_tokens == 3 * 16 * 3
    plain = _engine(model, False, budget=32 * 4).score(_items(seqs, starts))
    for a, b in zip(plain, shared):
        _assert_same(a, b)


def test_compiled_body_and_head_equal_eager(model):
    """compile='all' (here with torch.compile's 'eager' backend, so the CPU test is quick: the same
    Dynamo capture, wrappers, graph reuse and warm-up as on CUDA, without Inductor) gives the eager
    engine's results on plain, padded, split and prefix-shared batches; `uncompile_body` restores."""
    from teacher_server.model import uncompile_body

    rng = np.random.default_rng(11)
    seqs, starts = _workload(rng)
    plain = _engine(model, False).score(_items(seqs, starts))
    eng = ScoringEngine(model, chunk_size=5, max_batch_tokens=100_000, prefix_sharing=True, prefix_min_tokens=4,
                        compile="all", compile_backend="eager", split_min_tokens=8)
    try:
        got = eng.score(_items(seqs, starts))
        assert eng.compiled_body and eng.compiled_head and eng.stats.compile_seconds > 0
        assert eng.stats.sequences == len(seqs)            # warm-up batches are not counted
        assert "forward" in eng.body.layers[0].__dict__
        for a, b in zip(plain, got):
            _assert_same(a, b)
        eng.compile = "off"
        again = eng.score(_items(seqs, starts))
        assert not eng.compiled_body and "forward" not in eng.body.layers[0].__dict__
        for a, b in zip(plain, again):
            _assert_same(a, b)
    finally:
        uncompile_body(eng.body)


def test_compiled_results_are_checked_against_eager_at_warm_up(model, monkeypatch):
    """A compiled body that computes something else (here: a 'compile' that scales the last
    layer's output) is caught by the warm-up comparison with eager; the engine then serves eager
    results and says so in its mode."""
    import teacher_server.engine as E

    hooks = []

    def bad_compile(body, backend="inductor", dynamic=True):
        hooks.append(body.layers[-1].register_forward_hook(
            lambda mod, args, out: (out[0] * 1.5,) + tuple(out[1:]) if isinstance(out, tuple) else out * 1.5))
        body._opd_eager = []
        return True

    def undo(body):
        while hooks:
            hooks.pop().remove()
        body.__dict__.pop("_opd_eager", None)

    monkeypatch.setattr(E, "compile_body", bad_compile)
    monkeypatch.setattr(E, "uncompile_body", undo)
    rng = np.random.default_rng(5)
    seqs, starts = _workload(rng)
    plain = _engine(model, False).score(_items(seqs, starts))
    eng = ScoringEngine(model, chunk_size=5, max_batch_tokens=100_000, prefix_sharing=True, prefix_min_tokens=4,
                        compile="body", compile_backend="eager")
    try:
        got = eng.score(_items(seqs, starts))
        assert not eng.compiled_body and eng.compile == "off" and not hooks
        for a, b in zip(plain, got):
            _assert_same(a, b)
    finally:
        undo(eng.body)


def test_compare_results_tolerances():
    import torch

    from teacher_server.engine import compare_results

    ref = [[{"sampled": np.array([-1.0, -2.0]), "topk_logprobs": np.array([[-0.5, -1.5]])}]]
    near = [[{"sampled": np.array([-1.02, -2.01]), "topk_logprobs": np.array([[-0.51, -1.49]])}]]
    far = [[{"sampled": np.array([-1.0, -3.0]), "topk_logprobs": np.array([[-0.5, -1.5]])}]]
    assert compare_results(ref, near, torch.bfloat16) == ""
    assert "sampled" in compare_results(ref, far, torch.bfloat16)
    assert "sampled" in compare_results(ref, near, torch.float32)  # fp32 allows 1e-3 only
