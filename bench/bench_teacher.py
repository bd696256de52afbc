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
(a, b, L, d_eager, d, u, r, c, wire, e, q, p).

Reading the code: `main` runs the sections in order; `TeacherBench` has the shared helpers first,
then one method per section in that order; `report` turns the results into the tables.

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import TEACHER_SHAPES as SHAPES, add_workload_args, fill_sizes, qwen3_config, scrape  # noqa: E402

STREAM_BATCHES = 4  # the streamed end-to-end rows send this many batches' worth of distinct sequences
# sizes per shape: seqs x seq_len (b, c, e); prompts x samples x (prompt_len + response_len) (d); matmul n (a)
SIZES = {
    "full": dict(seqs=8, seq_len=2048, prompts=16, samples=8, prompt_len=1024, response_len=1024, matmul_size=8192),
    "tiny": dict(seqs=8, seq_len=256, prompts=4, samples=4, prompt_len=128, response_len=128, matmul_size=512),
}
STATS3 = frozenset({"sampled", "topk", "tail"})
LEVERS = [("eager body + old head", "off", "reference"), ("eager body + new head", "off", "fast"),
          ("eager body + new head compiled", "head", "fast"), ("compiled body + compiled new head", "all", "fast")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, SHAPES)
    p.add_argument("--out", default=None, help="write the results as JSON here")
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
    fill_sizes(a, SIZES)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import zstandard  # noqa: F401  (the server's codec needs it)
    except ImportError:
        print("bench_teacher: the teacher server needs `zstandard` (pip install zstandard)", file=sys.stderr)
        return 2
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_teacher: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    b = TeacherBench(args)
    b.section("a", b.matmul)
    b.build()                                # the separate-process server starts here (overlaps what follows)
    b.section("b", b.baseline)
    b.section("L", b.levers_eager)
    if "d" not in b.skip:
        b.section("d_eager", b.prefix_eager)
    b.section("L", b.levers_compiled)
    b.serve_best()                           # the best configuration for the remaining sections
    b.section("d", lambda: b.prefix_engine("prefix"))
    b.section("u", b.uneven)
    b.section("r", b.rollout_shaped)
    b.section("c", b.e2e)
    b.section("wire", b.wire)
    b.section("e", b.cached)
    if args.quantize != "none":
        b.section("q", b.quant_quality)
    b.stop_in_process()
    b.section("p", b.own_process)
    b.stop_process()
    b.save()
    print(report(b.R, args))
    return 0 if not b.R["errors"] else 1


