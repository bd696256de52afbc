"""Closed-form chunk gradients (analytic.py) == autograd on the detached chunk, float64, to 1e-10.

The reference is the same ``distill_loss`` with ``distill.GRAD_MODE = "autograd"`` (the generic
``autograd_chunk_fn`` path). With ``hidden = I`` the weight gradient IS d(loss)/d(logits), so the
per-chunk dz is compared directly; random hidden states check the two matmuls as well.
"""
import importlib
import math

import pytest
import torch

from student_trainer.losses import DistillLossConfig, distill_loss
from tests.test_losses_divergences import make_problem

distill_mod = importlib.import_module("student_trainer.losses.distill")

DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"]
SAMPLED = ["k1", "k2", "k3", "pg", "ppo", "sft"]
TOL = dict(atol=1e-10, rtol=1e-10)


def _run(mode, hidden, weight, targets, stats, mask, cfg, **kw):
    old = distill_mod.GRAD_MODE
    distill_mod.GRAD_MODE = mode
    try:
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)
        loss, met = distill_loss(h, w, targets, stats, mask, cfg, **kw)
        loss.backward()
        return loss.detach(), h.grad, w.grad, met
    finally:
        distill_mod.GRAD_MODE = old


def _compare(hidden, weight, targets, stats, mask, cfg, **kw):
    a = _run("analytic", hidden, weight, targets, stats, mask, cfg, **kw)
    r = _run("autograd", hidden, weight, targets, stats, mask, cfg, **kw)
    for x, y in zip(a[:3], r[:3]):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, **TOL)
    assert a[3].keys() == r[3].keys()
    for k in a[3]:
        torch.testing.assert_close(a[3][k].double(), r[3][k].double(), **TOL, msg=k)
    return a


def _problem(support, n=13, v=41, k=6, m=5, seed=0, scale=1.0):
    hidden, weight, targets, stats, t_lp = make_problem(n=n, v=v, h=7, k=k, m=m if support == "union" else None,
                                                        seed=seed)
    stats.full_logprobs = None
    return hidden * scale, weight, targets, stats


def _extras(name, hidden, weight, targets, seed):
    g = torch.Generator().manual_seed(seed + 100)
    n = hidden.shape[0]
    lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    # old log-probs spread so that clipped, unclipped and in-range rows all occur
    old = lp + torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return dict(rollout_logprobs_N=old, advantages_N=adv)


@pytest.mark.parametrize("support", ["topk", "union"])
@pytest.mark.parametrize("name", DIVS + SAMPLED)
@pytest.mark.parametrize("temperature,chunk", [(1.0, 4), (1.3, 5)])  # 13 rows: chunks do not divide
def test_analytic_grads_match_autograd(name, support, temperature, chunk):
    hidden, weight, targets, stats = _problem(support)
    mask = torch.tensor([1, 1, 0, 1, 0.5, 1, 1, 1, 0, 1, 2, 1, 1], dtype=torch.float64)
    kw = _extras(name, hidden, weight, targets, 0) if name in ("pg", "ppo") else {}
    if name == "pg":
        kw.pop("advantages_N")
    if name == "ppo":
        kw.pop("rollout_logprobs_N")
    cfg = DistillLossConfig(divergence=name, support=support, temperature=temperature, chunk_size=chunk)
    _compare(hidden, weight, targets, stats, mask, cfg, **kw)


@pytest.mark.parametrize("support", ["topk", "union"])
@pytest.mark.parametrize("name", DIVS + SAMPLED)
def test_analytic_dz_matches_autograd_dz(name, support):
    """hidden = identity: grad_W = dz^T, the chunk gradient itself."""
    _, weight0, targets, stats = _problem(support, n=9, v=37)
    n, v = 9, 37
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    hidden, weight = torch.eye(n, dtype=torch.float64), logits.T.contiguous()
    if support == "union":  # the student's own top-M of these logits
        stats.s_topk_ids = torch.topk(logits, stats.s_topk_ids.shape[1], -1).indices.sort(-1).values
    kw = {"advantages_N": torch.linspace(-1, 1, n, dtype=torch.float64)} if name == "ppo" else {}
    cfg = DistillLossConfig(divergence=name, support=support, chunk_size=2)
    a = _compare(hidden, weight, targets, stats, None, cfg, **kw)
    assert a[2].abs().sum() > 0


