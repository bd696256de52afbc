"""Benchmark the fused-head distillation losses: time of forward+backward and peak extra memory.

Compares every divergence of student_trainer.losses against (a) a naive top-k forward KL that
materialises the full [tokens x vocab] logits (full log_softmax + gather) and (b) Liger-Kernel's
LigerFusedLinearJSD when ``liger_kernel`` imports (teacher hidden = student hidden; it also runs
the teacher's head, which our losses never do: the teacher sends statistics).

Each fused loss is measured in every ``--modes`` entry, as separate rows of one table:
``triton`` (closed-form chunk loss with the Triton row-stats / dz kernels, the CUDA default),
``eager`` (the same closed form in plain torch ops: the CPU path and the CUDA fallback) and
``autograd`` (per-chunk autograd, the reference; only for ``--autograd-divergences``).

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


def naive_topk_fkl(hidden, weight, stats):
    logp = torch.log_softmax((hidden @ weight.T).float(), -1)
    lT = stats.topk_logprobs
    return (lT.exp() * (lT - logp.gather(-1, stats.topk_ids))).sum(-1).mean()


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


def _label(name, support, mode, metrics=True):
    base = f"fused {name}" + ("" if name in ("k3", "pg", "sft") else
                              f" ({'top-k' if support == 'topk' else 'union'}+tail)")
    return base + ("" if metrics else ", metrics off") + f" [{mode}]"


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
    for h in [int(x) for x in a.hidden.split(",")]:
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
                variants = [not a.no_metrics]
                if mode == modes[0] and name == "forward_kl" and not a.no_metrics:
                    variants.append(False)  # one metrics-off row: the naive baseline computes none
                if mode == modes[0] and name == "forward_kl":
                    variants += [int(c) for c in a.extra_chunks.split(",") if c and int(c) != a.chunk]
                for var in variants:
                    metrics = var if isinstance(var, bool) else not a.no_metrics
                    chunk = a.chunk if isinstance(var, bool) else var
                    support = "topk" if name == "forward_kl" else "auto"
                    cfg = DistillLossConfig(divergence=name, chunk_size=chunk, support=support, metrics=metrics)
                    label = _label(name, support, mode, metrics) + ("" if chunk == a.chunk else f" C={chunk}")
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
    if cuda and "triton" in modes and not any(fused_kernels._STATE.values()):
        print("WARNING: the Triton kernels did not run (self-test failed or triton missing): "
              "the [triton] rows are the eager path")
    print(f"\nbench wall time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
