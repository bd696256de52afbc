"""The batching policy alone (teacher_server/batching.py): queues of ScoreItems, no model."""

import numpy as np

from teacher_server.batching import BatchPolicy, BatchQueue, ScoreItem


def _item(rid, ids, start=1, model=""):
    ids = np.asarray(ids, dtype=np.int64)
    return ScoreItem(rid, ids, start, len(ids), top_k=1, stats=frozenset({"sampled"}), model=model)


def _queue(items, max_queue_tokens=1 << 20):
    q = BatchQueue(max_queue_tokens)
    for it in items:
        q.push(it)
    return q


def _ids(batch):
    return [it.request_id for it in batch]


def test_admission_counts_tokens_and_always_admits_into_an_empty_queue():
    q = BatchQueue(max_queue_tokens=10)
    big = _item("big", np.arange(25))
    assert q.admits(big)                       # empty: admitted however long
    q.push(big)
    assert q.tokens == 25 and not q.admits(_item("one", [1, 2]))
    q.remove([big])
    assert q.tokens == 0 and len(q) == 0
    q.push(_item("a", np.arange(6)))
    assert q.admits(_item("b", np.arange(4))) and not q.admits(_item("c", np.arange(5)))
    assert "6 tokens (limit 10)" in q.full_message()


def test_padded_picks_lengths_closest_to_the_opener_within_the_budget():
    rng = np.random.default_rng(0)
    lens = [10, 30, 11, 9, 12, 20]
    items = [_item(f"r{i}", rng.integers(100, 200, n)) for i, n in enumerate(lens)]
    pol = BatchPolicy(max_batch_tokens=48, prefix_sharing=False)
    q = _queue(items)
    # opener 10; closest: 11 (|1|), 9 (|1|), 12 (|2|): 12 x 4 = 48 fits; 20 x 5 would not
    assert _ids(q.take(lambda it: (pol, False))) == ["r0", "r2", "r3", "r4"]
    assert _ids(q.items) == ["r1", "r5"] and q.tokens == 50
    assert _ids(q.take(lambda it: (pol, False))) == ["r1"]         # 30 x 2 = 60 > 48
    assert _ids(q.take(lambda it: (pol, False))) == ["r5"]
    assert len(q) == 0 and q.tokens == 0


def test_padded_takes_prefix_mates_of_the_opener_first():
    rng = np.random.default_rng(1)
    prompt = rng.integers(100, 200, 8)
    opener = _item("open", np.concatenate([prompt, rng.integers(0, 50, 4)]))
    near = _item("near", rng.integers(100, 200, 12))            # same length, other prompt
    mate = _item("mate", np.concatenate([prompt, rng.integers(0, 50, 8)]))   # longer, same prompt
    pol = BatchPolicy(max_batch_tokens=32, prefix_sharing=True, prefix_min_tokens=8)
    assert _ids(pol.pick([opener, near, mate], packed=False)) == ["open", "mate"]   # 16 x 2; near would be 16 x 3
    pol.prefix_sharing = False
    assert _ids(pol.pick([opener, near, mate], packed=False)) == ["open", "near"]


def test_packed_counts_a_prefix_mate_by_its_continuation_and_keeps_groups_whole():
    rng = np.random.default_rng(2)
    pa, pb = rng.integers(0, 512, 30), rng.integers(0, 512, 30)
    ga = [_item(f"a{i}", np.concatenate([pa, rng.integers(0, 512, 10)]), 30) for i in range(4)]
    gb = [_item(f"b{i}", np.concatenate([pb, rng.integers(0, 512, 10)]), 30) for i in range(4)]
    lone = _item("lone", rng.integers(0, 512, 20))
    pol = BatchPolicy(max_batch_tokens=100, prefix_sharing=True, prefix_min_tokens=4)
    q = _queue([ga[0], gb[0], *ga[1:], *gb[1:], lone])
    # group a: 40 + 3 x 10 = 70; group b (70) waits whole; the lone sequence (20) fills up to 90
    assert _ids(q.take(lambda it: (pol, True))) == ["a0", "a1", "a2", "a3", "lone"]
    assert _ids(q.take(lambda it: (pol, True))) == ["b0", "b1", "b2", "b3"]
    assert pol.group_key(ga[0]) == pol.group_key(ga[3]) != pol.group_key(gb[0])
    assert pol.group_key(_item("short", np.arange(3))) is None       # too short to share


def test_a_batch_holds_one_model_only():
    """The opener's model decides; other models' items wait, in order, for their own batch."""
    rng = np.random.default_rng(3)
    items = [_item(f"r{i}", rng.integers(0, 50, 10), model=m) for i, m in enumerate("abab" "a")]
    pol = BatchPolicy(max_batch_tokens=1000, prefix_sharing=False)
    for packed in (False, True):
        q = _queue(list(items))
        first = q.take(lambda it: (pol, packed))
        assert _ids(first) == ["r0", "r2", "r4"] and {it.model for it in first} == {"a"}
        second = q.take(lambda it: (pol, packed))
        assert _ids(second) == ["r1", "r3"] and {it.model for it in second} == {"b"}
        assert len(q) == 0


def test_the_openers_model_picks_the_policy():
    rng = np.random.default_rng(4)
    items = [_item("b0", rng.integers(0, 50, 10), model="b"), _item("a0", rng.integers(0, 50, 10), model="a"),
             _item("b1", rng.integers(0, 50, 10), model="b")]
    small, large = BatchPolicy(max_batch_tokens=10), BatchPolicy(max_batch_tokens=100)
    seen = []

    def policy_for(opener):
        seen.append(opener.model)
        return (small if opener.model == "b" else large), False

    q = _queue(items)
    assert _ids(q.take(policy_for)) == ["b0"]        # b's budget holds one sequence of 10
    assert _ids(q.take(policy_for)) == ["a0"]
    assert _ids(q.take(policy_for)) == ["b1"]
    assert seen == ["b", "a", "b"]


def test_prompt_group_picks_the_openers_samples_whole_then_queue_order_by_tokens_sent():
    """The SGLang engine's batches (one /generate each): the opener's prompt group first, then
    the others in queue order, counting each sequence's tokens up to its span's end."""
    rng = np.random.default_rng(3)
    prompt = rng.integers(100, 200, 20)
    a = [ScoreItem(f"a{i}", np.concatenate([prompt, rng.integers(100, 200, 5)]), 20, 25, top_k=1,
                   stats=frozenset({"sampled"})) for i in range(3)]
    b = _item("b", rng.integers(100, 200, 10))                       # sends 10
    c = ScoreItem("c", rng.integers(100, 200, 30), 1, 10, top_k=1, stats=frozenset({"sampled"}))  # sends 10, not 30
    pend = [a[0], b, a[1], a[2], c]
    assert _ids(BatchPolicy(75, True, 4).pick_prompt_group(pend)) == ["a0", "a1", "a2"]
    assert _ids(BatchPolicy(70, True, 4).pick_prompt_group(pend)) == ["a0", "a1", "b", "c"]
    assert _ids(BatchPolicy(60, False, 4).pick_prompt_group(pend)) == ["a0", "b", "a1"]
    assert _ids(BatchPolicy(5, True, 4).pick_prompt_group(pend)) == ["a0"]    # the opener always goes
