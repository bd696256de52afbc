"""The tensor-parallel teacher (teacher_server/tp.py) on CPU with gloo, two ranks.

- Engine level (tests/tp_worker.py, two processes): every statistic of the tensor-parallel engine
  equals the one-process engine's (fp32, 1e-5; top-k ids exactly) on a dense tiny Qwen3 and a
  tiny Qwen3-MoE, with prefix sharing (packed and KV-cache) and without, and with an fp8 body.
- The sharded head's merge with ranks as threads (edge cases, against float64).
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
from tests.teacher_helpers import TeacherProcess, running_server

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


def test_two_ranks_equal_one_rank_dense_moe_fp8(tmp_path, tiny_model_dir, tiny_moe_dir):
    """tests/tp_worker.py on two gloo ranks: dense (prefix sharing packed, KV cache, off), MoE
    (prefix sharing through the KV cache, off) and the dense body as fp8 (emulated on CPU)."""
    out = tmp_path / "report.json"
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "tests.tp_worker", str(out), tiny_model_dir, tiny_moe_dir,
                               "fp8:" + tiny_model_dir],
                              env=_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (1, 0)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[1][-3000:] + logs[0][-3000:]
    report = json.loads(out.read_text())
    assert len(report) == 6, sorted(report)
    assert "fp8 qwen3/prefix=True/packing=on" in report and "qwen3_moe/prefix=False/packing=off" in report
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
    teacher = TeacherProcess("--model", tiny_model_dir, "--port", "0", "--dtype", "fp32", "--tp", "2", "--packing", "on",
                             "--prefix-min-tokens", "8", "--cache-mb", "8", "--grace-s", "2", env=_env())
    proc = teacher.proc
    try:
        url = teacher.grpc
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
        rest = teacher.output(timeout=60)
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
    (["--tp", "64", "--device", "cuda"], "--tp 64"),
    (["--tp", "2", "--quantize", "fp8"], "--quantize fp8 needs a CUDA GPU"),
])
def test_tp_config_errors_exit_2(tiny_model_dir, argv, needle, capsys, monkeypatch):
    from opd.cli import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    import torch.distributed as dist

    before = dist.is_initialized()   # earlier tests in this process may have set up DeepSpeed's group
    assert main(["teacher", "--model", tiny_model_dir, "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert dist.is_initialized() == before  # refused before any process group (or model) was set up


class _ThreadGroup:
    """The collectives of `tp.TPGroup` between threads of this process (one thread per rank):
    the sharded head's merge, tested without processes."""

    def __init__(self, rank: int, world: int, shared: dict):
        self.rank, self.world, self.shared = rank, world, shared

    def _exchange(self, x):
        import torch

        s = self.shared
        s["slots"][self.rank] = x.clone()
        s["barrier"].wait()
        out = torch.stack(s["slots"])
        s["barrier"].wait()
        return out

    def all_gather(self, x):
        return self._exchange(x)

    def all_reduce(self, x):
        x.copy_(self._exchange(x).sum(0))


def _sharded(req, W, world, chunk, softcap):
    import threading

    from teacher_server import tp

    shared = {"slots": [None] * world, "barrier": threading.Barrier(world)}
    vl = W.shape[0] // world
    out, errs = [None] * world, []

    def run(r):
        try:
            out[r] = tp.sharded_head_statistics(req, W[r * vl:(r + 1) * vl], r * vl, _ThreadGroup(r, world, shared),
                                                chunk_size=chunk, softcap=softcap)
        except Exception as exc:  # noqa: BLE001
            errs.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errs, errs
    for r in range(1, world):  # every rank holds the same merged statistics
        for k in out[0]:
            assert (out[r][k] == out[0][k]).all(), k
    return out[0]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("softcap, temps", [(None, None), (None, [0.7, 1.3, 1.0]), (30.0, [0.5])])
