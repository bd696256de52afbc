"""One teacher server with two models against one with one model, and the UpdateWeights push.

Random-weight Qwen3-shaped models (bf16 on CUDA). Two model directories whose config.json differ
by one unused key, so they hash differently and are two models (not one loaded twice). Rows:

    single        one-model server, N sequences through one client
    multi-one     two-model server, the same N sequences, all naming model a
    multi-mixed   two-model server, N/2 naming a and N/2 naming b, two clients at once
    update        TeacherClient.update_weights of model a's full weights (bf16, 64 MiB messages):
                  wall time, bytes, MB/s, and the time the engine was paused to swap them in

Tokens/s is the sequences' tokens over the wall time (median of --repeats). On the GPU the
mixed row runs batches of two models one after the other, so it should match `single` (one queue,
one device); the push is host-staged (gRPC on 127.0.0.1), so it measures serialisation and copy.

    PYTHONPATH=. python bench/bench_teacher_multi.py --out bench_teacher_multi.json          # CUDA, qwen3-1.7b
    PYTHONPATH=. python bench/bench_teacher_multi.py --shape tiny --device cpu --seqs 8 --seq-len 128  # smoke
    PYTHONPATH=. python bench/bench_teacher_multi.py --rows update --shape mid --device cpu --dtype bf16  # push only

--rows update runs the push alone: a one-model server, and the pushed tensors are a copy of that
model's own parameters (same bytes, sizes and names as the two-model run's push of b into a).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, max_position_embeddings=40960),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144, max_position_embeddings=40960),
    # ~218M parameters (436 MB in bf16): big enough for the push's per-byte costs to dominate, cheap on a CPU
    "mid": dict(vocab_size=32768, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
                num_key_value_heads=8, head_dim=64, intermediate_size=3072, max_position_embeddings=8192),
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=384, max_position_embeddings=8192),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", default="all", choices=["all", "update"],
                   help="all: the scoring rows and the push; update: the UpdateWeights push alone")
    p.add_argument("--bucket-mb", type=float, default=64.0, help="update_weights' message size (MiB)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def model_dirs(root: Path, shape: str) -> tuple[str, str]:
    from transformers import Qwen3Config

    dirs = []
    for i in range(2):
        cfg = Qwen3Config(**SHAPES[shape], rope_theta=1e6, tie_word_embeddings=False, pad_token_id=0,
                          bos_token_id=None, eos_token_id=None)
        cfg.opd_bench_copy = i   # unused by the model; makes the two checkpoints differ
        d = root / f"m{i}"
        cfg.save_pretrained(d)
        dirs.append(str(d))
    return dirs[0], dirs[1]


def serve(args, models):
    from teacher_server.app import TeacherConfig, build_server
    from teacher_server.service import ServerConfig

    srv = build_server(TeacherConfig(models=models, dtype=args.dtype, device=args.device, random_weights_seed=0,
                                     max_queue_tokens=1 << 24, server=ServerConfig(port=0, max_inflight_per_call=1024)))
    srv.start()
    srv.warm_up_and_serve()
    return srv, f"127.0.0.1:{srv.port}"


def timed(fn, repeats):
    times = []
    for _ in range(repeats + 1):   # the first run warms up (compile graphs of new shapes)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def score(url, model, seqs):
    from teacher_server.client import ScoreSettings, TeacherClient

    with TeacherClient(url, model=model, settings=ScoreSettings(top_k=64)) as c:
        c.score(seqs, [len(s) // 2 for s in seqs])


def score_rows(args, rows, seqs, tokens, a_dir, b_dir):
    """The single, multi-one and multi-mixed rows; returns the two-model server, still serving."""
    srv, url = serve(args, [("a", a_dir)])
    s = timed(lambda: score(url, "a", seqs), args.repeats)
    rows.append({"row": "single", "seconds": s, "tokens_per_s": tokens / s})
    srv.stop(1)
    del srv
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    srv, url = serve(args, [("a", a_dir), ("b", b_dir)])
    s = timed(lambda: score(url, "a", seqs), args.repeats)
    rows.append({"row": "multi-one", "seconds": s, "tokens_per_s": tokens / s})

    def mixed():
        ts = [threading.Thread(target=score, args=(url, m, seqs[i::2])) for i, m in enumerate("ab")]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    s = timed(mixed, args.repeats)
    rows.append({"row": "multi-mixed", "seconds": s, "tokens_per_s": tokens / s})
    return srv


def main(argv=None) -> int:
    args = parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    rng = np.random.default_rng(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    seqs = [rng.integers(0, vocab, args.seq_len) for _ in range(args.seqs)]
    tokens = args.seqs * args.seq_len
    rows = []
    root = Path(tempfile.mkdtemp(prefix="opd-bench-multi-"))
    a_dir, b_dir = model_dirs(root, args.shape)

    if args.rows == "all":
        srv = score_rows(args, rows, seqs, tokens, a_dir, b_dir)
        params = dict(srv.engine.engine_for("b").model.named_parameters())   # b's weights, on the device
    else:
        srv, _ = serve(args, [("a", a_dir)])
        params = {n: p.detach().clone() for n, p in srv.engine.engine_for("a").model.named_parameters()}
    url = f"127.0.0.1:{srv.port}"
    from teacher_server.client import TeacherClient

    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    pushes = []
    with TeacherClient(url, model="a") as c:
        for v in range(1, args.repeats + 2):
            t = time.perf_counter()
            (resp,) = c.update_weights(params.items(), version=v, bucket_mb=args.bucket_mb)
            pushes.append((time.perf_counter() - t, resp.apply_seconds))
    wall = statistics.median(p[0] for p in pushes[1:])
    pause = statistics.median(p[1] for p in pushes[1:])
    best = min(p[0] for p in pushes[1:])
    rows.append({"row": "update", "seconds": wall, "bytes": nbytes, "mb_per_s": nbytes / wall / 1e6,
                 "apply_seconds": pause, "best_seconds": best, "best_mb_per_s": nbytes / best / 1e6,
                 "bucket_mb": args.bucket_mb})
    srv.stop(1)

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# {args.shape}, {args.dtype}, {dev}; {args.seqs} x {args.seq_len} tokens; median of {args.repeats}"
          f" (update: {nbytes / 1e6:.0f} MB in {args.bucket_mb:g} MiB messages; best {best:.3f} s, "
          f"{nbytes / best / 1e6:.0f} MB/s)")
    print(f"{'row':<12} {'seconds':>9} {'tokens/s':>11} {'MB/s':>8} {'pause s':>8}")
    for r in rows:
        print(f"{r['row']:<12} {r['seconds']:>9.3f} {r.get('tokens_per_s', float('nan')):>11.0f} "
              f"{r.get('mb_per_s', float('nan')):>8.0f} {r.get('apply_seconds', float('nan')):>8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "dtype": args.dtype, "device": dev,
                                              "seqs": args.seqs, "seq_len": args.seq_len, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
