"""One rank of the two-rank gloo group that tests/test_teacher_tp.py starts (env RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): rank 0 scores the same items with the tensor-parallel engine and with
the plain one-process engine, for every model directory given and with prefix sharing / packing
on and off, and writes the largest differences per statistic to a JSON file; rank 1 follows."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from teacher_server import head as H
from teacher_server import tp
from teacher_server.engine import ScoreItem, ScoringEngine
from teacher_server.fp8 import quantize_body
from teacher_server.model import load_model

ALL = frozenset({H.SAMPLED, H.TOPK, H.TAIL, H.LSE, H.ENTROPY, H.EXTRA, H.FULL})


def make_items(vocab: int) -> list[ScoreItem]:
    """Samples sharing prompts (prefix sharing), lone sequences of uneven lengths, several k and
    temperatures, extra ids, every statistic; k = vocab on one item (a whole shard's top-k)."""
    rng = np.random.default_rng(0)
    items = []
    prompt = rng.integers(0, vocab, 24)
    for j, (n, k, t) in enumerate([(9, 5, 1.0), (13, 8, 0.7), (6, 5, 1.0)]):
        ids = np.concatenate([prompt, rng.integers(0, vocab, n)])
        extra = rng.integers(0, vocab, (n, 3))
        items.append(ScoreItem(f"p{j}", ids, len(prompt), len(ids), k, ALL, t, extra))
    for j, (n, k, t) in enumerate([(17, 3, 1.0), (30, 0, 1.3), (11, vocab, 1.0), (21, 16, 2.0)]):
        ids = rng.integers(0, vocab, n)
        stats = ALL if k else ALL - {H.TOPK}
        items.append(ScoreItem(f"s{j}", ids, 1, n, k, stats, t, None))
    return items


def diffs(got: list[dict], want: list[dict]) -> dict:
    out: dict[str, float] = {}
    for g, w in zip(got, want):
        assert set(g) == set(w), (sorted(g), sorted(w))
        for key, wv in w.items():
            if key.startswith("_"):
                continue
            gv = g[key]
            if key == "topk_ids":
                out["topk_ids_mismatch"] = out.get("topk_ids_mismatch", 0) + int((np.asarray(gv) != np.asarray(wv)).sum())
                continue
            d = np.abs(np.asarray(gv, np.float64) - np.asarray(wv, np.float64))
            d = np.where(np.isinf(np.asarray(gv)) & (np.asarray(gv) == np.asarray(wv)), 0.0, d)
            out[key] = max(out.get(key, 0.0), float(d.max()) if d.size else 0.0)
    return out


def main(out_path: str, *model_dirs: str) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tp._GROUP = tp.TPGroup(rank, world, rank, torch.device("cpu"), dist.new_group(backend="gloo"), [])
    report = {}
    for d in model_dirs:
        quant = d.startswith("fp8:")    # the body as fp8 (emulated on CPU) on both sides
        d = d.removeprefix("fp8:")
        model = tp.load_model(d, "fp32", "cpu")
        if quant:
            tp.quantize_body(model.get_decoder(), emulate=True)
        eng = tp.TPScoringEngine(model, group=tp.current(), device="cpu", compile="off", packing="on",
                                 prefix_min_tokens=8, max_batch_tokens=256, chunk_size=16, head_part_rows=20)
        if rank != 0:
            eng.serve_follower()
            continue
        one = load_model(d, "fp32", "cpu")
        if quant:
            quantize_body(one.get_decoder(), emulate=True)
        plain = ScoringEngine(one, device="cpu", compile="off", packing="on",
                              prefix_min_tokens=8, max_batch_tokens=256, chunk_size=16, head_part_rows=20)
        vocab = int(plain.weight.shape[0])
        cases = [(True, "on"), (True, "off"), (False, "on")] if eng.packing_active() else [(True, "off"), (False, "off")]
        if quant:
            cases = cases[:1]
        for prefix, packing in cases:
            for e in (eng, plain):
                e.prefix_sharing, e.packing = prefix, packing
            eng.stats.shared_prefix_tokens = 0
            got = eng.score(make_items(vocab), use_cache=False)
            want = plain.score(make_items(vocab), use_cache=False)
            r = diffs(got, want)
            r["shared_prefix_tokens"] = eng.stats.shared_prefix_tokens
            report[f"{'fp8 ' * quant}{plain.model.config.model_type}/prefix={prefix}/packing={packing}"] = r
        eng.stop_followers()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
