"""Distillation quality benchmark: which method gets the student furthest for the same student tokens?

For each synthetic task family of `opd.tasks` a tiny teacher is trained by plain SFT to high
greedy accuracy (cached), one teacher server process (`opd teacher`) is started on it, and a
smaller random-init student is trained with the REAL trainer (local rollout engine -> teacher
server -> chunked loss -> DeepSpeed ZeRO-2 with CPU Adam) by every method, for every seed, until
it has generated a fixed budget of response tokens (the run stops at the first step that reaches
the budget). Each run is a separate process, so its peak RSS is its own.

Recorded per run: greedy accuracy of the exported student on held-out problems, wall time (trainer
start to export, excluding the held-out eval), response tokens, steps, peak RSS, and the trainer's
periodic eval accuracy (for the curve). Written to OUT/: results.json, results.md (mean ± std over
seeds), accuracy_vs_tokens.png.

    .venv/bin/python bench/quality.py                  # --quick (the default configuration)
    .venv/bin/python bench/quality.py --full           # every task, every method, 3 seeds, longer
    .venv/bin/python bench/quality.py --tasks sort --methods rkl,fkl --seeds 0 --token-budget 20000

Methods (`METHODS`): trainer overrides on a common base; group methods (GRPO, OPD+GRPO, PACED)
sample rollout.n=4 per prompt with a quarter of the prompts, so every method samples the same
number of sequences per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (label, overrides); "{half}" is replaced by half the expected number of steps,
# "{teacher}" by the teacher directory, "{steps}" by the step cap.
METHODS: dict[str, tuple[str, list[str]]] = {
    "rkl": ("OPD reverse KL", ["loss.divergence=reverse_kl"]),
    "fkl": ("OPD forward KL", ["loss.divergence=forward_kl"]),
    "jsd": ("OPD JSD (beta 0.5)", ["loss.divergence=jsd", "loss.beta=0.5"]),
    "fkl2rkl": ("forward->reverse KL at half budget", ["loss.divergence=reverse_kl",
                                                       "loss.fkl_to_rkl_switch_step={half}"]),
    "pg": ("sampled-token RKL advantage (pg)", ["loss.divergence=pg"]),
    "sft": ("off-policy SFT on teacher samples", ["loss.objective=sft", "warmup.steps={steps}",
                                                  "warmup.teacher_model={teacher}"]),
    "grpo": ("GRPO from rewards (n=4)", ["loss.objective=grpo", "GROUP"]),
    "opd+grpo": ("OPD reverse KL + GRPO (n=4)", ["loss.objective=opd+grpo", "loss.divergence=reverse_kl",
                                                 "loss.rl_weight=1.0", "GROUP"]),
    "tip50": ("reverse KL, TIP 50% of tokens", ["loss.divergence=reverse_kl", "loss.token_keep_ratio=0.5"]),
    "tip10": ("reverse KL, TIP 10% of tokens", ["loss.divergence=reverse_kl", "loss.token_keep_ratio=0.1"]),
    "paced": ("reverse KL, PACED weighting (n=4)", ["loss.divergence=reverse_kl", "loss.sample_weighting=paced",
                                                    "GROUP"]),
}

QUICK = dict(tasks=["sort", "reverse"], methods=["rkl", "fkl", "sft", "grpo", "tip50", "paced"], seeds=[0, 1, 2],
             token_budget=16000, samples_per_step=16)
FULL = dict(tasks=["arithmetic", "sort", "reverse"], methods=list(METHODS), seeds=[0, 1, 2],
            token_budget=150000, samples_per_step=32)


# ---------------------------------------------------------------------------------------------
# teachers and students


@dataclass(frozen=True)
class TeacherSpec:
    task: str
    size: str = "demo_teacher"
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 15
    seed: int = 0
    vocab_size: int = 512
    eval_size: int = 256
    min_accuracy: float = 0.9
    extra_rounds: int = 3


def _max_new_tokens(tok, examples) -> int:
    from opd import demo_task

    return max(len(demo_task.response_ids(tok, ex)) for ex in examples) + 4


def task_accuracy(model, tok, task, examples, max_new_tokens: int | None = None) -> float:
    """Greedy accuracy graded by the task's own grader (demo_prep.evaluate_accuracy grades addition only)."""
    from transformers import AutoModelForCausalLM

    from opd import demo_prep

    if isinstance(model, (str, os.PathLike)):
        tok = tok or demo_prep._load_tokenizer(model)
        model = AutoModelForCausalLM.from_pretrained(str(model))
    rows = demo_prep.generate_responses(model, tok, examples, max_new_tokens=max_new_tokens or _max_new_tokens(tok, examples))
    texts = tok.batch_decode(rows, skip_special_tokens=True)
    return sum(task.grade(t, ex) for t, ex in zip(texts, examples)) / len(examples)


