"""Packed batches: a whole batch as one row with a tree-shaped mask gives the statistics of the
padded / KV-cache paths; the layout and the mask are what `packed.py` says; the block-maxima
top-k equals torch.topk."""

import numpy as np
import pytest
import torch

from teacher_server import head as H
from teacher_server import packed as PK
from teacher_server import prefix as PX
from teacher_server.engine import ScoreItem, ScoringEngine
from teacher_server.model import load_model

STATS = frozenset({"sampled", "topk", "tail", "entropy", "lse"})


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, "fp32")


def _workload(rng):
    p1, p2 = rng.integers(0, 512, 23), rng.integers(0, 512, 9)
    seqs, starts = [], []
    for n in (5, 29, 14):                                # 3 samples of prompt 1, uneven
        seqs.append(np.concatenate([p1, rng.integers(0, 512, n)]))
        starts.append(len(p1))
    for _ in range(2):                                   # 2 samples of prompt 2
        seqs.append(np.concatenate([p2, rng.integers(0, 512, 12)]))
        starts.append(len(p2))
    seqs.append(rng.integers(0, 512, 17)); starts.append(1)          # unrelated
    seqs.append(np.concatenate([seqs[0], rng.integers(0, 512, 6)])); starts.append(3)  # multi-turn
    seqs.append(seqs[1].copy()); starts.append(1)                    # an exact duplicate
    return seqs, starts


def _items(seqs, starts, k=8):
    return [ScoreItem(f"r{i}", s.astype(np.int64), st, len(s), top_k=k, stats=STATS)
            for i, (s, st) in enumerate(zip(seqs, starts))]


def test_layout_holds_every_sequence_once_per_prefix():
    rng = np.random.default_rng(1)
    seqs, _ = _workload(rng)
    groups = PX.plan_groups(seqs, min_prefix=4)
    lay = PK.plan_layout(seqs, groups, pad_id=0)
    assert lay.tokens % PK.BLOCK == 0 and lay.tokens - lay.real_tokens < PK.BLOCK
    saved = sum(p * (len(m) - 1) for p, m in groups)
    assert lay.real_tokens == sum(len(s) for s in seqs) - saved
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(lay.ids[lay.where[i]], s)
        np.testing.assert_array_equal(lay.pos[lay.where[i]], np.arange(len(s)))
        assert len(np.unique(lay.doc[lay.where[i]])) == 1


def test_dense_mask_is_the_tree():
    rng = np.random.default_rng(2)
    seqs, _ = _workload(rng)
    lay = PK.plan_layout(seqs, PX.plan_groups(seqs, min_prefix=4))
    m = PK.dense_mask(torch.from_numpy(lay.doc), torch.from_numpy(lay.seg))[0, 0].numpy()
    # every real token sees exactly the packed positions of its own sequence up to itself
    expect = np.zeros_like(m)
    for w in lay.where:
        for a in range(len(w)):
            expect[w[a], w[: a + 1]] = True
    real = np.zeros(lay.tokens, bool)
    for w in lay.where:
        real[w] = True
    np.testing.assert_array_equal(m[real], expect[real])
    assert not m[np.ix_(real, ~real)].any()   # the end padding is seen by no real token


@pytest.mark.parametrize("sharing", [True, False])
def test_packed_batches_equal_the_unpacked_paths(model, sharing):
    rng = np.random.default_rng(3)
    seqs, starts = _workload(rng)
    ref_eng = ScoringEngine(model, chunk_size=7, prefix_sharing=sharing, prefix_min_tokens=4, packing="off")
    eng = ScoringEngine(model, chunk_size=7, prefix_sharing=sharing, prefix_min_tokens=4, packing="on")
    assert eng.packing_active() and not ref_eng.packing_active()
    ref = ref_eng.score(_items(seqs, starts))
    got = eng.score(_items(seqs, starts))
    for a, b in zip(ref, got):
        for key in ("sampled", "topk_logprobs", "tail", "entropy", "lse"):
            np.testing.assert_allclose(b[key], a[key], atol=2e-5, rtol=0, err_msg=key)
        np.testing.assert_array_equal(b["topk_ids"], a["topk_ids"])
    total = sum(len(s) for s in seqs)
    assert eng.stats.batches == 1 and eng.stats.sub_batches == 1
    assert eng.stats.padded_tokens < PK.BLOCK
    if sharing:
        assert eng.stats.shared_prefix_tokens > 0
        assert eng.stats.forward_tokens == total - eng.stats.shared_prefix_tokens + eng.stats.padded_tokens


