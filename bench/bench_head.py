"""The teacher's statistics head alone: its time beside the lm-head GEMM, and where the rest goes.

Random hidden states [rows, hidden] and lm-head weight [vocab, hidden] (default the Qwen3-8B head:
16,384 rows, hidden 4096, vocab 151,936, bf16), `teacher_server.head.head_statistics` with top-k,
the sampled log-prob and the tail mass, chunked like the server. Prints a markdown table of the
median times and the device's top kernels (torch.profiler) of one call.

GPU:  PYTHONPATH=. python bench/bench_head.py
CPU:  PYTHONPATH=. python bench/bench_head.py --device cpu --rows 512 --hidden 128 --vocab 4096
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from teacher_server import head as H  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--chunk", type=int, default=2048, help="head chunk rows (the server's --chunk-size)")
    p.add_argument("--compiled", choices=["auto", "on", "off"], default="auto",
                   help="compiled row reduction (auto = on CUDA, as the server does)")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    compiled = a.compiled == "on" or (a.compiled == "auto" and cuda)
    g = torch.Generator(device=dev).manual_seed(0)
    hid = torch.randn(a.rows, a.hidden, device=dev, generator=g).bfloat16()
    w = (torch.randn(a.vocab, a.hidden, device=dev, generator=g) * a.hidden ** -0.5).bfloat16()
    req = H.HeadRequest(hidden=hid, targets=torch.randint(0, a.vocab, (a.rows,), device=dev, generator=g),
                        temperature=None, top_k=a.top_k, row_k=None, extra_ids=None,
                        stats=frozenset({H.SAMPLED, H.TOPK, H.TAIL}))

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def timed(fn):
        fn()
        sync()
        ts = []
        for _ in range(a.reps):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return 1e3 * statistics.median(ts)

    def gemm():
        for s in range(0, a.rows, a.chunk):
            torch.matmul(hid[s:s + a.chunk], w.t())

    from teacher_server import kernels as K

    kernels = K.available(w)
    head_ms = timed(lambda: H.head_statistics(req, w, a.chunk, compiled=compiled))
    saved, K.KERNELS = K.KERNELS, "eager"   # the torch path, for comparison
    try:
        torch_ms = timed(lambda: H.head_statistics(req, w, a.chunk, compiled=compiled)) if kernels else head_ms
    finally:
        K.KERNELS = saved
    gemm_ms = timed(gemm)
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(f"### Teacher head: {a.rows} rows x hidden {a.hidden} x vocab {a.vocab}, top-{a.top_k}, chunk {a.chunk}, "
          f"bf16, compiled={compiled}, Triton kernels={kernels}, on {name} (torch {torch.__version__})\n")
    print("| part | ms |\n|---|---|")
    print(f"| head (sampled + top-k + tail), {'Triton kernels' if kernels else 'torch'} | {head_ms:.1f} |")
    if kernels:
        print(f"| head, torch reductions ({'compiled' if compiled else 'eager'}; OPD_TEACHER_KERNELS=eager) | {torch_ms:.1f} |")
    print(f"| lm-head GEMM alone | {gemm_ms:.1f} |")
    print(f"| the rest | {head_ms - gemm_ms:.1f} |\n")
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        H.head_statistics(req, w, a.chunk, compiled=compiled)
        sync()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
