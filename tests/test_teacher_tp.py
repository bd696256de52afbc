"""The tensor-parallel teacher (teacher_server/tp.py) on CPU with gloo, two ranks.

- Engine level (tests/tp_worker.py, two processes): every statistic of the tensor-parallel engine
  equals the one-process engine's (fp32, 1e-5; top-k ids exactly) on a dense tiny Qwen3 and a
  tiny Qwen3-MoE, with prefix sharing (packed and KV-cache) and without.
- The CLI: `opd teacher --tp 2` over real gRPC on 127.0.0.1 equals the in-process one-rank server
  on requests of every statistic; killing a rank takes the server to NOT_SERVING and exit 1.
- Configuration errors exit 2 before any model loads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import psutil
import pytest

from teacher_server.client import ScoreSettings, TeacherClient
from tests.teacher_helpers import running_server

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, tiny_model_dir):
    """A tiny Qwen3-MoE (4 experts, 2 per token; the tiny tokenizer), random weights, built in code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    out = tmp_path_factory.mktemp("moe") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(str(out))
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, rope_theta=10000.0)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out), safe_serialization=True)
    return str(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**kw) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **kw)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(kw)
    return env


def test_two_ranks_equal_one_rank_dense_and_moe(tmp_path, tiny_model_dir, tiny_moe_dir):
    out = tmp_path / "report.json"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "tests.tp_worker", str(out), tiny_model_dir, tiny_moe_dir],
                              env=_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (1, 0)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[1][-3000:] + logs[0][-3000:]
    report = json.loads(out.read_text())
    assert len(report) == 5, sorted(report)
    for case, r in report.items():
        for key in ("sampled", "topk_logprobs", "tail", "lse", "entropy", "extra", "full"):
            assert key in r and r[key] <= TOL, (case, key, r)
        assert r["topk_ids_mismatch"] == 0, (case, r)
        # the shared-prefix cases really shared the prompt (3 samples of a 24-token prompt)
        assert (r["shared_prefix_tokens"] == 48) == ("prefix=True" in case), (case, r)


def _requests(vocab: int):
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, vocab, 30).tolist()
    seqs = [prompt + rng.integers(0, vocab, n).tolist() for n in (7, 12, 9)]   # samples of one prompt
    seqs += [rng.integers(0, vocab, n).tolist() for n in (19, 40)]
    starts = [30, 30, 30, 1, 5]
    extra = [rng.integers(0, vocab, (len(s) - st, 4)) for s, st in zip(seqs, starts)]
    return seqs, starts, extra


def _score_all(url: str, vocab: int):
    seqs, starts, extra = _requests(vocab)
    out = []
    with TeacherClient(url, max_retries=0) as c:
        for t, k in ((1.0, 6), (0.6, 20)):
            st = ScoreSettings(top_k=k, temperature=t, value_encoding="fp32", compression="none",
                               statistics=("sampled", "topk", "tail", "logsumexp", "entropy", "extra", "full"))
            out.append(c.score(seqs, starts, extra_ids=extra, settings=st))
    return out


def _compare(got, want):
    for ga, wa in zip(got, want):
        for g, w in zip(ga, wa):
            np.testing.assert_array_equal(g.topk_ids, w.topk_ids)
            for key in ("sampled_logprobs", "topk_logprobs", "tail_logmass", "logsumexp", "entropy",
                        "extra_logprobs", "full_logprobs"):
                a, b = getattr(g, key), getattr(w, key)
                assert a is not None and b is not None, key
                np.testing.assert_allclose(a, b, rtol=0, atol=TOL, err_msg=key)


def _children(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children()]


def test_cli_tp2_over_grpc_equals_one_rank_and_a_lost_rank_stops_it(tiny_model_dir):
    """`opd teacher --tp 2` (spawning rank 1 itself) answers like the one-rank server, a repeat
    comes from the cache; then rank 1 is killed: rank 0 notices, sets NOT_SERVING (its log says so),
    drains and exits 1."""
    proc = subprocess.Popen([sys.executable, "-m", "opd", "teacher", "--model", tiny_model_dir, "--port", "0",
                             "--dtype", "fp32", "--tp", "2", "--packing", "on", "--prefix-min-tokens", "8",
                             "--cache-mb", "8", "--grace-s", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    lines = []
    try:
        port = None
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line and "on 127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        assert port, "server did not start:\n" + "".join(lines[-40:])
        url = f"127.0.0.1:{port}"
        with TeacherClient(url) as c:
            vocab = c.info().vocab_size
        got = _score_all(url, vocab)
        again = _score_all(url, vocab)  # the statistics cache (rank 0 alone) answers a repeat
        assert all(r.server_seconds == 0.0 for a in again for r in a)
        _compare(again, got)
        with running_server(tiny_model_dir, prefix_min_tokens=8) as (srv, url1):
            srv.engine.packing = "on"
            want = _score_all(url1, vocab)
        _compare(got, want)
        # a rank that dies: NOT_SERVING, then the server ends with status 1
        followers = _children(proc.pid)
        assert len(followers) == 1, followers
        os.kill(followers[0], 9)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 1, rest[-3000:]
        assert "rank 1 exited with status -9; NOT_SERVING, shutting down" in rest, rest[-3000:]
        assert "opd teacher: stopped" in rest, rest[-3000:]
    finally:
        for pid in ([] if proc.poll() is not None else _children(proc.pid)):
            os.kill(pid, 9)
        proc.kill()


@pytest.mark.parametrize("argv, needle", [
    (["--tp", "3"], "--tp 3: the model's num_attention_heads 4 is not divisible by it; expected one of [1, 2, 4]"),
    (["--tp", "-1"], "--tp -1: expected a number of ranks >= 1"),
    (["--tp", "2", "--device", "cuda:1"], "--device cuda:1"),
    (["--tp", "2", "--head", "reference"], "--head reference: with --tp"),
    (["--tp", "2", "--quantize", "fp8"], "--quantize fp8 with --tp 2"),
])
def test_tp_config_errors_exit_2(tiny_model_dir, argv, needle, capsys, monkeypatch):
    from opd.cli import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main(["teacher", "--model", tiny_model_dir, "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    import torch.distributed as dist

    assert not dist.is_initialized()  # refused before any process group (or model) was set up