def prepare_task_teacher(cache_dir: Path, spec: TeacherSpec, log=print) -> Path:
    """Train (first call) or load (cached) a tiny teacher for `spec.task` with demo_prep's SFT helper."""
    from opd import demo_prep
    from opd.tasks import get_task

    out = Path(cache_dir) / demo_prep._key(f"teacher-{spec.task}", spec)
    if (out / "opd_demo.json").exists():
        log(f"teacher[{spec.task}]: cached at {out} (accuracy {demo_prep.read_info(out).get('accuracy')})")
        return out
    task = get_task(spec.task)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tok = demo_prep._load_tokenizer(demo_prep.tokenizer_dir(cache_dir, spec.vocab_size))
    model = demo_prep._new_model(tok, spec.size, spec.seed)
    train = task.make_examples("train", spec.steps * spec.batch_size, seed=spec.seed)
    evals = task.make_examples("eval", spec.eval_size, seed=spec.seed)
    t0 = time.time()
    log(f"teacher[{spec.task}]: training {spec.size} for {spec.steps} steps x {spec.batch_size}")
    acc, seconds = demo_prep.train_to_accuracy(
        model, tok, spec, train, lambda m: task_accuracy(m, tok, task, evals),
        lambda n, r: task.make_examples("train", n, seed=spec.seed, sample_seed=spec.seed + 2000 + r),
        name=f"teacher[{spec.task}]", log=log, t0=t0, log_every=100)
    return demo_prep.save_model(out, model, tok, {"role": "teacher", "task": spec.task, "settings": asdict(spec),
                                                  "accuracy": acc, "eval_size": len(evals),
                                                  "train_seconds": round(seconds, 1)})


def format_rate(model_dir: str, task, n: int) -> float:
    """Fraction of greedy responses on held-out problems that contain ``Answer: <digits>``."""
    import re

    from transformers import AutoModelForCausalLM

    from opd import demo_prep

    tok = demo_prep._load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    evals = task.make_examples("eval", n, seed=0)
    rows = demo_prep.generate_responses(model, tok, evals, max_new_tokens=_max_new_tokens(tok, evals))
    texts = tok.batch_decode(rows, skip_special_tokens=True)
    return sum(bool(re.search(r"Answer:\s*\d", t)) for t in texts) / len(texts)


# ---------------------------------------------------------------------------------------------
# one run (a child process)


class _BudgetReached(Exception):
    pass


def _method_overrides(method: str, teacher: Path, steps_cap: int, half: int, samples: int) -> list[str]:
    ov = []
    group = False
    for o in METHODS[method][1]:
        if o == "GROUP":
            group = True
            continue
        ov.append(o.format(teacher=teacher, steps=steps_cap, half=half))
    n = 4 if group else 1
    return ov + [f"rollout.n={n}", f"data.prompts_per_step={max(1, samples // n)}"]


