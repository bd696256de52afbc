"""Distillation quality benchmark: which method gets the student furthest for the same student tokens?

For each synthetic task family of `rollout.tasks` a tiny teacher is trained by plain SFT to high
greedy accuracy (cached), one teacher server process (`opd teacher`) is started on it, and a
smaller student, WARM-STARTED by a short SFT on a few reference solutions (the same warm start for
every method; cached per task and seed), is trained with the REAL trainer (local rollout engine
[+ the tool loop for multi-turn tasks] -> teacher server -> chunked loss -> DeepSpeed ZeRO-2 with
CPU Adam) by every method, for every seed, until it has generated a fixed budget of student tokens
(the run stops at the first step that reaches the budget).

Every run (and every preparation step) is a child process FORKED from a driver that has imported
torch / transformers / DeepSpeed once, so a run costs its own work plus ~1 s, and its state (threads,
DeepSpeed, gRPC) dies with it. Peak RSS is the child's own high-water mark (reset at its start).

Recorded per run: greedy accuracy of the exported student on held-out problems, wall time (trainer
start to export), student tokens, steps, peak RSS, and the trainer's periodic eval accuracy (the
curve). Written to OUT/: results.json, results.md (mean ± std over seeds), accuracy_vs_tokens.png.

    .venv/bin/python bench/quality.py                  # the default: 63 runs, ~20 min on 2 cores
    .venv/bin/python bench/quality.py --full           # 4 tasks x 11 methods x 3 seeds, 2x budget (~75 min)
    .venv/bin/python bench/quality.py --tasks sort --methods rkl,fkl --seeds 0 --token-budget 20000

Methods (`METHODS`): trainer overrides on a common base; group methods (GRPO, OPD+GRPO, PACED)
sample rollout.n=4 per prompt with a quarter of the prompts, so every method samples the same
number of sequences per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from opd.demo_models import TeacherSettings  # noqa: E402  (no torch import: safe before _set_env)

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

# Per task: warm-start SFT steps (batch 16, lr 3e-3, cosine) of the student before any method runs;
# picked from a short calibration so the warm student is off 0 and far below the teacher
# (docs/quality.md lists the resulting start accuracies, which differ a lot between seeds).
WARM_STEPS = {"arithmetic": 150, "sort": 80, "reverse": 110, "calc": 180}

# The default covers each claim of the issue (OPD vs GRPO vs off-policy SFT, TIP 50%, PACED,
# forward->reverse KL) on three task families; --full adds JSD, pg, OPD+GRPO, TIP 10% and arithmetic.
DEFAULT = dict(tasks=["sort", "reverse", "calc"], methods=["rkl", "fkl", "fkl2rkl", "sft", "grpo", "tip50", "paced"],
               seeds=[0, 1, 2], token_budget=10000, samples_per_step=32, eval_size=128)
FULL = dict(tasks=["arithmetic", "sort", "reverse", "calc"], methods=list(METHODS), seeds=[0, 1, 2],
            token_budget=20000, samples_per_step=32, eval_size=256)


# ---------------------------------------------------------------------------------------------
# teachers, warm-started students, accuracy


_DEMO_TEACHER = TeacherSettings()


@dataclass(frozen=True)
class TeacherSpec:
    """A task's teacher, trained like the demo teacher (defaults from `demo_models.TeacherSettings`,
    less its arithmetic-only digits and style)."""
    task: str
    size: str = _DEMO_TEACHER.size
    steps: int = _DEMO_TEACHER.steps
    batch_size: int = _DEMO_TEACHER.batch_size
    lr: float = _DEMO_TEACHER.lr
    warmup_steps: int = _DEMO_TEACHER.warmup_steps
    seed: int = _DEMO_TEACHER.seed
    vocab_size: int = _DEMO_TEACHER.vocab_size
    eval_size: int = _DEMO_TEACHER.eval_size
    min_accuracy: float = _DEMO_TEACHER.min_accuracy
    extra_rounds: int = _DEMO_TEACHER.extra_rounds


@dataclass(frozen=True)
class WarmSpec:
    """The default warm start: a fixed number of SFT steps (cosine schedule) per task."""
    task: str
    seed: int                      # the student init is StudentSettings(seed=1 + seed)
    steps: int = 60
    batch_size: int = 16
    lr: float = 3e-3
    vocab_size: int = 512


@dataclass(frozen=True)
class WarmTargetSpec:
    """The alternative warm start (--warm-target): SFT until a probe accuracy is reached."""
    task: str
    seed: int
    target: float = 0.3            # SFT until the greedy accuracy on probe problems reaches this
    check_every: int = 10
    max_steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    probe_size: int = 64           # train-split problems (not the held-out eval problems)
    vocab_size: int = 512


def task_accuracy(model, tok, task, examples, max_new_tokens: int | None = None) -> float:
    """Greedy accuracy graded by the task's own grader; multi-turn tasks go through the tool loop."""
    from rollout.evaluate import model_accuracy

    return model_accuracy(model, tok, examples, task.grade, tools=task.tools, max_new_tokens=max_new_tokens)


