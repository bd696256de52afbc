"""Task families of the quality benchmark (opd.tasks): determinism, disjoint splits, grading."""

from __future__ import annotations

import pytest

from opd import tasks as T


@pytest.mark.parametrize("name", list(T.TASKS))
def test_generators_are_deterministic_and_self_consistent(name):
    task = T.get_task(name)
    a = task.make_examples("train", 40, seed=0)
    assert a == task.make_examples("train", 40, seed=0)
    assert task.make_examples("train", 40, seed=0, sample_seed=5) != a
    assert task.make_examples("eval", 60, seed=0)[:20] == task.make_examples("eval", 20, seed=0)
    for ex in a:
        assert task.grade(ex.response, ex) == 1.0          # the target response is correct
        assert task.grade(ex.response, {"answer": ex.answer}) == 1.0
        assert ex.messages[0]["role"] == "user" and ex.messages[0]["content"]


@pytest.mark.parametrize("name", ["sort", "reverse"])
def test_list_splits_disjoint_and_in_range(name):
    task = T.get_task(name)
    train = {e.digits for e in task.make_examples("train", 2000, seed=0)}
    ev = task.make_examples("eval", 200, seed=0)
    assert len({e.digits for e in ev}) == 200  # eval draws without replacement
    assert not train & {e.digits for e in ev}
    for d in train:
        assert all(0 <= x <= 9 for x in d)
        assert (3 <= len(d) <= 5) if name == "sort" else (3 <= len(d) <= 6)


def test_sort_and_reverse_answers():
    s = T.ListExample("sort", (3, 9, 1, 3))
    assert s.question == "Sort 3 9 1 3"
    assert s.answer == "1 3 3 9"
    assert s.response.endswith("Answer: 1 3 3 9")
    r = T.ListExample("reverse", (4, 7, 2))
    assert r.question == "Reverse 4 7 2"
    assert r.response == "Answer: 2 7 4"


def test_list_grader():
    ex = T.ListExample("sort", (5, 1, 8))
    g = T.get_task("sort").grade
    assert g("min 1, 5, 8. Answer: 1 5 8", ex) == 1.0
    assert g("Answer: 158", ex) == 1.0                     # spacing is not graded, digits are
    assert g("Answer: 1 5 8 9", ex) == 0.0                 # an extra digit is wrong
    assert g("Answer: 1 5", ex) == 0.0
    assert g("Answer: 9 9 9. Answer: 1 5 8", ex) == 1.0    # the last answer counts
    assert g("1 5 8", ex) == 0.0                           # no "Answer:"
    assert g("", ex) == 0.0
    assert T.extract_digits("x Answer: 3 2 1<|im_end|>") == "3 2 1"
    assert T.extract_digits("nothing") is None


def test_arithmetic_is_the_demo_task():
    from opd import demo_task

    ex = T.get_task("arithmetic").make_examples("eval", 5, seed=0)
    assert ex == demo_task.make_examples("eval", 5, seed=0, digits=2, style="worked")


def test_unknown_task():
    with pytest.raises(KeyError):
        T.get_task("nope")


def test_trainer_task_source_builtin_names():
    from student_trainer.data import BUILTIN_TASKS

    assert set(BUILTIN_TASKS) == set(T.TASKS)


def test_task_source_prompts_and_rewards():
    from opd.tiny import build_tokenizer
    from student_trainer.data import task_source

    pytest.importorskip("transformers")
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        build_tokenizer(d, vocab_size=512)
        tok = AutoTokenizer.from_pretrained(d)
    src = task_source(tok, "reverse", seed=0, n_train=64, n_eval=16)
    assert len(src.train) == 64 and len(src.eval) == 16
    p = src.batch(0, 4)[0]
    assert src.reward(f"Answer: {p.answer}", p) == 1.0
    assert src.reward("Answer: 0", p) == 0.0
    assert "Reverse" in tok.decode(p.prompt_ids)
