"""Does `--quantize fp8` change what a trained teacher knows? The demo teacher (trained on 2-digit
addition by `opd demo`, cached), exact vs with its body's linear layers quantised to fp8 e4m3:
greedy task accuracy on the demo's 256 evaluation problems, and the distance between the two
teachers' statistics (`teacher_server.fp8.distance`) on the exact teacher's own responses.

Runs on the CPU: the quantised GEMM is emulated there with the same fp8 operands and scales
(`FP8Linear(emulate=True)`), which is what `torch._scaled_mm` computes up to accumulation order.

    PYTHONPATH=. python bench/bench_fp8_quality.py            # trains the demo teacher first if not cached
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=os.environ.get("OPD_CACHE", str(Path.home() / ".cache" / "opd" / "demo")))
    p.add_argument("--eval-size", type=int, default=256)
    a = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from opd import demo_models, generation, model_cache
    from rollout.tasks.encoding import max_new_tokens_for, prompt_ids
    from teacher_server import fp8
    from teacher_server.engine import ScoreItem, ScoringEngine

    torch.manual_seed(0)
    t0 = time.perf_counter()
    tdir = demo_models.prepare_teacher(a.cache_dir, log=None)
    tok = model_cache.load_tokenizer(tdir)
    examples = demo_models.eval_examples(n=a.eval_size)
    exact = AutoModelForCausalLM.from_pretrained(str(tdir)).eval()
    quant = AutoModelForCausalLM.from_pretrained(str(tdir)).eval()
    n = fp8.quantize_body(quant.get_decoder(), emulate=True)
    acc = {name: demo_models.evaluate_accuracy(m, tok, examples) for name, m in (("exact", exact), ("fp8", quant))}
    # statistics on the exact teacher's own greedy responses (prompt + response, scored from the response)
    rows = generation.generate_responses(exact, tok, examples, max_new_tokens=max_new_tokens_for(tok, examples))
    prompts = [prompt_ids(tok, ex) for ex in examples]
    seqs = [np.asarray(p + r, dtype=np.int64) for p, r in zip(prompts, rows)]
    starts = [len(p) for p in prompts]
    k = 16

    def score(model):
        eng = ScoringEngine(model, max_batch_tokens=1 << 16)
        return eng.score([ScoreItem(f"r{i}", s, st, len(s), top_k=k, stats=frozenset({"sampled", "topk", "lse"}))
                          for i, (s, st) in enumerate(zip(seqs, starts))], use_cache=False)

    d = fp8.distance(score(exact), score(quant))
    print(f"### fp8 body vs exact (fp32) body: the demo teacher ({sum(p.numel() for p in exact.parameters()) / 1e6:.2f}M "
          f"params, {n} linear layers quantised), CPU emulation, {time.perf_counter() - t0:.0f}s\n")
    print("| measurement | exact | fp8 |\n|---|---|---|")
    print(f"| greedy accuracy, {len(examples)} problems | {acc['exact']:.3f} | {acc['fp8']:.3f} |")
    print(f"\nStatistics on the exact teacher's {d['positions']:,} response positions: sampled log-prob |delta| "
          f"mean {d['sampled_abs_mean']:.4f}, p99 {d['sampled_abs_p99']:.4f}; KL(exact || fp8) over the exact top-{k} "
          f"{d['topk_kl_mean']:.2e} nats; top-1 agreement {d['top1_agree']:.3f}; top-{k} id overlap {d['topk_overlap']:.3f}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
