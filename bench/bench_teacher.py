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
  (e) a repeated batch served from the statistics cache;
  (L) levers, engine level (no gRPC), 8 x 2048, device-synchronised body / head split: eager body +
      old head, eager body + new head, + compiled head, + compiled body (compile times reported);
  (d_eager) prefix sharing on / off with the eager body (before anything is compiled);
  (u) uneven lengths (--uneven-seqs sequences, lengths uniform in [seq_len/8, seq_len]):
      split_uneven on / off, engine level;
  (r) a rollout-shaped batch, engine level, prefix sharing off / on as served: --rl-prompts
      prompts behind one shared system prompt (seq_len/40 tokens), user parts uniform in
      [seq_len/32, seq_len/2], --samples samples each with responses uniform in
      [seq_len/64, 3 seq_len/4] (the span starts at the response);
  (c) also gives a per-component split of one 8 x 2048 call: body, head, device->host copy + result
      slicing, encode (server, incl. protobuf serialisation), decode (client, incl. parsing), and
      the rest (gRPC transport, queueing, threads);
  (p) a teacher server in its OWN process (`python -m opd teacher`, started at the beginning so its
      build and compile overlap the in-process sections; default options = compile auto): end to
      end 8 x 2048, two clients at once (sustained), and prefix sharing through gRPC.
Prints markdown tables; --out writes everything as JSON. --skip drops sections
(a, b, L, d_eager, d, u, r, c, wire, e, p).

