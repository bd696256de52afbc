"""Calibrate a quality-bench task before a long run: how many SFT steps (and which model size) a
teacher needs to reach the bench's minimum accuracy, and how a student of a given size learns the
task by plain SFT on reference solutions (the warm start's curve, and the ceiling of off-policy
imitation at that size).

Each candidate trains in a process of its own (side by side with --jobs), on --device, with the
quality bench's own helpers (`opd.sft`, `bench.quality.task_accuracy`: greedy, the task's grader,
held-out problems). Prints a table per kind and writes --out (JSON).

    python bench/quality_calibrate.py --task chain --device cuda \\
        --teacher demo_teacher:1500 --teacher demo_teacher:3000 --teacher teacher:1500 \\
        --student student:3000 --student demo_teacher:3000 --seeds 0,1 --out docs/quality_chain_calibration.json

A teacher candidate SIZE:STEPS trains like the bench's teachers (batch 64, lr 3e-3, warm-up +
cosine to STEPS) and is evaluated every --every steps on --eval-size held-out problems. A student
candidate SIZE:STEPS trains like the bench's warm start (batch 16, lr 3e-3, 10 warm-up steps, then
constant, so a point of its curve is what a warm start of that many steps would give up to the
schedule) from the seed's random init, evaluated every --every steps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _curve(kind: str, task_name: str, size: str, steps: int, seed: int, every: int, eval_size: int,
           device: str, threads: int, cache: str) -> dict:
    import torch

    from bench.quality import task_accuracy
    from opd import model_cache, sft
    from opd.tiny import random_model
    from rollout.tasks import get_task
    from rollout.tasks.encoding import max_new_tokens_for

    torch.set_num_threads(threads)
    task = get_task(task_name)
    tok = model_cache.load_tokenizer(model_cache.tokenizer_dir(cache, 512))
    # teachers: the bench's teacher seed 0 (and its training sample); students: init seed 1 + seed
    init_seed = 0 if kind == "teacher" else 1 + seed
    torch.manual_seed(init_seed)
    model = random_model(tok, size, init_seed).to(device)
    batch, lr = (64, 3e-3) if kind == "teacher" else (16, 3e-3)
    train = task.make_examples("train", steps * batch, seed=0, sample_seed=(None if kind == "teacher" else 7000 + seed))
    evals = task.make_examples("eval", eval_size, seed=0)
    mnt = max_new_tokens_for(tok, evals)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, sft.warmup_cosine(steps, 15) if kind == "teacher" else (lambda i: min(1.0, (i + 1) / 10)))
    points, t0, t_eval = [], time.time(), 0.0
    for step in range(1, steps + 1):
        model.train()
        loss = sft.sft_step(model, tok, train[(step - 1) * batch:step * batch], opt, sched)
        if step % every == 0 or step == steps:
            t1 = time.time()
            acc = task_accuracy(model, tok, task, evals, mnt)
            t_eval += time.time() - t1
            points.append({"step": step, "loss": round(float(loss), 4), "accuracy": acc,
                           "train_s": round(time.time() - t0 - t_eval, 1)})
            print(f"[{kind} {size} seed {seed}] step {step} loss {float(loss):.4f} accuracy {acc:.3f}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    return {"kind": kind, "size": size, "steps": steps, "seed": seed, "batch": batch, "lr": lr,
            "params": n_params, "curve": points}


def _worker(args):
    return _curve(*args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="chain")
    p.add_argument("--teacher", action="append", default=[], metavar="SIZE:STEPS")
    p.add_argument("--student", action="append", default=[], metavar="SIZE:STEPS")
    p.add_argument("--seeds", default="0", help="student seeds (comma-separated)")
    p.add_argument("--every", type=int, default=250, help="evaluate every this many steps")
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="candidates trained side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per candidate")
    p.add_argument("--cache-dir", default=os.environ.get("OPD_CACHE", str(Path.home() / ".cache" / "opd" / "quality")))
    p.add_argument("--out", help="JSON file")
    args = p.parse_args(argv)
    from opd.tiny import SIZES
    from rollout.tasks import TASKS

    if args.task not in TASKS:
        p.error(f"--task {args.task!r}: choose from {', '.join(TASKS)}")
    cands = []
    for kind in ("teacher", "student"):
        for spec in getattr(args, kind):
            size, _, steps = spec.partition(":")
            if size not in SIZES or not steps.isdigit() or int(steps) < 1:
                p.error(f"--{kind} {spec!r}: expected SIZE:STEPS with SIZE one of {', '.join(SIZES)} and STEPS >= 1")
            seeds = [0] if kind == "teacher" else [int(s) for s in args.seeds.split(",")]
            cands += [(kind, size, int(steps), s) for s in seeds]
    if not cands:
        p.error("name at least one --teacher or --student candidate")
    return args, cands


def table(results: list[dict]) -> str:
    lines = []
    for kind in ("teacher", "student"):
        rows = [r for r in results if r["kind"] == kind]
        if not rows:
            continue
        steps = sorted({pt["step"] for r in rows for pt in r["curve"]})
        sched = "cosine to the run's steps" if kind == "teacher" else "constant after 10 warm-up steps"
        lines += [f"\n{kind}s: greedy accuracy on held-out problems after N SFT steps "
                  f"(batch {rows[0]['batch']}, lr {rows[0]['lr']:g}, {sched})", "",
                  "| size (params) | steps | seed | " + " | ".join(str(s) for s in steps) + " | train s |",
                  "|---|---|---|" + "---|" * len(steps) + "---|"]
        for r in rows:
            at = {pt["step"]: pt["accuracy"] for pt in r["curve"]}
            lines.append(f"| {r['size']} ({r['params'] / 1e6:.2f}M) | {r['steps']} | {r['seed']} | "
                         + " | ".join(f"{at[s]:.3f}" if s in at else "" for s in steps)
                         + f" | {r['curve'][-1]['train_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args, cands = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from opd import model_cache

    model_cache.tokenizer_dir(args.cache_dir, 512)  # built once, before the workers
    t0 = time.time()
    work = [(k, args.task, size, steps, seed, args.every, args.eval_size, args.device, args.threads, args.cache_dir)
            for k, size, steps, seed in cands]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(_worker, work, chunksize=1)
    text = table(results)
    print(text)
    print(f"\n{len(results)} candidates in {time.time() - t0:.0f} s on {args.device}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "task": args.task, "device": args.device,
                                              "results": results, "wall_s": round(time.time() - t0, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
