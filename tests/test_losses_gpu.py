"""CUDA: the Triton fast path of the closed-form chunk loss (``fused_kernels``) against float64.

Run on a GPU machine: ``pytest -m gpu tests/test_losses_gpu.py`` (skipped without CUDA).
The same tests run on the CPU under Triton's interpreter, on smaller shapes:
``TRITON_INTERPRET=1 pytest tests/test_losses_gpu.py`` (needs ``triton`` importable).
"""
import importlib
import os

import pytest
import torch

from student_trainer.losses import DistillLossConfig, distill_loss
from student_trainer.losses import fused_kernels as fk
from student_trainer.losses.analytic import _block_max, student_topk
from tests.test_losses_divergences import make_problem
from tests.triton_helpers import DEV, INTERP, MARKS, force_triton

pytestmark = list(MARKS)

distill_mod = importlib.import_module("student_trainer.losses.distill")
DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl", "tv"]
SAMPLED = ["k3", "pg", "sft"]


@pytest.fixture
def kernels(monkeypatch):
    return force_triton(monkeypatch, fk)


def _close(a, b, rel, what=""):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), what
    err = (a - b).abs().max().item()
    assert err <= rel * max(b.abs().max().item(), 1e-6), f"{what}: max err {err:.3g}, scale {b.abs().max().item():.3g}"


@pytest.mark.parametrize("v", [3 * fk.BLOCK + 77] + ([] if INTERP else [151936]))
def test_row_stats_and_dz_kernels_match_float64(kernels, v):
    g = torch.Generator().manual_seed(0)
    c = 6 if INTERP else 64
    z = torch.randn(c, v, generator=g) * 4
    z[1, :300] = float("-inf")        # masked columns
    z[2] = float("-inf")              # a row entirely on the support
    z[3, 5] = 60.0                    # a dominant logit
    z = z.to(DEV)
    m, s, a, bmax = fk.row_stats(z, True, True)
    zf = z.double().cpu()
    m_ref = zf.amax(-1)
    ms = torch.where(torch.isfinite(m_ref), m_ref, torch.zeros_like(m_ref))
    e = torch.exp(zf - ms[:, None])
    assert torch.equal(m.cpu().double(), m_ref)
    _close(s, e.sum(-1), 1e-5, "S")
    _close(a, torch.where(e > 0, e * (zf - ms[:, None]), torch.zeros_like(e)).sum(-1), 1e-5, "A")
    assert torch.equal(bmax.cpu().double(), _block_max(zf))
    shift = torch.randn(c, generator=g).to(DEV) + 3
    scale = torch.randn(c, generator=g).to(DEV)
    ref = torch.exp(zf - shift.double().cpu()[:, None]) * scale.double().cpu()[:, None]
    for dt, rel in ((torch.float32, 1e-5), (torch.bfloat16, 8e-3)):
        for inplace in (False, True):
            out = fk.write_dz(z.clone(), shift, scale, dt, inplace)
            assert out.dtype == dt and out.shape == z.shape
            _close(out, ref, rel, f"dz {dt} inplace={inplace}")


def test_student_topk_from_block_maxima_is_exact():
    g = torch.Generator().manual_seed(1)
    c, v, k, n_u = (8, 5000, 16, 10) if INTERP else (64, 151936, 64, 96)
    z = (torch.randn(c, v, generator=g) * 3).to(DEV)
    top8 = torch.topk(z, 8, -1).indices.cpu()  # the largest values are on the support
    rows = []
    for r in range(c):  # distinct ids per row (the contract: duplicates would carry -inf)
        perm = torch.randperm(v, generator=g)
        rows.append(torch.cat([top8[r], perm[~torch.isin(perm, top8[r])][: n_u - 8]]))
    ids = torch.stack(rows).to(DEV)
    zu = z.gather(-1, ids)
    zm = z.scatter(-1, ids, float("-inf"))
    ref = torch.topk(z, k, -1).indices.sort(-1).values
    for bmax in (_block_max(zm), None):
        got = student_topk(zm, bmax, zu, ids, k).sort(-1).values
        assert torch.equal(got, ref)


