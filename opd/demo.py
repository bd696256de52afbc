"""`opd demo`: the whole pipeline on a tiny built-in model, on CPU, in minutes.

1. A synthetic task with a checkable answer: 2-digit addition with a worked, column-by-column
   answer ("7+5=12, 3+8+1=12. Answer: 122"); train and eval operand pairs are disjoint.
2. A tiny teacher (0.9M parameters) is trained on it by plain SFT to >= 90% greedy accuracy
   (about a minute; cached under --cache-dir after the first run).
3. The teacher server starts as a separate process (`opd teacher`, gRPC on 127.0.0.1).
4. A smaller student (0.5M parameters, random init: it starts at 0%) first learns for 50 steps on
   the teacher's samples (forward KL, `warmup.steps`), then is distilled on its OWN samples with
   the real loop: local rollout engine -> teacher server -> chunked forward KL over
   the teacher's top-k + tail -> DeepSpeed ZeRO-2 with the optimizer on the CPU -> weights back to
   the rollout engine.
5. Teacher accuracy, student accuracy before and after, and where the report went are printed;
   `--out DIR/report.json` holds them for scripts.

Shorter or longer: `--steps N` (default 350), `--warmup-steps N` (default 50; 0 = on-policy from
step 1), `--prompts-per-step`, `--lr`; any trainer key as `--section.key=value`. Without the
warm-up a random-init student sits near 0% for ~150 steps and the step at which it takes off
varies between runs (it ended anywhere between 0.82 and 0.99 of the teacher at 400 steps); the
warm-up on teacher samples starts the climb ~100 steps earlier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ACCEPTS_OVERRIDES = True


def add_arguments(p):
    p.add_argument("--out", default="runs/demo", help="run directory: metrics.jsonl, metrics.png, report.json, hf/")
    p.add_argument("--cache-dir", default=os.environ.get("OPD_CACHE", str(Path.home() / ".cache" / "opd" / "demo")),
                   help="where the trained demo teacher and the student init are cached")
    p.add_argument("--steps", type=int, default=350, help="optimizer steps in all, the warm-up's included")
    p.add_argument("--warmup-steps", type=int, default=50,
                   help="first steps on the teacher's own samples (forward KL; warmup.steps), then on-policy; 0 = none")
    p.add_argument("--prompts-per-step", type=int, default=64, help="prompts per step (one sample each)")
    p.add_argument("--lr", type=float, default=3e-3, help="student learning rate")
    p.add_argument("--divergence", default="forward_kl", help="loss term (forward_kl, reverse_kl, jsd, pg, ...)")
    p.add_argument("--top-k", type=int, default=32, help="teacher top-k sent per position (plus the exact tail mass)")
    p.add_argument("--eval-size", type=int, default=256, help="held-out problems for the accuracy numbers")
    p.add_argument("--eval-every", type=int, default=50, help="greedy eval during training every N steps (0 = off)")
    p.add_argument("--teacher-steps", type=int, default=300, help="SFT steps for the demo teacher (first run only)")
    p.add_argument("--teacher-min-accuracy", type=float, default=0.9,
                   help="the demo teacher trains (up to 3 extra rounds) until its greedy accuracy reaches this; "
                        "tests pass 0 with a few --teacher-steps for a quick smoke run of the whole pipeline")


def start_teacher_process(model_dir: Path, log_path: Path):
    """Start `opd teacher` on `model_dir` as its own process; returns (process, "127.0.0.1:PORT")."""
    return wait_teacher_process(launch_teacher_process(model_dir), log_path)


def launch_teacher_process(model_dir: Path, device: str = "cpu") -> subprocess.Popen:
    """Start `opd teacher` on `model_dir` (fp32, on `device`) and return at once
    (`wait_teacher_process` waits until it serves): several servers can then start side by side."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "opd", "teacher", "--model", str(model_dir), "--port", "0",
                             "--dtype", "fp32", "--device", device, "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_teacher_process(proc: subprocess.Popen, log_path: Path):
    """Copy a launched server's output to `log_path` until it serves; (process, "127.0.0.1:PORT")."""
    logf = open(log_path, "w")
    for line in proc.stdout:
        logf.write(line)
        logf.flush()
        if "serving" in line and "on 127.0.0.1:" in line:
            threading.Thread(target=lambda: [logf.write(x) for x in proc.stdout], daemon=True).start()
            return proc, f"127.0.0.1:{int(line.rsplit(':', 1)[1])}"
    raise RuntimeError(f"the teacher server exited with code {proc.wait()}; see {log_path}")


