"""Benchmark the teacher server against a plain forward and the matmul roofline.

Builds a random-weight Qwen3-shaped model from a config (default: the Qwen3-8B shape, bf16),
starts the teacher server IN-PROCESS on 127.0.0.1 and measures in one run:
  (a) the bf16 matmul rate ([n x n] @ [n x n]); roofline tokens/s = rate / (2 x matmul params)
      where matmul params = all parameters except the input embedding (a lookup, no FLOPs);
      attention FLOPs are left out of the roofline (~4% at 2k tokens for the 8B shape);
  (b) the plain baseline: `model.model(ids)` + a chunked lm-head / log_softmax / top-k over every
      position (chunk 2048 rows), no server;
  (c) end to end: TeacherClient -> gRPC on 127.0.0.1 -> server -> client decode, the same sequences,
      target_start=1, top-k, sampled+topk+tail; bytes/token on the wire for every value encoding
      and compression;
  (d) prompt-prefix sharing: P prompts x n samples (score the responses; tokens/s counted over
      prompt + response tokens of every sequence), sharing on and off;
  (e) a repeated batch served from the statistics cache.
Prints markdown tables; --out writes everything as JSON.

GPU (H100, ~3-5 min incl. ~1 min model build):
    PYTHONPATH=. python bench/bench_teacher.py --device cuda --out bench_teacher.json
CPU smoke test:
    PYTHONPATH=. python bench/bench_teacher.py --shape tiny --device cpu --out /tmp/bt.json
Needs the project's runtime deps (torch, transformers, grpcio, protobuf, zstandard, numpy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, max_position_embeddings=40960,
                     rope_theta=1000000.0),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144, max_position_embeddings=40960,
                       rope_theta=1000000.0),
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=384, max_position_embeddings=8192, rope_theta=10000.0),
}
# sizes per shape: seqs x seq_len (b, c, e); prompts x samples x (prompt_len + response_len) (d); matmul n (a)
SIZES = {
    "full": dict(seqs=8, seq_len=2048, prompts=16, samples=8, prompt_len=1024, response_len=1024, matmul=8192),
    "tiny": dict(seqs=8, seq_len=256, prompts=4, samples=4, prompt_len=128, response_len=128, matmul=512),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--seqs", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--response-len", type=int, default=None)
    p.add_argument("--matmul-size", type=int, default=None)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median) after one warm-up")
    p.add_argument("--prefix-reps", type=int, default=1, help="timed repetitions of the prefix-shared case")
    p.add_argument("--chunk", type=int, default=2048, help="head chunk rows (baseline and server)")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--skip", default="", help="comma list of sections to skip: a,b,c,d,e,wire")
    a = p.parse_args(argv)
    sizes = SIZES["tiny" if a.shape == "tiny" else "full"]
    for k, v in sizes.items():
        attr = "matmul_size" if k == "matmul" else k
        if getattr(a, attr) is None:
            setattr(a, attr, v)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import zstandard  # noqa: F401  (the server's codec needs it)
    except ImportError:
        print("bench_teacher: the teacher server needs `zstandard` (pip install zstandard)", file=sys.stderr)
        return 2
    import numpy as np
    import torch
    import transformers
    from transformers import Qwen3Config

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from teacher_server.app import TeacherConfig, build_server
    from teacher_server.cache import StatsCache
    from teacher_server.client import ScoreSettings, TeacherClient
    from teacher_server.service import ServerConfig

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench_teacher: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def timed(fn, reps):
        fn()  # warm-up
        sync()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), ts

    R: dict = {"args": vars(args), "env": {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
        "threads": torch.get_num_threads()}, "errors": {}}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(R, f, indent=2, default=str)

    def section(name, fn):
        if name in skip:
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # keep the other numbers if one section fails
            R["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"[{name}] FAILED: {exc}", file=sys.stderr, flush=True)
        print(f"[{name}] {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
        save()

    # ---- (a) matmul rate ---------------------------------------------------------------------
    def matmul():
        n = args.matmul_size
        x = torch.randn(n, n, device=dev, dtype=dtype)
        y = torch.randn(n, n, device=dev, dtype=dtype)
        iters = 20 if cuda else 3
        med, _ = timed(lambda: [torch.matmul(x, y) for _ in range(iters)], args.reps)
        R["matmul"] = {"n": n, "tflops": 2 * n ** 3 * iters / med / 1e12}
        del x, y

    section("a", matmul)

    # ---- the server (builds the random-weight model on the device) ----------------------------
    tmp = tempfile.mkdtemp(prefix="opd-bench-")
    cfg = Qwen3Config(**SHAPES[args.shape], tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=None, eos_token_id=None)
    cfg.save_pretrained(tmp)
    t = time.perf_counter()
    srv = build_server(TeacherConfig(model=tmp, dtype=args.dtype, device=args.device, random_weights_seed=0,
                                     max_batch_tokens=args.max_batch_tokens, chunk_size=args.chunk,
                                     max_top_k=max(256, args.top_k), max_queue_tokens=1 << 22,
                                     server=ServerConfig(port=0, max_inflight_per_call=1024)))
    srv.start()
    srv.warm_up_and_serve()
    R["build_seconds"] = time.perf_counter() - t
    eng = srv.engine
    model = eng.model
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    R["params"] = {"total": n_params, "matmul": n_params - n_embed}
    if "matmul" in R:
        R["roofline_tokens_per_s"] = R["matmul"]["tflops"] * 1e12 / (2 * (n_params - n_embed))
    url = f"127.0.0.1:{srv.port}"
    client = TeacherClient(url, timeout_s=1800)
    V, K = cfg.vocab_size, args.top_k
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, V, size=(args.seqs, args.seq_len))
    n_tok = seqs.size
    print(f"model {args.shape}: {n_params / 1e9:.3f}B params, built in {R['build_seconds']:.1f}s on {R['env']['device']}",
          file=sys.stderr, flush=True)

    # ---- (b) plain forward + chunked top-k ----------------------------------------------------
    def baseline():
        ids = torch.as_tensor(seqs, device=dev)
        W = model.get_output_embeddings().weight

        @torch.inference_mode()
        def body():
            return model.model(input_ids=ids, use_cache=False).last_hidden_state

        @torch.inference_mode()
        def full():
            h = body().reshape(-1, W.shape[1])
            for s in range(0, h.shape[0], args.chunk):
                logp = torch.log_softmax(torch.matmul(h[s:s + args.chunk], W.t()).float(), dim=-1)
                torch.topk(logp, K, dim=-1)

        med_body, _ = timed(body, args.reps)
        med, ts = timed(full, args.reps)
        R["baseline"] = {"tokens": n_tok, "seconds": med, "all_seconds": ts, "tokens_per_s": n_tok / med,
                         "body_seconds": med_body, "body_tokens_per_s": n_tok / med_body,
                         "body_tflops": 2 * (n_params - n_embed - W.numel()) * n_tok / med_body / 1e12}
        if cuda:
            R["baseline"]["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30

    section("b", baseline)

    def run_client(settings, s=seqs, starts=None):
        starts = [1] * len(s) if starts is None else starts
        t = time.perf_counter()
        out = client.score(list(s), starts, settings=settings)
        return time.perf_counter() - t, out

    # ---- (c) end to end through gRPC ----------------------------------------------------------
    base_settings = ScoreSettings(top_k=K, statistics=("sampled", "topk", "tail"), value_encoding="bf16",
                                  compression="zstd")

    def e2e():
        eng.cache = None
        busy0, n0 = eng.stats.busy_seconds, eng.stats.batches
        med, ts = timed(lambda: run_client(base_settings), args.reps)
        busy = (eng.stats.busy_seconds - busy0) / (args.reps + 1)
        _, out = run_client(base_settings)
        positions = sum(o.num_positions for o in out)
        R["e2e"] = {"tokens": n_tok, "seconds": med, "all_seconds": ts, "tokens_per_s": n_tok / med,
                    "server_busy_seconds": busy, "server_tokens_per_s": n_tok / busy if busy else None,
                    "batches_per_call": (eng.stats.batches - n0) / (args.reps + 2),
                    "bytes_per_token": sum(o.wire_bytes for o in out) / positions}

    section("c", e2e)

    def sustained():
        # Two clients (e.g. two trainers) each send the 8 x 2048 batch `reps` times at once: the
        # server overlaps one call's encode/transfer with the next call's forward.
        import threading

        clients = [TeacherClient(url, timeout_s=1800) for _ in range(2)]
        t = time.perf_counter()
        threads = [threading.Thread(target=lambda c=c: [c.score(list(seqs), [1] * len(seqs), settings=base_settings)
                                                        for _ in range(args.reps)]) for c in clients]
        [th.start() for th in threads]
        [th.join() for th in threads]
        dt = time.perf_counter() - t
        R["sustained"] = {"clients": 2, "calls": 2 * args.reps, "tokens": 2 * args.reps * n_tok, "seconds": dt,
                          "tokens_per_s": 2 * args.reps * n_tok / dt}
        [c.close() for c in clients]

    section("sustained", sustained)

    def wire():
        rows = []
        for enc in ("fp32", "bf16", "q16", "q8"):
            for comp in ("zstd", "none"):
                st = ScoreSettings(top_k=K, statistics=("sampled", "topk", "tail"), value_encoding=enc, compression=comp)
                dt, out = run_client(st)
                positions = sum(o.num_positions for o in out)
                rows.append({"encoding": enc, "compression": comp, "seconds": dt, "tokens_per_s": n_tok / dt,
                             "bytes_per_token": sum(o.wire_bytes for o in out) / positions})
        R["wire"] = rows

    section("wire", wire)

    # ---- (d) prompt-prefix sharing ------------------------------------------------------------
    def prefix_case():
        prompts = rng.integers(0, V, size=(args.prompts, args.prompt_len))
        pseqs = [np.concatenate([prompts[i], rng.integers(0, V, size=args.response_len)])
                 for i in range(args.prompts) for _ in range(args.samples)]
        starts = [args.prompt_len] * len(pseqs)
        tokens = sum(len(x) for x in pseqs)
        warm = [pseqs[i * args.samples + j] for i in range(min(2, args.prompts)) for j in range(min(2, args.samples))]
        out = {"sequences": len(pseqs), "tokens": tokens, "scored_positions": len(pseqs) * args.response_len}
        eng.cache = None
        for on in (True, False):
            eng.prefix_sharing = on
            run_client(base_settings, warm, [args.prompt_len] * len(warm))
            sync()
            shared0, fwd0 = eng.stats.shared_prefix_tokens, eng.stats.forward_tokens
            ts = []
            for _ in range(args.prefix_reps):
                dt, _ = run_client(base_settings, pseqs, starts)
                ts.append(dt)
            med = statistics.median(ts)
            out["on" if on else "off"] = {
                "seconds": med, "all_seconds": ts, "tokens_per_s": tokens / med,
                "forward_tokens": (eng.stats.forward_tokens - fwd0) / args.prefix_reps,
                "shared_prefix_tokens": (eng.stats.shared_prefix_tokens - shared0) / args.prefix_reps}
        eng.prefix_sharing = True
        R["prefix"] = out

    section("d", prefix_case)

    # ---- (e) the statistics cache -------------------------------------------------------------
    def cached():
        eng.cache = StatsCache(8 << 30)
        run_client(base_settings)  # fills the cache (misses)
        h0 = eng.stats.cache_hits
        med, ts = timed(lambda: run_client(base_settings), args.reps)
        R["cache"] = {"seconds": med, "all_seconds": ts, "tokens_per_s": n_tok / med,
                      "hits": eng.stats.cache_hits - h0, "bytes": eng.stats.cache_bytes,
                      "bytes_per_token": eng.stats.cache_bytes / max(1, eng.stats.cache_entries * (args.seq_len - 1))}
        eng.cache = None

    section("e", cached)

    client.close()
    srv.stop(1)
    save()
    print(report(R, args))
    return 0 if not R["errors"] else 1


def report(R, args) -> str:
    base = R.get("baseline", {}).get("tokens_per_s")
    roof = R.get("roofline_tokens_per_s")

    def ratio(x, ref):
        return f"{x / ref:.2f}x" if x and ref else "n/a"

    lines = [f"### Teacher server: {args.shape} (random weights, {args.dtype}) on {R['env']['device']}", "",
             f"torch {R['env']['torch']}, transformers {R['env']['transformers']}; "
             f"{R['params']['total'] / 1e9:.3f}B params ({R['params']['matmul'] / 1e9:.3f}B in matmuls); "
             f"top-{args.top_k}; model build {R.get('build_seconds', 0):.0f}s.", ""]
    if "matmul" in R:
        lines.append(f"Matmul rate: {R['matmul']['tflops']:.3g} TFLOP/s (bf16 {R['matmul']['n']}^3); "
                     f"roofline {roof:,.0f} tokens/s = rate / (2 x matmul params).")
        lines.append("")
    lines += ["| measurement | tokens/s | vs plain forward | vs roofline | notes |", "|---|---|---|---|---|"]
    b = R.get("baseline")
    shape = f"{args.seqs} x {args.seq_len}"
    if b:
        lines.append(f"| plain body only | {b['body_tokens_per_s']:,.0f} | | {ratio(b['body_tokens_per_s'], roof)} | "
                     f"{shape}, {b['body_tflops']:.3g} TFLOP/s |")
        lines.append(f"| plain forward + chunked top-{args.top_k} | {b['tokens_per_s']:,.0f} | 1.00x | {ratio(b['tokens_per_s'], roof)} | "
                     f"{shape}, every position |")
    e = R.get("e2e")
    if e:
        srv = f", server busy {e['server_tokens_per_s']:,.0f} tok/s" if e.get("server_tokens_per_s") else ""
        lines.append(f"| end to end (gRPC, bf16 + zstd) | {e['tokens_per_s']:,.0f} | {ratio(e['tokens_per_s'], base)} | "
                     f"{ratio(e['tokens_per_s'], roof)} | {shape}, sampled+top-k+tail, {e['bytes_per_token']:.0f} B/token{srv} |")
    su = R.get("sustained")
    if su:
        lines.append(f"| end to end, 2 clients at once | {su['tokens_per_s']:,.0f} | {ratio(su['tokens_per_s'], base)} | "
                     f"{ratio(su['tokens_per_s'], roof)} | {su['calls']} calls of {shape} in {su['seconds']:.1f}s |")
    p = R.get("prefix")
    if p:
        for mode in ("off", "on"):
            if mode in p:
                m = p[mode]
                lines.append(f"| prefix sharing {mode} | {m['tokens_per_s']:,.0f} | {ratio(m['tokens_per_s'], base)} | "
                             f"{ratio(m['tokens_per_s'], roof)} | {args.prompts} prompts x {args.prompt_len} x "
                             f"{args.samples} samples x {args.response_len}; body ran {m['forward_tokens']:,.0f} of "
                             f"{p['tokens']:,} tokens |")
    c = R.get("cache")
    if c:
        lines.append(f"| repeated batch from the cache | {c['tokens_per_s']:,.0f} | {ratio(c['tokens_per_s'], base)} | "
                     f"{ratio(c['tokens_per_s'], roof)} | {shape}, {c['hits']} hits, {c['bytes_per_token']:.0f} B/token held |")
    if R.get("wire"):
        lines += ["", "| value encoding | compression | bytes/token | tokens/s end to end |", "|---|---|---|---|"]
        for w in R["wire"]:
            lines.append(f"| {w['encoding']} | {w['compression']} | {w['bytes_per_token']:.1f} | {w['tokens_per_s']:,.0f} |")
    if R["errors"]:
        lines += ["", "Failed sections: " + ", ".join(sorted(R["errors"]))]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