def test_sharded_head_merge_equals_one_rank_and_float64(world, softcap, temps):
    """The merge itself, ranks as threads: ties across shards at the k-th place (duplicated
    lm-head rows in different shards), peaked rows (tails down to ~1e-12: the exact path), per-row
    k (including 0) and k larger than a shard, temperatures, softcap: equal to the one-rank head
    and to float64 from the definition."""
    import torch

    from teacher_server import head as H

    g = torch.Generator().manual_seed(1)
    rows, hid, V = 29, 16, 64
    hidden = torch.randn(rows, hid, generator=g)
    W = torch.randn(V, hid, generator=g) * 0.7
    W[:, 0] *= torch.linspace(0, 30, V)              # peaked rows: tiny tails
    W[V - 1] = W[3]                                  # ties across the first and last shard
    W[V // 2] = W[3]
    k = V // 2 + 3                                   # more than a shard holds at world 2 and 4
    row_k = torch.randint(0, k + 1, (rows,), generator=g)
    row_k[:3] = torch.tensor([0, 1, k])
    t = None if temps is None else torch.tensor(temps * rows)[:rows].float()
    req = H.HeadRequest(hidden=hidden, targets=torch.randint(0, V, (rows,), generator=g), temperature=t,
                        top_k=k, row_k=row_k, extra_ids=torch.randint(0, V, (rows, 5), generator=g),
                        stats=frozenset({H.SAMPLED, H.TOPK, H.TAIL, H.LSE, H.ENTROPY, H.EXTRA, H.FULL}))
    for chunk in (7, 64):
        got = _sharded(req, W, world, chunk, softcap)
        one = H.head_statistics(req, W, chunk_size=chunk, softcap=softcap)
        assert set(got) == set(one)
        z = (hidden.double() @ W.double().t())
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        if t is not None:
            z = z / t.double()[:, None]
        lp = torch.log_softmax(z, -1)
        ref = {H.LSE: torch.logsumexp(z, -1), H.ENTROPY: -(lp.exp() * lp).sum(-1), H.FULL: lp,
               H.SAMPLED: lp.gather(1, req.targets[:, None]).squeeze(1), H.EXTRA: lp.gather(1, req.extra_ids)}
        for key, want in ref.items():
            torch.testing.assert_close(got[key].double(), want, rtol=1e-5, atol=1e-5, msg=key)
            torch.testing.assert_close(got[key], one[key], rtol=1e-5, atol=1e-5, msg=key)
        # top-k: the values (ids may differ among tied values) and that the ids carry them
        torch.testing.assert_close(got["topk_vals"].double(), lp.topk(k, -1).values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp.gather(1, got["topk_ids"]), got["topk_vals"].double(), rtol=1e-5, atol=1e-5)
        # tail: the mass outside the row's own k, whichever tied ids were taken
        tail_ref = torch.stack([torch.logsumexp(lp[r].scatter(0, lp[r].topk(int(row_k[r])).indices, float("-inf")), 0)
                                if row_k[r] else torch.zeros((), dtype=torch.float64) for r in range(rows)])
        # (the eager tail is log(1 - sum of k fp32 probabilities) above 1e-3: each carries ~6e-8 of
        # rounding, so the mass is good to ~k x 6e-8 there; below 1e-3 it is the exact sum)
        for other in (tail_ref.exp(), one[H.TAIL].exp().double()):
            torch.testing.assert_close(got[H.TAIL].exp().double(), other, rtol=1e-4, atol=k * 6e-8)
        small = tail_ref < -8
        torch.testing.assert_close(got[H.TAIL].double()[small], tail_ref[small], rtol=1e-5, atol=1e-5)
        assert tail_ref[row_k > 0].min() < -20          # the exact (tiny-tail) path was taken


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2])
def test_sharded_head_kernels_on_cuda_equal_one_rank(world):
    """On CUDA the shards run the Triton kernels (row stats, block top-k, the exact tail): the
    merged statistics equal the one-rank kernel head's on bf16 logits of a wide vocabulary."""
    import torch

    from teacher_server import head as H

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, hid, V, k = 300, 64, 8 * 4096 + 256, 64
    hidden = torch.randn(rows, hid, generator=g, device="cuda").bfloat16()
    W = (torch.randn(V, hid, generator=g, device="cuda") * 0.5).bfloat16()
    W[:, 0] *= torch.linspace(0, 30, V, device="cuda").bfloat16()
    req = H.HeadRequest(hidden=hidden, targets=torch.randint(0, V, (rows,), generator=g, device="cuda"),
                        temperature=None, top_k=k, row_k=torch.full((rows,), k, device="cuda"),
                        extra_ids=torch.randint(0, V, (rows, 5), generator=g, device="cuda"),
                        stats=frozenset({H.SAMPLED, H.TOPK, H.TAIL, H.LSE, H.ENTROPY, H.EXTRA}))
    got = _sharded(req, W, world, 128, None)
    one = H.head_statistics(req, W, chunk_size=128)
    for key in (H.SAMPLED, H.LSE, H.ENTROPY, H.EXTRA, "topk_vals"):
        torch.testing.assert_close(got[key], one[key], rtol=1e-4, atol=1e-4, msg=key)
    torch.testing.assert_close(got[H.TAIL].exp(), one[H.TAIL].exp(), rtol=1e-3, atol=1e-6)
