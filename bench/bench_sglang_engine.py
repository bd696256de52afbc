"""opd's own engine vs the SGLang-fronted one (`opd teacher --engine sglang`): the same scoring,
through each engine's `score()` (no gRPC: the engines only), statistics cache off.

Work: P prompts x S samples (prompt L_p tokens, samples L_s tokens, the samples' tokens scored),
sampled + top-k k + tail. Rows:
  hf        ScoringEngine on --model (--device, --dtype), one process;
  sglang    SGLangScoringEngine against --sglang-url (a real SGLang server serving the same model), or,
            without --sglang-url, against `opd rollout-server`'s service started in this process on
            --model (CPU: the stand-in's HF forward, one sequence at a time: a check that the path runs
            and what the JSON costs, not SGLang's speed).
tokens/s = sequence tokens / median seconds over --repeats runs (after one warm-up). Prints a
markdown table; --out writes the results as JSON.

CPU, tiny model (stand-in):
    opd tiny-model /tmp/tiny && PYTHONPATH=. python bench/bench_sglang_engine.py --model /tmp/tiny
GPU (the lead): a real SGLang server on the same model, then
    python -m sglang.launch_server --model-path /ckpt/qwen3-8b --port 30000 --mem-fraction-static 0.5 &
    # (the hf row loads the model on the same GPU; or run SGLang on a second GPU)
    PYTHONPATH=. python bench/bench_sglang_engine.py --model /ckpt/qwen3-8b --device cuda --dtype bf16 \\
        --sglang-url http://127.0.0.1:30000 --prompts 16 --samples 8 --prompt-len 1024 --sample-len 1024 --out sg.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def items(args, vocab):
    import numpy as np

    from teacher_server import head as H
    from teacher_server.engine import ScoreItem

    rng = np.random.default_rng(0)
    out = []
    for p in range(args.prompts):
        prompt = rng.integers(3, vocab, args.prompt_len)
        for s in range(args.samples):
            ids = np.concatenate([prompt, rng.integers(3, vocab, args.sample_len)]).astype(np.int64)
            out.append(ScoreItem(f"p{p}s{s}", ids, args.prompt_len, len(ids), args.top_k,
                                 frozenset({H.SAMPLED, H.TOPK, H.TAIL})))
    return out


def timed(engine, args, vocab):
    engine.score(items(args, vocab)[:2], use_cache=False)   # warm-up
    times = []
    for _ in range(args.repeats):
        work = items(args, vocab)
        t = time.perf_counter()
        engine.score(work, use_cache=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--sglang-url", default=None, help="a real SGLang server on --model (default: the stand-in)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--sample-len", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from teacher_server.app import TeacherConfig, build_server
    from teacher_server.service import ServerConfig
    from teacher_server.sglang_engine import SGLangScoringEngine

    srv = build_server(TeacherConfig(model=args.model, dtype=args.dtype, device=args.device, server=ServerConfig(port=0)))
    vocab = srv.servicer.limits.vocab_size
    rows = [("hf", timed(srv.engine, args, vocab))]
    srv.server.stop(0)
    thread = None
    url = args.sglang_url
    if url is None:
        from rollout.local_engine import LocalEngine
        from rollout.server import RolloutService, ServerThread

        local = LocalEngine.from_pretrained(args.model)
        thread = ServerThread(RolloutService(local, args.model))
        url = thread.__enter__()
    try:
        eng = SGLangScoringEngine(url.split(","), vocab_size=vocab)
        rows.append(("sglang" + ("" if args.sglang_url else " (stand-in)"), timed(eng, args, vocab)))
    finally:
        if thread is not None:
            thread.__exit__(None, None, None)
    tokens = args.prompts * args.samples * (args.prompt_len + args.sample_len)
    print(f"| engine | seconds (median of {args.repeats}) | tokens/s |")
    print("|---|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.3f} | {tokens / sec:,.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": platform.platform(), "rows": [
                {"engine": n, "seconds": s, "tokens_per_s": tokens / s} for n, s in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
