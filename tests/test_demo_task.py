"""The synthetic task of `opd demo` (rollout.tasks.arithmetic): determinism, disjoint splits, grading, token layout."""

from __future__ import annotations

import pytest

from rollout.tasks import arithmetic as T
from rollout.tasks.answers import extract_int
from rollout.tasks.encoding import encode_example, prompt_ids


def test_generator_is_deterministic():
    a = T.make_examples("train", 50, seed=0)
    b = T.make_examples("train", 50, seed=0)
    assert a == b
    assert T.make_examples("train", 50, seed=1) != a
    # a longer draw starts with the shorter one
    assert T.make_examples("eval", 100, seed=0)[:40] == T.make_examples("eval", 40, seed=0)


def test_splits_are_disjoint_and_in_range():
    train = {(e.a, e.b) for e in T.make_examples("train", 3000, seed=0)}
    evals = T.make_examples("eval", 256, seed=0)
    ev = {(e.a, e.b) for e in evals}
    assert len(ev) == 256  # eval draws without replacement
    assert not train & ev
    for a, b in train | ev:
        assert 10 <= a <= 99 and 10 <= b <= 99
    three = T.make_examples("eval", 20, seed=0, digits=3)
    assert all(100 <= e.a <= 999 and 100 <= e.b <= 999 for e in three)


def test_response_formats():
    assert T.format_response(37, 85, "direct") == "Answer: 122"
    assert T.format_response(37, 85, "worked") == "7+5=12, 3+8+1=12. Answer: 122"
    assert T.format_response(12, 34, "worked") == "2+4=6, 1+3=4. Answer: 46"
    ex = T.Example(37, 85, "worked")
    assert ex.messages == [{"role": "user", "content": "What is 37+85?"}]
    assert ex.answer == 122
    assert ex.to_dict()["answer"] == "122"
    with pytest.raises(ValueError):
        T.format_response(1, 2, "nope")


def test_grader_right_wrong_malformed():
    ex = T.Example(37, 85, "worked")
    assert T.grade("7+5=12, 3+8+1=12. Answer: 122", ex) == 1.0
    assert T.grade("Answer: 122<|im_end|>", ex) == 1.0
    assert T.grade("Answer:122", ex) == 1.0
    assert T.grade("Answer: 121. Answer: 122", ex) == 1.0  # the last answer counts
    assert T.grade("Answer: 122. Answer: 121", ex) == 0.0
    assert T.grade("7+5=12, 3+8+1=12. Answer: 112", ex) == 0.0
    assert T.grade("Answer: 1222", ex) == 0.0
    assert T.grade("122", ex) == 0.0          # no "Answer:"
    assert T.grade("Answer: ", ex) == 0.0
    assert T.grade("", ex) == 0.0
    assert T.grade("Answer: 122", {"answer": "122"}) == 1.0
    assert extract_int("x Answer: -5 y") == -5
    assert extract_int("garbage") is None


def test_prompt_and_response_token_layout(tmp_path_factory):
    from opd.tiny import build_tokenizer

    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    ex = T.Example(37, 85, "worked")
    prompt, response = encode_example(tok, ex)
    text = tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 37+85?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(prompt) == text
    assert response[-1] == tok.eos_token_id
    assert tok.eos_token_id not in response[:-1]
    assert tok.decode(response) == ex.response + "<|im_end|>"
    assert T.grade(tok.decode(response, skip_special_tokens=True), ex) == 1.0
    # digits are one token each, and all prompts of one digit count have one length
    lengths = {len(prompt_ids(tok, e)) for e in T.make_examples("train", 30, seed=0)}
    assert len(lengths) == 1
