"""The built-in task families (rollout.tasks): determinism, disjoint splits, grading."""

from __future__ import annotations

import pytest

from rollout import tasks as T
from rollout.tasks.answers import extract_digits
from rollout.tasks.calc import CalcExample
from rollout.tasks.chain import ChainExample
from rollout.tasks.lists import ListExample


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    """The tiny built-in tokenizer (vocab 512, one token per digit) of the session's tiny model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


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
    s = ListExample("sort", (3, 9, 1, 3))
    assert s.question == "Sort 3 9 1 3"
    assert s.answer == "1 3 3 9"
    assert s.response.endswith("Answer: 1 3 3 9")
    r = ListExample("reverse", (4, 7, 2))
    assert r.question == "Reverse 4 7 2"
    assert r.response == "Answer: 2 7 4"


def test_list_grader():
    ex = ListExample("sort", (5, 1, 8))
    g = T.get_task("sort").grade
    assert g("min 1, 5, 8. Answer: 1 5 8", ex) == 1.0
    assert g("Answer: 158", ex) == 1.0                     # spacing is not graded, digits are
    assert g("Answer: 1 5 8 9", ex) == 0.0                 # an extra digit is wrong
    assert g("Answer: 1 5", ex) == 0.0
    assert g("Answer: 9 9 9. Answer: 1 5 8", ex) == 1.0    # the last answer counts
    assert g("1 5 8", ex) == 0.0                           # no "Answer:"
    assert g("", ex) == 0.0
    assert extract_digits("x Answer: 3 2 1<|im_end|>") == "3 2 1"
    assert extract_digits("nothing") is None


def test_chain_worked_answer_and_exact_grading():
    ex = ChainExample((3, 8, 5, 2, 9))
    assert ex.question == "Add 3 8 5 2 9"
    assert ex.response == "3+8=11, 11+5=16, 16+2=18, 18+9=27. Answer: 27"
    assert ex.answer == "27" and ex.solution == ex.response
    assert ex.to_dict()["solution"] == ex.response
    assert T.get_task("chain").metadata(ex) == {"answer": "27", "solution": ex.response}
    sort_ex = ListExample("sort", (2, 1))
    assert T.get_task("sort").metadata(sort_ex) == {"answer": "1 2", "solution": sort_ex.response}
    g = T.get_task("chain").grade
    assert g(ex.response, ex) == 1.0
    assert g(ex.response + "<|im_end|>", {"answer": "27"}) == 1.0
    # one wrong digit anywhere in the final answer fails; there is no partial credit for correct steps
    assert g("3+8=11, 11+5=16, 16+2=18, 18+9=27. Answer: 28", ex) == 0.0
    assert g("3+8=11, 11+5=16, 16+2=18, 18+9=27. Answer: 37", ex) == 0.0
    assert g("3+8=11, 11+5=16, 16+2=18, 18+9=27. Answer: 2", ex) == 0.0
    assert g("3+8=11, 11+5=16, 16+2=18, 18+9=27.", ex) == 0.0       # the steps alone are not an answer
    # an early error compounds: the worked chain carries it into the answer
    assert g("3+8=12, 12+5=17, 17+2=19, 19+9=28. Answer: 28", ex) == 0.0


def test_chain_generator_deterministic_disjoint_and_long():
    from rollout.tasks.chain import LENGTHS, make_chain_examples

    task = T.get_task("chain")
    a = task.make_examples("train", 300, seed=0)
    assert a == make_chain_examples("train", 300, seed=0)
    assert a != task.make_examples("train", 300, seed=1)
    ev = task.make_examples("eval", 200, seed=0)
    assert len({e.digits for e in ev}) == 200
    assert not {e.digits for e in a} & {e.digits for e in ev}
    for e in a + ev:
        assert LENGTHS[0] <= len(e.digits) <= LENGTHS[1] and all(1 <= d <= 9 for d in e.digits)
        assert int(e.answer) == sum(e.digits) and e.response.count("=") == len(e.digits) - 1
    with pytest.raises(ValueError, match="lengths"):
        make_chain_examples("train", 1, lengths=(1, 3))


def test_chain_responses_are_100_plus_tokens(tiny_tokenizer):
    from rollout.tasks.encoding import response_ids

    exs = T.get_task("chain").make_examples("train", 200, seed=0)
    lengths = [len(response_ids(tiny_tokenizer, e)) for e in exs]
    assert min(lengths) >= 100, min(lengths)
    ids = response_ids(tiny_tokenizer, exs[0])
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == exs[0].response


def test_arithmetic_is_the_demo_task():
    from rollout.tasks import arithmetic

    ex = T.get_task("arithmetic").make_examples("eval", 5, seed=0)
    assert ex == arithmetic.make_examples("eval", 5, seed=0, digits=2, style="worked")


def test_unknown_task():
    with pytest.raises(KeyError):
        T.get_task("nope")


def test_trainer_task_source_builtin_names():
    from student_trainer.config import load_config
    from student_trainer.data import BUILTIN_TASKS

    assert set(BUILTIN_TASKS) == set(T.TASKS)
    cfg = load_config(None, ["model.student=/x", "data.task=chain", "teacher.url=127.0.0.1:1"])  # `opd train` parse
    assert cfg.data.task == "chain"


def test_task_source_prompts_and_rewards():
    from opd.tiny import build_tokenizer
    from student_trainer.data import builtin_source

    pytest.importorskip("transformers")
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        build_tokenizer(d, vocab_size=512)
        tok = AutoTokenizer.from_pretrained(d)
    src = builtin_source(tok, "reverse", seed=0, n_train=64, n_eval=16)
    assert len(src.train) == 64 and len(src.eval) == 16
    p = src.batch(0, 4)[0]
    assert src.reward(f"Answer: {p.answer}", p) == 1.0
    assert src.reward("Answer: 0", p) == 0.0
    assert "Reverse" in tok.decode(p.prompt_ids)


def test_calc_task_trajectory_and_grading():
    from opd.tiny import build_tokenizer

    pytest.importorskip("transformers")
    import tempfile

    from transformers import AutoTokenizer

    from rollout.tools import calculator, parse_tool_calls

    ex = CalcExample(347, "*", 28)
    assert ex.answer == "9716" and ex.question == "Compute 347*28"
    calls = parse_tool_calls(ex.tool_call)
    assert len(calls) == 1 and calls[0].name == "calculator" and calls[0].arguments == {"expression": "347*28"}
    assert calculator(calls[0].arguments["expression"]) == ex.answer
    g = T.get_task("calc").grade
    assert g(ex.response, ex) == 1.0
    assert g("<tool_call>...</tool_call> 9716", ex) == 0.0        # the tool's output alone is not an answer
    assert g("Answer: -12", {"answer": "-12"}) == 1.0
    assert T.get_task("calc").tools == ("calculator",) and T.get_task("sort").tools == ()
    with tempfile.TemporaryDirectory() as d:
        build_tokenizer(d, vocab_size=512)
        tok = AutoTokenizer.from_pretrained(d)
    prompt, resp, mask = ex.encode(tok)
    assert len(resp) == len(mask) and 0 in mask and mask[0] == 1 and mask[-1] == 1
    assert resp[-1] == tok.eos_token_id
    # the tool tokens are exactly what the rollout tool loop appends after the first turn
    from rollout.chat import ToolTurnFormatter

    first = mask.index(0)
    tool = ToolTurnFormatter(tok).tool_turn_ids([calculator(ex.expression)])
    assert resp[first:first + len(tool)] == tool and sum(1 for m in mask if m == 0) == len(tool)
    assert tok.decode(resp[:first]).startswith("<tool_call>")
    from opd import sft

    ids, att, lmask = sft.collate(tok, [ex, CalcExample(12, "+", 5)])
    assert int(lmask[0].sum()) == sum(mask)
    # single-turn examples (the demo's) keep the old layout: loss on every response token
    from rollout.tasks import arithmetic
    from rollout.tasks.encoding import encode_example, max_new_tokens_for, response_ids

    arith = arithmetic.make_examples("train", 3, seed=0, style="worked")
    ids, att, lmask = sft.collate(tok, arith)
    for i, e in enumerate(arith):
        p_ids, r_ids = encode_example(tok, e)
        assert ids[i, :len(p_ids) + len(r_ids)].tolist() == p_ids + r_ids
        assert lmask[i].nonzero().flatten().tolist() == list(range(len(p_ids), len(p_ids) + len(r_ids)))
    assert max_new_tokens_for(tok, arith) == max(len(response_ids(tok, e)) for e in arith) + 4


def test_tool_engine_runs_the_calculator_loop():
    """A scripted 'model' engine: the wrapper calls the tool and appends its output with mask 0."""
    pytest.importorskip("transformers")
    import asyncio
    import tempfile

    from transformers import AutoTokenizer

    from opd.tiny import build_tokenizer
    from rollout.tasks.tool_engine import ToolEngine
    from rollout.types import Rollout, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        build_tokenizer(d, vocab_size=512)
        tok = AutoTokenizer.from_pretrained(d)
    ex = CalcExample(21, "*", 34)
    _, resp, mask = ex.encode(tok)
    first = mask.index(0)
    second = first + mask[first:].index(1)

    class Scripted:
        closed = False

        async def generate(self, prompts, params, **kw):
            ids = prompts[0]
            out = resp[:first] if len(ids) < 30 else resp[second:]
            yield Rollout(prompt_ids=list(ids), response_ids=list(out), logprobs=[0.0] * len(out),
                          response_mask=[1] * len(out), finish_reason="stop", policy_version=0, group_id=0,
                          prompt_index=0, sample_index=0)

        def close(self):
            Scripted.closed = True

    eng = ToolEngine(Scripted(), tok)

    async def go():
        return [r async for r in eng.generate([[1, 2, 3]], SamplingParams(n=1, max_new_tokens=80))]

    (ro,) = asyncio.run(go())
    assert ro.response_ids == resp and ro.response_mask == mask and ro.num_turns == 2
    assert ro.tool_calls[0]["output"] == "714"
    eng.close()  # passed through to the wrapped engine
    assert Scripted.closed


# generous: on a fresh machine the first run also JIT-builds DeepSpeed's CPU Adam (~3 min on 2
# cores; later tests reuse the build); the two executions themselves take about a minute
@pytest.mark.timeout(900)
def test_quality_bench_is_reproducible(tmp_path):
    """Two executions of a tiny bench configuration with the same seeds give the same numbers: the
    long-generation task (chain) through the real trainer, two runs at once (--jobs 2, a teacher
    server per job slot), the learning-rate grid (one rate: the grid's seed-0 run is reused),
    --until-flat, and the report's thresholds and confidence intervals. Then, once, issue #20's
    methods on a mix of two families (sort+reverse, seed 0, one step each): the self-teacher's
    prompt template and weight refresh, the two-teacher run's per-teacher metrics."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cache = tmp_path / "cache"
    base = [sys.executable, str(root / "bench" / "quality.py"), "--tasks", "chain", "--methods", "rkl,grpo",
            "--seeds", "0,1", "--token-budget", "500", "--samples-per-step", "8", "--eval-size", "8",
            "--teacher-steps", "4", "--teacher-min-accuracy", "0", "--warm-steps", "0", "--threads", "1",
            "--jobs", "2", "--until-flat", "--lr-grid", "1e-3", "--grid-seeds", "2", "--method-lr", "grpo=2e-3",
            "--teacher-recovery", "0.5",
            "--cache-dir", str(cache)]
    # torch's default extension directory: the CPU Adam build is shared with the rest of the suite
    from torch.utils.cpp_extension import get_default_build_root

    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    got = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        r = subprocess.run(base + ["--out", str(out)], cwd=root, capture_output=True, text=True, timeout=420,
                           env=dict(os.environ, PYTHONHASHSEED="0", TORCH_EXTENSIONS_DIR=ext_dir))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        res = json.loads((out / "results.json").read_text())
        # the curve's third column is wall time: not reproducible, left out
        got.append([(x["task"], x["method"], x["seed"], x["lr"], x["accuracy"], x["tokens"], x["steps"], x["stop"],
                     [c[:2] for c in x["curve"]]) for x in res["records"]] + [res["lr_grid"]])
        assert sorted((x["method"], x["seed"]) for x in res["records"]) == [("grpo", 0), ("grpo", 1), ("rkl", 0),
                                                                          ("rkl", 1)]
        assert res["lr_grid"]["chain"]["rkl"]["chosen"] == 1e-3
        # the machine names the kernel set torch used (another CPU can round differently)
        import torch

        assert f"torch {torch.backends.cpu.get_cpu_capability()}" in res["machine"], res["machine"]
        # --grid-seeds 2: both seeds ran at every rate; their grid runs are the seeds' runs
        for seed in (0, 1):
            assert (out / "chain" / "rkl" / "lr_0.001" / f"seed{seed}" / "record.json").exists()
            assert not (out / "chain" / "rkl" / f"seed{seed}").exists()
        assert set(res["lr_grid"]["chain"]["rkl"]["per_seed"]["0.001"]) == {"0", "1"}
        # --method-lr: grpo skips the grid and runs every seed at its own rate
        assert "grpo" not in res["lr_grid"]["chain"] and not (out / "chain" / "grpo" / "lr_0.001").exists()
        assert {x["lr"] for x in res["records"] if x["method"] == "grpo"} == {2e-3}
        assert json.loads((out / "chain" / "grpo" / "seed0" / "config.json").read_text())["optim"]["lr"] == 2e-3
        assert all(x["stop"] in ("budget", "flat", "steps") and x["curve"] for x in res["records"])
        assert res["teachers"]["chain"]["start"] == "cold (random init)"
        md = (out / "results.md").read_text()
        assert "tokens to 50%" in md and "95% Student-t" in md
        assert "Learning-rate grid (chain, seeds 0, 1, mean final held-out accuracy" in md
        assert "set by --method-lr (no grid for these): GRPO from rewards (n=4) 0.002" in md
        assert "| GRPO from rewards (n=4) - OPD reverse KL |" in md  # the paired table, seeds 0 and 1
        # --teacher-recovery: the chain teacher was trained on recovery examples, and says so
        assert res["teachers"]["chain"]["teacher_recovery"] == 0.5 and "with 50% recovery examples" in md
        tdir = Path(res["teachers"]["chain"]["dir"])
        assert json.loads((tdir / "opd_demo.json").read_text())["settings"]["recovery"] == 0.5
        assert len({(x["task"], x["seed"]) for x in res["records"]}) == 2
    assert got[0] == got[1]

    # issue #20's methods on a mix of two families (one seed, one execution): self-distillation with
    # the reference in a frozen / refreshed self-teacher's prompt, two routed task teachers vs one
    from bench.quality import SELF_TEMPLATE

    out = tmp_path / "mix"
    r = subprocess.run(base[:2] + ["--tasks", "sort+reverse", "--methods",
                                   "selfdistill,selfdistill-follow,two-teacher,one-teacher,generalist", "--seeds", "0",
                                   "--token-budget", "200", "--samples-per-step", "8", "--eval-size", "8",
                                   "--teacher-steps", "4", "--teacher-min-accuracy", "0", "--warm-steps", "0",
                                   "--threads", "1", "--jobs", "2", "--cache-dir", str(cache), "--out", str(out)],
                       cwd=root, capture_output=True, text=True, timeout=420,
                       env=dict(os.environ, PYTHONHASHSEED="0", TORCH_EXTENSIONS_DIR=ext_dir))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    recs = {x["method"]: x for x in res["records"]}
    assert set(recs) == {"selfdistill", "selfdistill-follow", "two-teacher", "one-teacher", "generalist"}
    for x in recs.values():  # graded per family, overall = the mean
        assert x["task"] == "sort+reverse" and set(x["by_family"]) == {"sort", "reverse"}
        assert x["accuracy"] == (x["by_family"]["sort"] + x["by_family"]["reverse"]) / 2 and x["steps"] >= 1
        # the trainer's evals of each family (4 + 4 interleaved prompts), at the overall curve's points
        fam = x["curve_by_family"]
        assert set(fam) == {"sort", "reverse"} and x["curve"] and len(fam["sort"]) == len(x["curve"])
        for c, s_, r_ in zip(x["curve"], fam["sort"], fam["reverse"]):
            assert c[0] == s_[0] == r_[0] and c[1] == pytest.approx((s_[1] + r_[1]) / 2)
    assert set(res["teachers"]["sort+reverse"]["families"]) == {"sort", "reverse"}
    assert "Per family (sort+reverse" in (out / "results.md").read_text()

    def run(method):
        d = out / "sort+reverse" / method / "seed0"
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return json.loads((d / "config.json").read_text()), [x for x in rows if "step" in x], d

    cfg, rows, _ = run("two-teacher")  # each family's prompts scored by its own teacher, nothing unrouted
    assert cfg["data"]["task"] == "sort,reverse" and cfg["teacher"]["url"] == ""
    assert set(cfg["teacher"]["routes"]) == {"sort", "reverse"}
    assert all(x["teacher/sort/samples"] + x["teacher/reverse/samples"] == 8 for x in rows)
    assert sum(x["teacher/sort/samples"] for x in rows) > 0 and sum(x["teacher/reverse/samples"] for x in rows) > 0
    cfg, rows, _ = run("one-teacher")
    assert cfg["teacher"]["routes"] == {} and cfg["teacher"]["url"]
    assert not any("teacher/sort/samples" in x for x in rows)
    # the generalist: one teacher trained on both families' references for the specialists' steps
    # together (4 + 4), graded per family, and it is the server the run was pointed at
    gen = res["teachers"]["sort+reverse"]["generalist"]
    assert set(gen["by_family"]) == {"sort", "reverse"}
    assert gen["accuracy"] == (gen["by_family"]["sort"] + gen["by_family"]["reverse"]) / 2
    ginfo = json.loads((Path(gen["dir"]) / "opd_demo.json").read_text())
    assert ginfo["task"] == "sort+reverse" and ginfo["settings"]["steps"] == 8
    assert Path(gen["dir"]) not in {Path(v["dir"]) for v in res["teachers"]["sort+reverse"]["families"].values()}
    cfg, rows, d = run("generalist")  # pointed at the server that serves the generalist
    assert cfg["teacher"]["routes"] == {} and cfg["teacher"]["url"]
    port = cfg["teacher"]["url"].rsplit(":", 1)[1]
    assert any(f"serving {Path(gen['dir']).name} " in line and line.endswith(f":{port}")
               for p in out.glob("teacher_generalist_*.log") for line in p.read_text().splitlines())
    assert "the generalist (one teacher trained on every family): on sort " in (out / "results.md").read_text()
    for method in ("selfdistill", "selfdistill-follow"):
        cfg, rows, d = run(method)  # the run's own start served as its teacher, prompted with the solution
        assert cfg["teacher"]["prompt_template"] == SELF_TEMPLATE
        assert f"serving {Path(json.loads((d / 'job.json').read_text())['student']).name} " in \
            (d / "teacher_self.log").read_text()
        versions = [x["teacher_weight_version"] for x in rows if "teacher_weight_version" in x]
        assert versions == (list(range(1, len(rows) + 1)) if method == "selfdistill-follow" else [])


# ---- bench/quality_report.py: the statistics the quality bench reports -------------------------


def test_t_quantiles_match_the_t_distribution():
    """Each tabulated t_{0.975, df} has CDF 0.975: float64 integration of the t density from its
    definition (Simpson's rule on [0, q], plus the half of the mass below 0)."""
    import math

    import numpy as np

    from bench.quality_report import T_975, Z_975

    def cdf(q, df):
        x = np.linspace(0.0, q, 200001)
        c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        f = c * (1 + x * x / df) ** (-(df + 1) / 2)
        h = x[1] - x[0]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    for df, q in enumerate(T_975, start=1):
        assert abs(cdf(q, df) - 0.975) < 2e-6, (df, q, cdf(q, df))
    assert abs(0.5 * (1 + math.erf(Z_975 / math.sqrt(2))) - 0.975) < 1e-6


def test_t_interval_threshold_flatness_and_lr_choice():
    import math
    import statistics

    from bench import quality_report as R

    xs = [0.2, 0.4, 0.3, 0.5, 0.1]
    m, h = R.t_interval(xs)
    assert m == statistics.fmean(xs)
    assert abs(h - 2.776445 * statistics.stdev(xs) / math.sqrt(5)) < 1e-15
    assert math.isnan(R.t_interval([0.3])[1]) and R.fmt_ci([0.3]) == "0.300 (n=1)"
    rec = {"seed": 0, "tokens": 900, "accuracy": 0.9, "wall_s": 30.0,
           "curve": [[300, 0.2, 10.0], [600, 0.45, 20.0]]}
    pts = R.trajectory(rec, 0.1)
    assert pts == [(0.0, 0.1, 0.0), (300.0, 0.2, 10.0), (600.0, 0.45, 20.0), (900.0, 0.9, 30.0)]
    assert R.first_reach(pts, 0.45) == (600.0, 20.0)       # reaching the level exactly counts
    assert R.first_reach(pts, 0.1) == (0.0, 0.0)           # a start above the level: 0 tokens
    assert R.first_reach(pts, 0.95) is None
    assert R.threshold_cell([rec], {0: 0.1}, 0.95) == ("not reached", "-")
    assert R.threshold_cell([rec, {**rec, "seed": 1}], {0: 0.1, 1: 0.5}, 0.5) == ("450 (2/2)", "15 (2/2)")
    old = {**rec, "curve": [[300, 0.6]]}                   # records before the wall-time column
    assert R.threshold_cell([old], {0: 0.0}, 0.5) == ("300 (1/1)", "-")
    # flat: the last `window` evals improve the best before them by <= delta
    assert not R.is_flat([0.1, 0.2, 0.3], 3, 0.02)         # not enough evals yet
    assert R.is_flat([0.1, 0.5, 0.51, 0.49, 0.52], 3, 0.02)
    assert not R.is_flat([0.1, 0.5, 0.51, 0.49, 0.53], 3, 0.02)
    assert R.is_flat([0.6, 0.2, 0.3, 0.4], 3, 0.02)        # below an earlier best is flat too
    # a mix: flat only when every family's curve is (sort on its plateau, reverse still climbing)
    sort_, rev = [0.8, 0.9, 0.9, 0.9, 0.9], [0.0, 0.0, 0.1, 0.3, 0.6]
    assert R.is_flat(sort_, 3, 0.02) and not R.is_flat(rev, 3, 0.02)
    assert not R.all_flat([sort_, rev], 3, 0.02) and R.all_flat([sort_, rev[:2] + [0.0] * 3], 3, 0.02)
    assert R.all_flat([sort_], 3, 0.02) and not R.all_flat([], 3, 0.02)
    assert R.pick_lr({1e-4: 0.2, 3e-4: 0.5, 1e-3: 0.5}) == 3e-4
    assert R.pick_lr({1e-3: 0.0, 1e-4: 0.0}) == 1e-4
    # --grid-seeds: the mean over the grid seeds decides (reverse KL on chain at 500k tokens, seeds 1
    # and 2: seed 1 alone picks 1e-3, seed 2 alone 3e-4); a rate missing a seed's run is left out
    per = {3e-4: {1: 0.152, 2: 0.895}, 1e-3: {1: 0.348, 2: 0.762}, 3e-3: {1: 0.098, 2: 0.430}}
    assert R.choose_lr(per, [1])[1] == 1e-3 and R.choose_lr(per, [2])[1] == 3e-4
    means, best = R.choose_lr(per, [1, 2])
    assert best == 1e-3 and means == {3e-4: pytest.approx(0.5235), 1e-3: pytest.approx(0.555), 3e-3: pytest.approx(0.264)}
    per[1e-3] = {1: 0.348}
    assert R.choose_lr(per, [1, 2]) == ({3e-4: pytest.approx(0.5235), 3e-3: pytest.approx(0.264)}, 3e-4)
    assert R.choose_lr({}, [1]) == ({}, None)
    # step-wise mean curve on a grid; a run that ended holds its final value
    assert R.mean_curve([rec], {0: 0.1}, [0, 299, 300, 1000]) == [0.1, 0.1, 0.2, 0.9]


@pytest.mark.parametrize("args, words", [
    (["--lr-grid", "1e-4,fast"], ["--lr-grid", "'1e-4,fast'", "comma-separated numbers"]),
    (["--lr-grid", "0,1e-3"], ["--lr-grid", "> 0"]),
    (["--seeds", "0,1", "--grid-seeds", "3"], ["--grid-seeds 3", "between 1 and the number of seeds (2)"]),
    (["--device", "tpu"], ["--device", "'tpu'", "cpu or cuda"]),
    (["--tasks", "chain,nope"], ["unknown task", "'nope'", "chain"]),
    (["--methods", "rkl,distill"], ["unknown method", "'distill'", "selfdistill"]),
    (["--tasks", "sort", "--methods", "rkl,two-teacher"], ["method 'two-teacher'", "a mix of task families",
                                                           "--tasks sort has none"]),
    (["--tasks", "sort+nope"], ["unknown task", "'nope'", "A+B"]),
    (["--tasks", "sort+sort"], ["'sort+sort'", "names a family twice"]),
    (["--tasks", "sort+reverse", "--warm-target", "0.3"], ["--warm-target", "'sort+reverse'", "--warm-steps"]),
    (["--jobs", "0"], ["--jobs", ">= 1"]),
    (["--teacher-device", "gpu"], ["--teacher-device", "'gpu'", "cpu or cuda"]),
    (["--prep-device", "tpu"], ["--prep-device", "'tpu'", "cpu or cuda"]),
    (["--teacher-size", "huge"], ["--teacher-size", "'huge'", "demo_teacher"]),
    (["--student-size", "huge"], ["--student-size", "'huge'", "student"]),
    (["--tasks", "chain", "--teacher-recovery", "1.5"], ["--teacher-recovery", "1.5", "0 < P < 1"]),
    (["--tasks", "sort", "--teacher-recovery", "0.2"], ["--teacher-recovery", "only the chain task", "sort"]),
    (["--tasks", "chain", "--student-hints", "1"], ["--student-hints", "1.0", "0 < P < 1"]),
    (["--tasks", "sort+reverse", "--student-hints", "0.3"], ["--student-hints", "single tasks without tools",
                                                             "sort+reverse"]),
    (["--tasks", "calc", "--student-hints", "0.3"], ["--student-hints", "single tasks without tools", "calc"]),
    (["--methods", "rkl", "--method-lr", "rkl=fast"], ["--method-lr", "'rkl=fast'", "METHOD=LR"]),
    (["--methods", "rkl", "--method-lr", "sft=1e-3"], ["--method-lr", "'sft'", "not one of the methods run", "rkl"]),
    (["--methods", "rkl", "--method-lr", "rkl=-1"], ["--method-lr", "'rkl=-1'", "finite number > 0"]),
])
def test_quality_bench_rejects_bad_flags_before_any_work(args, words, capsys, tmp_path):
    from bench import quality

    with pytest.raises(SystemExit) as e:
        quality.main(args + ["--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()  # nothing was prepared or written


def test_paired_differences_table():
    """Method minus anchor on the seeds both finished, a 95% t-interval with n - 1 degrees of freedom
    (hand-computed: mean 0.3, sd 0.158114, t_{0.975,4} = 2.776445 -> half-width 0.196320), each pair
    once, bold only when the interval excludes 0."""
    from bench import quality_report as R

    def rec(method, seed, acc):
        return {"task": "chain", "method": method, "seed": seed, "accuracy": acc}

    recs = ([rec("rkl", s, 0.2) for s in range(5)] + [rec("sft", s, 0.2 + 0.1 * (s + 1)) for s in range(5)]
            + [rec("grpo", s, 0.2 + (0.1 if s % 2 else -0.1)) for s in range(4)] + [rec("fkl", 0, 0.9)])
    d = R.paired_differences(recs, "chain", "sft", "rkl")
    assert [s for s, _ in d] == list(range(5)) and [x for _, x in d] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert R.paired_differences(recs, "chain", "fkl", "sft") == [(0, pytest.approx(0.6))]
    lines = R.paired_lines(recs, "chain", ["rkl", "sft", "grpo", "fkl"], {"sft": "SFT"})
    rows = [x for x in lines if x.startswith("| ") and " - " in x]
    assert rows[0] == "| SFT - rkl | **+0.300 [+0.104, +0.496]** | 5/5 | +0.100, +0.200, +0.300, +0.400, +0.500 |"
    assert rows[1] == "| grpo - rkl | +0.000 [-0.184, +0.184] | 2/4 | -0.100, +0.100, -0.100, +0.100 |"
    # grpo - SFT once (not SFT - grpo too); fkl pairs on one seed only: no row
    assert [r.split(" | ")[0] for r in rows] == ["| SFT - rkl", "| grpo - rkl", "| grpo - SFT"]
    assert R.paired_lines(recs, "chain", ["fkl", "sft"], {}) == []
    # a mix: against the routed specialists, overall and on each family (the family's own accuracies)
    mix = [{"task": "a+b", "method": m, "seed": s, "accuracy": (fa + fb) / 2, "by_family": {"a": fa, "b": fb}}
           for s in range(3) for m, fa, fb in (("two-teacher", 0.5, 0.1 * s), ("generalist", 0.5, 0.1 * s + 0.2))]
    assert R.paired_differences(mix, "a+b", "generalist", "two-teacher", "b") == [
        (s, pytest.approx(0.2)) for s in range(3)]
    rows = [x for x in R.paired_lines(mix, "a+b", ["two-teacher", "generalist"], {}, ["a", "b"]) if " - " in x]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| generalist - two-teacher", "**+0.100 [+0.100, +0.100]**"],
        ["| generalist - two-teacher (on a)", "+0.000 [+0.000, +0.000]"],
        ["| generalist - two-teacher (on b)", "**+0.200 [+0.200, +0.200]**"]]


def test_quality_bench_full_configuration():
    from bench import quality

    _, conf = quality.parse_args(["--full"])
    assert len(conf["seeds"]) >= 5 and "chain" in conf["tasks"] and conf["methods"] == list(quality.METHODS)
    assert conf["lr_grid"] == [1e-4, 3e-4, 1e-3] and conf["until_flat"] and conf["evals_per_run"] == 20
    _, conf = quality.parse_args(["--full", "--seeds", "0,1", "--lr-grid", "3e-4", "--jobs", "4"])
    assert conf["seeds"] == [0, 1] and conf["lr_grid"] == [3e-4] and conf["jobs"] == 4
    _, conf = quality.parse_args([])
    assert conf["lr_grid"] == [] and not conf["until_flat"] and conf["evals_per_run"] == 3
    assert not quality.parse_args(["--full", "--no-until-flat"])[1]["until_flat"]
    assert quality.parse_args(["--until-flat"])[1]["until_flat"]


def test_quality_bench_leaves_out_a_task_whose_preparation_fails(tmp_path, monkeypatch):
    import json

    from bench import quality
    from bench.quality_report import summarize

    _, conf = quality.parse_args(["--tasks", "sort,chain", "--methods", "rkl", "--seeds", "0"])

    def fake_child(fn, log, task_name, conf, cache, info_path):  # chain's teacher "stays below the minimum"
        if task_name == "chain":
            return 1
        info_path.write_text(json.dumps({"dir": "d", "accuracy": 0.9, "start": "warm (80 SFT steps)",
                                         "students": {"0": {"accuracy": 0.2}}, "max_new_tokens": 20}))
        return 0

    monkeypatch.setattr(quality, "in_child", fake_child)
    bench = quality.Bench(conf, tmp_path, tmp_path / "cache")
    assert bench.prepare()
    assert conf["tasks"] == ["sort"] and conf["failed_tasks"] == ["chain"] and set(bench.teachers) == {"sort"}
    assert "Left out (preparation failed, see prep_TASK.log): chain." in summarize([], bench.teachers, conf,
                                                                                  quality.LABELS, "c", "m")
    assert quality.FULL["tasks"][-1] == "chain"  # the module's configuration is not mutated
    _, conf = quality.parse_args(["--tasks", "chain", "--methods", "rkl", "--seeds", "0"])
    assert not quality.Bench(conf, tmp_path, tmp_path / "cache").prepare()  # nothing left: the driver stops


def test_expected_steps_follow_the_reference_length(tmp_path):
    """The steps a budget is expected to take (the fkl2rkl switch at half of them, the eval spacing
    and the step cap) come from the mean reference response length of the task: on chain (~138
    tokens) half the max length would put the switch at the very end of the run."""
    from bench import quality

    _, conf = quality.parse_args(["--tasks", "chain", "--methods", "fkl2rkl", "--seeds", "0",
                                  "--token-budget", "200000", "--evals-per-run", "20"])
    bench = quality.Bench(conf, tmp_path, tmp_path / "cache")
    info = {"dir": "t", "max_new_tokens": 147, "reference_tokens": 138.2, "students": {"0": {"dir": "s"}}}
    bench.teachers["chain"] = info
    job = bench.job("chain", "fkl2rkl", 0, 3e-4, tmp_path / "r")
    exp = 200000 // (32 * 138.2)                          # 45 steps of 32 sequences of ~138 tokens
    assert job["steps_cap"] == 4 * exp and job["eval_every"] == exp // 20
    assert "loss.fkl_to_rkl_switch_step=22" in job["overrides"]
    del info["reference_tokens"]                          # a preparation recorded before: half the max length
    assert bench.job("chain", "fkl2rkl", 0, 3e-4, tmp_path / "r")["steps_cap"] == 4 * (200000 // (32 * 73))


def test_quality_calibrate_prints_and_records_curves(tmp_path, capsys):
    """bench/quality_calibrate.py: each candidate's SFT curve (held-out greedy accuracy every
    --every steps) in a table and the JSON; bad candidates exit 2 naming the flag."""
    import json

    from bench import quality_calibrate as qc

    with pytest.raises(SystemExit) as e:
        qc.main(["--teacher", "huge:10"])
    assert e.value.code == 2 and "--teacher 'huge:10'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        qc.main(["--task", "chain"])
    assert e.value.code == 2 and "at least one" in capsys.readouterr().err
    out = tmp_path / "c.json"
    assert qc.main(["--task", "sort", "--teacher", "test:2", "--student", "test:2", "--seeds", "0,1", "--every", "1",
                    "--eval-size", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| test (" in text and "teachers: greedy accuracy" in text and "students: greedy accuracy" in text
    got = json.loads(out.read_text())
    assert [(r["kind"], r["seed"]) for r in got["results"]] == [("teacher", 0), ("student", 0), ("student", 1)]
    assert all([p["step"] for p in r["curve"]] == [1, 2] and 0.0 <= r["curve"][-1]["accuracy"] <= 1.0
               for r in got["results"])


def test_opd_turns_hub_kernels_off_unless_asked(tmp_path):
    """transformers >= 5.25 fetches layer kernels from the Hub at from_pretrained when `kernels` is
    installed (fails offline): importing opd sets USE_HUB_KERNELS=NO, a user's own value wins."""
    import os
    import subprocess
    import sys

    code = "import opd, os; print(os.environ['USE_HUB_KERNELS'])"
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "NO"
    assert subprocess.run([sys.executable, "-c", code], env={**env, "USE_HUB_KERNELS": "YES"}, capture_output=True,
                          text=True, check=True).stdout.strip() == "YES"


def test_chain_probe_reads_steps_and_injects_errors():
    """bench/quality_chain_probe.py: the parsing and the error injection, exact values by hand."""
    from bench import quality_chain_probe as P

    digits = (3, 8, 5, 2, 9)  # sums 3, 11, 16, 18, 27
    assert P.parse_steps("3+8=11, 11+5=16, x, 18+9=27. Answer: 27") == [(3, 8, 11), (11, 5, 16), None, (18, 9, 27)]
    # own: step 2 wrong (11+5=17), step 3 carries it and is locally right, step 4 is right from 19
    st = P.own_stats("3+8=11, 11+5=17, 17+2=19, 19+9=28. Answer: 28", digits)
    assert st == {"steps": 4, "local": 3, "carried": 4, "correct": False}
    # steps 2 and 3 do not carry the sum before them (their arithmetic on what they wrote is right)
    st = P.own_stats("3+8=11, 12+5=17, 16+2=18, 18+9=27. Answer: 27", digits)
    assert st == {"steps": 4, "local": 4, "carried": 2, "correct": True}
    assert P.own_stats("3+8=11, 11+4=15", digits)["local"] == 1  # the wrong digit of the problem
    assert P.injected_prefix(digits, 1, 1) == ("3+8=12, ", 12)
    assert P.injected_prefix(digits, 3, -1) == ("3+8=11, 11+5=16, 16+2=17, ", 17)
    c = P.continuation_stats("17+9=26. Answer: 26", digits, 3, 17, -1)  # carries the error, consistent with it
    assert c == {"carries": True, "restores": False, "recovers": False, "consistent": True}
    c = P.continuation_stats("18+9=27. Answer: 27", digits, 3, 17, -1)  # restores the true sum, recovers
    assert c == {"carries": False, "restores": True, "recovers": True, "consistent": False}


def test_chain_probe_runs_on_a_model_and_refuses_bad_flags(tmp_path, capsys):
    import json

    from bench import quality_chain_probe as P
    from opd import demo_models

    d = demo_models.prepare_student(tmp_path, seed=1, log=None)
    out = tmp_path / "probe.json"
    assert P.main(["--model", f"init={d}", "--n", "4", "--error-steps", "1,14", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    r = res["results"]["init"]
    assert res["error_steps"] == [1, 14] and r["n"] == 4 and set(r["injected"]) == {"1", "14"}
    assert 0 <= r["own"]["accuracy"] <= 1 and set(r["injected"]["14"]) == {"carries", "restores", "recovers",
                                                                            "consistent"}
    assert "| init |" in capsys.readouterr().out
    for args, words in ((["--model", "x"], ["--model", "NAME=HF_DIR"]),
                        (["--model", f"x={tmp_path}"], ["no config.json"]),
                        (["--model", f"x={d}", "--error-steps", "0,3"], ["--error-steps", "1-14"])):
        with pytest.raises(SystemExit) as e:
            P.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(w in err for w in words), err


def test_chain_recovery_examples_mask_the_error_and_go_on_from_the_true_sum():
    """A teacher example that shows the way back after a wrong sum: the corrupted prefix is in the
    response but out of the loss; the continuation starts from the true sum; same prompt and answer."""
    from opd.tiny import build_tokenizer
    from rollout.tasks.chain import ChainExample, ChainRecoveryExample, make_chain_examples, with_recovery
    from rollout.tasks.encoding import encode, prompt_ids

    ex = ChainRecoveryExample((3, 8, 5, 2, 9), step=2, delta=-1)  # sums 3, 11, 16, 18, 27
    assert ex.prefix == "3+8=11, 11+5=15, " and ex.continuation == "16+2=18, 18+9=27. Answer: 27"
    assert ex.answer == "27" and ex.messages == ChainExample((3, 8, 5, 2, 9)).messages
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok = build_tokenizer(d)
    p, ids, mask = encode(tok, ex)
    assert p == prompt_ids(tok, ChainExample((3, 8, 5, 2, 9)))
    assert ids == list(tok.encode(ex.response, add_special_tokens=False)) + [tok.eos_token_id]
    n_prefix = len(tok.encode(ex.prefix, add_special_tokens=False))
    assert mask == [0] * n_prefix + [1] * (len(ids) - n_prefix)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True) == ex.continuation
    for bad in (dict(step=0, delta=1), dict(step=4, delta=1), dict(step=1, delta=0), dict(step=1, delta=-12)):
        with pytest.raises(ValueError):
            ChainRecoveryExample((3, 8, 5, 2, 9), **bad)
    # a fraction of the problems, the same problems, deterministic per seed
    exs = make_chain_examples("train", 400, seed=0)
    mixed = with_recovery(exs, 0.25, seed=3)
    rec = [m for m in mixed if isinstance(m, ChainRecoveryExample)]
    assert 70 <= len(rec) <= 130 and [m.digits for m in mixed] == [e.digits for e in exs]
    assert all(1 <= m.step <= 14 and 1 <= abs(m.delta) <= 3 for m in rec)
    assert mixed == with_recovery(exs, 0.25, seed=3) and with_recovery(exs, 0.0) == exs
    with pytest.raises(ValueError):
        with_recovery(exs, 1.5)


def test_cache_key_leaves_out_settings_that_are_none():
    """A setting added later with default None keeps the keys of what was cached before it."""
    from dataclasses import dataclass

    from bench.quality import TeacherSpec
    from opd.model_cache import cache_key

    @dataclass
    class Old:
        task: str = "chain"
        steps: int = 600

    @dataclass
    class New(Old):
        recovery: float | None = None

    assert cache_key("teacher-chain", New()) == cache_key("teacher-chain", Old())
    assert cache_key("teacher-chain", New(recovery=0.2)) != cache_key("teacher-chain", Old())
    assert cache_key("t", TeacherSpec("chain")) != cache_key("t", TeacherSpec("chain", recovery=0.2))


def test_hinted_examples_ask_with_the_self_teachers_exact_prompt(tmp_path):
    """--student-hints: a hinted warm-start example's prompt ids are exactly the ids the trainer's
    producer scores a self-teacher's response after (Producer.teacher_prompt_ids over the prompt's
    data row), with the plain example's response, answer and grade; a fraction of the problems,
    deterministic per seed; a tool task's multi-turn encode is not borrowed."""
    from types import SimpleNamespace

    from bench.quality import SELF_TEMPLATE, with_hints
    from opd.tiny import build_tokenizer
    from rollout.tasks import get_task
    from rollout.tasks.encoding import encode, prompt_ids
    from student_trainer.data import PromptedExample, privileged_example, task_row
    from student_trainer.producer import Producer

    tok = build_tokenizer(tmp_path / "tok", vocab_size=512)
    for name in ("chain", "sort"):
        task = get_task(name)
        exs = task.make_examples("train", 300, seed=0)
        mixed = with_hints(name, exs, 0.3, seed=4)
        hinted = [m for m in mixed if isinstance(m, PromptedExample)]
        assert 50 <= len(hinted) <= 130 and [getattr(m, "base", m) for m in mixed] == exs
        assert mixed == with_hints(name, exs, 0.3, seed=4) and mixed != with_hints(name, exs, 0.3, seed=5)
        h = hinted[0]
        fake = SimpleNamespace(tokenizer=tok, data=SimpleNamespace(where="test"),
                               teachers={"t": SimpleNamespace(spec=SimpleNamespace(prompt_template=SELF_TEMPLATE,
                                                                                   key="teacher"),
                                                              chat_template=None)})
        prompt = SimpleNamespace(metadata={"row": task_row(name, h.base)})
        assert prompt_ids(tok, h) == Producer.teacher_prompt_ids(fake, "t", prompt)
        assert h.text == f"{h.base.question}\nReference solution: {task_row(name, h.base)['solution']}"
        p, r, mask = encode(tok, h)
        assert (r, mask) == (encode(tok, h.base)[1], None) and p != prompt_ids(tok, h.base)
        assert h.answer == h.base.answer and task.grade(h.base.response, h) == 1.0
    calc = get_task("calc").make_examples("train", 1, seed=0)[0]
    assert hasattr(calc, "encode") and not hasattr(privileged_example("calc", calc, "{question}"), "encode")


@pytest.mark.timeout(600)
def test_quality_bench_student_hints_train_a_self_teacher_that_is_measured(tmp_path):
    """`--student-hints 0.5` on the bench's entry point: the warm students are trained on hinted
    examples (their cache settings say so), the preparation measures each self-teacher's accuracy
    under the reference prompt, and the report names both; a self-distillation run goes through."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(root / "bench" / "quality.py"), "--tasks", "sort", "--methods",
                        "selfdistill", "--seeds", "0", "--token-budget", "150", "--samples-per-step", "8",
                        "--eval-size", "8", "--teacher-steps", "4", "--teacher-min-accuracy", "0",
                        "--warm-steps", "3", "--student-hints", "0.5", "--threads", "1",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                       cwd=root, capture_output=True, text=True, timeout=500,
                       env=dict(os.environ, PYTHONHASHSEED="0",
                                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    t = res["teachers"]["sort"]
    assert t["student_hints"] == 0.5 and 0.0 <= t["students"]["0"]["self_teacher_accuracy"] <= 1.0
    settings = json.loads((Path(t["students"]["0"]["dir"]) / "opd_demo.json").read_text())["settings"]
    assert settings["hints"] == 0.5 and settings["steps"] == 3
    assert [x["method"] for x in res["records"]] == ["selfdistill"]
    md = (out / "results.md").read_text()
    assert "50% of its SFT examples with the reference in the prompt" in md and "Self-teacher (each seed's" in md


def test_family_table_tokens_to_threshold():
    """A mix's per-family table: each family's tokens to 50% / 80% of that family's own teacher,
    from the trainer's per-family evals (median over the seeds that reached it); "-" for records
    without per-family curves (older runs)."""
    from bench import quality_report as R

    t = {"families": {"a": {"accuracy": 1.0}, "b": {"accuracy": 0.5}},
         "students": {"0": {"by_family": {"a": 0.4, "b": 0.0}}, "1": {"by_family": {"a": 0.6, "b": 0.0}}}}

    def rec(seed, curve_a, curve_b, final):
        return {"task": "a+b", "method": "two-teacher", "seed": seed, "tokens": 3000, "wall_s": 9.0,
                "accuracy": sum(final) / 2, "by_family": {"a": final[0], "b": final[1]},
                "curve_by_family": {"a": curve_a, "b": curve_b}}

    recs = [rec(0, [[1000, 0.5], [2000, 0.9]], [[1000, 0.0], [2000, 0.3]], (0.9, 0.3)),   # b: 50% at 2000
            rec(1, [[1000, 0.8], [2000, 0.8]], [[1000, 0.25], [2000, 0.5]], (0.85, 0.45))]  # b: 50% at 1000
    lines = R.family_lines(recs, "a+b", t, ["two-teacher"], {})
    head = next(x for x in lines if x.startswith("| method"))
    assert head == ("| method | a [95% CI] | b [95% CI] | a: tokens to 50% | a: tokens to 80% | b: tokens to 50% "
                    "| b: tokens to 80% |")
    row = next(x for x in lines if x.startswith("| two-teacher"))
    # a: 50% (0.5) at 1000 (seed 0) and at 0 (seed 1 starts at 0.6): median 500; 80%: 2000 and 1000
    # b (teacher 0.5): 50% = 0.25 at 2000 and 1000; 80% = 0.4 at 2000 for seed 1 (seed 0 ends at 0.3)
    assert row.split(" | ")[3:] == ["500 (2/2)", "1500 (2/2)", "1500 (2/2)", "2000 (1/2) |"]
    old = [{k: v for k, v in r.items() if k != "curve_by_family"} for r in recs]
    row = next(x for x in R.family_lines(old, "a+b", t, ["two-teacher"], {}) if x.startswith("| two-teacher"))
    assert row.split(" | ")[3:] == ["-", "-", "-", "- |"]


def test_combine_pieces_of_executions(tmp_path, capsys):
    """bench/quality_combine.py: records and learning-rate grid runs of several results.json (and a
    docs grid_runs.json without a task), the first file winning a duplicate (named on stderr), one
    rate per method with --pick, the per-seed row and the paired table."""
    import json

    from bench import quality_combine as C

    a = {"config": {"seeds": [1, 2], "grid_seeds": [1, 2]},
         "records": [{"task": "chain", "method": "rkl", "lr": 1e-3, "seed": s, "accuracy": x}
                     for s, x in ((1, 0.3), (2, 0.7))],
         "lr_grid": {"chain": {"rkl": {"grid": {"0.0003": 0.5, "0.001": 0.5}, "chosen": 1e-3,
                                       "per_seed": {"0.0003": {"1": 0.1, "2": 0.9}, "0.001": {"1": 0.3, "2": 0.7}}}}}}
    b = {"runs": [{"method": "sft", "lr": 1e-3, "seed": s, "accuracy": x} for s, x in ((1, 0.4), (2, 0.9))]
         + [{"method": "rkl", "lr": 1e-3, "seed": 2, "accuracy": 0.0}]}  # a rerun: the first file's is kept
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert C.main(["--task", "chain", "--seeds", "1,2", "--pick", "rkl=1e-3,sft=1e-3",
                   str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out, err = capsys.readouterr()
    assert "('rkl', 0.001, 2) again in" in err and "(accuracy 0.000 there, 0.700 kept)" in err
    rows = [x for x in out.splitlines() if x.startswith("| ") and not x.startswith(("| method", "| comparison"))]
    assert rows[0] == "| OPD reverse KL | 0.001 | 0.500 [-2.041, 3.041] | 0.300 / 0.700 | - |"
    assert rows[1].startswith("| off-policy SFT on teacher samples | 0.001 | 0.650 ")
    assert "| off-policy SFT on teacher samples - OPD reverse KL | +0.150 [-0.485, +0.785] | 2/2 | +0.100, +0.200 |" in out
    assert "0.0003" not in out  # --pick: rkl's other grid rate is not shown
    C.main(["--task", "chain", "--seeds", "1,2,3", str(tmp_path / "a.json")])
    out = capsys.readouterr().out
    assert "| OPD reverse KL | 0.0003 | 0.500 [-4.582, 5.582] | 0.100 / 0.900 / - | 3 |" in out  # the grid's runs
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")
    for args, words in ((["--pick", "rkl=1e-3,distill=1e-3", str(tmp_path / "a.json")], "unknown method 'distill'"),
                        ([str(tmp_path / "nope.json")], "nope.json: no such file"),
                        ([str(tmp_path / "bad.json")], "bad.json: not JSON"),
                        ([str(tmp_path / "list.json")], "list.json: a JSON list, expected"),
                        (["--pick", "rkl=fast", str(tmp_path / "a.json")], "expected 0,1,2 and METHOD=LR")):
        with pytest.raises(SystemExit) as e:
            C.main(["--task", "chain", "--seeds", "1,2", *args])
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_combine_a_mix_per_family(tmp_path, capsys):
    """quality_combine on a mix whose seeds ran in two executions: the pairs on each family, and the
    per-family table with every seed's start (gathered from both files) and tokens to 50% / 80%
    of each family's teacher from the trainer's per-family evals."""
    import json

    from bench import quality_combine as C

    def piece(seed, start_rev, runs):
        return {"teachers": {"sort+reverse": {
                    "families": {"sort": {"accuracy": 1.0}, "reverse": {"accuracy": 0.8}},
                    "students": {str(seed): {"accuracy": (0.5 + start_rev) / 2,
                                             "by_family": {"sort": 0.5, "reverse": start_rev}}}}},
                "records": [{"task": "sort+reverse", "method": m, "lr": 3e-4, "seed": seed, "tokens": 300,
                             "wall_s": 30.0, "accuracy": (so + rev) / 2, "by_family": {"sort": so, "reverse": rev},
                             "curve_by_family": {"sort": [[100, so], [200, so]], "reverse": [[100, r1], [200, r2]]}}
                            for m, so, rev, r1, r2 in runs]}

    # reverse's teacher 0.8: 50% = 0.4, 80% = 0.64. Routing reaches 0.4 at 100 tokens on both seeds and
    # 0.64 at the end (300) / at 200; the generalist 0.4 at 200 / at the end, 0.64 on seed 0 only
    (tmp_path / "a.json").write_text(json.dumps(piece(0, 0.0, [("two-teacher", 1.0, 0.8, 0.4, 0.5),
                                                               ("generalist", 1.0, 0.7, 0.1, 0.4)])))
    (tmp_path / "b.json").write_text(json.dumps(piece(1, 0.1, [("two-teacher", 0.9, 0.7, 0.6, 0.7),
                                                               ("generalist", 1.0, 0.6, 0.2, 0.3)])))
    assert C.main(["--task", "sort+reverse", "--seeds", "0,1", "--pick", "two-teacher=3e-4,generalist=3e-4",
                   str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    from quality import LABELS

    gen, tt = LABELS["generalist"], LABELS["two-teacher"]
    assert f"| {gen} - {tt} (on reverse) | **-0.100 [-0.100, -0.100]** | 0/2 | -0.100, -0.100 |" in out
    assert f"| {gen} - {tt} (on sort) | +0.050 [-0.585, +0.685] | 1/2 | +0.000, +0.100 |" in out
    assert "| (start) | 0.500 [0.500, 0.500] | 0.050 [-0.585, 0.685] | - | - | - | - |" in out  # both files' starts
    assert f"| {tt} | 0.950 [0.315, 1.585] | 0.750 [0.115, 1.385] | 0 (2/2) | 100 (2/2) | 100 (2/2) | 250 (2/2) |" in out
    assert f"| {gen} | 1.000 [1.000, 1.000] | 0.650 [0.015, 1.285] | 0 (2/2) | 100 (2/2) | 250 (2/2) | 300 (1/2) |" in out
    # a single task: no family table
    (tmp_path / "c.json").write_text(json.dumps({"records": [{"task": "sort", "method": "rkl", "lr": 1e-3, "seed": s,
                                                                "accuracy": 0.5} for s in (0, 1)]}))
    assert C.main(["--task", "sort", "--seeds", "0,1", "--pick", "rkl=1e-3", str(tmp_path / "c.json")]) == 0
    assert "Per family" not in capsys.readouterr().out


def test_summarize_keeps_an_older_executions_grid_seed(tmp_path, capsys):
    """`--summarize` on a results.json written before --grid-seeds (no grid_seeds in its config):
    the grid is labelled with that execution's first seed, not the summarizing command's."""
    import json

    from bench import quality as Q

    res = {"config": {**Q.parse_args(["--tasks", "sort", "--methods", "rkl", "--seeds", "0,1"])[1],
                      "lr_grid": [3e-4, 1e-3]},
           "teachers": {"sort": {"accuracy": 1.0, "students": {}}},
           "records": [{"task": "sort", "method": "rkl", "seed": s, "lr": 1e-3, "accuracy": 0.5, "tokens": 10,
                        "wall_s": 1.0, "steps": 1, "stop": "budget", "peak_rss_mb": 1.0, "curve": []} for s in (0, 1)],
           "lr_grid": {"sort": {"rkl": {"grid": {"0.0003": 0.4, "0.001": 0.5}, "chosen": 1e-3}}}}
    del res["config"]["grid_seeds"]
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert Q.main(["--summarize", "--out", str(tmp_path), "--tasks", "sort", "--methods", "rkl",
                   "--seeds", "1,0"]) == 0
    assert "Learning-rate grid (sort, seed 0, final held-out accuracy" in capsys.readouterr().out
