"""Progress bars for what a person waits on (opd eval, the demo's SFT): shown on a terminal,
silent when stderr is a pipe or a file (logs stay clean)."""

import asyncio
import io
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rollout.evaluate import evaluate
from rollout.local_engine import LocalEngine
from rollout.types import SamplingParams


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("tty", [True, False])
def test_eval_shows_a_bar_only_on_a_terminal(tiny, monkeypatch, tty):
    from rollout.data import PromptExample

    model, tok = tiny
    err = _Tty() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    examples = [PromptExample(index=i, prompt_ids=tok.encode(f"{i}+1="), messages=[], answer=str(i + 1), source="t")
                for i in range(3)]
    engine = LocalEngine(model, tok)
    try:
        by_source = asyncio.run(evaluate(engine, tok, examples, SamplingParams(n=2, max_new_tokens=3, seed=0),
                                         lambda text, answer: 0.0))
    finally:
        engine.close()
    assert [len(r) for r in by_source["t"]] == [2, 2, 2]
    if tty:
        assert "eval" in err.getvalue() and "6/6" in err.getvalue()
    else:
        assert err.getvalue() == ""


def test_demo_sft_bar_on_a_terminal(tiny, monkeypatch):
    from rollout.tasks import arithmetic
    from opd.sft import sft_train

    model, tok = tiny
    err = _Tty()
    monkeypatch.setattr("sys.stderr", err)
    examples = arithmetic.make_examples("train", 4, seed=0)
    torch.manual_seed(0)
    sft_train(model, tok, examples, steps=2, batch_size=2, lr=1e-4, warmup_steps=1)
    assert "sft:" in err.getvalue() and "/2 [" in err.getvalue()   # leave=False clears it at the end


def test_teacher_warm_up_bar_on_a_terminal(tiny_model_dir, monkeypatch):
    """The warm-up batches `prepare()` runs before SERVING (compiled on CUDA: tens of seconds)."""
    from teacher_server.app import TeacherConfig, build_server
    from teacher_server.service import ServerConfig

    srv = build_server(TeacherConfig(model=tiny_model_dir, dtype="fp32", server=ServerConfig(port=0)))
    try:
        batches = srv.engine._warm_batches()
        err = _Tty()
        monkeypatch.setattr("sys.stderr", err)
        out = srv.engine._run_warm(batches)
        assert len(out) == len(batches) and "teacher warm-up (eager)" in err.getvalue()
        monkeypatch.setattr("sys.stderr", io.StringIO())
        srv.engine._run_warm(batches)
        assert sys.stderr.getvalue() == ""
    finally:
        srv.stop(0)
