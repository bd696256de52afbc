"""One layer's attention over a packed batch, by kernel (CUDA only; prints a markdown table).

The teacher's packed path (`teacher_server/packed.py`) runs a whole batch as one row with a
tree-shaped mask through FlexAttention. This script times the alternatives that were measured
against it, so the numbers in docs/benchmarks.md ("fifth version") can be reproduced:

- flex: FlexAttention with the packed path's own BlockMask (what the server runs);
- varlen FA2: `aten._flash_attention_forward` over the tree's runs (each prefix, continuation or
  lone sequence is a run; a continuation's keys are its prompt's K/V gathered in front of its own,
  causal alignment bottom-right), checked against FlexAttention's output;
- cuDNN ragged: `aten._cudnn_attention_forward` with cumulative lengths on the same runs
  (`--ragged`; it aligns the diagonal top-left, so it is timed, not checked);
- cuDNN dense: SDPA on [B, H, L, D] tensors, causal (the plain path's kernel), and the two parts
  of a dense cascade for uniform groups (self part causal + cross part to the prompt).

Layouts: 8 distinct sequences of 2048 (plain), and G prompt groups of 1024 + 8 x 1024.
Shape: 32 query heads on 8 key/value heads of 128, bf16 (Qwen3-8B).

    PYTHONPATH=. python bench/bench_tree_attention.py [--groups 3] [--ragged]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=3, help="prompt groups in the tree layout")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--ragged", action="store_true", help="also time cuDNN's ragged mode (slow: ~50 ms per call)")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_tree_attention: needs a CUDA device", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from teacher_server import packed as PK
    from teacher_server import prefix as PX

    hq, hk, d, dt, dev = 32, 8, 128, torch.bfloat16, "cuda"
    scale = d ** -0.5
    rng = np.random.default_rng(0)

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / a.reps * 1e3

    def runs(lay):
        """(kv_index, cu_q, cu_k, longest run, most keys) of a packed layout."""
        t = lay.tokens
        starts = np.flatnonzero(lay.lo2 == np.arange(t))
        ends = np.append(starts[1:], t)
        keys = [np.concatenate([np.arange(lay.lo1[s], lay.hi1[s]), np.arange(s, e)]) for s, e in zip(starts, ends)]
        cu_k = np.concatenate([[0], np.cumsum([len(k) for k in keys])])
        put = lambda x: torch.from_numpy(np.asarray(x)).to(dev)  # noqa: E731
        return (put(np.concatenate(keys).astype(np.int64)), put(np.append(starts, t).astype(np.int32)),
                put(cu_k.astype(np.int32)), int((ends - starts).max()), int(max(len(k) for k in keys)))

    flex = torch.compile(flex_attention, dynamic=True)
    layouts = [("8 x 2048 distinct", [rng.integers(0, 999, 2048) for _ in range(8)])]
    tree = []
    for _ in range(a.groups):
        prompt = rng.integers(0, 999, 1024)
        tree += [np.concatenate([prompt, rng.integers(0, 999, 1024)]) for _ in range(8)]
    layouts.append((f"{a.groups} x (1024 + 8 x 1024) packed", tree))
    rows = []
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}", flush=True)
    with torch.inference_mode():
        for name, seqs in layouts:
            lay = PK.plan_layout(seqs, PX.plan_groups(seqs, 16))
            t = lay.tokens
            q = torch.randn(t, hq, d, device=dev, dtype=dt)
            k = torch.randn(t, hk, d, device=dev, dtype=dt)
            v = torch.randn_like(k)
            doc, seg = (torch.from_numpy(x).to(dev) for x in (lay.doc, lay.seg))
            bm = PK.block_mask(lay, doc, seg)
            bhd = lambda x: x.transpose(0, 1)[None]  # noqa: E731
            run_flex = lambda: flex(bhd(q), bhd(k), bhd(v), block_mask=bm, scale=scale, enable_gqa=True)  # noqa: E731
            kv, cu_q, cu_k, mq, mk = runs(lay)

            def run_fa2():
                kk, vv = k.index_select(0, kv), v.index_select(0, kv)
                return torch.ops.aten._flash_attention_forward(q, kk, vv, cu_q, cu_k, mq, mk, 0.0, True, False,
                                                               scale=scale)[0]

            ref = run_flex()[0].transpose(0, 1)
            err = (run_fa2().float() - ref.float())[: lay.real_tokens].abs().max().item()
            rows.append((name, "FlexAttention + BlockMask (the server's)", timed(run_flex), ""))
            rows.append((name, "varlen FA2 over the runs (K/V gathered)", timed(run_fa2),
                         f"max abs diff vs flex {err:.3g}"))
            if a.ragged:
                def run_ragged():
                    kk, vv = k.index_select(0, kv), v.index_select(0, kv)
                    return torch.ops.aten._cudnn_attention_forward(q, kk, vv, None, cu_q, cu_k, mq, mk, False, 0.0,
                                                                   True, False, scale=scale)[0]
                try:
                    rows.append((name, "cuDNN ragged over the runs", timed(run_ragged), "top-left causal: timing only"))
                except RuntimeError as exc:
                    rows.append((name, "cuDNN ragged over the runs", float("nan"), f"failed: {exc}"[:80]))
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                sdpa = torch.nn.functional.scaled_dot_product_attention
                if name.startswith("8 x"):
                    qs, ks = (torch.randn(8, h, 2048, d, device=dev, dtype=dt) for h in (hq, hk))
                    rows.append((name, "cuDNN dense SDPA, causal [8, 32, 2048, 128]",
                                 timed(lambda: sdpa(qs, ks, ks, is_causal=True, enable_gqa=True)), "the plain path"))
                else:
                    g = a.groups
                    qs, ks = (torch.randn(9 * g, h, 1024, d, device=dev, dtype=dt) for h in (hq, hk))
                    qc = torch.randn(g, hq, 8 * 1024, d, device=dev, dtype=dt)
                    kc = torch.randn(g, hk, 1024, d, device=dev, dtype=dt)
                    rows.append((name, f"cuDNN dense, self part: causal [{9 * g}, 32, 1024, 128]",
                                 timed(lambda: sdpa(qs, ks, ks, is_causal=True, enable_gqa=True)), "cascade, part 1"))
                    rows.append((name, f"cuDNN dense, cross part: [{g}, 32, 8192] x [1024]",
                                 timed(lambda: sdpa(qc, kc, kc, enable_gqa=True)), "cascade, part 2 (+ a merge)"))
    print("\n| layout | kernel | ms per layer | notes |\n|---|---|---|---|")
    for name, kern, ms, note in rows:
        print(f"| {name} | {kern} | {ms:.2f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