GPU (H100, ~5-6 min incl. ~1 min model build and the compiles):
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
STREAM_BATCHES = 4  # the streamed end-to-end rows send this many batches' worth of distinct sequences
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
    p.add_argument("--max-batch-tokens", type=int, default=32768,
                   help="the server's token budget per forward (32,768: what `opd teacher` picks by default on an 80 GB GPU)")
    p.add_argument("--quantize", default="none", choices=["none", "fp8"],
                   help="the teacher's --quantize (fp8: every row measures the fp8 body; section q compares its "
                        "statistics with the bf16 teacher's on the same weights)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: a,b,L,d_eager,d,u,r,c,wire,e,q,p")
    p.add_argument("--uneven-seqs", type=int, default=16, help="sequences of the uneven-length section (u)")
    p.add_argument("--rl-prompts", type=int, default=24, help="prompts of the rollout-shaped section (r)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for the compiled rows (default: inductor on CUDA, eager on CPU)")
    p.add_argument("--proc-late", action="store_true",
                   help="start the separate-process server only when section p runs (no overlap with the others)")
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
    from teacher_server.client import ScoreSettings, TeacherClient, TeacherStats
    from teacher_server.engine import ScoreItem, ScoringEngine
    from teacher_server.service import ServerConfig, encode_result
    from teacher_server.wire import pb

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

    def timed(fn, reps, warm=True):
        if warm:
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
        if args.quantize == "fp8" and cuda:  # the fp8 GEMM's own rate (rowwise scales, as the body uses)
            xq, yq = x.to(torch.float8_e4m3fn), y.t().contiguous().to(torch.float8_e4m3fn).t()
            sa, sb = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)
            med8, _ = timed(lambda: [torch._scaled_mm(xq, yq, scale_a=sa, scale_b=sb, out_dtype=dtype)
                                     for _ in range(iters)], args.reps)
            R["matmul"]["fp8_tflops"] = 2 * n ** 3 * iters / med8 / 1e12
            del xq, yq
        del x, y

    section("a", matmul)

    # ---- the model config; the separate-process server starts now (its build overlaps ours) ----
    tmp = tempfile.mkdtemp(prefix="opd-bench-")
    cfg = Qwen3Config(**SHAPES[args.shape], tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=None, eos_token_id=None)
    cfg.save_pretrained(tmp)
    backend = args.compile_backend or ("inductor" if cuda else "eager")
    proc_state = None
    if "p" not in skip and not args.proc_late:
        proc_state = start_server_process(args, tmp)

    # ---- the in-process server (builds the random-weight model on the device) -----------------
    t = time.perf_counter()
    srv = build_server(TeacherConfig(model=tmp, dtype=args.dtype, device=args.device, random_weights_seed=0,
                                     max_batch_tokens=args.max_batch_tokens, chunk_size=args.chunk,
                                     max_top_k=max(256, args.top_k), max_queue_tokens=1 << 22,
                                     quantize=args.quantize,
                                     server=ServerConfig(port=0, max_inflight_per_call=1024)))
    eng = srv.engine
    eng.compile, eng.compile_backend = "off", backend   # the lever rows switch it on later
    srv.start()
    srv.warm_up_and_serve()
    R["build_seconds"] = time.perf_counter() - t
    model = eng.model
    n_params = sum(p.numel() for p in model.parameters()) + sum(  # (+ an fp8 body's weights, held as buffers)
        b.numel() for n, b in model.named_buffers() if n.endswith("weight_fp8"))
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
    STATS3 = frozenset({"sampled", "topk", "tail"})
    prompts = rng.integers(0, V, size=(args.prompts, args.prompt_len))
    pseqs = [np.concatenate([prompts[i], rng.integers(0, V, size=args.response_len)])
             for i in range(args.prompts) for _ in range(args.samples)]
    p_tokens = sum(len(x) for x in pseqs)
    lo = max(2, args.seq_len // 8)
    useqs = [rng.integers(0, V, size=int(n)) for n in rng.integers(lo, args.seq_len + 1, size=args.uneven_seqs)]

    def items_of(ss, start=1):
        """ScoreItems of `ss`, scored from `start` (one int for all, or one per sequence)."""
        starts = [start] * len(ss) if isinstance(start, int) else start
        return [ScoreItem(f"r{i}", np.asarray(x, dtype=np.int64), st, len(x), top_k=K, stats=STATS3)
                for i, (x, st) in enumerate(zip(ss, starts))]

    def engine_run(make_items, reps, warm=True):
        """Median wall time of eng.score (no gRPC, no cache) + per-call stats deltas."""
        eng.timing = True
        keys = ("body_seconds", "head_seconds", "busy_seconds", "forward_tokens", "padded_tokens", "sub_batches",
                "batches", "shared_prefix_tokens")
        s0 = {k: getattr(eng.stats, k) for k in keys}
        med, ts = timed(lambda: eng.score(make_items(), use_cache=False), reps, warm)
        d = {k: (getattr(eng.stats, k) - s0[k]) / (reps + int(warm)) for k in keys}
        eng.timing = False
        return med, ts, d

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

    # ---- (L) levers, engine level ---------------------------------------------------------------
    LEVERS = [("eager body + old head", "off", "reference"), ("eager body + new head", "off", "fast"),
              ("eager body + new head compiled", "head", "fast"), ("compiled body + compiled new head", "all", "fast")]

    def lever(name, mode, head):
        eng.compile, eng.head = mode, head
        t = time.perf_counter()
        eng.prepare()
        sync()
        compile_s = time.perf_counter() - t
        med, ts, d = engine_run(lambda: items_of(seqs), args.reps)
        row = {"name": name, "compile": mode, "head": head, "active_body": eng.compiled_body,
               "active_head": eng.compiled_head, "prepare_seconds": compile_s, "seconds": med, "all_seconds": ts,
               "tokens_per_s": n_tok / med, "body_ms": 1e3 * d["body_seconds"], "head_ms": 1e3 * d["head_seconds"],
               "other_ms": 1e3 * (d["busy_seconds"] - d["body_seconds"] - d["head_seconds"])}
        R.setdefault("levers", []).append(row)
        print(f"  lever {name}: {row['tokens_per_s']:,.0f} tok/s (body {row['body_ms']:.0f} ms, head "
              f"{row['head_ms']:.0f} ms; prepare {compile_s:.1f}s)", file=sys.stderr, flush=True)

    def prefix_row(med, ts, d, packed, **extra):
        per = max(1, d["batches"])  # body / head ms per batch
        return {"seconds": med, "all_seconds": ts, "tokens_per_s": p_tokens / med, "forward_tokens": d["forward_tokens"],
                "shared_prefix_tokens": d["shared_prefix_tokens"], "body_ms": 1e3 * d["body_seconds"] / per,
                "head_ms": 1e3 * d["head_seconds"] / per, "batches": d["batches"], "packed": packed, **extra}

    def prefix_engine(key):
        out = {"sequences": len(pseqs), "tokens": p_tokens, "scored_positions": len(pseqs) * args.response_len,
               "compile": eng.resolved_compile() if eng._prepared else "off"}
        warm = [pseqs[i * args.samples + j] for i in range(min(2, args.prompts)) for j in range(min(2, args.samples))]
        packing = eng.packing
        # off; on through a KV cache (packing off); on as served (packed when the engine packs)
        for name, on, pk in (("off", False, packing), ("on_cache", True, "off"), ("on", True, packing)):
            if name == "on_cache" and not eng.packing_active():
                continue  # (the served path is the KV cache already)
            eng.prefix_sharing, eng.packing = on, pk
            eng.score(items_of(warm, args.prompt_len), use_cache=False)
            sync()
            med, ts, d = engine_run(lambda: items_of(pseqs, args.prompt_len), args.prefix_reps, warm=False)
            out[name] = prefix_row(med, ts, d, eng.packing_active() and on)
        eng.prefix_sharing, eng.packing = True, packing
        if eng.packing_active():  # packed batches hold whole prompt groups more often with a larger budget
            budget = eng.max_batch_tokens
            eng.max_batch_tokens = 2 * budget
            med, ts, d = engine_run(lambda: items_of(pseqs, args.prompt_len), args.prefix_reps)
            eng.max_batch_tokens = budget
            out["on_2x_budget"] = prefix_row(med, ts, d, True, max_batch_tokens=2 * budget)
        out["speedup"] = out["off"]["seconds"] / out["on"]["seconds"]
        R[key] = out
        print(f"  prefix ({key}): off {out['off']['tokens_per_s']:,.0f} / on {out['on']['tokens_per_s']:,.0f} tok/s",
              file=sys.stderr, flush=True)

    def levers_eager():
        for name, mode, head in LEVERS[:2]:
            lever(name, mode, head)

    def levers_compiled():
        for name, mode, head in LEVERS[2:]:
            lever(name, mode, head)

    section("L", levers_eager)
    if "d" not in skip:
        section("d_eager", lambda: (setattr(eng, "compile", "off"), setattr(eng, "head", "fast"), eng.prepare(),
                                    prefix_engine("prefix_eager")))
    section("L", levers_compiled)
    eng.compile, eng.head = "all", "fast"   # the best configuration for the remaining sections
    try:
        eng.prepare()
    except Exception as exc:  # noqa: BLE001
        R["errors"]["prepare"] = repr(exc)
    R["serving_compile"] = {"body": eng.compiled_body, "head": eng.compiled_head, "backend": backend}

    # ---- (d) prompt-prefix sharing, engine level, best configuration ----------------------------
    section("d", lambda: prefix_engine("prefix"))

    # ---- (u) uneven lengths: split into similar-length sub-batches or pad to the longest -------
    def uneven():
        tokens = sum(len(x) for x in useqs)
        out = {"sequences": len(useqs), "tokens": tokens}
        for split in (False, True):
            eng.split_uneven = split
            med, ts, d = engine_run(lambda: items_of(useqs), args.reps)
            out["split" if split else "padded"] = {
                "seconds": med, "all_seconds": ts, "tokens_per_s": tokens / med, "forward_tokens": d["forward_tokens"],
                "padded_tokens": d["padded_tokens"], "sub_batches": d["sub_batches"], "batches": d["batches"],
                "body_ms": 1e3 * d["body_seconds"], "head_ms": 1e3 * d["head_seconds"]}
        eng.split_uneven = True
        R["uneven"] = out

    section("u", uneven)

    # ---- (r) a rollout-shaped batch: a shared system prompt, uneven prompts and responses ------
    def rollout_shaped():
        L = args.seq_len
        system = rng.integers(0, V, size=max(16, L // 40))
        rseqs, rstarts = [], []
        for _ in range(args.rl_prompts):
            prompt = np.concatenate([system, rng.integers(0, V, size=int(rng.integers(L // 32, L // 2 + 1)))])
            for _ in range(args.samples):
                rseqs.append(np.concatenate([prompt, rng.integers(0, V, size=int(rng.integers(L // 64, 3 * L // 4 + 1)))]))
                rstarts.append(len(prompt))
        tokens = sum(len(x) for x in rseqs)

        out = {"sequences": len(rseqs), "tokens": tokens, "prompts": args.rl_prompts,
               "scored_positions": sum(len(x) - st for x, st in zip(rseqs, rstarts))}
        for name, on in (("off", False), ("on", True)):
            eng.prefix_sharing = on
            med, ts, d = engine_run(lambda: items_of(rseqs, rstarts), 1)
            out[name] = {"seconds": med, "all_seconds": ts, "tokens_per_s": tokens / med, "packed": on and eng.packing_active(),
                         **{k: d[k] for k in ("forward_tokens", "padded_tokens", "batches", "shared_prefix_tokens")}}
        eng.prefix_sharing = True
        out["speedup"] = out["off"]["seconds"] / out["on"]["seconds"]
        R["rollout_shaped"] = out
        print(f"  rollout-shaped: off {out['off']['tokens_per_s']:,.0f} / on {out['on']['tokens_per_s']:,.0f} tok/s",
              file=sys.stderr, flush=True)

    section("r", rollout_shaped)

    def run_client(settings, s=seqs, starts=None, c=None):
        starts = [1] * len(s) if starts is None else starts
        t = time.perf_counter()
        out = (c or client).score(list(s), starts, settings=settings)
        return time.perf_counter() - t, out

    # ---- (c) end to end through gRPC (in-process server) + per-component split ---------------
    base_settings = ScoreSettings(top_k=K, statistics=("sampled", "topk", "tail"), value_encoding="bf16",
                                  compression="zstd")

    def streamed(c=None):
        """STREAM_BATCHES x the batch's size of distinct sequences in one call, so the server
        encodes (and the client decodes) one batch while the next one runs."""
        dt, _ = run_client(base_settings, list(rng.integers(0, V, size=(STREAM_BATCHES * args.seqs, args.seq_len))), c=c)
        return {"tokens": STREAM_BATCHES * n_tok, "seconds": dt, "tokens_per_s": STREAM_BATCHES * n_tok / dt}

    def e2e():
        eng.cache = None
        run_client(base_settings)  # warm-up (first-call allocations, kernel specialisations): not in busy
        busy0, n0 = eng.stats.busy_seconds, eng.stats.batches
        med, ts = timed(lambda: run_client(base_settings), args.reps, warm=False)
        busy = (eng.stats.busy_seconds - busy0) / args.reps
        _, out = run_client(base_settings)
        positions = sum(o.num_positions for o in out)
        R["e2e"] = {"tokens": n_tok, "seconds": med, "all_seconds": ts, "tokens_per_s": n_tok / med,
                    "server_busy_seconds": busy, "server_tokens_per_s": n_tok / busy if busy else None,
                    "batches_per_call": (eng.stats.batches - n0) / (args.reps + 1),
                    "bytes_per_token": sum(o.wire_bytes for o in out) / positions}
        R["e2e_stream"] = streamed()
        # split of one call: body / head (synchronised), copy-out, encode, decode, rest
        items = items_of(seqs)
        _, _, d = engine_run(lambda: items_of(seqs), 1)
        res = eng.score(items, use_cache=False)
        opts = base_settings.to_options()
        t = time.perf_counter()
        msgs = [encode_result(it, r, opts).SerializeToString() for it, r in zip(items, res)]
        enc = time.perf_counter() - t
        t = time.perf_counter()
        [TeacherStats.from_message(pb.ScoreResult.FromString(m)) for m in msgs]
        dec = time.perf_counter() - t
        rest = med - d["busy_seconds"] - enc - dec
        R["breakdown"] = {"body_ms": 1e3 * d["body_seconds"], "head_ms": 1e3 * d["head_seconds"],
                          "copy_out_ms": 1e3 * (d["busy_seconds"] - d["body_seconds"] - d["head_seconds"]),
                          "encode_ms": 1e3 * enc, "decode_ms": 1e3 * dec, "grpc_rest_ms": 1e3 * rest,
                          "e2e_ms": 1e3 * med}

    section("c", e2e)

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

    # ---- (q) the quantised teacher's distance from the bf16 one (same random weights) ---------
    def quant_quality():
        from teacher_server.fp8 import distance
        from teacher_server.model import load_model

        ref_model = load_model(tmp, args.dtype, args.device, random_weights_seed=0)
        ref = ScoringEngine(ref_model, device=args.device, chunk_size=args.chunk, max_batch_tokens=args.max_batch_tokens,
                            compile="off")
        q_items, r_items = items_of(seqs[:2]), items_of(seqs[:2])
        for it in q_items + r_items:
            it.stats = frozenset({"sampled", "topk", "lse"})
        got = eng.score(q_items, use_cache=False)
        want = ref.score(r_items, use_cache=False)
        R["quant_quality"] = distance(want, got)
        del ref, ref_model
        if cuda:
            torch.cuda.empty_cache()

    if args.quantize != "none":
        section("q", quant_quality)
    client.close()
    srv.stop(1)

    # ---- (p) the server in its own process -----------------------------------------------------
    def own_process():
        nonlocal proc_state
        if cuda:  # give the in-process model's memory back first
            del_model()
        st = proc_state or start_server_process(args, tmp)
        proc_state = st
        if not st["ready"].wait(timeout=1200) or st["port"] is None:
            raise RuntimeError("server process did not start:\n" + "".join(st["lines"][-30:]))
        out = {"ready_seconds_after_launch": st["ready_s"], "compile_log": st.get("compile_line"),
               "overlapped_with_in_process_sections": not args.proc_late}
        purl = f"127.0.0.1:{st['port']}"

        def scrape():
            from urllib.request import urlopen

            from teacher_server.metrics import parse_text
            with urlopen(f"http://127.0.0.1:{st['metrics_port']}/metrics", timeout=10) as r:
                return parse_text(r.read().decode())

        def busy():
            return scrape().get("opd_teacher_engine_busy_seconds_total", 0.0)

        pc = TeacherClient(purl, timeout_s=1800)
        try:
            run_client(base_settings, c=pc)  # warm (connection, any lazy compile)
            b0 = busy()
            ts = [run_client(base_settings, c=pc)[0] for _ in range(args.reps)]
            med = statistics.median(ts)
            b = (busy() - b0) / args.reps
            out["e2e"] = {"seconds": med, "all_seconds": ts, "tokens_per_s": n_tok / med, "server_busy_seconds": b,
                          "server_tokens_per_s": n_tok / b if b else None}
            out["e2e_stream"] = streamed(pc)
            import threading

            clients = [TeacherClient(purl, timeout_s=1800) for _ in range(2)]
            # distinct sequences in every call (identical ones would share their whole forward)
            work = [[list(rng.integers(0, V, size=(args.seqs, args.seq_len))) for _ in range(args.reps)] for _ in clients]
            t = time.perf_counter()
            threads = [threading.Thread(target=lambda c=c, w=w: [c.score(x, [1] * len(x), settings=base_settings)
                                                                 for x in w]) for c, w in zip(clients, work)]
            [th.start() for th in threads]
            [th.join() for th in threads]
            dt = time.perf_counter() - t
            out["sustained"] = {"clients": 2, "calls": 2 * args.reps, "tokens": 2 * args.reps * n_tok, "seconds": dt,
                                "tokens_per_s": 2 * args.reps * n_tok / dt}
            [c.close() for c in clients]
            if "d" not in skip:
                starts = [args.prompt_len] * len(pseqs)
                run_client(base_settings, pseqs[: 2 * args.samples], starts[: 2 * args.samples], c=pc)
                m0 = scrape()
                dt, _ = run_client(base_settings, pseqs, starts, c=pc)
                m1 = scrape()
                out["prefix_on"] = {"seconds": dt, "tokens_per_s": p_tokens / dt, **{
                    k: m1.get(f"opd_teacher_engine_{k}_total", 0.0) - m0.get(f"opd_teacher_engine_{k}_total", 0.0)
                    for k in ("batches", "forward_tokens", "shared_prefix_tokens", "busy_seconds")}}
        finally:
            pc.close()
        out["log_tail"] = st["lines"][-40:]
        R["process"] = out

    def del_model():
        nonlocal model
        eng.model = eng.body = eng.weight = None
        srv.engine = None
        model = None
        import gc

        gc.collect()
        torch.cuda.empty_cache()

    section("p", own_process)
    if proc_state is not None:
        proc_state["proc"].terminate()
        try:
            proc_state["proc"].wait(60)
        except Exception:  # noqa: BLE001
            proc_state["proc"].kill()
    save()
    print(report(R, args))
    return 0 if not R["errors"] else 1


def start_server_process(args, model_dir):
    """`python -m opd teacher` on the bench's config, random weights, its own process; returns a
    state dict whose 'ready' event fires once it prints its port (i.e. after build + compile)."""
    import socket
    import subprocess
    import threading

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        mport = so.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "opd", "teacher", "--model", str(model_dir), "--port", "0", "--device", args.device,
           "--dtype", args.dtype, "--random-weights-seed", "0", "--max-batch-tokens", str(args.max_batch_tokens),
           "--chunk-size", str(args.chunk), "--max-top-k", str(max(256, args.top_k)), "--max-queue-tokens",
           str(1 << 22), "--metrics-port", str(mport), "--log-level", "INFO", "--quantize", args.quantize]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root)
    st = {"proc": proc, "port": None, "lines": [], "ready": threading.Event(), "metrics_port": mport, "ready_s": None}

    def reader():
        for line in proc.stdout:
            st["lines"] = (st["lines"] + [line])[-200:]
            if "compile (" in line:
                st["compile_line"] = line.strip()
                print("[server process] " + line.strip(), file=sys.stderr, flush=True)
            if st["port"] is None and "serving" in line and "on 127.0.0.1:" in line:
                st["port"] = int(line.rsplit(":", 1)[1])
                st["ready_s"] = time.perf_counter() - t0
                print(f"[server process] ready after {st['ready_s']:.0f}s", file=sys.stderr, flush=True)
                st["ready"].set()
        st["ready"].set()

    threading.Thread(target=reader, daemon=True).start()
    return st


def report(R, args) -> str:
    base = R.get("baseline", {}).get("tokens_per_s")
    roof = R.get("roofline_tokens_per_s")

    def ratio(x, ref):
        return f"{x / ref:.2f}x" if x and ref else "n/a"

    quant = "" if args.quantize == "none" else f", body {args.quantize}"
    lines = [f"### Teacher server: {args.shape} (random weights, {args.dtype}{quant}) on {R['env']['device']}", "",
             f"torch {R['env']['torch']}, transformers {R['env']['transformers']}; "
             f"{R['params']['total'] / 1e9:.3f}B params ({R['params']['matmul'] / 1e9:.3f}B in matmuls); "
             f"top-{args.top_k}; model build {R.get('build_seconds', 0):.0f}s.", ""]
    if "matmul" in R:
        lines.append(f"Matmul rate: {R['matmul']['tflops']:.3g} TFLOP/s (bf16 {R['matmul']['n']}^3); "
                     f"roofline {roof:,.0f} tokens/s = rate / (2 x matmul params).")
        if R["matmul"].get("fp8_tflops"):
            lines[-1] += (f" The fp8 GEMM (rowwise scales) runs at {R['matmul']['fp8_tflops']:.3g} TFLOP/s; the "
                          f"roofline column stays at the bf16 rate.")
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
                     f"{ratio(e['tokens_per_s'], roof)} | {shape}, sampled+top-k+tail, {e['bytes_per_token']:.0f} B/token{srv}, "
                     f"{e.get('batches_per_call', 0):.1f} batches per call |")
    for label, x in (("in-process server", R.get("e2e_stream")), ("server in its own process",
                                                                   (R.get("process") or {}).get("e2e_stream"))):
        if x:
            lines.append(f"| end to end, streamed ({label}) | {x['tokens_per_s']:,.0f} | {ratio(x['tokens_per_s'], base)} | "
                         f"{ratio(x['tokens_per_s'], roof)} | {STREAM_BATCHES} x {shape} distinct sequences in one call |")
    pr = R.get("process")
    if pr:
        if pr.get("e2e"):
            x = pr["e2e"]
            busy = f", server busy {x['server_tokens_per_s']:,.0f} tok/s" if x.get("server_tokens_per_s") else ""
            lines.append(f"| end to end, server in its own process | {x['tokens_per_s']:,.0f} | {ratio(x['tokens_per_s'], base)} | "
                         f"{ratio(x['tokens_per_s'], roof)} | {shape}{busy}; ready {pr['ready_seconds_after_launch'] or 0:.0f}s after launch |")
        if pr.get("sustained"):
            su = pr["sustained"]
            lines.append(f"| own process, 2 clients at once | {su['tokens_per_s']:,.0f} | {ratio(su['tokens_per_s'], base)} | "
                         f"{ratio(su['tokens_per_s'], roof)} | {su['calls']} calls of {shape} in {su['seconds']:.1f}s |")
        if pr.get("prefix_on"):
            x = pr["prefix_on"]
            lines.append(f"| own process, prefix sharing on | {x['tokens_per_s']:,.0f} | {ratio(x['tokens_per_s'], base)} | "
                         f"{ratio(x['tokens_per_s'], roof)} | {args.prompts} x {args.prompt_len} prompts x {args.samples} x "
                         f"{args.response_len}, through gRPC; {x.get('batches', 0):.0f} batches, body ran "
                         f"{x.get('forward_tokens', 0):,.0f} tokens, server busy {x.get('busy_seconds', 0):.2f}s |")
    for key, label in (("prefix_eager", "eager body"), ("prefix", "best config")):
        p = R.get(key)
        if not p:
            continue
        for mode in ("off", "on_cache", "on", "on_2x_budget"):
            if mode in p:
                m = p[mode]
                how = {"off": "off", "on_cache": "on, KV cache", "on": "on, packed" if m.get("packed") else "on",
                       "on_2x_budget": f"on, packed, {m.get('max_batch_tokens', 0):,}-token batches"}[mode]
                lines.append(f"| prefix sharing {how} ({label}, engine) | {m['tokens_per_s']:,.0f} | {ratio(m['tokens_per_s'], base)} | "
                             f"{ratio(m['tokens_per_s'], roof)} | {args.prompts} prompts x {args.prompt_len} x "
                             f"{args.samples} samples x {args.response_len}; body ran {m['forward_tokens']:,.0f} of "
                             f"{p['tokens']:,} tokens; body {m['body_ms']:.0f} / head {m['head_ms']:.0f} ms per batch x "
                             f"{m['batches']:.0f} |")
        lines.append(f"| prefix sharing speed-up ({label}) | | {p['speedup']:.2f}x | | on vs off |")
    c = R.get("cache")
    if c:
        lines.append(f"| repeated batch from the cache | {c['tokens_per_s']:,.0f} | {ratio(c['tokens_per_s'], base)} | "
                     f"{ratio(c['tokens_per_s'], roof)} | {shape}, {c['hits']} hits, {c['bytes_per_token']:.0f} B/token held |")
    qq = R.get("quant_quality")
    if qq:
        lines += ["", f"{args.quantize} teacher vs the {args.dtype} teacher on the same weights, {qq['positions']:,} positions: "
                  f"sampled log-prob |delta| mean {qq['sampled_abs_mean']:.4f}, p99 {qq['sampled_abs_p99']:.4f}; "
                  f"KL(exact || quantised) over the exact top-{args.top_k} {qq['topk_kl_mean']:.2e}; top-1 agreement "
                  f"{qq['top1_agree']:.3f}; top-{args.top_k} id overlap {qq['topk_overlap']:.3f}."]
    if R.get("levers"):
        lines += ["", f"Levers, engine level (no gRPC), {shape}, device-synchronised split per call:", "",
                  "| configuration | tokens/s | vs plain forward | vs roofline | body ms | head ms | other ms | prepare s |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in R["levers"]:
            act = "" if (x["active_body"] or x["compile"] in ("off", "head")) else " (compile FAILED: eager)"
            lines.append(f"| {x['name']}{act} | {x['tokens_per_s']:,.0f} | {ratio(x['tokens_per_s'], base)} | "
                         f"{ratio(x['tokens_per_s'], roof)} | {x['body_ms']:.0f} | {x['head_ms']:.0f} | {x['other_ms']:.0f} | "
                         f"{x['prepare_seconds']:.1f} |")
    bd = R.get("breakdown")
    if bd:
        lines += ["", f"One end-to-end call of {shape} (in-process server, best config), ms: body {bd['body_ms']:.0f}, "
                  f"head {bd['head_ms']:.0f}, copy-out + slicing {bd['copy_out_ms']:.0f}, encode {bd['encode_ms']:.0f}, "
                  f"decode {bd['decode_ms']:.0f}, gRPC + threads + rest {bd['grpc_rest_ms']:.0f} (of {bd['e2e_ms']:.0f})."]
    u = R.get("uneven")
    if u:
        lines += ["", f"Uneven lengths ({u['sequences']} sequences, {u['tokens']:,} tokens), engine level:", "",
                  "| plain path | tokens/s | forwarded tokens | padded | sub-batches | body ms | head ms |", "|---|---|---|---|---|---|---|"]
        for mode in ("padded", "split"):
            m = u[mode]
            lines.append(f"| {mode} | {m['tokens_per_s']:,.0f} | {m['forward_tokens']:,.0f} | {m['padded_tokens']:,.0f} | "
                         f"{m['sub_batches']:.0f} | {m['body_ms']:.0f} | {m['head_ms']:.0f} |")
    r = R.get("rollout_shaped")
    if r:
        lines += ["", f"Rollout-shaped batch, engine level: {r['prompts']} prompts behind one shared system prompt, "
                  f"{r['sequences']} sequences, {r['tokens']:,} tokens ({r['scored_positions']:,} scored):", "",
                  "| prefix sharing | tokens/s | forwarded tokens | padded | batches |", "|---|---|---|---|---|"]
        for mode in ("off", "on"):
            m = r[mode]
            how = "on, packed" if m["packed"] else mode
            lines.append(f"| {how} | {m['tokens_per_s']:,.0f} | {m['forward_tokens']:,.0f} | {m['padded_tokens']:,.0f} | "
                         f"{m['batches']:.0f} |")
        lines.append(f"| speed-up | {r['speedup']:.2f}x | | | |")
    if R.get("wire"):
        lines += ["", "| value encoding | compression | bytes/token | tokens/s end to end |", "|---|---|---|---|"]
        for w in R["wire"]:
            lines.append(f"| {w['encoding']} | {w['compression']} | {w['bytes_per_token']:.1f} | {w['tokens_per_s']:,.0f} |")
    if R["errors"]:
        lines += ["", "Failed sections: " + ", ".join(sorted(R["errors"]))]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
