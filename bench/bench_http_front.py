"""The price of JSON: the same scoring (8 x 2048 tokens, every position scored) through gRPC and
through each subset of the teacher's HTTP front (`opd teacher --http-port`, docs/interop.md).

One server in this process (random weights of a Qwen3-shaped config, statistics cache off), its
gRPC port and its HTTP front on 127.0.0.1. Rows, each timed end to end on the client (request
built, sent, answered, parsed into Python objects):
  grpc      TeacherClient.score, sampled + top-k, opd's default wire (bf16 values, zstd) and fp32
            uncompressed;
  vllm      POST /v1/completions, the 8 prompts in one request, prompt_logprobs k (what TRL's
            VLLMClient.get_sequence_logprobs sends), parsed with the json module (what requests does);
  sglang    POST /generate, the 8 sequences as one batch, top_logprobs_num k (miles), and with
            top_logprobs_num 0 (slime: sampled log-probs only, compared with gRPC sampled only);
  ... (json module) the same HTTP rows with the server's msgspec encoder switched off.
bytes/token = response bytes / scored positions; tokens/s = sequence tokens / median seconds.
Prints a markdown table; --out writes the results as JSON.

CPU (tiny shape):  PYTHONPATH=. python bench/bench_http_front.py --shape tiny --device cpu --out /tmp/bh.json
GPU (8B shape):    PYTHONPATH=. python bench/bench_http_front.py --device cuda --out bench_http_front_h100.json
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import TEACHER_SHAPES as SHAPES, qwen3_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--top-k", default="8,20,64",
                   help="comma list of k (TRL's async trainer defaults to 8; vLLM caps prompt_logprobs at 20 unless "
                        "--max-logprobs; opd's client defaults to 64)")
    p.add_argument("--json-module-k", type=int, default=20, help="k of the rows with the msgspec encoder off (0 = none)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median) after one warm-up")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import requests
    import torch

    from teacher_server import http_front
    from teacher_server.app import TeacherConfig, build_server
    from teacher_server.client import ScoreSettings, TeacherClient
    from teacher_server.service import ServerConfig

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_http_front: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    ks = [int(k) for k in args.top_k.split(",") if k]
    tmp = tempfile.mkdtemp(prefix="opd-bench-http-")
    qwen3_config(SHAPES[args.shape], tie_word_embeddings=False, pad_token_id=0, bos_token_id=None,
                 eos_token_id=None).save_pretrained(tmp)
    srv = build_server(TeacherConfig(model=tmp, dtype=args.dtype, device=args.device, random_weights_seed=0,
                                     max_top_k=max(ks + [1]), max_queue_tokens=1 << 22, server=ServerConfig(port=0)))
    srv.start()
    srv.warm_up_and_serve()
    front = http_front.HttpFront(srv, "127.0.0.1", 0).start()
    url, target = f"http://127.0.0.1:{front.port}", f"127.0.0.1:{srv.port}"
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, SHAPES[args.shape]["vocab_size"], size=args.seq_len).tolist() for _ in range(args.seqs)]
    tokens, positions = args.seqs * args.seq_len, args.seqs * (args.seq_len - 1)
    R = {"args": vars(args), "env": {"python": platform.python_version(), "torch": torch.__version__,
                                     "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                                     else (platform.processor() or "cpu"), "cpus": os.cpu_count(),
                                     "threads": torch.get_num_threads(),
                                     "json_encoder": "msgspec" if http_front._msgspec is not None else "json"},
         "rows": []}
    session = requests.Session()

    def timed(fn):
        nbytes = fn()   # warm-up
        ts = []
        for _ in range(args.reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), nbytes

    def row(name, k, fn):
        sec, nbytes = timed(fn)
        r = {"path": name, "k": k, "seconds": sec, "tokens_per_s": tokens / sec, "bytes": nbytes,
             "bytes_per_token": nbytes / positions}
        R["rows"].append(r)
        print(f"  {name:<44} k={k:<3} {r['tokens_per_s']:>10,.0f} tok/s {r['bytes_per_token']:>10,.1f} B/token",
              flush=True)

    def grpc(k, encoding, compression):
        stats = ("sampled", "topk") if k else ("sampled",)
        settings = ScoreSettings(top_k=k, statistics=stats, value_encoding=encoding, compression=compression)

        def fn():
            with TeacherClient(target) as c:
                return sum(s.wire_bytes for s in c.score(seqs, [1] * len(seqs), settings=settings))
        return fn

    def post(path, body):
        def fn():
            r = session.post(url + path, json=body, timeout=3600)
            r.raise_for_status()
            r.json()   # the client's parse is part of the price
            return len(r.content)
        return fn

    def vllm(k):
        return post("/v1/completions", {"prompt": seqs, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k})

    def sglang(k):
        body = {"input_ids": seqs, "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                "return_logprob": True, "logprob_start_len": 0}
        if k:
            body["top_logprobs_num"] = k
        return post("/generate", body)

    print(f"{args.seqs} x {args.seq_len} tokens, shape {args.shape}, {args.device}, {args.dtype}; "
          f"server JSON encoder: {R['env']['json_encoder']}", flush=True)
    try:
        row("grpc sampled only (bf16, zstd)", 0, grpc(0, "bf16", "zstd"))
        row("sglang /generate sampled only (slime)", 0, sglang(0))
        for k in ks:
            row("grpc sampled+top-k (bf16, zstd; opd default)", k, grpc(k, "bf16", "zstd"))
            row("grpc sampled+top-k (fp32, uncompressed)", k, grpc(k, "fp32", "none"))
            row("vllm /v1/completions prompt_logprobs (TRL)", k, vllm(k))
            row("sglang /generate top_logprobs_num (miles)", k, sglang(k))
        if args.json_module_k and http_front._msgspec is not None:
            saved, http_front._msgspec = http_front._msgspec, None
            try:
                k = args.json_module_k
                row("vllm /v1/completions (server: json module)", k, vllm(k))
                row("sglang /generate (server: json module)", k, sglang(k))
            finally:
                http_front._msgspec = saved
    finally:
        front.stop(1)
        srv.stop(1)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(R, f, indent=2)
    print()
    print("| path | k | tokens/s | bytes/token |")
    print("|---|---:|---:|---:|")
    for r in R["rows"]:
        print(f"| {r['path']} | {r['k']} | {r['tokens_per_s']:,.0f} | {r['bytes_per_token']:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