def prepare_task_teacher(cache_dir: Path, spec: TeacherSpec, log=print) -> Path:
    """Train (first call) or load (cached) a tiny teacher for `spec.task` with opd.sft's helper."""
    from opd import model_cache, sft
    from opd.tiny import random_model
    from rollout.tasks import get_task

    out = Path(cache_dir) / model_cache.cache_key(f"teacher-{spec.task}", spec)
    if (out / "opd_demo.json").exists():
        log(f"teacher[{spec.task}]: cached at {out} (accuracy {model_cache.read_info(out).get('accuracy')})")
        return out
    task = get_task(spec.task)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tok = model_cache.load_tokenizer(model_cache.tokenizer_dir(cache_dir, spec.vocab_size))
    model = random_model(tok, spec.size, spec.seed)
    train = task.make_examples("train", spec.steps * spec.batch_size, seed=spec.seed)
    evals = task.make_examples("eval", spec.eval_size, seed=spec.seed)
    t0 = time.time()
    log(f"teacher[{spec.task}]: training {spec.size} for {spec.steps} steps x {spec.batch_size}")
    acc, seconds = sft.train_to_accuracy(
        model, tok, spec, train, lambda m: task_accuracy(m, tok, task, evals),
        lambda n, r: task.make_examples("train", n, seed=spec.seed, sample_seed=spec.seed + 2000 + r),
        name=f"teacher[{spec.task}]", log=log, t0=t0, log_every=100)
    return model_cache.save_model(out, model, tok, {"role": "teacher", "task": spec.task, "settings": asdict(spec),
                                                  "accuracy": acc, "eval_size": len(evals),
                                                  "train_seconds": round(seconds, 1)})


def _warm_start(cache_dir: Path, spec, train_at_all: bool):
    """Shared start of the two warm-student preparations: the seed's random-init demo student's
    path when there is nothing to train, the cached warm student's path when it exists, else
    (task, tokenizer, model loaded from the init, output directory) to train and save."""
    from opd import demo_models, model_cache
    from rollout.tasks import get_task

    init = demo_models.prepare_student(cache_dir, seed=1 + spec.seed, vocab_size=spec.vocab_size, log=None)
    if not train_at_all:
        return init
    out = Path(cache_dir) / model_cache.cache_key(f"warm-{spec.task}", spec)
    if (out / "opd_demo.json").exists():
        return out
    from transformers import AutoModelForCausalLM

    tok = model_cache.load_tokenizer(init)
    return get_task(spec.task), tok, AutoModelForCausalLM.from_pretrained(str(init)), out


def prepare_warm_student(cache_dir: Path, spec: WarmSpec, log=print) -> Path:
    """The seed's random-init demo student after `spec.steps` SFT steps (sft.sft_train: AdamW,
    warm-up + cosine) on reference solutions of the task (train split, a sample of its own per seed);
    cached. steps=0: the random init."""
    import torch

    from opd import model_cache, sft

    got = _warm_start(cache_dir, spec, train_at_all=spec.steps > 0)
    if isinstance(got, Path):
        return got
    task, tok, model, out = got
    train = task.make_examples("train", spec.steps * spec.batch_size, seed=0, sample_seed=7000 + spec.seed)
    torch.manual_seed(spec.seed)
    sft.sft_train(model, tok, train, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                        warmup_steps=min(10, spec.steps))
    log(f"warm student[{spec.task}, seed {spec.seed}]: {spec.steps} SFT steps x {spec.batch_size}")
    return model_cache.save_model(out, model, tok, {"role": "student", "task": spec.task, "settings": asdict(spec),
                                                  "warm_steps": spec.steps})