@pytest.mark.parametrize("support", ["topk", "union"])
def test_analytic_mix_with_clipped_pg_and_discount(support):
    hidden, weight, targets, stats = _problem(support, n=12, seed=3)
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    kw = _extras("pg", hidden, weight, targets, 3)
    terms = (("reverse_kl", 0.6), ("forward_kl", 0.3), ("jsd", 0.2), ("sft", 0.1), ("pg", 0.5),
             ("ppo", 0.25), ("k3", 0.4))
    cfg = DistillLossConfig(terms=terms, support=support, chunk_size=5, gamma=0.9, clip_eps=0.1,
                            temperature=0.8)
    _compare(hidden, weight, targets, stats, None, cfg, seq_ids_N=seq,
             sft_targets_N=torch.roll(targets, 1), **kw)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_analytic_topk_covering_vocab_and_extreme_logits(name):
    """k = V (tail -inf, empty rest bucket) and logits so peaked that lS < LOG_FLOOR (clamps)."""
    hidden, weight, targets, stats = _problem("topk", n=7, v=19, k=19)
    assert torch.isinf(stats.tail_logmass).all()
    _compare(hidden, weight, targets, stats, None, DistillLossConfig(divergence=name, support="topk", chunk_size=3))
    hidden, weight, targets, stats = _problem("union", n=7, v=40, k=4, m=3, scale=40.0)
    z = torch.log_softmax(hidden @ weight.T, -1)
    assert (z.gather(-1, stats.topk_ids) < math.log(1e-30)).any()  # the clamp is exercised
    _compare(hidden, weight, targets, stats, None, DistillLossConfig(divergence=name, support="union", chunk_size=3))


def test_analytic_without_teacher_stats():
    hidden, weight, targets, _ = _problem("topk")
    adv = torch.linspace(-1, 1, hidden.shape[0], dtype=torch.float64)
    for terms in ((("sft", 1.0),), (("ppo", 1.0), ("sft", 0.3))):
        _compare(hidden, weight, targets, None, None, DistillLossConfig(terms=terms, chunk_size=4),
                 advantages_N=adv)


def test_analytic_metrics_off_and_full_support_fallback():
    hidden, weight, targets, stats, _ = make_problem(n=8, v=29, k=5)
    cfg = DistillLossConfig(divergence="reverse_kl", support="topk", metrics=False, chunk_size=3)
    a = _compare(hidden, weight, targets, stats, None, cfg)
    assert set(a[3]) == {"loss_row_mean", "tokens"}
    _compare(hidden, weight, targets, stats, None, DistillLossConfig(divergence="forward_kl", support="full"))


