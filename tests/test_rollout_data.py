"""Prompt data layouts and errors, math grading on known answers, pass@k, and `opd eval` end to end."""

import json
import math
from itertools import combinations

import pytest

from rollout.data import DataConfig, load_prompts
from rollout.evaluate import pass_at_k, summarize
from rollout.grading import exact_reward, extract_answer, get_reward_fn, last_boxed, math_reward


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from opd.tiny import build_model

    d = tmp_path_factory.mktemp("tiny_rollout_data")
    build_model(d, size="test")
    return str(d)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("rows,answer", [
    ([{"problem": "1+1?", "answer": "2"}], "2"),  # MATH-500 / AIME 2025
    ([{"ID": "2024-I-1", "Problem": "1+1?", "Answer": 2}], "2"),  # AIME 2024
    ([{"data_source": "dapo", "prompt": [{"role": "user", "content": "1+1?"}],
       "reward_model": {"ground_truth": "2", "style": "rule"}}], "2"),  # DAPO-Math-17k
])
def test_layouts(tmp_path, tok, rows, answer):
    exs, stats = load_prompts(DataConfig(write_jsonl(tmp_path / "d.jsonl", rows), system_prompt="Be brief."), tok)
    assert stats == {"total": 1, "kept": 1, "dropped_too_long": 0}
    assert exs[0].answer == answer and exs[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert "1+1?" in tok.decode(exs[0].prompt_ids)
    assert exs[0].source == ("dapo" if "data_source" in rows[0] else "d")


def test_parquet_and_filtering(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"problem": "x " * n, "answer": str(n)} for n in (1, 50, 2)]),
                   str(tmp_path / "p.parquet"))
    exs, stats = load_prompts(DataConfig(str(tmp_path / "p.parquet"), max_prompt_tokens=40), tok)
    assert [e.answer for e in exs] == ["1", "2"] and stats["dropped_too_long"] == 1


def test_bad_files_give_clear_errors(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{"problem": oops}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_prompts(DataConfig(str(bad)), tok)
    f = write_jsonl(tmp_path / "cols.jsonl", [{"question_text": "a", "answer": "1"}])
    with pytest.raises(ValueError, match="no prompt column"):
        load_prompts(DataConfig(f), tok)
    with pytest.raises(ValueError, match="answer column 'sol' not found"):
        load_prompts(DataConfig(f, prompt_key="question_text", answer_key="sol"), tok)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(DataConfig(str(tmp_path / "missing.jsonl")), tok)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="Parquet"):
        load_prompts(DataConfig(str(tmp_path / "x.parquet")), tok)


def test_answer_extraction():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{a}{\sqrt{b}}} end") == r"\frac{a}{\sqrt{b}}"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert extract_answer("work...\nAnswer: 17.") == "17"
    assert extract_answer("The final answer is: $x = 3$") == "x = 3"
    assert extract_answer("no marker 5") is None


@pytest.mark.parametrize("response,gold,ok", [
    (r"So \boxed{\frac{1}{2}}", "1/2", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    ("Answer: 1/2", "0.5", 1.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", 1.0),
    (r"\boxed{x^{2}+1}", "1+x^2", 1.0),
    (r"\boxed{\boxed{7}}", "7", 1.0),
    (r"\boxed{3}", "4", 0.0),
    (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
    ("Answer: 12", "21", 0.0),
    ("I think it is 42", "42", 0.0),  # no \boxed{} / Answer: form
])
def test_math_reward_known_cases(response, gold, ok):
    assert math_reward(response, gold) == ok


def test_reward_registry():
    assert get_reward_fn("math") is math_reward and get_reward_fn("exact") is exact_reward
    assert get_reward_fn("rollout.grading:exact_reward") is exact_reward
    assert exact_reward(r"\boxed{ 12 }", "12") == 1.0 and exact_reward(r"\boxed{0.5}", "1/2") == 0.0
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward_fn("no_such_mod:f")


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (4, 4, 4), (8, 3, 4)]:
        samples = [1] * c + [0] * (n - c)
        subsets = list(combinations(samples, k))
        assert math.isclose(pass_at_k(n, c, k), sum(any(s) for s in subsets) / len(subsets))
    table = summarize({"a": [[1.0, 0.0], [0.0, 0.0]]}, [1, 2, 4])
    assert table["a"] == {"problems": 2, "samples": 2, "avg@2": 0.25, "pass@1": 0.25, "pass@2": 0.5}


def test_opd_eval_cli(tmp_path, tiny_dir, capsys):
    from opd.cli import main

    data = write_jsonl(tmp_path / "math.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}])
    out = tmp_path / "samples.jsonl"
    assert main(["eval", "--model", tiny_dir, "--data", data, "--n", "2", "--k", "1,2", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 4 and {x["source"] for x in lines} == {"math"}
    printed = capsys.readouterr().out
    assert "pass@2" in printed and "avg@2" in printed