def prepare_warm_student_to_target(cache_dir: Path, spec: WarmTargetSpec, log=print) -> Path:
    """The seed's random-init demo student, SFT'd on reference solutions of the task (train split,
    a sample of its own per seed; AdamW, constant lr after 10 warm-up steps) until its greedy accuracy
    on `probe_size` other train problems reaches `target` (checked every `check_every` steps); cached.
    Slow for a seed that learns slowly (up to max_steps plus a probe eval every check_every steps)."""
    import torch

    from opd import model_cache, sft

    got = _warm_start(cache_dir, spec, train_at_all=spec.target > 0)
    if isinstance(got, Path):
        return got
    task, tok, model, out = got
    train = task.make_examples("train", spec.max_steps * spec.batch_size, seed=0, sample_seed=7000 + spec.seed)
    probe = task.make_examples("train", spec.probe_size, seed=0, sample_seed=9000 + spec.seed)
    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10))
    acc, step = 0.0, 0
    while step < spec.max_steps:
        model.train()
        sft.sft_step(model, tok, train[step * spec.batch_size:(step + 1) * spec.batch_size], opt, sched)
        step += 1
        if step % spec.check_every == 0:
            model.eval()
            acc = task_accuracy(model, tok, task, probe)
            if acc >= spec.target:
                break
    model.eval()
    log(f"warm student[{spec.task}, seed {spec.seed}]: {step} SFT steps x {spec.batch_size}, probe accuracy {acc:.3f}")
    return model_cache.save_model(out, model, tok, {"role": "student", "task": spec.task, "settings": asdict(spec),
                                                  "warm_steps": step, "probe_accuracy": acc})


def format_rate(model_dir: str, task, n: int) -> float:
    """Fraction of greedy responses on held-out problems that contain ``Answer: <digits>``."""
    import re

    from transformers import AutoModelForCausalLM

    from opd import generation, model_cache
    from rollout.tasks.encoding import max_new_tokens_for

    tok = model_cache.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    evals = task.make_examples("eval", n, seed=0)
    rows = generation.generate_responses(model, tok, evals, max_new_tokens=max_new_tokens_for(tok, evals))
    texts = tok.batch_decode(rows, skip_special_tokens=True)
    return sum(bool(re.search(r"Answer:\s*\d", t)) for t in texts) / len(texts)


# ---------------------------------------------------------------------------------------------
# child processes


def _set_env() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed JIT-builds its CPU ops into a shared cache; another environment on the same machine
    # rebuilding them there would force a rebuild (minutes) into every run. Keep one per interpreter.
    import hashlib

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "opd" / "torch_extensions" /
                                                      hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]))