def main(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level="WARNING")
    from opd import demo_models
    from student_trainer.config import ConfigError, load_config
    from student_trainer.trainer import Trainer

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(f"[demo] {msg}", flush=True)  # noqa: E731
    teacher_dir = demo_models.prepare_teacher(args.cache_dir, steps=args.teacher_steps,
                                            min_accuracy=args.teacher_min_accuracy, log=say)
    student_dir = demo_models.prepare_student(args.cache_dir, log=say)
    evals = demo_models.eval_examples(n=args.eval_size)
    teacher_acc = demo_models.evaluate_accuracy(str(teacher_dir), None, evals)
    before = demo_models.evaluate_accuracy(str(student_dir), None, evals)
    say(f"teacher accuracy {teacher_acc:.3f}; student before {before:.3f} ({len(evals)} held-out problems, greedy)")

    proc, url = start_teacher_process(teacher_dir, out / "teacher_server.log")
    say(f"teacher server (separate process, pid {proc.pid}) serving on {url}")
    try:
        cfg = load_config(None, [
            f"model.student={student_dir}", "model.dtype=fp32", "data.task=arithmetic",
            f"data.prompts_per_step={args.prompts_per_step}", "rollout.n=1", "rollout.temperature=1.0",
            "rollout.max_new_tokens=28", "rollout.max_batch_size=128", f"teacher.url={url}",
            f"teacher.top_k={args.top_k}", "teacher.value_encoding=bf16", f"loss.divergence={args.divergence}",
            f"optim.lr={args.lr}", "optim.min_lr_ratio=1.0", "optim.warmup_steps=10", "optim.grad_clip=1.0",
            "optim.zero_stage=2", "optim.offload_optimizer=true", f"run.steps={args.steps}", f"run.out_dir={out}",
            f"run.eval_every={args.eval_every}", f"run.eval_prompts={min(args.eval_size, 128)}",
            "run.save_every=0", "run.tensorboard=false",
            *([f"warmup.steps={args.warmup_steps}", f"warmup.teacher_model={teacher_dir}"] if args.warmup_steps else []),
            *getattr(args, "_extra", [])])
        warm = (f"the first {cfg.warmup.steps} on the teacher's samples, then " if cfg.warmup.steps else "")
        say(f"distilling for {cfg.run.steps} steps x {cfg.data.prompts_per_step} prompts ({warm}on the student's own) "
            f"({cfg.loss.divergence}, teacher top-{cfg.teacher.top_k} + tail, DeepSpeed ZeRO-{cfg.optim.zero_stage} "
            f"with the optimizer offloaded to the CPU)")
        trainer = Trainer(cfg)
        try:
            last = trainer.run()
        finally:
            trainer.close()
    except ConfigError as exc:
        print(f"opd demo: config error: {exc}", file=sys.stderr)
        return 2
    finally:
        proc.terminate()
        proc.wait(30)
    print(file=sys.stderr)
    after = demo_models.evaluate_accuracy(str(out / "hf"), None, evals)
    report = {
        "teacher_accuracy": teacher_acc, "student_accuracy_before": before, "student_accuracy_after": after,
        "student_over_teacher": after / teacher_acc if teacher_acc else None,
        "steps": cfg.run.steps, "warmup_steps": cfg.warmup.steps, "wall_seconds": round(time.time() - t_start, 1), "eval_problems": len(evals),
        "teacher_model": str(teacher_dir), "student_init": str(student_dir), "student_final": str(out / "hf"),
        "metrics_jsonl": str(out / "metrics.jsonl"), "plot_png": str(out / "metrics.png"),
        "wire_bytes_per_token": last.get("wire_bytes_per_token"), "teacher_wait_frac_last_step": last.get("teacher_wait_frac"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    say(f"teacher accuracy        {teacher_acc:.3f}")
    say(f"student accuracy before {before:.3f}")
    say(f"student accuracy after  {after:.3f}  ({100 * after / max(teacher_acc, 1e-9):.0f}% of the teacher)")
    say(f"report {out / 'report.json'}; metrics {out / 'metrics.jsonl'}; plot {out / 'metrics.png'}; "
        f"student {out / 'hf'} ({report['wall_seconds']:.0f}s in all)")
    return 0
