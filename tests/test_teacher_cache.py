"""The statistics cache: a repeated request is a hit with identical results; other options miss;
the on-disk store survives a restart; the memory LRU stays within its byte budget."""

import numpy as np

from teacher_server.cache import StatsCache, item_key
from teacher_server.client import ScoreSettings, TeacherClient
from teacher_server.engine import ScoreItem, ScoringEngine
from teacher_server.model import load_model
from tests.teacher_helpers import running_server

STATS = frozenset({"sampled", "topk", "tail"})


def _item(ids, start=1, k=8, temperature=1.0, stats=STATS, extra=None):
    return ScoreItem("r", np.asarray(ids, dtype=np.int64), start, len(ids), top_k=k, stats=stats,
                     temperature=temperature, extra_ids=extra)


def test_keys_cover_everything_that_changes_results():
    ids = np.arange(10)
    base = item_key("m", _item(ids))
    assert base == item_key("m", _item(ids.copy()))
    others = [item_key("m2", _item(ids)), item_key("m", _item(ids, start=2)), item_key("m", _item(ids, k=9)),
              item_key("m", _item(ids, temperature=0.7)), item_key("m", _item(ids, stats=STATS | {"entropy"})),
              item_key("m", _item(np.r_[ids, 1])), item_key("m", _item(ids, stats=STATS | {"extra"}, extra=np.zeros((9, 2)))),
              item_key("m", _item(ids, stats=STATS | {"extra"}, extra=np.ones((9, 2))))]
    assert len(set(others + [base])) == len(others) + 1


def test_engine_repeat_is_a_hit_with_identical_results(tiny_model_dir):
    eng = ScoringEngine(load_model(tiny_model_dir, "fp32"), cache=StatsCache(1 << 24), model_id="tiny")
    ids = np.random.default_rng(0).integers(0, 512, 40)
    first = eng.score([_item(ids)])[0]
    assert (eng.stats.cache_hits, eng.stats.cache_misses, eng.stats.batches) == (0, 1, 1)
    again = eng.score([_item(ids)])[0]
    assert (eng.stats.cache_hits, eng.stats.batches) == (1, 1)      # no forward ran
    assert again["_batch_sequences"] == 0
    for k in ("sampled", "topk_ids", "topk_logprobs", "tail"):
        np.testing.assert_array_equal(first[k], again[k])
    eng.score([_item(ids, k=4)])                                       # other options: a miss
    eng.score([_item(ids, temperature=0.5)])
    assert (eng.stats.cache_hits, eng.stats.cache_misses, eng.stats.batches) == (1, 3, 3)
    assert eng.stats.cache_bytes > 0 and eng.stats.cache_entries == 3


def test_memory_lru_respects_its_byte_budget():
    c = StatsCache(max_bytes=10_000)
    for i in range(20):
        c.put(str(i), {"a": np.zeros(500, np.float32)})   # ~2.2 kB each
    assert c.counters.bytes <= 10_000 and c.counters.evictions > 0
    assert c.get("0") is None and c.get("19") is not None


def test_disk_store_survives_restart_and_is_atomic(tmp_path):
    a = StatsCache(1 << 20, tmp_path)
    res = {"sampled": np.arange(5, dtype=np.float32), "topk_ids": np.arange(10).reshape(5, 2), "_server_seconds": 1.0}
    a.put("ab" * 32, res)
    files = list(tmp_path.rglob("*"))
    assert [f.name for f in files if f.is_file()] == ["ab" * 32 + ".npz"]      # no temporaries left
    b = StatsCache(1 << 20, tmp_path)                                          # a fresh process
    got = b.get("ab" * 32)
    assert b.counters.disk_hits == 1 and "_server_seconds" not in got
    np.testing.assert_array_equal(got["sampled"], res["sampled"])
    np.testing.assert_array_equal(got["topk_ids"], res["topk_ids"])
    assert b.get("cd" * 32) is None and b.counters.misses == 1


def test_served_repeat_hits_across_encodings(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 512, 30) for _ in range(3)]
    with running_server(tiny_model_dir, cache_mb=16, cache_dir=str(tmp_path)) as (srv, url):
        with TeacherClient(url) as c:
            first = c.score(seqs, [1] * 3, settings=ScoreSettings(top_k=8, value_encoding="fp32"))
            hits0 = srv.engine.stats.cache_hits
            again = c.score(seqs, [1] * 3, settings=ScoreSettings(top_k=8, value_encoding="fp32"))
            assert srv.engine.stats.cache_hits - hits0 == 3
            lossy = c.score(seqs, [1] * 3, settings=ScoreSettings(top_k=8, value_encoding="bf16"))
            assert srv.engine.stats.cache_hits - hits0 == 6            # encoding is not part of the key
            c.score(seqs, [1] * 3, settings=ScoreSettings(top_k=4))
            assert srv.engine.stats.cache_hits - hits0 == 6
    for a, b, l in zip(first, again, lossy):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        np.testing.assert_array_equal(a.sampled_logprobs, b.sampled_logprobs)
        np.testing.assert_allclose(l.topk_logprobs, a.topk_logprobs, rtol=2 ** -8)
    # a restarted server with the same disk store answers from it
    with running_server(tiny_model_dir, cache_mb=16, cache_dir=str(tmp_path)) as (srv, url):
        with TeacherClient(url) as c:
            again = c.score(seqs, [1] * 3, settings=ScoreSettings(top_k=8, value_encoding="fp32"))
        assert srv.engine.stats.cache_hits == 3 and srv.engine.cache.counters.disk_hits == 3
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
