"""Benchmark the fused-head distillation losses: forward+backward time, peak extra memory, accuracy.

Compares every divergence of student_trainer.losses against (a) a naive top-k forward KL that
materialises the full [tokens x vocab] logits (full log_softmax + gather) and (b) Liger-Kernel's
LigerFusedLinearJSD when ``liger_kernel`` imports (teacher hidden = student hidden; it also runs
the teacher's head, which our losses never do: the teacher sends statistics).

Each fused loss is measured in every ``--modes`` entry, as separate rows of one table:
``triton`` (closed-form chunk loss with the Triton row-stats / dz kernels, the CUDA default),
``eager`` (the same closed form in plain torch ops: the CPU path and the CUDA fallback) and
``autograd`` (per-chunk autograd, the reference; only for ``--autograd-divergences``).
In the first mode, forward KL also gets a metrics-off row, a row with the weight gradient
accumulated in the weight's dtype (``fp32_weight_grad=False``; not for ``--dtype fp32``) and
rows at the ``--extra-chunks`` chunk sizes.

After the table, an accuracy table for a smaller problem (``--accuracy-tokens``, same vocab and
hidden sizes): the relative error ||g - g_ref||_F / ||g_ref||_F of the weight and hidden gradients
of the naive loss (in ``--dtype``) and of the fused forward KL (fp32 and weight-dtype accumulation),
each against its own loss in float64 (the naive loss by plain autograd, chunked over rows; the
fused one by the library on float64 inputs), plus the floor: the float64 gradient rounded to
``--dtype``, the least error of any gradient returned in that dtype.

GPU (defaults: 16,384 tokens, vocab 151,936, hidden 2048 and 4096, bf16, top-64, chunk 1024):
    PYTHONPATH=. python bench/bench_losses.py
CPU smoke:
    python bench/bench_losses.py --tokens 512 --vocab 4096 --hidden 128 --device cpu

Peak extra memory = torch.cuda.max_memory_allocated() during the call minus the memory allocated
after the inputs exist (n/a on CPU). Times are medians over --iters after one warm-up (which
also compiles the Triton kernels).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from student_trainer.losses import DistillLossConfig, TeacherStats, distill_loss  # noqa: E402
from student_trainer.losses import fused_kernels  # noqa: E402

distill_mod = importlib.import_module("student_trainer.losses.distill")
MODES = {"triton": ("analytic", "triton"), "eager": ("analytic", "eager"), "autograd": ("autograd", "eager")}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def spread_ids(n, v, k, device, gen):
    """Sorted, distinct ids per row without a [n, v] tensor: one random id in each of k strata."""
    stride = v // k
    return torch.arange(k, device=device) * stride + torch.randint(0, stride, (n, k), device=device, generator=gen)


def make_inputs(n, v, h, k, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(n, h, device=device, generator=gen) * 1.0).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, generator=gen) / h ** 0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    ids = spread_ids(n, v, k, device, gen)
    lp_all = torch.log_softmax(torch.randn(n, k + 1, device=device, generator=gen) * 2, -1)
    tail = lp_all[:, k]
    s_ids = spread_ids(n, v, k, device, gen)
    extra = tail[:, None] - torch.log(torch.tensor(float(k), device=device)) - 1 - torch.rand(n, k, device=device, generator=gen)
    stats = TeacherStats(ids, lp_all[:, :k].contiguous(), tail.contiguous(), lp_all[:, 0].contiguous(), s_ids, extra)
    return hidden, weight, targets, stats


def naive_topk_fkl(hidden, weight, stats, rows=slice(None)):
    """Top-k forward KL from the full logits (fp32, or float64 for float64 inputs): the sum over
    ``rows`` of the row terms / N (all rows: the mean)."""
    z = hidden[rows] @ weight.T
    logp = torch.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), -1)
    lT = stats.topk_logprobs[rows].to(logp.dtype)
    return (lT.exp() * (lT - logp.gather(-1, stats.topk_ids[rows]))).sum() / hidden.shape[0]


def measure(fn, inputs, device, iters):
    cuda = device.startswith("cuda")
    for t in inputs:
        t.grad = None
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(iters + 1):
            t0 = time.perf_counter()
            fn().backward()
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            for t in inputs:
                t.grad = None
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if cuda else None
        return statistics.median(times), peak
    except torch.OutOfMemoryError:
        for t in inputs:
            t.grad = None
        if cuda:
            torch.cuda.empty_cache()
        return "OOM", "OOM"


def _with_mode(mode, fn):
    grad_mode, kernels = MODES[mode]
    old = distill_mod.GRAD_MODE, fused_kernels.KERNELS
    distill_mod.GRAD_MODE, fused_kernels.KERNELS = grad_mode, kernels
    try:
        return fn()
    finally:
        distill_mod.GRAD_MODE, fused_kernels.KERNELS = old


def liger_row(hidden, weight):
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception:
        return None
    jsd = LigerFusedLinearJSD(jsd_beta=0.5)
    t_hidden = hidden.detach().clone()
    t_weight = weight.detach().clone()
    return lambda: jsd(hidden, weight, t_hidden, t_weight, None)


def fmt(x, digits=3):
    return x if isinstance(x, str) else ("n/a" if x is None else f"{x:.{digits}f}")


def ratio(a, b):
    return "n/a" if not all(isinstance(x, float) for x in (a, b)) or b == 0 else f"{a / b:.2f}x"


def _label(name, support, mode, metrics=True, acc_dtype=None):
    base = f"fused {name}" + ("" if name in ("k3", "pg", "sft") else
                              f" ({'top-k' if support == 'topk' else 'union'}+tail)")
    acc = "" if acc_dtype is None else f", {acc_dtype} weight-grad accumulation"
    return base + ("" if metrics else ", metrics off") + acc + f" [{mode}]"


def _grads(backward, hidden, weight):
    """(grad_h, grad_W) left by ``backward()``."""
    hidden.grad = weight.grad = None
    backward()
    g = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    return g


def _rel_err(g, ref):
    d = g.double()
    return float(torch.linalg.vector_norm(d.sub_(ref)) / torch.linalg.vector_norm(ref))


def accuracy_rows(n, v, h, k, dtype, dtype_name, device, chunk, mode):
    """[(label, grad_W rel err, grad_h rel err)] against float64 references (see the docstring)."""
    hidden, weight, targets, stats = make_inputs(n, v, h, k, dtype, device)
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    out = []

    def naive64():  # one backward per row chunk: [chunk x vocab] float64 logits at a time
        for s in range(0, n, chunk):
            naive_topk_fkl(h64, w64, stats, slice(s, s + chunk)).backward()

    ref_h, ref_w = _grads(naive64, h64, w64)
    gh, gw = _grads(lambda: naive_topk_fkl(hidden, weight, stats).backward(), hidden, weight)
    out.append((f"naive top-k forward KL (full logits) [{dtype_name}]", _rel_err(gw, ref_w), _rel_err(gh, ref_h)))
    base = DistillLossConfig(divergence="forward_kl", support="topk", chunk_size=chunk, metrics=False)
    ref_h, ref_w = _grads(lambda: distill_loss(h64, w64, targets, stats, None, base)[0].backward(), h64, w64)
    out.append((f"fused float64 result rounded to {dtype_name} (the floor)",
                _rel_err(ref_w.to(dtype), ref_w), _rel_err(ref_h.to(dtype), ref_h)))
    for fp32_acc in (True, False) if dtype != torch.float32 else (True,):
        cfg = dataclasses.replace(base, fp32_weight_grad=fp32_acc)
        gh, gw = _grads(lambda: _with_mode(
            mode, lambda: distill_loss(hidden, weight, targets, stats, None, cfg)[0].backward()), hidden, weight)
        label = _label("forward_kl", "topk", mode, acc_dtype=None if fp32_acc else dtype_name)
        out.append((label, _rel_err(gw, ref_w), _rel_err(gh, ref_h)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", default="2048,4096", help="comma-separated list")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--chunk", type=int, default=DistillLossConfig().chunk_size)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--divergences", default="forward_kl,reverse_kl,jsd,skew_reverse_kl,tv,k3,pg,sft")
    p.add_argument("--no-metrics", action="store_true", help="skip entropy/overlap metrics in the pass")
    p.add_argument("--modes", default="auto",
                   help="comma-separated subset of triton,eager (auto: both on CUDA, eager on CPU)")
    p.add_argument("--autograd-divergences", default="forward_kl",
                   help="divergences also measured with per-chunk autograd (the reference; '' for none)")
    p.add_argument("--extra-chunks", default="512,2048",
                   help="chunk sizes for extra forward_kl rows in the first mode ('' for none)")
    p.add_argument("--accuracy-tokens", type=int, default=2048,
                   help="tokens of the gradient-accuracy table's problem (0: no accuracy table)")
    a = p.parse_args(argv)
    dtype = DTYPES[a.dtype]
    cuda = a.device.startswith("cuda")
    modes = (["triton", "eager"] if cuda else ["eager"]) if a.modes == "auto" else a.modes.split(",")
    if "triton" in modes and not cuda:
        print("note: the triton mode needs CUDA; dropped")
        modes.remove("triton")
    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    tri = getattr(fused_kernels.triton, "__version__", "absent")
    print(f"device={a.device} ({dev_name}) torch={torch.__version__} triton={tri} tokens={a.tokens} "
          f"vocab={a.vocab} dtype={a.dtype} topk={a.topk} chunk={a.chunk} metrics={not a.no_metrics} "
          f"iters={a.iters}")
    print()
    print("| hidden | loss | time s | peak extra GiB | time vs naive | mem vs naive | time vs Liger | mem vs Liger |")
    print("|---|---|---|---|---|---|---|---|")
    t_start = time.perf_counter()
    hiddens = [int(x) for x in a.hidden.split(",")]
    for h in hiddens:
        hidden, weight, targets, stats = make_inputs(a.tokens, a.vocab, h, a.topk, dtype, a.device)
        rows = [("naive top-k forward KL (full logits)", lambda: naive_topk_fkl(hidden, weight, stats))]
        lig = liger_row(hidden, weight)
        if lig is not None:
            rows.append(("Liger fused linear JSD", lig))
        auto_divs = [d for d in a.autograd_divergences.split(",") if d]
        for mode in modes + (["autograd"] if auto_divs else []):
            for name in a.divergences.split(","):
                if mode == "autograd" and name not in auto_divs:
                    continue
                support = "topk" if name == "forward_kl" else "auto"
                base = DistillLossConfig(divergence=name, chunk_size=a.chunk, support=support,
                                         metrics=not a.no_metrics)
                variants = [{}]
                if mode == modes[0] and name == "forward_kl":
                    if not a.no_metrics:
                        variants.append({"metrics": False})  # the naive baseline computes no metrics
                    if dtype != torch.float32:
                        variants.append({"fp32_weight_grad": False})  # grad_W accumulated in bf16/fp16
                    variants += [{"chunk_size": int(c)} for c in a.extra_chunks.split(",") if c and int(c) != a.chunk]
                for var in variants:
                    cfg = dataclasses.replace(base, **var)
                    label = _label(name, support, mode, cfg.metrics, None if cfg.fp32_weight_grad else a.dtype) \
                        + ("" if cfg.chunk_size == a.chunk else f" C={cfg.chunk_size}")
                    rows.append((label, lambda cfg=cfg, mode=mode: _with_mode(
                        mode, lambda: distill_loss(hidden, weight, targets, stats, None, cfg)[0])))
        res = {}
        for label, fn in rows:
            res[label] = measure(fn, [hidden, weight], a.device, a.iters)
        naive = res[rows[0][0]]
        liger = res.get("Liger fused linear JSD", ("n/a", "n/a"))
        for label, (t, m) in res.items():
            print(f"| {h} | {label} | {fmt(t)} | {fmt(m, 2)} | {ratio(t, naive[0])} | {ratio(m, naive[1])} | "
                  f"{ratio(t, liger[0])} | {ratio(m, liger[1])} |", flush=True)
        hidden = weight = targets = stats = rows = res = None  # free before the next size
    if a.accuracy_tokens > 0:
        print(f"\nGradient accuracy at {a.accuracy_tokens} tokens (chunk {a.chunk}): ||g - g_ref||_F / ||g_ref||_F, "
              "g_ref = the same loss in float64 (naive: autograd; fused: the library on float64 inputs)\n")
        print("| hidden | loss | grad_W rel err | grad_h rel err |")
        print("|---|---|---|---|")
        for h in hiddens:
            for label, ew, eh in accuracy_rows(a.accuracy_tokens, a.vocab, h, a.topk, dtype, a.dtype, a.device,
                                               a.chunk, modes[0]):
                print(f"| {h} | {label} | {ew:.2e} | {eh:.2e} |", flush=True)
    if cuda and "triton" in modes and not any(fused_kernels._STATE.values()):
        print("WARNING: the Triton kernels did not run (self-test failed or triton missing): "
              "the [triton] rows are the eager path")
    print(f"\nbench wall time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