def test_packed_budget_counts_a_prefix_mate_by_its_continuation(model):
    rng = np.random.default_rng(4)
    p1, p2 = rng.integers(0, 512, 40), rng.integers(0, 512, 30)
    mates = [np.concatenate([p1, rng.integers(0, 512, 10)]) for _ in range(4)]
    others = [np.concatenate([p2, rng.integers(0, 512, 5)]) for _ in range(3)]
    eng = ScoringEngine(model, max_batch_tokens=130, prefix_min_tokens=4, packing="on")
    # queue: r0 = mates[0], r1 = others[0], r2..r4 = mates[1:], r5, r6 = others[1:]
    eng._pending = _items([mates[0], others[0], *mates[1:], *others[1:]], [40] + [30] + [40] * 3 + [30] * 2)
    eng._pending_tokens = sum(it.cost for it in eng._pending)
    with eng._cv:  # (the worker holds the queue's lock here)
        batch = eng._take_batch()
    # the opener's mates first: 50 + 3 x 10 = 80; then r1 (35) = 115, and r5, r6 cost 5 each
    # once r1 is in: 125; nothing else is left
    assert [it.request_id for it in batch] == ["r0", "r2", "r3", "r4", "r1", "r5", "r6"]
    assert eng._pending == [] and eng._pending_tokens == 0
    eng._pending = _items([mates[0], others[0], *others[1:]], [40, 30, 30, 30])
    eng._pending_tokens = sum(it.cost for it in eng._pending)
    eng.max_batch_tokens = 60
    with eng._cv:
        batch = eng._take_batch()
    assert [it.request_id for it in batch] == ["r0"]          # 50 + 35 would pass 60
    assert [it.request_id for it in eng._pending] == ["r1", "r2", "r3"]


def test_packed_batches_keep_prompt_groups_whole(model):
    """Two prompt groups of 30 + 4 x 10 tokens (70 packed) and a lone sequence of 20, budget
    100: the second group does not fit after the first but fits a batch of its own, so it waits
    (cutting it would run its prompt twice) and the lone sequence fills the first batch. A group
    larger than a whole batch is cut."""
    rng = np.random.default_rng(7)
    pa, pb = rng.integers(0, 512, 30), rng.integers(0, 512, 30)
    ga = [np.concatenate([pa, rng.integers(0, 512, 10)]) for _ in range(4)]
    gb = [np.concatenate([pb, rng.integers(0, 512, 10)]) for _ in range(4)]
    lone = rng.integers(0, 512, 20)
    seqs = [ga[0], gb[0], *ga[1:], *gb[1:], lone]
    eng = ScoringEngine(model, max_batch_tokens=100, prefix_min_tokens=4, packing="on")
    eng._pending = _items(seqs, [30] * 8 + [1])
    eng._pending_tokens = sum(it.cost for it in eng._pending)
    with eng._cv:
        first = [it.request_id for it in eng._take_batch()]
        second = [it.request_id for it in eng._take_batch()]
    assert first == ["r0", "r2", "r3", "r4", "r8"]        # group a (70) + the lone one (20)
    assert second == ["r1", "r5", "r6", "r7"]             # group b, whole
    # run through score(): no prompt is forwarded twice
    eng2 = ScoringEngine(model, max_batch_tokens=100, prefix_min_tokens=4, packing="on")
    out = eng2.score(_items(seqs, [30] * 8 + [1]))
    assert len(out) == 9 and eng2.stats.batches == 2
    assert eng2.stats.forward_tokens - eng2.stats.padded_tokens == 2 * 70 + 20
    # a group of 30 + 10 x 10 = 130 > 100 is cut: members in queue order until the budget
    big = [np.concatenate([pa, rng.integers(0, 512, 10)]) for _ in range(10)]
    eng._pending = _items(big, [30] * 10)
    eng._pending_tokens = sum(it.cost for it in eng._pending)
    with eng._cv:
        assert [it.request_id for it in eng._take_batch()] == [f"r{i}" for i in range(7)]   # 40 + 6 x 10