def _preimport() -> None:
    """Import the heavy modules once in the driver (no torch compute, no threads) so forks start warm."""
    import logging

    logging.basicConfig(level="WARNING")
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.qwen3 import modeling_qwen3  # noqa: F401

    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (imported by every engine init: ~3 s)
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import rollout.agent  # noqa: F401
    import rollout.local_engine  # noqa: F401
    import student_trainer.trainer  # noqa: F401
    import teacher_server.client  # noqa: F401
    import rollout.tasks.tool_engine  # noqa: F401
    from opd import demo_models, generation, model_cache, sft  # noqa: F401

    # DeepSpeed's CPU Adam asks py-cpuinfo three times per engine, and each call runs a subprocess
    # (~1.2 s): ask once here, and load the JIT-built CPU ops once, so every forked run reuses them.
    try:
        import cpuinfo

        info = cpuinfo.get_cpu_info()
        cpuinfo.get_cpu_info = lambda: info
    except ImportError:
        pass
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load(verbose=False)


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(fn, log_path: Path, *args) -> int:
    """Run fn(*args) in a forked child (stdout/stderr to log_path); returns its exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:  # the child's own peak RSS from here on (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                # a run stopped at the token budget can leave producer / gRPC threads alive; skip teardown
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _deterministic(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if os.environ.get("OPD_DETERMINISTIC_ALGORITHMS") == "1":  # not needed on CPU (see docs); much slower
        torch.use_deterministic_algorithms(True, warn_only=True)


def prep_task(task_name: str, conf: dict, cache: Path, out_json: Path) -> None:
    """Child: teacher + warm students for one task, and their held-out accuracies."""
    from opd import model_cache
    from rollout.tasks import get_task
    from rollout.tasks.encoding import max_new_tokens_for

    _deterministic(conf["threads"])
    task = get_task(task_name)
    spec = TeacherSpec(task_name, steps=conf.get("teacher_steps") or 300,
                       min_accuracy=conf.get("teacher_min_accuracy", 0.9))
    teacher = prepare_task_teacher(cache, spec)
    tok = model_cache.load_tokenizer(teacher)
    evals = task.make_examples("eval", conf["eval_size"], seed=0)
    # room for the longest reference trajectory (+ eos) and some slack, over train and eval problems
    mnt = max(max_new_tokens_for(tok, evals), max_new_tokens_for(
        tok, task.make_examples("train", 512, seed=0)))
    info = {"dir": str(teacher), "accuracy": task_accuracy(str(teacher), tok, task, evals, mnt),
            "max_new_tokens": mnt, "students": {}}
    for seed in conf["seeds"]:
        if conf.get("warm_target") is not None:
            st = prepare_warm_student_to_target(cache, WarmTargetSpec(task_name, seed, target=conf["warm_target"]))
        else:
            st = prepare_warm_student(cache, WarmSpec(task_name, seed, steps=conf["warm_steps"][task_name]))
        info["students"][str(seed)] = {"dir": str(st), "warm_steps": model_cache.read_info(st).get("warm_steps", 0),
                                       "accuracy": task_accuracy(str(st), tok, task, evals, mnt)}
    info["student_before"] = statistics.mean(s["accuracy"] for s in info["students"].values())
    out_json.write_text(json.dumps(info, indent=1))


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
    """Child: train one (task, method, seed) to the token budget; writes job['out']/record.json."""
    from opd import model_cache
    from rollout.tasks import get_task
    from student_trainer.config import load_config
    from student_trainer.trainer import Trainer

    _deterministic(job["threads"])
    task = get_task(job["task"])
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    budget = job["token_budget"]
    overrides = [
        f"model.student={job['student']}", "model.dtype=fp32", f"data.task={job['task']}", "data.seed=0",
        f"run.seed={job['seed']}", "rollout.temperature=1.0", f"rollout.max_new_tokens={job['max_new_tokens']}",
        "rollout.max_batch_size=256", f"teacher.url={job['url']}", "teacher.top_k=32", "teacher.value_encoding=bf16",
        # one scoring call per step with all its sequences: the same teacher batches on every rerun
        "teacher.concurrency=1", "teacher.batch_sequences=4096",
        f"optim.lr={job['lr']}", "optim.min_lr_ratio=1.0", "optim.warmup_steps=5", "optim.grad_clip=1.0",
        "optim.zero_stage=2", "optim.offload_optimizer=true", f"run.steps={job['steps_cap']}", f"run.out_dir={out}",
        f"run.eval_every={job['eval_every']}", f"run.eval_prompts={job['eval_prompts']}", "run.save_every=0",
        "run.tensorboard=false", "run.plot=false", "run.progress=false", "run.export_hf=true",
        *job["overrides"]]
    cfg = load_config(None, overrides)
    seen = {"tokens": 0, "steps": 0, "curve": []}

    def on_step(step, m):
        # student tokens: model-generated response tokens (tool-output tokens are not generated)
        seen["tokens"] += int(round(m["tokens"] * (1.0 - m.get("tool_token_ratio", 0.0))))
        seen["steps"] = step
        if "eval_accuracy" in m:
            seen["curve"].append([seen["tokens"], float(m["eval_accuracy"])])
        if seen["tokens"] >= budget:
            raise _BudgetReached

    t0 = time.time()
    trainer = Trainer(cfg, on_step=on_step)  # (multi-turn tasks get the tool loop from the trainer)
    t_init = time.time() - t0
    try:
        try:
            trainer.run()
        except _BudgetReached:
            trainer.export_hf(out / "hf")
            trainer.log.close()
    finally:
        trainer.close()
    wall = time.time() - t0
    t1 = time.time()
    evals = task.make_examples("eval", job["eval_size"], seed=0)
    tok = model_cache.load_tokenizer(out / "hf")
    acc = task_accuracy(str(out / "hf"), tok, task, evals, job["max_new_tokens"])
    rec = {k: job[k] for k in ("task", "method", "seed")}
    rec.update({"accuracy": acc, "wall_s": round(wall, 1), "init_s": round(t_init, 1),
                "eval_s": round(time.time() - t1, 1), "tokens": seen["tokens"], "steps": seen["steps"],
                "peak_rss_mb": round(_peak_rss_mb(), 1), "curve": seen["curve"], "overrides": job["overrides"]})
    (out / "record.json").write_text(json.dumps(rec, indent=1))
    return rec


# ---------------------------------------------------------------------------------------------
# tables and the plot


def _fmt(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summarize(records: list[dict], teachers: dict, conf: dict, command: str, machine: str) -> str:
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
             f"Budget per run: {conf['token_budget']} student tokens ({conf['samples_per_step']} sampled "
             f"sequences per step); seeds {conf['seeds']}; greedy accuracy on {conf['eval_size']} held-out "
             f"problems; accuracy is mean ± sample std over seeds.", ""]
    for task in conf["tasks"]:
        t = teachers.get(task, {})
        lines += [f"### {task} (teacher {t.get('accuracy', float('nan')):.3f}, warm-started student before "
                  f"{t.get('student_before', float('nan')):.3f})", "",
                  "| method | accuracy | Δ vs start | wall s | student tokens | steps | peak RSS MB |",
                  "|---|---|---|---|---|---|---|"]
        before = {int(k): v["accuracy"] for k, v in t.get("students", {}).items()}
        for method in conf["methods"]:
            rs = sorted((r for r in records if r["task"] == task and r["method"] == method), key=lambda r: r["seed"])
            if not rs:
                continue
            gain = [r["accuracy"] - before[r["seed"]] for r in rs if r["seed"] in before]
            lines.append(f"| {METHODS[method][0]} | {_fmt([r['accuracy'] for r in rs])} | {_fmt(gain)} | "
                         f"{_fmt([r['wall_s'] for r in rs], 0)} | {_fmt([r['tokens'] for r in rs], 0)} | "
                         f"{_fmt([r['steps'] for r in rs], 0)} | {max(r['peak_rss_mb'] for r in rs):.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], teachers: dict, conf: dict, path: Path) -> None:
    """Top row: mean accuracy against student tokens per task and method (trainer evals on 64 eval
    prompts, last point = held-out accuracy, error bar = std over seeds). Bottom row: the held-out
    gain over each seed's warm start, mean ± std over seeds (paired, so the spread of the starts
    cancels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = conf["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 8.0), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    cmap = plt.get_cmap("tab20")
    for col, task in enumerate(tasks):
        ax, bx = axes[0][col], axes[1][col]
        t = teachers.get(task, {})
        start = t.get("student_before", 0.0)
        before = {int(k): v["accuracy"] for k, v in t.get("students", {}).items()}
        names = []
        for k, method in enumerate(conf["methods"]):
            rs = [r for r in records if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            xs = [float(np.mean([r["curve"][i][0] for r in rs])) for i in range(n)]
            ys = [float(np.mean([r["curve"][i][1] for r in rs])) for i in range(n)]
            xs.append(float(np.mean([r["tokens"] for r in rs])))
            ys.append(float(np.mean([r["accuracy"] for r in rs])))
            sd = float(np.std([r["accuracy"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0
            color = cmap(2 * k % 20 + (k >= 10))
            ax.plot([0.0] + xs, [start] + ys, marker="o", ms=3, color=color, label=METHODS[method][0])
            ax.errorbar(xs[-1], ys[-1], yerr=sd, color=color, capsize=3)
            gain = [r["accuracy"] - before[r["seed"]] for r in rs if r["seed"] in before]
            if gain:
                g_sd = float(np.std(gain, ddof=1)) if len(gain) > 1 else 0.0
                bx.bar(len(names), float(np.mean(gain)), yerr=g_sd, color=color, capsize=3)
                bx.plot([len(names)] * len(gain), gain, "k.", ms=3)
                names.append(method)
        ax.axhline(t.get("accuracy", 1.0), color="k", ls=":", lw=1, label="teacher")
        ax.set_title(f"{task}: accuracy vs student tokens")
        ax.set_xlabel("student tokens")
        ax.set_ylabel("greedy accuracy (mean over seeds)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        bx.axhline(0.0, color="k", lw=0.8)
        bx.set_xticks(range(len(names)))
        bx.set_xticklabels(names, rotation=30, fontsize=8)
        bx.set_ylabel("held-out gain over warm start")
        bx.set_title(f"{task}: gain at {conf['token_budget']} tokens (mean ± std, dots = seeds)", fontsize=9)
        bx.grid(alpha=0.3, axis="y")
    axes[0][-1].legend(fontsize=6.5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------
# driver


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--full", action="store_true", help="every task and method, 3 seeds, twice the budget")
    p.add_argument("--tasks", help="comma-separated task names (rollout.tasks.TASKS)")
    p.add_argument("--methods", help=f"comma-separated method names: {','.join(METHODS)}")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--token-budget", type=int, help="student tokens per run")
    p.add_argument("--samples-per-step", type=int, help="sampled sequences per step")
    p.add_argument("--lr", type=float, default=3e-4, help="student learning rate (constant after 5 warm-up steps)")
    p.add_argument("--eval-size", type=int, help="held-out problems per final eval")
    p.add_argument("--evals-per-run", type=int, default=3, help="trainer evals (curve points) per run")
    p.add_argument("--warm-steps", type=int, help="warm-start SFT steps of the student, every task "
                   f"(default per task: {WARM_STEPS}; 0: start from the random init)")
    p.add_argument("--warm-target", type=float,
                   help="instead of --warm-steps: SFT each seed's student until its greedy accuracy on 64 "
                        "probe problems reaches this (evens out the starts of the seeds; slower to prepare)")
    p.add_argument("--teacher-steps", type=int, help="teacher SFT steps (default 300; changes the cache key)")
    p.add_argument("--teacher-min-accuracy", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--cache-dir", default=os.environ.get("OPD_CACHE", str(Path.home() / ".cache" / "opd" / "quality")))
    p.add_argument("--summarize", action="store_true",
                   help="run nothing: tabulate and plot the results.json / record.json files under --out")
    args = p.parse_args(argv)

    conf = dict(FULL if args.full else DEFAULT)
    for key, val in (("tasks", args.tasks), ("methods", args.methods)):
        if val:
            conf[key] = val.split(",")
    if args.seeds:
        conf["seeds"] = [int(s) for s in args.seeds.split(",")]
    for key in ("token_budget", "samples_per_step", "eval_size"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    conf["warm_steps"] = {t: (args.warm_steps if args.warm_steps is not None else WARM_STEPS.get(t, 0))
                          for t in conf["tasks"]}
    if args.warm_target is not None:
        conf["warm_target"] = args.warm_target
    conf.update(lr=args.lr, threads=args.threads, teacher_steps=args.teacher_steps,
                teacher_min_accuracy=args.teacher_min_accuracy, evals_per_run=args.evals_per_run)
    for m in conf["methods"]:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    from rollout.tasks import TASKS

    for t in conf["tasks"]:
        if t not in TASKS:
            p.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    command = " ".join([".venv/bin/python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])])
    machine = f"{os.cpu_count()}-core CPU, no GPU"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir)

    if args.summarize:
        if (out / "results.json").exists():
            old = json.loads((out / "results.json").read_text())
        else:  # an unfinished run: the per-task preparations and the finished runs' records
            old = {"config": conf, "records": [json.loads(f.read_text()) for f in sorted(out.glob("*/*/seed*/record.json"))],
                   "teachers": {f.stem[len("prep_"):]: json.loads(f.read_text()) for f in out.glob("prep_*.json")}}
            conf["tasks"] = [t for t in conf["tasks"] if t in old["teachers"]]
        records = [r for r in old["records"] if r["task"] in conf["tasks"] and r["method"] in conf["methods"]
                   and r["seed"] in conf["seeds"]]
        table = summarize(records, old["teachers"], {**old["config"], **{k: conf[k] for k in ("tasks", "methods")}},
                          old.get("command", command), old.get("machine", machine))
        plot(records, old["teachers"], conf, out / "accuracy_vs_tokens.png")
        print(table)
        return 0

    _set_env()
    _preimport()
    from opd.demo import start_teacher_process

    t_all = time.time()
    records: list[dict] = []
    teachers: dict = {}
    for task_name in conf["tasks"]:
        t_task = time.time()
        info_path = out / f"prep_{task_name}.json"
        rc = in_child(prep_task, out / f"prep_{task_name}.log", task_name, conf, cache, info_path)
        if rc != 0:
            print(f"[quality] {task_name}: preparation FAILED (rc {rc}); see {out / f'prep_{task_name}.log'}",
                  flush=True)
            return 1
        info = json.loads(info_path.read_text())
        teachers[task_name] = info
        print(f"[quality] {task_name}: teacher {info['accuracy']:.3f}, warm students "
              f"{[round(s['accuracy'], 3) for s in info['students'].values()]} "
              f"({time.time() - t_task:.0f}s)", flush=True)
        teacher = Path(info["dir"])
        mnt = info["max_new_tokens"]
        proc, url = start_teacher_process(teacher, out / f"teacher_{task_name}.log")
        try:
            # expected steps: the budget over sequences per step at about half the max length
            exp_steps = max(2, conf["token_budget"] // (conf["samples_per_step"] * max(1, mnt // 2)))
            steps_cap = exp_steps * 4
            for method in conf["methods"]:
                for seed in conf["seeds"]:
                    run_dir = out / task_name / method / f"seed{seed}"
                    done = run_dir / "record.json"
                    job = {"task": task_name, "method": method, "seed": seed, "out": str(run_dir),
                           "student": info["students"][str(seed)]["dir"], "url": url,
                           "token_budget": conf["token_budget"], "max_new_tokens": mnt, "lr": conf["lr"],
                           "steps_cap": steps_cap, "threads": conf["threads"],
                           "eval_every": max(1, exp_steps // conf["evals_per_run"]),
                           "eval_prompts": min(64, conf["eval_size"]), "eval_size": conf["eval_size"],
                           "overrides": _method_overrides(method, teacher, steps_cap, exp_steps // 2,
                                                          conf["samples_per_step"])}
                    run_dir.mkdir(parents=True, exist_ok=True)
                    jf = run_dir / "job.json"
                    same = {k: v for k, v in job.items() if k != "url"}
                    if done.exists() and jf.exists() and {k: v for k, v in json.loads(jf.read_text()).items()
                                                          if k != "url"} == same:
                        records.append(json.loads(done.read_text()))
                        continue
                    done.unlink(missing_ok=True)
                    jf.write_text(json.dumps(job, indent=1))
                    rc = in_child(run_one, run_dir / "stdout.log", job)
                    if not done.exists():
                        print(f"[quality] {task_name}/{method}/seed{seed} FAILED (rc {rc}); "
                              f"see {run_dir / 'stdout.log'}", flush=True)
                        continue
                    rec = json.loads(done.read_text())
                    records.append(rec)
                    print(f"[quality] {task_name:10s} {method:9s} seed {seed}: accuracy {rec['accuracy']:.3f} "
                          f"tokens {rec['tokens']} steps {rec['steps']} {rec['wall_s']:.0f}s "
                          f"(init {rec['init_s']:.0f}s, eval {rec['eval_s']:.0f}s) rss {rec['peak_rss_mb']:.0f}MB "
                          f"({time.time() - t_all:.0f}s so far)", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    table = summarize(records, teachers, conf, command, machine)
    total = round(time.time() - t_all, 1)
    (out / "results.json").write_text(json.dumps({"config": conf, "teachers": teachers, "records": records,
                                                  "command": command, "machine": machine,
                                                  "total_wall_s": total}, indent=1))
    (out / "results.md").write_text(table + f"\nTotal wall time: {total:.0f} s.\n")
    try:
        plot(records, teachers, conf, out / "accuracy_vs_tokens.png")
    except ImportError:
        print("[quality] matplotlib not installed: no PNG", flush=True)
    print(table)
    print(f"[quality] {len(records)} runs in {total:.0f}s; {out / 'results.json'}, "
          f"{out / 'results.md'}, {out / 'accuracy_vs_tokens.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
