"""Benchmark the fused-head distillation losses: time of forward+backward and peak extra memory.

Compares every divergence of student_trainer.losses against (a) a naive top-k forward KL that
materialises the full [tokens x vocab] logits (full log_softmax + gather) and (b) Liger-Kernel's
LigerFusedLinearJSD when ``liger_kernel`` imports (teacher hidden = student hidden; it also runs
the teacher's head, which our losses never do: the teacher sends statistics).

GPU (defaults: 16,384 tokens, vocab 151,936, hidden 2048 and 4096, bf16, top-64):
    python bench/bench_losses.py          # after `pip install -e .`, else prefix PYTHONPATH=.
CPU smoke:
    python bench/bench_losses.py --tokens 512 --vocab 4096 --hidden 128 --device cpu

``--grad-modes analytic,autograd`` adds rows for the autograd-per-chunk reference path
(``student_trainer.losses.distill.GRAD_MODE``) in the same run, for a before/after on one card.

Peak extra memory = torch.cuda.max_memory_allocated() during the call minus the memory allocated
after the inputs exist (n/a on CPU). Times are medians over --iters after one warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import importlib

import torch

from student_trainer.losses import DistillLossConfig, TeacherStats, distill_loss

distill_mod = importlib.import_module("student_trainer.losses.distill")

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
    old = distill_mod.GRAD_MODE
    distill_mod.GRAD_MODE = mode
    try:
        return fn()
    finally:
        distill_mod.GRAD_MODE = old


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", default="2048,4096", help="comma-separated list")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--divergences", default="forward_kl,reverse_kl,jsd,skew_reverse_kl,tv,k3,pg,sft")
    p.add_argument("--no-metrics", action="store_true", help="skip entropy/overlap metrics in the pass")
    p.add_argument("--grad-modes", default="analytic", help="comma-separated: analytic,autograd")
    a = p.parse_args(argv)
    dtype = DTYPES[a.dtype]
    print(f"device={a.device} tokens={a.tokens} vocab={a.vocab} dtype={a.dtype} topk={a.topk} chunk={a.chunk}")
    print("| hidden | loss | time s | peak extra GiB | time vs naive | mem vs naive | time vs Liger | mem vs Liger |")
    print("|---|---|---|---|---|---|---|---|")
    for h in [int(x) for x in a.hidden.split(",")]:
        hidden, weight, targets, stats = make_inputs(a.tokens, a.vocab, h, a.topk, dtype, a.device)
        rows = [("naive top-k forward KL (full logits)", lambda: naive_topk_fkl(hidden, weight, stats))]
        lig = liger_row(hidden, weight)
        if lig is not None:
            rows.append(("Liger fused linear JSD", lig))
        for mode in a.grad_modes.split(","):
            suffix = "" if mode == "analytic" else f" [{mode}]"
            for name in a.divergences.split(","):
                support = "topk" if name == "forward_kl" else "auto"
                cfg = DistillLossConfig(divergence=name, chunk_size=a.chunk, support=support,
                                        metrics=not a.no_metrics)
                label = (f"fused {name} ({'top-k' if support == 'topk' else 'union'}+tail)" if name not in
                         ("k3", "pg", "sft") else f"fused {name}") + suffix
                rows.append((label, lambda cfg=cfg, mode=mode: _with_mode(
                    mode, lambda: distill_loss(hidden, weight, targets, stats, None, cfg)[0])))
        res = {}
        for label, fn in rows:
            res[label] = measure(fn, [hidden, weight], a.device, a.iters)
        naive = res[rows[0][0]]
        liger = res.get("Liger fused linear JSD", ("n/a", "n/a"))
        for label, (t, m) in res.items():
            print(f"| {h} | {label} | {fmt(t)} | {fmt(m, 2)} | {ratio(t, naive[0])} | {ratio(m, naive[1])} | "
                  f"{ratio(t, liger[0])} | {ratio(m, liger[1])} |")
        del hidden, weight, targets, stats


if __name__ == "__main__":
    main()