def test_prompt_groups_are_prompts_not_a_shared_system_prompt(model):
    """Every sequence starts with the same 20-token system prompt (longer than
    prefix_min_tokens); two user prompts of 10 tokens have 4 samples each (prompt 30 + 10
    response tokens, the span starting at 30). The groups are the prompts: the second prompt's
    samples wait whole for the next batch instead of being split across two."""
    rng = np.random.default_rng(8)
    system = rng.integers(0, 512, 20)
    pa, pb = (np.concatenate([system, rng.integers(0, 512, 10)]) for _ in range(2))
    seqs = [np.concatenate([p, rng.integers(0, 512, 10)]) for p in (pa, pa, pa, pa, pb, pb, pb, pb)]
    eng = ScoringEngine(model, max_batch_tokens=100, prefix_min_tokens=4, packing="on")
    eng._pending = _items(seqs, [30] * 8)
    eng._pending_tokens = sum(it.cost for it in eng._pending)
    with eng._cv:
        assert [it.request_id for it in eng._take_batch()] == ["r0", "r1", "r2", "r3"]
        assert [it.request_id for it in eng._take_batch()] == ["r4", "r5", "r6", "r7"]


@pytest.mark.parametrize("vocab", [20_000, 20_096])
def test_block_topk_equals_torch_topk(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(33, vocab, generator=g)
    x[3, -5:] = 50.0 + torch.arange(5.0)   # winners in the last (partial) block
    x[4, :] = -1e4
    x[4, 7] = 1.0                         # one winner, the rest equal: any tie order is fine
    for k in (1, 16, 39):
        raw, ids = H.topk_raw(x, k)
        ref_raw, ref_ids = torch.topk(x, k, sorted=True)
        torch.testing.assert_close(raw, ref_raw, rtol=0, atol=0)
        keep = torch.ones(33, dtype=torch.bool)
        keep[4] = False
        torch.testing.assert_close(ids[keep], ref_ids[keep], rtol=0, atol=0)
        assert ids[4, 0] == 7
        torch.testing.assert_close(x.gather(1, ids), raw, rtol=0, atol=0)
        assert all(len(set(r.tolist())) == k for r in ids)   # no column twice


def test_block_mask_tiles_equal_the_dense_mask():
    rng = np.random.default_rng(5)
    seqs, _ = _workload(rng)
    seqs += [rng.integers(0, 512, n) for n in (300, 129, 128)]   # tiles wholly inside one sequence
    prompt = rng.integers(0, 512, 260)
    seqs += [np.concatenate([prompt, rng.integers(0, 512, n)]) for n in (140, 3, 200)]
    lay = PK.plan_layout(seqs, PX.plan_groups(seqs, min_prefix=4))
    dense = PK.dense_mask(torch.from_numpy(lay.doc), torch.from_numpy(lay.seg))[0, 0]
    nb = lay.tokens // PK.BLOCK
    tiles = dense.view(nb, PK.BLOCK, nb, PK.BLOCK).permute(0, 2, 1, 3).reshape(nb, nb, -1)
    partial, full = PK.block_tiles(*(torch.from_numpy(a) for a in (lay.lo1, lay.hi1, lay.lo2)))
    torch.testing.assert_close(full, tiles.all(-1))
    torch.testing.assert_close(partial, tiles.any(-1) & ~tiles.all(-1))
    assert full.any() and partial.any() and (~(full | partial)).any()
    bm = PK.block_mask(lay, torch.from_numpy(lay.doc), torch.from_numpy(lay.seg))
    torch.testing.assert_close(bm.to_dense()[0, 0].bool(), tiles.any(-1))


@pytest.mark.parametrize("raw,ok", [("", None), ('{"BLOCK_N": 64}', {"BLOCK_N": 64}), ("[1", "not JSON"),
                                    ("3", "expected a JSON object")])
def test_flex_kernel_options_from_the_environment(monkeypatch, raw, ok):
    monkeypatch.setenv("OPD_FLEX_KERNEL_OPTIONS", raw)
    if isinstance(ok, str):
        with pytest.raises(ValueError, match=ok):
            PK._flex_kernel_options()
    else:
        assert PK._flex_kernel_options() == ok