class TeacherBench:
    """The measurements, one method per section, in the order `main` runs them; `R` holds the results."""

    # ---- setup and shared helpers ---------------------------------------------------------------
    def __init__(self, args):
        import torch
        import transformers

        self.args = args
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.skip = set(filter(None, args.skip.split(",")))
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        self.proc_state = None
        self.R: dict = {"args": vars(args), "env": {
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(self.dev) if self.cuda else platform.processor() or "cpu",
            "threads": torch.get_num_threads()}, "errors": {}}

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.dev)

    def timed(self, fn, reps, warm=True):
        """(median, all times) of `reps` device-synchronised calls of `fn`, after one warm-up call."""
        if warm:
            fn()  # warm-up
        self.sync()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), ts

    def save(self):
        if self.args.out:
            with open(self.args.out, "w") as f:
                json.dump(self.R, f, indent=2, default=str)

    def section(self, name, fn):
        """Run one section unless skipped; a failure is recorded and the other sections still run."""
        if name in self.skip:
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # keep the other numbers if one section fails
            self.R["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"[{name}] FAILED: {exc}", file=sys.stderr, flush=True)
        print(f"[{name}] {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
        self.save()

    def build(self):
        """The model config; the separate-process server (unless --proc-late); the in-process server
        (builds the random-weight model on the device), a client, and the sequences every section scores."""
        import numpy as np

        from teacher_server.app import TeacherConfig, build_server
        from teacher_server.client import TeacherClient
        from teacher_server.service import ServerConfig

        args, R = self.args, self.R
        self.tmp = tempfile.mkdtemp(prefix="opd-bench-")
        cfg = qwen3_config(SHAPES[args.shape], tie_word_embeddings=False, pad_token_id=0,
                           bos_token_id=None, eos_token_id=None)
        cfg.save_pretrained(self.tmp)
        self.backend = args.compile_backend or ("inductor" if self.cuda else "eager")
        if "p" not in self.skip and not args.proc_late:
            self.proc_state = start_server_process(args, self.tmp)

        t = time.perf_counter()
        self.srv = build_server(TeacherConfig(model=self.tmp, dtype=args.dtype, device=args.device, random_weights_seed=0,
                                              max_batch_tokens=args.max_batch_tokens, chunk_size=args.chunk,
                                              max_top_k=max(256, args.top_k), max_queue_tokens=1 << 22,
                                              quantize=args.quantize,
                                              server=ServerConfig(port=0, max_inflight_per_call=1024)))
        eng = self.eng = self.srv.engine
        eng.compile, eng.compile_backend = "off", self.backend   # the lever rows switch it on later
        self.srv.start()
        self.srv.warm_up_and_serve()
        R["build_seconds"] = time.perf_counter() - t
        model = self.model = eng.model
        n_params = sum(p.numel() for p in model.parameters()) + sum(  # (+ an fp8 body's weights, held as buffers)
            b.numel() for n, b in model.named_buffers() if n.endswith("weight_fp8"))
        n_embed = model.get_input_embeddings().weight.numel()
        self.n_params, self.n_embed = n_params, n_embed
        R["params"] = {"total": n_params, "matmul": n_params - n_embed}
        if "matmul" in R:
            R["roofline_tokens_per_s"] = R["matmul"]["tflops"] * 1e12 / (2 * (n_params - n_embed))
        self.client = TeacherClient(f"127.0.0.1:{self.srv.port}", timeout_s=1800)
        V = self.V = cfg.vocab_size
        rng = self.rng = np.random.default_rng(0)
        self.seqs = rng.integers(0, V, size=(args.seqs, args.seq_len))
        self.n_tok = self.seqs.size
        print(f"model {args.shape}: {n_params / 1e9:.3f}B params, built in {R['build_seconds']:.1f}s on {R['env']['device']}",
              file=sys.stderr, flush=True)
        prompts = rng.integers(0, V, size=(args.prompts, args.prompt_len))
        self.pseqs = [np.concatenate([prompts[i], rng.integers(0, V, size=args.response_len)])
                      for i in range(args.prompts) for _ in range(args.samples)]
        self.p_tokens = sum(len(x) for x in self.pseqs)
        lo = max(2, args.seq_len // 8)
        self.useqs = [rng.integers(0, V, size=int(n)) for n in rng.integers(lo, args.seq_len + 1, size=args.uneven_seqs)]
        self.base_settings = self._settings("bf16", "zstd")

    def _settings(self, encoding, compression):
        from teacher_server.client import ScoreSettings

        return ScoreSettings(top_k=self.args.top_k, statistics=("sampled", "topk", "tail"), value_encoding=encoding,
                             compression=compression)

    def items_of(self, ss, start=1):
        """ScoreItems of `ss`, scored from `start` (one int for all, or one per sequence)."""
        import numpy as np

        from teacher_server.engine import ScoreItem

        starts = [start] * len(ss) if isinstance(start, int) else start
        return [ScoreItem(f"r{i}", np.asarray(x, dtype=np.int64), st, len(x), top_k=self.args.top_k, stats=STATS3)
                for i, (x, st) in enumerate(zip(ss, starts))]

    def engine_run(self, make_items, reps, warm=True):
        """Median wall time of eng.score (no gRPC, no cache) + per-call stats deltas."""
        eng = self.eng
        eng.timing = True
        keys = ("body_seconds", "head_seconds", "busy_seconds", "forward_tokens", "padded_tokens", "sub_batches",
                "batches", "shared_prefix_tokens")
        s0 = {k: getattr(eng.stats, k) for k in keys}
        med, ts = self.timed(lambda: eng.score(make_items(), use_cache=False), reps, warm)
        d = {k: (getattr(eng.stats, k) - s0[k]) / (reps + int(warm)) for k in keys}
        eng.timing = False
        return med, ts, d

    def run_client(self, settings, s=None, starts=None, c=None):
        """(seconds, results) of one TeacherClient.score call (default: the in-process server, `seqs`)."""
        s = self.seqs if s is None else s
        starts = [1] * len(s) if starts is None else starts
        t = time.perf_counter()
        out = (c or self.client).score(list(s), starts, settings=settings)
        return time.perf_counter() - t, out

    def streamed(self, c=None):
        """STREAM_BATCHES x the batch's size of distinct sequences in one call, so the server
        encodes (and the client decodes) one batch while the next one runs."""
        args, n_tok = self.args, self.n_tok
        dt, _ = self.run_client(self.base_settings, list(self.rng.integers(0, self.V, size=(STREAM_BATCHES * args.seqs,
                                                                                           args.seq_len))), c=c)
        return {"tokens": STREAM_BATCHES * n_tok, "seconds": dt, "tokens_per_s": STREAM_BATCHES * n_tok / dt}

    # ---- (a) matmul rate ------------------------------------------------------------------------
    def matmul(self):
        import torch

        args, dev, dtype = self.args, self.dev, self.dtype
        n = args.matmul_size
        x = torch.randn(n, n, device=dev, dtype=dtype)
        y = torch.randn(n, n, device=dev, dtype=dtype)
        iters = 20 if self.cuda else 3
        med, _ = self.timed(lambda: [torch.matmul(x, y) for _ in range(iters)], args.reps)
        self.R["matmul"] = {"n": n, "tflops": 2 * n ** 3 * iters / med / 1e12}
        if args.quantize == "fp8" and self.cuda:  # the fp8 GEMM's own rate (rowwise scales, as the body uses)
            xq, yq = x.to(torch.float8_e4m3fn), y.t().contiguous().to(torch.float8_e4m3fn).t()
            sa, sb = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)
            med8, _ = self.timed(lambda: [torch._scaled_mm(xq, yq, scale_a=sa, scale_b=sb, out_dtype=dtype)
                                          for _ in range(iters)], args.reps)
            self.R["matmul"]["fp8_tflops"] = 2 * n ** 3 * iters / med8 / 1e12
            del xq, yq
        del x, y

    # ---- (b) plain forward + chunked top-k ------------------------------------------------------
    def baseline(self):
        import torch

        args, model, n_tok, K = self.args, self.model, self.n_tok, self.args.top_k
        ids = torch.as_tensor(self.seqs, device=self.dev)
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

        med_body, _ = self.timed(body, args.reps)
        med, ts = self.timed(full, args.reps)
        self.R["baseline"] = {"tokens": n_tok, "seconds": med, "all_seconds": ts, "tokens_per_s": n_tok / med,
                              "body_seconds": med_body, "body_tokens_per_s": n_tok / med_body,
                              "body_tflops": 2 * (self.n_params - self.n_embed - W.numel()) * n_tok / med_body / 1e12}
        if self.cuda:
            self.R["baseline"]["peak_gib"] = torch.cuda.max_memory_allocated(self.dev) / 2 ** 30

    # ---- (L) levers, engine level ---------------------------------------------------------------
    def lever(self, name, mode, head):
        eng = self.eng
        eng.compile, eng.head = mode, head
        t = time.perf_counter()
        eng.prepare()
        self.sync()
        compile_s = time.perf_counter() - t
        med, ts, d = self.engine_run(lambda: self.items_of(self.seqs), self.args.reps)
        row = {"name": name, "compile": mode, "head": head, "active_body": eng.compiled_body,
               "active_head": eng.compiled_head, "prepare_seconds": compile_s, "seconds": med, "all_seconds": ts,
               "tokens_per_s": self.n_tok / med, "body_ms": 1e3 * d["body_seconds"], "head_ms": 1e3 * d["head_seconds"],
               "other_ms": 1e3 * (d["busy_seconds"] - d["body_seconds"] - d["head_seconds"])}
        self.R.setdefault("levers", []).append(row)
        print(f"  lever {name}: {row['tokens_per_s']:,.0f} tok/s (body {row['body_ms']:.0f} ms, head "
              f"{row['head_ms']:.0f} ms; prepare {compile_s:.1f}s)", file=sys.stderr, flush=True)

    def levers_eager(self):
        for name, mode, head in LEVERS[:2]:
            self.lever(name, mode, head)

    def levers_compiled(self):
        for name, mode, head in LEVERS[2:]:
            self.lever(name, mode, head)

    def serve_best(self):
        eng = self.eng
        eng.compile, eng.head = "all", "fast"
        try:
            eng.prepare()
        except Exception as exc:  # noqa: BLE001
            self.R["errors"]["prepare"] = repr(exc)
        self.R["serving_compile"] = {"body": eng.compiled_body, "head": eng.compiled_head, "backend": self.backend}

    # ---- (d) prompt-prefix sharing, engine level (d_eager: before anything is compiled) ---------
    def prefix_row(self, med, ts, d, packed, **extra):
        per = max(1, d["batches"])  # body / head ms per batch
        return {"seconds": med, "all_seconds": ts, "tokens_per_s": self.p_tokens / med, "forward_tokens": d["forward_tokens"],
                "shared_prefix_tokens": d["shared_prefix_tokens"], "body_ms": 1e3 * d["body_seconds"] / per,
                "head_ms": 1e3 * d["head_seconds"] / per, "batches": d["batches"], "packed": packed, **extra}

    def prefix_eager(self):
        eng = self.eng
        eng.compile, eng.head = "off", "fast"
        eng.prepare()
        self.prefix_engine("prefix_eager")

    def prefix_engine(self, key):
        args, eng, pseqs = self.args, self.eng, self.pseqs
        out = {"sequences": len(pseqs), "tokens": self.p_tokens, "scored_positions": len(pseqs) * args.response_len,
               "compile": eng.resolved_compile() if eng._prepared else "off"}
        warm = [pseqs[i * args.samples + j] for i in range(min(2, args.prompts)) for j in range(min(2, args.samples))]
        packing = eng.packing
        # off; on through a KV cache (packing off); on as served (packed when the engine packs)
        for name, on, pk in (("off", False, packing), ("on_cache", True, "off"), ("on", True, packing)):
            if name == "on_cache" and not eng.packing_active():
                continue  # (the served path is the KV cache already)
            eng.prefix_sharing, eng.packing = on, pk
            eng.score(self.items_of(warm, args.prompt_len), use_cache=False)
            self.sync()
            med, ts, d = self.engine_run(lambda: self.items_of(pseqs, args.prompt_len), args.prefix_reps, warm=False)
            out[name] = self.prefix_row(med, ts, d, eng.packing_active() and on)
        eng.prefix_sharing, eng.packing = True, packing
        if eng.packing_active():  # packed batches hold whole prompt groups more often with a larger budget
            budget = eng.max_batch_tokens
            eng.max_batch_tokens = 2 * budget
            med, ts, d = self.engine_run(lambda: self.items_of(pseqs, args.prompt_len), args.prefix_reps)
            eng.max_batch_tokens = budget
            out["on_2x_budget"] = self.prefix_row(med, ts, d, True, max_batch_tokens=2 * budget)
        out["speedup"] = out["off"]["seconds"] / out["on"]["seconds"]
        self.R[key] = out
        print(f"  prefix ({key}): off {out['off']['tokens_per_s']:,.0f} / on {out['on']['tokens_per_s']:,.0f} tok/s",
              file=sys.stderr, flush=True)

    # ---- (u) uneven lengths: split into similar-length sub-batches or pad to the longest --------
    def uneven(self):
        eng, useqs = self.eng, self.useqs
        tokens = sum(len(x) for x in useqs)
        out = {"sequences": len(useqs), "tokens": tokens}
        for split in (False, True):
            eng.split_uneven = split
            med, ts, d = self.engine_run(lambda: self.items_of(useqs), self.args.reps)
            out["split" if split else "padded"] = {
                "seconds": med, "all_seconds": ts, "tokens_per_s": tokens / med, "forward_tokens": d["forward_tokens"],
                "padded_tokens": d["padded_tokens"], "sub_batches": d["sub_batches"], "batches": d["batches"],
                "body_ms": 1e3 * d["body_seconds"], "head_ms": 1e3 * d["head_seconds"]}
        eng.split_uneven = True
        self.R["uneven"] = out

    # ---- (r) a rollout-shaped batch: a shared system prompt, uneven prompts and responses -------
    def rollout_shaped(self):
        import numpy as np

        args, eng, rng, V = self.args, self.eng, self.rng, self.V
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
            med, ts, d = self.engine_run(lambda: self.items_of(rseqs, rstarts), 1)
            out[name] = {"seconds": med, "all_seconds": ts, "tokens_per_s": tokens / med, "packed": on and eng.packing_active(),
                         **{k: d[k] for k in ("forward_tokens", "padded_tokens", "batches", "shared_prefix_tokens")}}
        eng.prefix_sharing = True
        out["speedup"] = out["off"]["seconds"] / out["on"]["seconds"]
        self.R["rollout_shaped"] = out
        print(f"  rollout-shaped: off {out['off']['tokens_per_s']:,.0f} / on {out['on']['tokens_per_s']:,.0f} tok/s",
              file=sys.stderr, flush=True)

    # ---- (c) end to end through gRPC (in-process server) + per-component split ------------------
    def e2e(self):
        from teacher_server.client import TeacherStats
        from teacher_server.service import encode_result
        from teacher_server.wire import pb

        args, eng, n_tok, base = self.args, self.eng, self.n_tok, self.base_settings
        eng.cache = None
        self.run_client(base)  # warm-up (first-call allocations, kernel specialisations): not in busy
        busy0, n0 = eng.stats.busy_seconds, eng.stats.batches
        med, ts = self.timed(lambda: self.run_client(base), args.reps, warm=False)
        busy = (eng.stats.busy_seconds - busy0) / args.reps
        _, out = self.run_client(base)
        positions = sum(o.num_positions for o in out)
        self.R["e2e"] = {"tokens": n_tok, "seconds": med, "all_seconds": ts, "tokens_per_s": n_tok / med,
                         "server_busy_seconds": busy, "server_tokens_per_s": n_tok / busy if busy else None,
                         "batches_per_call": (eng.stats.batches - n0) / (args.reps + 1),
                         "bytes_per_token": sum(o.wire_bytes for o in out) / positions}
        self.R["e2e_stream"] = self.streamed()
        # split of one call: body / head (synchronised), copy-out, encode, decode, rest
        items = self.items_of(self.seqs)
        _, _, d = self.engine_run(lambda: self.items_of(self.seqs), 1)
        res = eng.score(items, use_cache=False)
        opts = base.to_options()
        t = time.perf_counter()
        msgs = [encode_result(it, r, opts).SerializeToString() for it, r in zip(items, res)]
        enc = time.perf_counter() - t
        t = time.perf_counter()
        [TeacherStats.from_message(pb.ScoreResult.FromString(m)) for m in msgs]
        dec = time.perf_counter() - t
        rest = med - d["busy_seconds"] - enc - dec
        self.R["breakdown"] = {"body_ms": 1e3 * d["body_seconds"], "head_ms": 1e3 * d["head_seconds"],
                               "copy_out_ms": 1e3 * (d["busy_seconds"] - d["body_seconds"] - d["head_seconds"]),
                               "encode_ms": 1e3 * enc, "decode_ms": 1e3 * dec, "grpc_rest_ms": 1e3 * rest,
                               "e2e_ms": 1e3 * med}

    # ---- (wire) bytes/token and rate for every value encoding and compression -------------------
    def wire(self):
        rows = []
        for enc in ("fp32", "bf16", "q16", "q8"):
            for comp in ("zstd", "none"):
                dt, out = self.run_client(self._settings(enc, comp))
                positions = sum(o.num_positions for o in out)
                rows.append({"encoding": enc, "compression": comp, "seconds": dt, "tokens_per_s": self.n_tok / dt,
                             "bytes_per_token": sum(o.wire_bytes for o in out) / positions})
        self.R["wire"] = rows

    # ---- (e) the statistics cache ---------------------------------------------------------------
    def cached(self):
        from teacher_server.cache import StatsCache

        eng = self.eng
        eng.cache = StatsCache(8 << 30)
        self.run_client(self.base_settings)  # fills the cache (misses)
        h0 = eng.stats.cache_hits
        med, ts = self.timed(lambda: self.run_client(self.base_settings), self.args.reps)
        self.R["cache"] = {"seconds": med, "all_seconds": ts, "tokens_per_s": self.n_tok / med,
                           "hits": eng.stats.cache_hits - h0, "bytes": eng.stats.cache_bytes,
                           "bytes_per_token": eng.stats.cache_bytes / max(1, eng.stats.cache_entries * (self.args.seq_len - 1))}
        eng.cache = None

    # ---- (q) the quantised teacher's distance from the bf16 one (same random weights) -----------
    def quant_quality(self):
        from teacher_server.engine import ScoringEngine
        from teacher_server.fp8 import distance
        from teacher_server.model import load_model

        args = self.args
        ref_model = load_model(self.tmp, args.dtype, args.device, random_weights_seed=0)
        ref = ScoringEngine(ref_model, device=args.device, chunk_size=args.chunk, max_batch_tokens=args.max_batch_tokens,
                            compile="off")
        q_items, r_items = self.items_of(self.seqs[:2]), self.items_of(self.seqs[:2])
        for it in q_items + r_items:
            it.stats = frozenset({"sampled", "topk", "lse"})
        got = self.eng.score(q_items, use_cache=False)
        want = ref.score(r_items, use_cache=False)
        self.R["quant_quality"] = distance(want, got)
        del ref, ref_model
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def stop_in_process(self):
        self.client.close()
        self.srv.stop(1)

    # ---- (p) the server in its own process ------------------------------------------------------
    def own_process(self):
        import threading

        from teacher_server.client import TeacherClient

        args, rng, V, n_tok, base = self.args, self.rng, self.V, self.n_tok, self.base_settings
        if self.cuda:  # give the in-process model's memory back first
            self.del_model()
        st = self.proc_state = self.proc_state or start_server_process(args, self.tmp)
        if not st["ready"].wait(timeout=1200) or st["port"] is None:
            raise RuntimeError("server process did not start:\n" + "".join(st["lines"][-30:]))
        out = {"ready_seconds_after_launch": st["ready_s"], "compile_log": st.get("compile_line"),
               "overlapped_with_in_process_sections": not args.proc_late}
        purl = f"127.0.0.1:{st['port']}"

        def busy():
            return scrape(st["metrics_port"]).get("opd_teacher_engine_busy_seconds_total", 0.0)

        pc = TeacherClient(purl, timeout_s=1800)
        try:
            self.run_client(base, c=pc)  # warm (connection, any lazy compile)
            b0 = busy()
            ts = [self.run_client(base, c=pc)[0] for _ in range(args.reps)]
            med = statistics.median(ts)
            b = (busy() - b0) / args.reps
            out["e2e"] = {"seconds": med, "all_seconds": ts, "tokens_per_s": n_tok / med, "server_busy_seconds": b,
                          "server_tokens_per_s": n_tok / b if b else None}
            out["e2e_stream"] = self.streamed(pc)
            clients = [TeacherClient(purl, timeout_s=1800) for _ in range(2)]
            # distinct sequences in every call (identical ones would share their whole forward)
            work = [[list(rng.integers(0, V, size=(args.seqs, args.seq_len))) for _ in range(args.reps)] for _ in clients]
            t = time.perf_counter()
            threads = [threading.Thread(target=lambda c=c, w=w: [c.score(x, [1] * len(x), settings=base)
                                                                 for x in w]) for c, w in zip(clients, work)]
            [th.start() for th in threads]
            [th.join() for th in threads]
            dt = time.perf_counter() - t
            out["sustained"] = {"clients": 2, "calls": 2 * args.reps, "tokens": 2 * args.reps * n_tok, "seconds": dt,
                                "tokens_per_s": 2 * args.reps * n_tok / dt}
            [c.close() for c in clients]
            if "d" not in self.skip:
                pseqs = self.pseqs
                starts = [args.prompt_len] * len(pseqs)
                self.run_client(base, pseqs[: 2 * args.samples], starts[: 2 * args.samples], c=pc)
                m0 = scrape(st["metrics_port"])
                dt, _ = self.run_client(base, pseqs, starts, c=pc)
                m1 = scrape(st["metrics_port"])
                out["prefix_on"] = {"seconds": dt, "tokens_per_s": self.p_tokens / dt, **{
                    k: m1.get(f"opd_teacher_engine_{k}_total", 0.0) - m0.get(f"opd_teacher_engine_{k}_total", 0.0)
                    for k in ("batches", "forward_tokens", "shared_prefix_tokens", "busy_seconds")}}
        finally:
            pc.close()
        out["log_tail"] = st["lines"][-40:]
        self.R["process"] = out

    def del_model(self):
        import gc

        import torch

        eng = self.eng
        eng.model = eng.body = eng.weight = None
        self.srv.engine = None
        self.model = None
        gc.collect()
        torch.cuda.empty_cache()

    def stop_process(self):
        if self.proc_state is not None:
            self.proc_state["proc"].terminate()
            try:
                self.proc_state["proc"].wait(60)
            except Exception:  # noqa: BLE001
                self.proc_state["proc"].kill()


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