def _run(hidden, weight, targets, stats, cfg, dev, **kw):
    h = hidden.detach().to(dev).requires_grad_(True)
    w = weight.detach().to(dev).requires_grad_(True)
    st = stats.select(slice(None)).to(dev)
    st.full_logprobs = None
    kw = {k: x.to(dev) for k, x in kw.items()}
    loss, met = distill_loss(h, w, targets.to(dev), st, None, cfg, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad, met


def _reference(hidden, weight, targets, stats, cfg, **kw):
    old = distill_mod.GRAD_MODE
    distill_mod.GRAD_MODE = "autograd"
    try:
        return _run(hidden.double(), weight.double(), targets, stats, cfg, "cpu",
                    **{k: x.double() for k, x in kw.items()})
    finally:
        distill_mod.GRAD_MODE = old


def _problem(support, seed=0):
    n, v, h, k = (24, 1100, 16, 8) if INTERP else (300, 5003, 64, 16)
    hidden, weight, targets, stats, _ = make_problem(n=n, v=v, h=h, k=k, m=k if support == "union" else None,
                                                     seed=seed, dtype=torch.float32)
    return hidden, weight * 2, targets, stats


@pytest.mark.parametrize("support", ["topk", "union"])
@pytest.mark.parametrize("name", DIVS + SAMPLED)
def test_kernel_path_fp32_matches_float64(kernels, name, support):
    """fp32 inputs through the Triton path == float64 autograd reference (loss, grads, metrics)."""
    hidden, weight, targets, stats = _problem(support)
    kw = {"advantages_N": torch.linspace(-1, 1, hidden.shape[0])} if name == "ppo" else {}
    for temperature, chunk in ((1.0, 64), (1.3, 37)):
        cfg = DistillLossConfig(divergence=name, support=support, temperature=temperature, chunk_size=chunk)
        got = _run(hidden, weight, targets, stats, cfg, DEV, **kw)
        ref = _reference(hidden, weight, targets, stats, cfg, **kw)
        for a, b, what in zip(got[:3], ref[:3], ("loss", "grad_h", "grad_w")):
            _close(a, b, 2e-4, what)
        assert got[3].keys() == ref[3].keys()
        for key in ref[3]:
            _close(got[3][key].reshape(()), ref[3][key].reshape(()), 1e-4, key)


def test_kernel_path_mix_and_eager_agree(kernels):
    hidden, weight, targets, stats = _problem("union", seed=2)
    terms = (("reverse_kl", 0.6), ("forward_kl", 0.3), ("jsd", 0.2), ("sft", 0.1), ("pg", 0.5), ("k3", 0.4))
    cfg = DistillLossConfig(terms=terms, support="union", chunk_size=50, temperature=0.8)
    got = _run(hidden, weight, targets, stats, cfg, DEV)
    kernels.setattr(fk, "KERNELS", "eager")
    eager = _run(hidden, weight, targets, stats, cfg, DEV)
    ref = _reference(hidden, weight, targets, stats, cfg)
    for a, b, r, what in zip(got[:3], eager[:3], ref[:3], ("loss", "grad_h", "grad_w")):
        _close(a, r, 2e-4, what)
        _close(b, r, 2e-4, what + " (eager)")
    for key in ref[3]:
        _close(got[3][key].reshape(()), ref[3][key].reshape(()), 1e-4, key)


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "sft"])
def test_kernel_path_bf16_close_and_inplace_identical(kernels, name):
    """bf16 weights: dz in bf16 (in place or not: the same) close to float64 on the same inputs."""
    hidden, weight, targets, stats = _problem("union", seed=3)
    hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    # temperature != 1 with bf16 weights: 1/T applied in the logits matmul (addmm alpha) on CUDA
    cfg = DistillLossConfig(divergence=name, support="auto", chunk_size=64, temperature=1.3)
    kernels.setattr(fk, "DZ_INPLACE", True)
    a = _run(hidden, weight, targets, stats, cfg, DEV)
    kernels.setattr(fk, "DZ_INPLACE", False)
    b = _run(hidden, weight, targets, stats, cfg, DEV)
    assert torch.equal(a[0], b[0])
    for x, y, what in zip(a[1:3], b[1:3], ("grad_h", "grad_w")):  # cuBLAS may pick other kernels for ld = 2V
        _close(x, y, 1e-2, what + " in place vs not")
    ref = _reference(hidden.float(), weight.float(), targets, stats, cfg)
    assert a[1].dtype == torch.bfloat16 and a[2].dtype == torch.bfloat16
    for x, r, what in zip(a[:3], ref[:3], ("loss", "grad_h", "grad_w")):
        _close(x, r, 3e-2, what)


@pytest.mark.skipif(INTERP, reason="full-size memory check: CUDA only")
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_peak_memory_16k_tokens_under_2gib(kernels, name):
    """16,384 tokens, vocab 151,936, hidden 2048, bf16, top-64, default chunk: extra peak <= 2 GiB."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from bench_losses import make_inputs

    hidden, weight, targets, stats = make_inputs(16384, 151936, 2048, 64, torch.bfloat16, "cuda")
    cfg = DistillLossConfig(divergence=name, support="topk" if name == "forward_kl" else "auto")
    distill_loss(hidden, weight, targets, stats, None, cfg)[0].backward()  # warm-up (kernel compile)
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, met = distill_loss(hidden, weight, targets, stats, None, cfg)
    loss.backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    assert fk._STATE.get(str(hidden.device)) is True
    assert torch.isfinite(loss) and torch.isfinite(weight.grad.float()).all()
    assert peak <= 2.0, peak