def run_one(job: dict) -> dict:
    """Train one (task, method, seed) to the token budget; returns the record (also job['out']/record.json)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed JIT-builds cpu_adam into a shared cache; another environment on the same machine
    # rebuilding it there would force a rebuild (minutes) into every run. Keep one per interpreter.
    import hashlib

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "opd" / "torch_extensions" /
                                                      hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]))
    import logging

    logging.basicConfig(level="WARNING")
    import torch

    from student_trainer.config import load_config
    from student_trainer.trainer import Trainer

    torch.set_num_threads(job.get("threads", 2))
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    budget = job["token_budget"]
    overrides = [
        f"model.student={job['student']}", "model.dtype=fp32", f"data.task={job['task']}", "data.seed=0",
        f"run.seed={job['seed']}", "rollout.temperature=1.0", f"rollout.max_new_tokens={job['max_new_tokens']}",
        "rollout.max_batch_size=128", f"teacher.url={job['url']}", "teacher.top_k=32", "teacher.value_encoding=bf16",
        f"optim.lr={job['lr']}", "optim.min_lr_ratio=1.0", "optim.warmup_steps=10", "optim.grad_clip=1.0",
        "optim.zero_stage=2", "optim.offload_optimizer=true", f"run.steps={job['steps_cap']}", f"run.out_dir={out}",
        f"run.eval_every={job['eval_every']}", "run.eval_prompts=64", "run.save_every=0", "run.tensorboard=false",
        "run.plot=false", "run.progress=false", "run.export_hf=true",
        *job["overrides"]]
    cfg = load_config(None, overrides)
    seen = {"tokens": 0, "steps": 0, "curve": []}

    def on_step(step, m):
        seen["tokens"] += int(m["tokens"])
        seen["steps"] = step
        if "eval_accuracy" in m:
            seen["curve"].append([seen["tokens"], float(m["eval_accuracy"])])
        if seen["tokens"] >= budget:
            raise _BudgetReached

    t0 = time.time()
    trainer = Trainer(cfg, on_step=on_step)
    try:
        try:
            trainer.run()
        except _BudgetReached:
            trainer.export_hf(out / "hf")
            trainer.log.close()
    finally:
        trainer.close()
    wall = time.time() - t0
    from opd import demo_prep
    from opd.tasks import get_task

    task = get_task(job["task"])
    evals = task.make_examples("eval", job["eval_size"], seed=0)
    tok = demo_prep._load_tokenizer(out / "hf")
    acc = task_accuracy(str(out / "hf"), tok, task, evals)
    rec = {k: job[k] for k in ("task", "method", "seed")}
    rec.update({"accuracy": acc, "wall_s": round(wall, 1), "tokens": seen["tokens"], "steps": seen["steps"],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "curve": seen["curve"], "overrides": job["overrides"]})
    (out / "record.json").write_text(json.dumps(rec, indent=1))
    return rec


# ---------------------------------------------------------------------------------------------
# driver


def _fmt(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summarize(records: list[dict], teachers: dict, conf: dict, command: str, machine: str) -> str:
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
             f"Token budget per run: {conf['token_budget']} student response tokens "
             f"({conf['samples_per_step']} sampled sequences per step); seeds {conf['seeds']}; "
             f"greedy accuracy on {conf['eval_size']} held-out problems.", ""]
    for task in conf["tasks"]:
        t = teachers.get(task, {})
        lines += [f"### {task} (teacher accuracy {t.get('accuracy', float('nan')):.3f}, "
                  f"student before {t.get('student_before', float('nan')):.3f})", "",
                  "| method | accuracy (mean ± std) | answer format rate | wall s | tokens | steps | peak RSS MB |",
                  "|---|---|---|---|---|---|---|"]
        for method in conf["methods"]:
            rs = [r for r in records if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            lines.append(f"| {METHODS[method][0]} | {_fmt([r['accuracy'] for r in rs])} | "
                         f"{_fmt([r['format_rate'] for r in rs if 'format_rate' in r], 2)} | "
                         f"{_fmt([r['wall_s'] for r in rs], 0)} | {_fmt([r['tokens'] for r in rs], 0)} | "
                         f"{_fmt([r['steps'] for r in rs], 0)} | {max(r['peak_rss_mb'] for r in rs):.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], conf: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = conf["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in conf["methods"]:
            rs = [r for r in records if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            # curve points: mean over seeds of (tokens, eval accuracy) at each eval; final point = held-out accuracy
            n = min(len(r["curve"]) for r in rs)
            xs = [float(np.mean([r["curve"][i][0] for r in rs])) for i in range(n)]
            ys = [float(np.mean([r["curve"][i][1] for r in rs])) for i in range(n)]
            xs.append(float(np.mean([r["tokens"] for r in rs])))
            ys.append(float(np.mean([r["accuracy"] for r in rs])))
            sd = float(np.std([r["accuracy"] for r in rs]))
            line, = ax.plot([0.0] + xs, [0.0] + ys, marker="o", ms=3, label=METHODS[method][0])
            ax.errorbar(xs[-1], ys[-1], yerr=sd, color=line.get_color(), capsize=3)
        ax.set_title(task)
        ax.set_xlabel("student response tokens")
        ax.set_ylabel("greedy accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short default configuration (the default)")
    p.add_argument("--full", action="store_true", help="every task and method, larger budget")
    p.add_argument("--tasks", help="comma-separated task names (opd.tasks.TASKS)")
    p.add_argument("--methods", help=f"comma-separated method names: {','.join(METHODS)}")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--token-budget", type=int, help="student response tokens per run")
    p.add_argument("--samples-per-step", type=int, help="sampled sequences per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--cache-dir", default=os.environ.get("OPD_CACHE", str(Path.home() / ".cache" / "opd" / "quality")))
    p.add_argument("--docs", help="also write the markdown table into this file")
    p.add_argument("--summarize", action="store_true",
                   help="run nothing: tabulate and plot the record.json files already under --out")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        rec = run_one(json.loads(Path(args._one).read_text()))
        print(json.dumps({k: rec[k] for k in ("task", "method", "seed", "accuracy", "wall_s", "tokens")}), flush=True)
        sys.stderr.flush()
        # a run stopped at the token budget can leave the producer / gRPC threads alive; a normal
        # interpreter exit then sometimes aborts in C++ teardown ("terminate called ...")
        os._exit(0)

    conf = dict(FULL if args.full else QUICK)
    if args.tasks:
        conf["tasks"] = args.tasks.split(",")
    if args.methods:
        conf["methods"] = args.methods.split(",")
    if args.seeds:
        conf["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.token_budget:
        conf["token_budget"] = args.token_budget
    if args.samples_per_step:
        conf["samples_per_step"] = args.samples_per_step
    conf["eval_size"] = args.eval_size
    for m in conf["methods"]:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    command = " ".join([".venv/bin/python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from opd import demo_prep
    from opd.tasks import get_task

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir)
    if args.summarize:
        records = [json.loads(f.read_text()) for f in sorted(out.glob("*/*/seed*/record.json"))]
        records = [r for r in records if r["task"] in conf["tasks"] and r["method"] in conf["methods"]
                   and r["seed"] in conf["seeds"]]
        old = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
        teachers = old.get("teachers", {})
        for task_name in conf["tasks"]:
            if task_name not in teachers:
                info = demo_prep.read_info(prepare_task_teacher(cache, TeacherSpec(task_name)))
                teachers[task_name] = {"accuracy": info.get("accuracy", float("nan"))}
        for r in records:  # partial credit: how often the greedy response has the answer format at all
            hf = out / r["task"] / r["method"] / f"seed{r['seed']}" / "hf"
            if "format_rate" not in r and hf.exists():
                r["format_rate"] = format_rate(str(hf), get_task(r["task"]), conf["eval_size"])
        table = summarize(records, teachers, conf, command, f"{os.cpu_count()}-core CPU, no GPU")
        (out / "results_partial.md").write_text(table + "\n")
        plot(records, conf, out / "accuracy_vs_tokens.png")
        print(table)
        return 0
    t_all = time.time()
    records: list[dict] = []
    teachers: dict = {}
    for task_name in conf["tasks"]:
        task = get_task(task_name)
        teacher = prepare_task_teacher(cache, TeacherSpec(task_name))
        tok = demo_prep._load_tokenizer(teacher)
        evals = task.make_examples("eval", conf["eval_size"], seed=0)
        mnt = _max_new_tokens(tok, evals)
        student0 = demo_prep.prepare_student(cache, seed=1)
        teachers[task_name] = {"dir": str(teacher), "accuracy": task_accuracy(str(teacher), tok, task, evals),
                               "student_before": task_accuracy(str(student0), tok, task, evals),
                               "max_new_tokens": mnt}
        print(f"[quality] {task_name}: teacher {teachers[task_name]['accuracy']:.3f}, "
              f"student before {teachers[task_name]['student_before']:.3f}", flush=True)
        from opd.demo import start_teacher_process

        proc, url = start_teacher_process(teacher, out / f"teacher_{task_name}.log")
        try:
            # expected steps: the budget over sequences per step at about half the max length
            exp_steps = max(2, conf["token_budget"] // (conf["samples_per_step"] * max(1, mnt // 2)))
            steps_cap = exp_steps * 4
            for method in conf["methods"]:
                for seed in conf["seeds"]:
                    run_dir = out / task_name / method / f"seed{seed}"
                    done = run_dir / "record.json"
                    student = demo_prep.prepare_student(cache, seed=1 + seed, log=None)
                    job = {"task": task_name, "method": method, "seed": seed, "out": str(run_dir),
                           "student": str(student), "url": url, "token_budget": conf["token_budget"],
                           "max_new_tokens": mnt, "lr": args.lr, "steps_cap": steps_cap,
                           "eval_every": max(1, exp_steps // 4), "eval_size": conf["eval_size"],
                           "overrides": _method_overrides(method, teacher, steps_cap, exp_steps // 2,
                                                          conf["samples_per_step"])}
                    run_dir.mkdir(parents=True, exist_ok=True)
                    jf = run_dir / "job.json"
                    if done.exists() and json.loads(jf.read_text()) == job:
                        records.append(json.loads(done.read_text()))
                        continue
                    done.unlink(missing_ok=True)
                    jf.write_text(json.dumps(job, indent=1))
                    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_one", str(jf)],
                                       cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    (run_dir / "stdout.log").write_text(r.stdout)
                    if r.returncode != 0 and done.exists():
                        print(f"[quality] {task_name}/{method}/seed{seed}: exit code {r.returncode} after "
                              f"writing its record (kept)", flush=True)
                    elif r.returncode != 0:
                        print(f"[quality] {task_name}/{method}/seed{seed} FAILED (rc {r.returncode}); "
                              f"see {run_dir / 'stdout.log'}", flush=True)
                        continue
                    rec = json.loads(done.read_text())
                    records.append(rec)
                    print(f"[quality] {task_name:10s} {method:9s} seed {seed}: accuracy {rec['accuracy']:.3f} "
                          f"tokens {rec['tokens']} steps {rec['steps']} {rec['wall_s']:.0f}s "
                          f"rss {rec['peak_rss_mb']:.0f}MB ({time.time() - t_all:.0f}s so far)", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    machine = f"{os.cpu_count()}-core CPU, no GPU"
    table = summarize(records, teachers, conf, command, machine)
    (out / "results.json").write_text(json.dumps({"config": conf, "teachers": teachers, "records": records,
                                                  "total_wall_s": round(time.time() - t_all, 1)}, indent=1))
    (out / "results.md").write_text(table + "\n")
    try:
        plot(records, conf, out / "accuracy_vs_tokens.png")
    except ImportError:
        print("[quality] matplotlib not installed: no PNG", flush=True)
    print(table)
    print(f"[quality] {len(records)} runs in {time.time() - t_all:.0f}s; {out / 'results.json'}, "
          f"{out / 'results.md'}, {out / 'accuracy_vs_tokens.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