def test_analytic_bf16_close_to_fp64():
    hidden, weight, targets, stats = _problem("union", n=33, v=300, k=8, m=8)
    cfg = DistillLossConfig(terms=(("reverse_kl", 1.0), ("k3", 0.5)), support="union", chunk_size=8)
    ref = _run("analytic", hidden, weight, targets, stats, None, cfg)
    out = _run("analytic", hidden.float().to(torch.bfloat16), weight.float().to(torch.bfloat16), targets,
               stats, None, cfg)
    assert out[1].dtype == torch.bfloat16 and out[2].dtype == torch.bfloat16
    for a, b in zip(out[:3], ref[:3]):
        torch.testing.assert_close(a.double(), b, atol=3e-2, rtol=5e-2)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_analytic_chunk_allocates_one_logits_buffer(monkeypatch, wdtype):
    """Per chunk: the fp32 logits buffer (softmax and, for fp32 weights, dz in place) plus, for
    bf16 weights, dz in bf16 -- metrics included, no other [C, V] allocation."""
    from tests.test_losses_fused_head import RecordShapes

    analytic = importlib.import_module("student_trainer.losses.analytic")
    monkeypatch.setattr(analytic, "ENTROPY_BLOCK_ELEMS", 64)  # entropy temporaries: column blocks
    n, v, chunk = 24, 97, 8
    hidden, weight, targets, stats = _problem("union", n=n, v=v, k=6, m=5)
    h = hidden.to(wdtype).requires_grad_(True)
    w = weight.to(wdtype).requires_grad_(True)

    class Allocs(RecordShapes):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {a.data_ptr() for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)}
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor) and o.numel() >= chunk * v and o.data_ptr() not in ins:
                    self.records.append((str(func), tuple(o.shape), o.numel()))
            return out

    cfg = DistillLossConfig(terms=(("reverse_kl", 1.0), ("k3", 0.3), ("sft", 0.1)), support="union",
                            chunk_size=chunk)
    rec = Allocs()
    with rec:
        loss, met = distill_loss(h, w, targets, stats, None, cfg)
        loss.backward()
    big = [r for r in rec.records if r[1] == (chunk, v)]
    # bf16: + dz in bf16, and on CPU the logits come out of a bf16 mm before the fp32 copy
    # (CUDA writes them in fp32 directly: torch.mm(..., out_dtype=torch.float32)).
    per_chunk = 1 if wdtype == torch.float32 else 3
    assert len(big) == per_chunk * (n // chunk), big
    assert {"entropy", "topk_overlap", "s_mass_on_t_topk", "k3_reverse_kl"} <= set(met)


def test_student_topk_from_block_maxima_is_exact(monkeypatch):
    """Top-k among the k blocks with the largest maxima (+ partial last block + support) == torch.topk."""
    analytic = importlib.import_module("student_trainer.losses.analytic")
    fk = importlib.import_module("student_trainer.losses.fused_kernels")
    monkeypatch.setattr(fk, "SUB", 8)
    g = torch.Generator().manual_seed(7)
    c, v, k, n_u = 12, 203, 5, 7  # 25 full blocks of 8 and a partial one of 3
    for trial in range(4):
        z = torch.randn(c, v, generator=g, dtype=torch.float64) * 3
        if trial == 1:
            z[:, -3:] += 20.0  # the top-k in the partial last block
        if trial == 2:
            z[:, 40:48] += 20.0  # the whole top-k in one block
        ids = torch.stack([torch.randperm(v, generator=g)[:n_u] for _ in range(c)])
        ids[:, :2] = torch.topk(z, 2, -1).indices  # the two largest are on the support
        zu = z.gather(-1, ids)
        zm = z.scatter(-1, ids, -math.inf)
        ref = torch.topk(z, k, -1).indices.sort(-1).values
        for bmax in (analytic._block_max(zm), None):
            got = analytic.student_topk(zm, bmax, zu, ids, k).sort(-1).values
            assert torch.equal(got, ref), trial
        # without a support: candidates from the blocks only
        assert torch.equal(analytic.student_topk(z, analytic._block_max(z), None, None, k).sort(-1).values, ref)


@pytest.mark.parametrize("support", ["topk", "union"])
def test_analytic_metrics_with_block_topk(monkeypatch, support):
    """topk_overlap via block-maxima candidates (blocks of 4 columns) == autograd reference."""
    fk = importlib.import_module("student_trainer.losses.fused_kernels")
    monkeypatch.setattr(fk, "SUB", 4)
    hidden, weight, targets, stats = _problem(support, n=13, v=97, k=6, m=5)
    a = _compare(hidden, weight, targets, stats, None,
                 DistillLossConfig(divergence="reverse_kl", support=support, chunk_size=5))
    assert 0 < a[3]["topk_overlap"] < 1
