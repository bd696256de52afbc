"""One GPU, two processes: the teacher server (random-weight Qwen3-8B shape) in its own process,
the trainer (random-weight Qwen3-1.7B shape, DeepSpeed ZeRO-2, optimizer offloaded to the CPU)
with the local rollout engine in this one. Prints per-phase times, tokens/s and the fraction of
step time the trainer waited on the teacher.

    PYTHONPATH=. python bench/bench_trainer.py --device cuda --out bench_trainer.json
    PYTHONPATH=. python bench/bench_trainer.py --shape tiny --device cpu --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAPES = {
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True),
    "tiny-t": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=128, vocab_size=512, tie_word_embeddings=False),
    "tiny-s": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   intermediate_size=64, vocab_size=512, tie_word_embeddings=True),
}


def model_dir(root: Path, shape: str, tok_dir: Path) -> Path:
    from transformers import AutoTokenizer, Qwen3Config

    d = root / shape
    d.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    Qwen3Config(**SHAPES[shape], max_position_embeddings=8192, rope_theta=1e6, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="full", choices=["full", "tiny"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--staleness", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device.startswith("cuda") else "cpu")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from opd.tiny import build_tokenizer
    from student_trainer.config import load_config
    from student_trainer.trainer import Trainer

    root = Path(tempfile.mkdtemp(prefix="opd-bench-train-"))
    build_tokenizer(root / "tok")
    t_shape, s_shape = ("qwen3-8b", "qwen3-1.7b") if args.shape == "full" else ("tiny-t", "tiny-s")
    tdir, sdir = model_dir(root, t_shape, root / "tok"), model_dir(root, s_shape, root / "tok")
    dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    teacher = subprocess.Popen([sys.executable, "-m", "opd", "teacher", "--model", str(tdir), "--port", "0",
                                "--device", args.device, "--dtype", dtype, "--random-weights-seed", "0",
                                "--max-batch-tokens", "32768", "--chunk-size", "2048", "--log-level", "WARNING"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    port = None
    for line in teacher.stdout:
        sys.stderr.write("[teacher] " + line)
        if "serving" in line and "on 127.0.0.1:" in line:
            port = int(line.rsplit(":", 1)[1])
            # keep draining its output, or a full pipe blocks the server
            threading.Thread(target=lambda: [sys.stderr.write("[teacher] " + x) for x in teacher.stdout],
                             daemon=True).start()
            break
    if port is None:
        raise SystemExit("teacher did not start")
    rows = []
    try:
        cfg = load_config(None, [
            f"model.student={sdir}", f"model.dtype={dtype}", "model.random_init=true", "model.gradient_checkpointing=true",
            "data.task=arithmetic", f"data.prompts_per_step={args.prompts}", f"rollout.n={args.n}",
            f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.staleness={args.staleness}",
            "rollout.max_batch_size=128", f"teacher.url=127.0.0.1:{port}", f"teacher.top_k={args.top_k}",
            "teacher.concurrency=4", "loss.divergence=reverse_kl", "loss.chunk_size=2048", "optim.lr=1e-6",
            "optim.micro_batch_tokens=16384", "optim.zero_stage=2", "optim.offload_optimizer=true",
            f"run.steps={args.steps}", f"run.device={args.device}", f"run.out_dir={root / 'run'}",
            "run.export_hf=false", "run.plot=false", "run.progress=true", "run.tensorboard=false"])
        t_init = time.time()
        tr = Trainer(cfg, on_step=lambda s, m: rows.append(m))
        print(f"trainer ready in {time.time() - t_init:.0f}s", file=sys.stderr, flush=True)
        t0 = time.time()
        tr.run()
        wall = time.time() - t0
        tr.close()
    finally:
        teacher.terminate()
        teacher.wait(60)
    steady = rows[1:] or rows
    mean = lambda k: sum(r[k] for r in steady) / len(steady)  # noqa: E731
    keys = ["step_s", "rollout_s", "teacher_tail_s", "wait_rollout_teacher_s", "train_s", "weight_sync_s",
            "teacher_wait_frac", "tokens", "tokens_per_s", "wire_bytes_per_token"]
    print(f"\n## Trainer, one {args.device} device, teacher {t_shape} + student {s_shape} (steps 2..{len(rows)} averaged)\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    print("| " + " | ".join(f"{mean(k):.3f}" if isinstance(rows[-1][k], float) else f"{mean(k):.0f}" for k in keys) + " |")
    out = {"rows": rows, "steady_mean": {k: mean(k) for k in keys}, "wall_s": wall, "args": vars(args)}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
