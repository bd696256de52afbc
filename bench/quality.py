"""Distillation quality benchmark: which method gets the student furthest, and how fast, per student token?

For each synthetic task family of `rollout.tasks` a tiny teacher is trained by plain SFT to high
greedy accuracy (cached), a teacher server process (`opd teacher`) is started on it, and a smaller
student (WARM-STARTED by a short SFT on a few reference solutions, the same start for every
method, cached per task and seed; `--warm-steps 0`: COLD, the random init) is trained with the
REAL trainer (local rollout engine [+ the tool loop for multi-turn tasks] -> teacher server ->
chunked loss -> DeepSpeed ZeRO-2 with CPU Adam) by every method, for every seed, until it has
generated a budget of student tokens or (`--until-flat`) its eval curve has flattened.

Issue #20's methods: self-distillation (`selfdistill`: the teacher server serves the run's own warm
start, prompted with the task's reference solution; `selfdistill-follow`: the same, refreshed with
the student's weights every step), and on a mix of two task families (a task "A+B": the trainer's
`data.task=A,B`, graded per family) `two-teacher` (each family routed to its own task teacher)
against `one-teacher` (A's teacher for both) and `generalist` (one teacher of the same size trained on
both families). docs/quality.md describes them.

Every run (and every preparation) is a child process FORKED from a driver that has imported torch /
transformers / DeepSpeed once (and, with `--device cuda`, has not initialized CUDA: each child does
its own CUDA init), so a run costs its own work plus ~1 s; `--jobs N` runs N children at once, each
with a teacher server of its own per task (a shared server would batch requests of different runs
together, and the numbers would depend on the schedule).

Recorded per run: held-out greedy accuracy, wall time, student tokens, steps, why it stopped, peak
RSS, and the trainer's eval curve; reported per method (`bench/quality_report.py`): final accuracy
with a 95% Student-t interval over seeds, tokens and wall time to 50% / 80% of the teacher's
accuracy, the curves, and with `--lr-grid` the learning-rate grid. Written to OUT/: results.json,
results.md, accuracy_vs_tokens.png.

    .venv/bin/python bench/quality.py                  # the default: 63 runs, ~20 min on 2 cores
    .venv/bin/python bench/quality.py --full --jobs 8 --threads 2   # 6 tasks (one a mix) x 16 methods
                                                                    # where they apply x 5 seeds, lr grid, until flat
    .venv/bin/python bench/quality.py --full --device cuda --jobs 14 --threads 1   # the same, students on one GPU
    .venv/bin/python bench/quality.py --tasks chain --methods rkl,fkl,sft,grpo --seeds 0,1,2,3,4 \
        --lr-grid 3e-4,1e-3,3e-3 --no-until-flat --token-budget 100000 --evals-per-run 10 \
        --eval-size 256 --warm-target 0.2      # the long-generation comparison in docs/quality.md

With `--device cuda` the students of the runs, the preparation (teacher and warm-student SFT) and
the held-out evals use the GPU; `--teacher-device cuda` puts the teacher servers there too.

Sections, in order: configuration (methods, tasks' warm starts, the default and full sets) ·
shared helpers (environment, forked children, the job pool) · evaluation · preparation (teachers,
warm students) · one run · the driver (plan, learning-rate grid, runs, report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import quality_report as report  # noqa: E402  (no torch import)
from opd.demo_models import TeacherSettings  # noqa: E402  (no torch import: safe before _set_env)


# =============================================================================================
# 1. configuration

# name -> (label, overrides); "{half}" is replaced by half the expected number of steps,
# "{teacher}" by the teacher directory, "{steps}" by the step cap; "GROUP": rollout.n=4 with a
# quarter of the prompts (every method samples the same number of sequences per step); "SELF": the
# teacher server serves the run's own warm-start student (a server per run, started and stopped
# with it); "ROUTES": on a mix of task families (a task "A+B"), each family's prompts go to that
# family's task teacher (`teacher.routes.A.url=...`); "GENERALIST": on a mix, one teacher of the
# specialists' size trained on the families' interleaved references (as many steps as the
# specialists together, so as many examples of each family as its specialist saw). Without "ROUTES" or
# "GENERALIST" a mix's single teacher is the first family's (A's). Which tasks a method runs on: METHOD_SCOPE.
SELF_TEMPLATE = "{question}\nReference solution: {solution}"
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
    # issue #20: the teacher sees a privileged prompt, or each task family gets its own teacher
    "selfdistill": ("self-distillation: teacher = student's start + reference solution in its prompt",
                    ["loss.divergence=reverse_kl", "SELF", f"teacher.prompt_template={SELF_TEMPLATE}"]),
    "selfdistill-follow": ("self-distillation, the teacher follows the student (refresh every step)",
                           ["loss.divergence=reverse_kl", "SELF", f"teacher.prompt_template={SELF_TEMPLATE}",
                            "teacher.refresh_every=1"]),
    "two-teacher": ("two teachers: each family its own task teacher (teacher.routes)",
                    ["loss.divergence=reverse_kl", "ROUTES"]),
    "one-teacher": ("one teacher for both families: the first family's", ["loss.divergence=reverse_kl"]),
    "generalist": ("one generalist teacher trained on both families", ["loss.divergence=reverse_kl", "GENERALIST"]),
}
LABELS = {name: label for name, (label, _) in METHODS.items()}
# "task": single task families only; "mix": mixes only ("A+B"); "any": both. Unlisted: "task".
METHOD_SCOPE = {"selfdistill": "any", "selfdistill-follow": "any", "two-teacher": "mix", "one-teacher": "mix",
                "generalist": "mix"}


def families(task: str) -> list[str]:
    """The task families of a bench task: "sort" -> ["sort"], a mix "sort+reverse" -> ["sort", "reverse"]."""
    return task.split("+")


def applies(method: str, task: str) -> bool:
    scope, mix = METHOD_SCOPE.get(method, "task"), len(families(task)) > 1
    return scope == "any" or (scope == "mix") == mix


# Per task: warm-start SFT steps (batch 16, lr 3e-3, cosine) of the student before any method runs;
# picked from a short calibration so the warm student is off 0 and far below the teacher
# (docs/quality.md lists the resulting start accuracies). chain: 150 steps leave every seed near 0
# (0.02-0.03); a student learns chain abruptly at a seed-dependent step (750 steps: 0.04-0.94 over
# five seeds), so the chain runs in docs/quality.md use --warm-target instead.
WARM_STEPS = {"arithmetic": 150, "sort": 80, "reverse": 110, "calc": 180, "chain": 150}
# Per task: teacher SFT steps (batch 64, lr 3e-3, cosine; default 300, the demo teacher's). chain:
# 300 steps gave 0.051 held-out accuracy; 600 give 0.949 (CPU) / 0.934 (H200) (docs/quality.md,
# bench/quality_calibrate.py: 1000-1500 steps reach 1.000).
TEACHER_STEPS = {"chain": 600}
# Per task: the teacher's model size (opd.tiny.SIZES; default the demo teacher's, 0.9M parameters).
TEACHER_SIZE: dict[str, str] = {}

# The default covers each claim of issue #5 (OPD vs GRPO vs off-policy SFT, TIP 50%, PACED,
# forward->reverse KL) on three task families in ~20 minutes on 2 cores.
DEFAULT = dict(tasks=["sort", "reverse", "calc"], methods=["rkl", "fkl", "fkl2rkl", "sft", "grpo", "tip50", "paced"],
               seeds=[0, 1, 2], token_budget=10000, samples_per_step=32, eval_size=128)
# --full (issue #23): every task incl. the long-generation chain and a mix of two families (for the
# teacher-routing methods of issue #20), every method where it applies, 5 seeds, a per-method
# learning rate from a grid on seed 0, runs until their eval curve is flat or a generous budget ends.
# Meant for a machine with many cores or a GPU (--jobs, --device cuda).
FULL = dict(tasks=["arithmetic", "sort", "reverse", "calc", "sort+reverse", "chain"], methods=list(METHODS),
            seeds=[0, 1, 2, 3, 4], token_budget=200000, samples_per_step=32, eval_size=256,
            lr_grid=[1e-4, 3e-4, 1e-3], until_flat=True)
# --until-flat: stop when the last FLAT_WINDOW evals gain no more than FLAT_DELTA over the best before
FLAT_WINDOW, FLAT_DELTA = 4, 0.02


# =============================================================================================
# 2. shared helpers: environment, forked children, the job pool


def _set_env(device: str = "cpu") -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.startswith("cuda") else "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch.cuda.is_available() through NVML: the driver can fork after asking it (no CUDA init)
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    # DeepSpeed JIT-builds its CPU ops into a shared cache; another environment on the same machine
    # rebuilding them there would force a rebuild (minutes) into every run. Keep one per interpreter.
    import hashlib

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "opd" / "torch_extensions" /
                                                      hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]))


def _preimport(device: str = "cpu") -> None:
    """Import the heavy modules once in the driver (no torch compute, no threads, no CUDA init) so
    forks start warm."""
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
    import rollout.tasks.tool_engine  # noqa: F401
    import student_trainer.trainer  # noqa: F401
    import teacher_server.client  # noqa: F401
    from opd import demo_models, generation, model_cache, sft  # noqa: F401

    # DeepSpeed's CPU Adam asks py-cpuinfo three times per engine, and each call runs a subprocess
    # (~1.2 s): ask once here, and load the JIT-built CPU ops once, so every forked run reuses them.
    try:
        import cpuinfo

        info = cpuinfo.get_cpu_info()
        cpuinfo.get_cpu_info = lambda: info
    except ImportError:
        pass
    if device == "cpu":  # (with CUDA each child loads the op itself: the driver stays CUDA-free)
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_child(fn, log_path: Path, *args) -> int:
    """Fork a child that runs fn(*args) with stdout/stderr to log_path; returns its pid."""
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise RuntimeError("CUDA is initialized in the driver: forked children could not use it")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
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


def in_child(fn, log_path: Path, *args) -> int:
    """Run fn(*args) in a forked child (stdout/stderr to log_path); returns its exit code."""
    _, status = os.waitpid(start_child(fn, log_path, *args), 0)
    return os.waitstatus_to_exitcode(status)


def run_pool(jobs: list[dict], n_slots: int, start, done) -> None:
    """Run `jobs` with at most `n_slots` children at once: `start(job, slot) -> pid` forks one,
    `done(job, rc)` is called as each ends (in the driver, in the order they end). A slot is a
    small integer a job keeps while it runs (its teacher servers are the slot's)."""
    pending, running, free = list(jobs), {}, list(range(n_slots))
    try:
        while pending or running:
            while pending and free:
                job, slot = pending.pop(0), free.pop(0)
                running[start(job, slot)] = (job, slot)
            pid, status = os.wait()
            if pid not in running:
                continue
            job, slot = running.pop(pid)
            free.insert(0, slot)
            free.sort()
            done(job, os.waitstatus_to_exitcode(status))
    finally:  # interrupted (Ctrl-C, SIGTERM from a time limit): end the runs still going
        for pid in running:
            os.kill(pid, signal.SIGTERM)
        for pid in running:
            os.waitpid(pid, 0)


def _deterministic(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if os.environ.get("OPD_DETERMINISTIC_ALGORITHMS") == "1":  # not needed on CPU (see docs); much slower
        torch.use_deterministic_algorithms(True, warn_only=True)


def _same_job(run_dir: Path, job: dict) -> bool:
    """A finished run whose job (all its settings but the teacher URLs) is unchanged."""
    jf, done = run_dir / "job.json", run_dir / "record.json"
    if not (done.exists() and jf.exists()):
        return False
    strip = lambda j: {k: v for k, v in j.items() if k not in ("url", "routes")}  # noqa: E731
    return strip(json.loads(jf.read_text())) == strip(job)


# =============================================================================================
# 3. evaluation (the one place that grades a model; rollout/evaluate.py will take its place)


def task_accuracy(model, tok, task, examples, max_new_tokens: int | None = None, device: str = "cpu") -> float:
    """Greedy accuracy graded by the task's own grader; multi-turn tasks go through the tool loop.
    `model` is a model (evaluated where it is) or a directory (loaded on `device`)."""
    from rollout.evaluate import model_accuracy

    return model_accuracy(model, tok, examples, task.grade, tools=task.tools, max_new_tokens=max_new_tokens,
                          device=device)


def bench_accuracy(model, tok, task_name: str, n: int, max_new_tokens: int | None = None,
                   device: str = "cpu") -> tuple[float, dict]:
    """Held-out greedy accuracy of a bench task: (overall, {family: accuracy}); a mix "A+B" is
    graded on `n` eval problems of each family by the family's own grader (and tools), overall =
    the mean over the families."""
    from rollout.tasks import get_task

    by = {f: task_accuracy(model, tok, get_task(f), get_task(f).make_examples("eval", n, seed=0), max_new_tokens,
                           device) for f in families(task_name)}
    return statistics.fmean(by.values()), by


class MixTask:
    """Several task families as one task for the preparation (warm-start SFT): examples are the
    families' examples interleaved, one of each in turn (the trainer's `data.task=A,B` order)."""

    def __init__(self, names: list[str]):
        from rollout.tasks import get_task

        self.name, self.tasks = "+".join(names), [get_task(n) for n in names]

    def make_examples(self, split: str, n: int, seed: int = 0, sample_seed: int | None = None):
        k = len(self.tasks)
        per = [t.make_examples(split, -(-n // k), seed=seed, sample_seed=sample_seed) for t in self.tasks]
        return [e for group in zip(*per) for e in group][:n]


def bench_task(name: str):
    from rollout.tasks import get_task

    return MixTask(families(name)) if "+" in name else get_task(name)


# =============================================================================================
# 4. preparation: teachers, warm (or cold) students


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
    # chain only: this fraction of the SFT examples shows an error in a step's sum (masked out of the
    # loss) and the continuation from the true sum (rollout.tasks.chain.with_recovery): a teacher
    # that can steer back after a student's mistake. None: plain references (not in the cache key).
    recovery: float | None = None


@dataclass(frozen=True)
class WarmSpec:
    """The default warm start: a fixed number of SFT steps (cosine schedule) per task."""
    task: str
    seed: int                      # the student init is StudentSettings(seed=1 + seed, size=size)
    steps: int = 60
    size: str = "student"          # opd.tiny.SIZES
    batch_size: int = 16
    lr: float = 3e-3
    vocab_size: int = 512
    hints: float | None = None     # see WarmTargetSpec


@dataclass(frozen=True)
class WarmTargetSpec:
    """The alternative warm start (--warm-target): SFT until a probe accuracy is reached."""
    task: str
    seed: int
    target: float = 0.3
    size: str = "student"            # SFT until the greedy accuracy on probe problems reaches this
    check_every: int = 10
    max_steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    probe_size: int = 64           # train-split problems (not the held-out eval problems)
    vocab_size: int = 512
    # this fraction of the SFT examples asks with the self-distillation teacher's prompt (the question
    # and its reference solution, SELF_TEMPLATE) and answers the same, so the warm student, shown
    # that prompt, can serve as a self-teacher that reads the reference (--student-hints). The probe
    # (the target) stays on plain prompts. None: plain examples only (not in the cache key).
    hints: float | None = None


def with_hints(task_name: str, examples: list, fraction: float, seed: int) -> list:
    """`examples` with a `fraction` of them (chosen at random, seeded) asked with the
    self-distillation teacher's prompt (SELF_TEMPLATE over the example's data row; the same text the
    trainer's teacher.prompt_template gives the self-teacher) and the same response."""
    import random

    from student_trainer.data import privileged_example

    rng = random.Random(f"hints:{task_name}:{seed}")
    return [privileged_example(task_name, ex, SELF_TEMPLATE) if rng.random() < fraction else ex for ex in examples]


def _kind(name: str, device: str) -> str:
    """A cache entry's kind: a model trained on a GPU is a different entry from the CPU's (its bits
    differ), so the key names the device type when it is not the CPU."""
    dev = device.split(":")[0]
    return name if dev == "cpu" else f"{name}-{dev}"


def prepare_task_teacher(cache_dir: Path, spec: TeacherSpec, log=print, device: str = "cpu") -> Path:
    """Train (first call) or load (cached) a tiny teacher for `spec.task` with opd.sft's helper,
    on `device` (the cache key names a non-CPU device)."""
    from opd import model_cache, sft
    from opd.tiny import random_model
    from rollout.tasks import get_task

    out = Path(cache_dir) / model_cache.cache_key(_kind(f"teacher-{spec.task}", device), spec)
    if (out / "opd_demo.json").exists():
        log(f"teacher[{spec.task}]: cached at {out} (accuracy {model_cache.read_info(out).get('accuracy')})")
        return out
    task = bench_task(spec.task)  # a mix "A+B": the generalist, on the families' interleaved references
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tok = model_cache.load_tokenizer(model_cache.tokenizer_dir(cache_dir, spec.vocab_size))
    model = random_model(tok, spec.size, spec.seed).to(device)

    def train_examples(n: int, sample_seed: int | None = None) -> list:
        exs = task.make_examples("train", n, seed=spec.seed, sample_seed=sample_seed)
        if spec.recovery:
            from rollout.tasks.chain import with_recovery

            exs = with_recovery(exs, spec.recovery, seed=spec.seed if sample_seed is None else sample_seed)
        return exs

    train = train_examples(spec.steps * spec.batch_size)
    # a mix: graded per family by the family's own grader, accuracy = the mean over the families
    by_family = [(get_task(f), get_task(f).make_examples("eval", spec.eval_size, seed=spec.seed))
                 for f in families(spec.task)]
    evals = [e for _, exs in by_family for e in exs]
    t0 = time.time()
    log(f"teacher[{spec.task}]: training {spec.size} for {spec.steps} steps x {spec.batch_size}"
        + (f", {spec.recovery:.0%} of the examples with an error and the way back" if spec.recovery else ""))
    acc, seconds = sft.train_to_accuracy(
        model, tok, spec, train, lambda m: statistics.fmean(task_accuracy(m, tok, t, exs) for t, exs in by_family),
        lambda n, r: train_examples(n, sample_seed=spec.seed + 2000 + r),
        name=f"teacher[{spec.task}]", log=log, t0=t0, log_every=100)
    return model_cache.save_model(out, model.cpu(), tok, {"role": "teacher", "task": spec.task,
                                                        "settings": asdict(spec), "device": device,
                                                        "accuracy": acc, "eval_size": len(evals),
                                                        "train_seconds": round(seconds, 1)})


def _warm_start(cache_dir: Path, spec, train_at_all: bool, device: str = "cpu"):
    """Shared start of the two warm-student preparations: the seed's random-init demo student's
    path when there is nothing to train, the cached warm student's path when it exists, else
    (task, tokenizer, model loaded from the init, output directory) to train and save."""
    from opd import demo_models, model_cache

    init = demo_models.prepare_student(cache_dir, seed=1 + spec.seed, vocab_size=spec.vocab_size, size=spec.size,
                                       log=None)
    if not train_at_all:
        return init
    out = Path(cache_dir) / model_cache.cache_key(_kind(f"warm-{spec.task}", device), spec)
    if (out / "opd_demo.json").exists():
        return out
    from transformers import AutoModelForCausalLM

    tok = model_cache.load_tokenizer(init)
    return bench_task(spec.task), tok, AutoModelForCausalLM.from_pretrained(str(init)).to(device), out


def prepare_warm_student(cache_dir: Path, spec: WarmSpec, log=print, device: str = "cpu") -> Path:
    """The seed's random-init demo student after `spec.steps` SFT steps (sft.sft_train: AdamW,
    warm-up + cosine) on reference solutions of the task (train split, a sample of its own per seed);
    cached. steps=0: the random init."""
    import torch

    from opd import model_cache, sft

    got = _warm_start(cache_dir, spec, train_at_all=spec.steps > 0, device=device)
    if isinstance(got, Path):
        return got
    task, tok, model, out = got
    train = task.make_examples("train", spec.steps * spec.batch_size, seed=0, sample_seed=7000 + spec.seed)
    if spec.hints:
        train = with_hints(spec.task, train, spec.hints, spec.seed)
    torch.manual_seed(spec.seed)
    sft.sft_train(model, tok, train, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                        warmup_steps=min(10, spec.steps))
    log(f"warm student[{spec.task}, seed {spec.seed}]: {spec.steps} SFT steps x {spec.batch_size}")
    return model_cache.save_model(out, model.cpu(), tok, {"role": "student", "task": spec.task, "settings": asdict(spec),
                                                  "warm_steps": spec.steps})


def prepare_warm_student_to_target(cache_dir: Path, spec: WarmTargetSpec, log=print, device: str = "cpu") -> Path:
    """The seed's random-init demo student, SFT'd on reference solutions of the task (train split,
    a sample of its own per seed; AdamW, constant lr after 10 warm-up steps) until its greedy accuracy
    on `probe_size` other train problems reaches `target` (checked every `check_every` steps); cached.
    Slow for a seed that learns slowly (up to max_steps plus a probe eval every check_every steps)."""
    import torch

    from opd import model_cache, sft

    got = _warm_start(cache_dir, spec, train_at_all=spec.target > 0, device=device)
    if isinstance(got, Path):
        return got
    task, tok, model, out = got
    train = task.make_examples("train", spec.max_steps * spec.batch_size, seed=0, sample_seed=7000 + spec.seed)
    if spec.hints:
        train = with_hints(spec.task, train, spec.hints, spec.seed)
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
    return model_cache.save_model(out, model.cpu(), tok, {"role": "student", "task": spec.task,
                                                        "settings": asdict(spec), "warm_steps": step,
                                                        "probe_accuracy": acc})


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


def prep_task(task_name: str, conf: dict, cache: Path, out_json: Path) -> None:
    """Child: teacher + students (warm or cold) for one task, and their held-out accuracies. A mix
    "A+B": the task teacher of every family (as for the family alone), the teacher accuracy is the
    mean of each family's teacher on its own family (what the routed two-teacher run distills
    from), `first_teacher_by_family` the first family's teacher on each family (what one-teacher
    distills from); one student per seed, warm-started on the families' interleaved references."""
    from opd import model_cache
    from rollout.tasks.encoding import encode, max_new_tokens_for
    from rollout.tasks import get_task

    _deterministic(conf["prep_threads"])
    # with --device cuda the preparation trains and evaluates on the GPU; --prep-device names where the
    # teacher and warm students are trained (and cached) when that differs from the runs' device
    dev = conf.get("device", "cpu")
    train_dev = conf.get("prep_device") or dev
    fams, dirs, mnt, ref_lens, specs = families(task_name), {}, 0, [], {}
    for f in fams:
        task = get_task(f)
        spec = specs[f] = TeacherSpec(f, steps=conf.get("teacher_steps") or TEACHER_STEPS.get(f, 300),
                                      size=conf.get("teacher_size") or TEACHER_SIZE.get(f, _DEMO_TEACHER.size),
                                      min_accuracy=conf.get("teacher_min_accuracy", 0.9),
                                      recovery=conf.get("teacher_recovery") if f == "chain" else None)
        dirs[f] = prepare_task_teacher(cache, spec, device=train_dev)
        tok = model_cache.load_tokenizer(dirs[f])
        evals = task.make_examples("eval", conf["eval_size"], seed=0)
        # room for the longest reference trajectory (+ eos) and some slack, over train and eval problems
        mnt = max(mnt, max_new_tokens_for(tok, evals),
                  max_new_tokens_for(tok, task.make_examples("train", 512, seed=0)))
        ref_lens += [len(encode(tok, ex)[1]) for ex in evals]
    own = {f: bench_accuracy(str(dirs[f]), tok, f, conf["eval_size"], mnt, dev)[0] for f in fams}
    info = {"dir": str(dirs[fams[0]]), "accuracy": statistics.fmean(own.values()), "max_new_tokens": mnt,
            "reference_tokens": round(statistics.fmean(ref_lens), 1), "students": {}}
    if conf.get("teacher_recovery") and "chain" in fams:
        info["teacher_recovery"] = conf["teacher_recovery"]
    if conf.get("student_hints"):
        info["student_hints"] = conf["student_hints"]
    # with a self-distillation method: the held-out problems as its self-teacher is asked them
    hinted_evals = None
    if len(fams) == 1 and any("SELF" in METHODS[m][1] for m in conf["methods"] if applies(m, task_name)):
        from student_trainer.data import privileged_example

        hinted_evals = [privileged_example(task_name, ex, SELF_TEMPLATE) for ex in evals]
    if len(fams) > 1:
        info["families"] = {f: {"dir": str(dirs[f]), "accuracy": own[f]} for f in fams}
        info["first_teacher_by_family"] = {f: own[f] if f == fams[0] else
                                           bench_accuracy(str(dirs[fams[0]]), tok, f, conf["eval_size"], mnt, dev)[0]
                                           for f in fams}
        if any("GENERALIST" in METHODS[m][1] for m in conf["methods"] if applies(m, task_name)):
            # one teacher of the specialists' size on the families' interleaved references, as many
            # steps as the specialists together (each family's examples as many as its specialist's)
            first = specs[fams[0]]
            gen = prepare_task_teacher(cache, replace(first, task=task_name, recovery=None,
                                                      steps=sum(specs[f].steps for f in fams)), device=train_dev)
            acc, by = bench_accuracy(str(gen), tok, task_name, conf["eval_size"], mnt, dev)
            info["generalist"] = {"dir": str(gen), "accuracy": acc, "by_family": by}
    warm_target = conf.get("warm_target")
    for seed in conf["seeds"]:
        if warm_target is not None:
            st = prepare_warm_student_to_target(cache, WarmTargetSpec(task_name, seed, target=warm_target,
                                                                      size=conf.get("student_size", "student"),
                                                                      hints=conf.get("student_hints")),
                                                device=train_dev)
        else:
            st = prepare_warm_student(cache, WarmSpec(task_name, seed, steps=conf["warm_steps"][task_name],
                                                      size=conf.get("student_size", "student"),
                                                      hints=conf.get("student_hints")), device=train_dev)
        acc, by = bench_accuracy(str(st), tok, task_name, conf["eval_size"], mnt, dev)
        info["students"][str(seed)] = {"dir": str(st), "warm_steps": model_cache.read_info(st).get("warm_steps", 0),
                                       "accuracy": acc, **({"by_family": by} if len(fams) > 1 else {})}
        if hinted_evals is not None:  # the self-teacher's own accuracy: the warm student, shown the reference
            info["students"][str(seed)]["self_teacher_accuracy"] = task_accuracy(
                str(st), tok, get_task(task_name), hinted_evals, mnt, dev)
    info["student_before"] = statistics.mean(s["accuracy"] for s in info["students"].values())
    if warm_target is not None:
        info["start"] = f"warm (SFT to probe accuracy {warm_target})"
    elif conf["warm_steps"][task_name] > 0:
        info["start"] = f"warm ({conf['warm_steps'][task_name]} SFT steps)"
    else:
        info["start"] = "cold (random init)"
    out_json.write_text(json.dumps(info, indent=1))


# =============================================================================================
# 5. one run


class _Stop(Exception):
    """Raised from the trainer's step callback to end a run (budget reached or curve flat)."""


def _method_overrides(method: str, teacher: Path, steps_cap: int, half: int, samples: int) -> list[str]:
    ov = []
    group = False
    for o in METHODS[method][1]:
        if o == "GROUP":
            group = True
            continue
        if o in ("SELF", "ROUTES", "GENERALIST"):  # the teacher servers: Bench.execute
            continue
        ov.append(o.replace("{teacher}", str(teacher)).replace("{steps}", str(steps_cap)).replace("{half}", str(half)))
    n = 4 if group else 1
    return ov + [f"rollout.n={n}", f"data.prompts_per_step={max(1, samples // n)}"]


def run_one(job: dict) -> dict:
    """Child: train one (task, method, seed, lr) until the token budget (or, with until_flat, a flat
    eval curve); writes job['out']/record.json."""
    from opd import model_cache
    from student_trainer.config import load_config
    from student_trainer.trainer import Trainer

    _deterministic(job["threads"])
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    budget = job["token_budget"]
    overrides = [
        f"model.student={job['student']}", "model.dtype=fp32", f"data.task={','.join(families(job['task']))}",
        "data.seed=0",
        f"run.seed={job['seed']}", f"run.device={job['device']}", "rollout.temperature=1.0",
        f"rollout.max_new_tokens={job['max_new_tokens']}", "rollout.max_batch_size=256", f"teacher.url={job['url']}",
        *[f"teacher.routes.{name}.url={url}" for name, url in (job.get("routes") or {}).items()],
        "teacher.top_k=32", "teacher.value_encoding=bf16",
        # one scoring call per step with all its sequences: the same teacher batches on every rerun
        "teacher.concurrency=1", "teacher.batch_sequences=4096",
        f"optim.lr={job['lr']}", "optim.min_lr_ratio=1.0", "optim.warmup_steps=5", "optim.grad_clip=1.0",
        "optim.zero_stage=2", "optim.offload_optimizer=true", f"run.steps={job['steps_cap']}", f"run.out_dir={out}",
        f"run.eval_every={job['eval_every']}", f"run.eval_prompts={job['eval_prompts']}", "run.save_every=0",
        "run.tensorboard=false", "run.plot=false", "run.progress=false", "run.export_hf=true",
        *job["overrides"]]
    cfg = load_config(None, overrides)
    seen = {"tokens": 0, "steps": 0, "curve": [], "stop": "steps"}
    by_family: dict[str, list] = {}
    t0 = time.time()

    def on_step(step, m):
        # student tokens: model-generated response tokens (tool-output tokens are not generated)
        seen["tokens"] += int(round(m["tokens"] * (1.0 - m.get("tool_token_ratio", 0.0))))
        seen["steps"] = step
        if "eval_accuracy" in m:
            seen["curve"].append([seen["tokens"], float(m["eval_accuracy"]), round(time.time() - t0, 2)])
            for fam in families(job["task"]):  # a mix: the trainer's eval of each task among its prompts
                if f"eval_accuracy/{fam}" in m:
                    by_family.setdefault(fam, []).append([seen["tokens"], float(m[f"eval_accuracy/{fam}"])])
            curves = list(by_family.values()) or [seen["curve"]]  # a mix: flat only when each family is
            if job["until_flat"] and report.all_flat([[c[1] for c in cv] for cv in curves], job["flat_window"],
                                                     job["flat_delta"]):
                seen["stop"] = "flat"
                raise _Stop
        if seen["tokens"] >= budget:
            seen["stop"] = "budget"
            raise _Stop

    trainer = Trainer(cfg, on_step=on_step)  # (multi-turn tasks get the tool loop from the trainer)
    t_init = time.time() - t0
    try:
        try:
            trainer.run()
        except _Stop:
            trainer.export_hf(out / "hf")
            trainer.log.close()
    finally:
        trainer.close()
    wall = time.time() - t0
    t1 = time.time()
    tok = model_cache.load_tokenizer(out / "hf")
    acc, by = bench_accuracy(str(out / "hf"), tok, job["task"], job["eval_size"], job["max_new_tokens"], job["device"])
    rec = {k: job[k] for k in ("task", "method", "seed", "lr")}
    rec.update({"accuracy": acc, "wall_s": round(wall, 1), "init_s": round(t_init, 1),
                "eval_s": round(time.time() - t1, 1), "tokens": seen["tokens"], "steps": seen["steps"],
                "stop": seen["stop"], "peak_rss_mb": round(_peak_rss_mb(), 1), "curve": seen["curve"],
                "overrides": job["overrides"], **({"by_family": by} if len(by) > 1 else {}),
                **({"curve_by_family": by_family} if by_family else {})})
    (out / "record.json").write_text(json.dumps(rec, indent=1))
    return rec


# =============================================================================================
# 6. the driver: configuration from the command line, preparation, learning-rate grid, runs, report


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="every task and method, 5 seeds, lr grid 1e-4,3e-4,1e-3, until flat or 200k tokens")
    p.add_argument("--tasks", help="comma-separated task names (rollout.tasks.TASKS); A+B: a mix of two task families "
                   "(the two-teacher / one-teacher methods run only on mixes, most others only on single tasks)")
    p.add_argument("--methods", help=f"comma-separated method names: {','.join(METHODS)}")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--token-budget", type=int, help="student tokens per run (with --until-flat: the most)")
    p.add_argument("--samples-per-step", type=int, help="sampled sequences per step")
    p.add_argument("--lr", type=float, default=3e-4, help="student learning rate (constant after 5 warm-up steps)")
    p.add_argument("--lr-grid", help="comma-separated learning rates: per task and method, run the first seed "
                   "(--grid-seeds: the first N) at each, keep the one with the best final accuracy (ties: the "
                   "smaller) for all seeds")
    p.add_argument("--grid-seeds", type=int, default=1,
                   help="with --lr-grid: run the first N seeds at every rate and keep the rate with the best mean "
                        "final accuracy over them (one seed's best rate is often not another's)")
    p.add_argument("--method-lr", help="comma-separated METHOD=LR: these methods run every seed at this rate and "
                   "skip the grid (e.g. the rates a shorter run's grid chose, for a longer budget)")
    p.add_argument("--until-flat", action=argparse.BooleanOptionalAction, default=None,
                   help="stop a run when its eval curve is flat (the last --flat-window evals gain no more than "
                        "--flat-delta over the best before them; on a mix, every family's curve) or the token "
                        "budget ends")
    p.add_argument("--flat-window", type=int, default=FLAT_WINDOW, help="evals of the flatness rule")
    p.add_argument("--flat-delta", type=float, default=FLAT_DELTA, help="accuracy gain of the flatness rule")
    p.add_argument("--eval-size", type=int, help="held-out problems per final eval")
    p.add_argument("--evals-per-run", type=int,
                   help="trainer evals (curve points) per expected budget (default 3; 20 with --until-flat)")
    p.add_argument("--warm-steps", type=int, help="warm-start SFT steps of the student, every task "
                   f"(default per task: {WARM_STEPS}; 0: a cold start from the random init)")
    p.add_argument("--warm-target", type=float,
                   help="instead of --warm-steps: SFT each seed's student until its greedy accuracy on 64 "
                        "probe problems reaches this (evens out the starts of the seeds; slower to prepare)")
    p.add_argument("--teacher-steps", type=int, help="teacher SFT steps, every task (default per task: 300, "
                   f"except {TEACHER_STEPS}; changes the cache key)")
    p.add_argument("--teacher-size", help="the teachers' model size, every task (opd.tiny.SIZES; default per task: "
                   f"{_DEMO_TEACHER.size}, except {TEACHER_SIZE}; changes the cache key)")
    p.add_argument("--student-size", default="student", help="the students' model size (opd.tiny.SIZES)")
    p.add_argument("--teacher-min-accuracy", type=float, default=0.9)
    p.add_argument("--teacher-recovery", type=float, help="chain only: train its teacher with this fraction "
                   "(0-1) of examples that show an error in a step's sum (masked out of the loss) and the way "
                   "back from the true sum, so the teacher can steer a student back after its own mistake")
    p.add_argument("--student-hints", type=float, help="warm-start every student with this fraction (0-1) of "
                   "its SFT examples asked with the self-distillation teacher's prompt (the question and its "
                   "reference solution) and the same answer, so the self-teacher (the warm student shown the "
                   "reference) can read it; single tasks without tools (changes the students' cache key)")
    p.add_argument("--device", default="cpu", help="the student's device in every run, and of the preparation "
                   "(teacher and warm-student SFT) and the held-out evals: cpu or cuda (the teacher servers stay on "
                   "the CPU; a model trained on a GPU is cached apart from the CPU's)")
    p.add_argument("--prep-device", help="where the teachers and warm students are trained (default --device); a "
                   "model trained on a GPU is cached apart, so --prep-device cuda on a CPU machine reuses a cache "
                   "prepared on a GPU (the preparation's evals run on --device)")
    p.add_argument("--teacher-device", default="cpu", help="the teacher servers' device: cpu or cuda (each job "
                   "slot's servers are processes of their own: with cuda, each holds a CUDA context)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each a forked child with its own teacher "
                   "servers); give each --threads cores")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    p.add_argument("--prep-threads", type=int, help="torch threads of the preparation (teachers, students, one "
                   "task after the other; default --threads; a cached teacher is not retrained)")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--cache-dir", default=os.environ.get("OPD_CACHE", str(Path.home() / ".cache" / "opd" / "quality")))
    p.add_argument("--summarize", action="store_true",
                   help="run nothing: tabulate and plot the results.json / record.json files under --out")
    args = p.parse_args(argv)

    conf = {k: (list(v) if isinstance(v, list) else v) for k, v in (FULL if args.full else DEFAULT).items()}
    for key, val in (("tasks", args.tasks), ("methods", args.methods)):
        if val:
            conf[key] = val.split(",")
    if args.seeds:
        conf["seeds"] = [int(s) for s in args.seeds.split(",")]
    for key in ("token_budget", "samples_per_step", "eval_size"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    if args.lr_grid:
        try:
            conf["lr_grid"] = [float(x) for x in args.lr_grid.split(",")]
        except ValueError:
            p.error(f"--lr-grid {args.lr_grid!r}: expected comma-separated numbers, e.g. 1e-4,3e-4,1e-3")
    conf.setdefault("lr_grid", [])
    if any(x <= 0 for x in conf["lr_grid"]):
        p.error(f"--lr-grid {args.lr_grid!r}: learning rates must be > 0")
    if not 1 <= args.grid_seeds <= len(conf["seeds"]):
        p.error(f"--grid-seeds {args.grid_seeds}: must be between 1 and the number of seeds ({len(conf['seeds'])})")
    conf["grid_seeds"] = conf["seeds"][:args.grid_seeds]
    conf["method_lr"] = {}
    for item in (args.method_lr.split(",") if args.method_lr else []):
        name, _, rate = item.partition("=")
        try:
            conf["method_lr"][name] = float(rate)
        except ValueError:
            p.error(f"--method-lr {item!r}: expected METHOD=LR, e.g. rkl=3e-3")
        if name not in conf["methods"]:
            p.error(f"--method-lr {item!r}: {name!r} is not one of the methods run ({','.join(conf['methods'])})")
        if not 0 < conf["method_lr"][name] < float("inf"):
            p.error(f"--method-lr {item!r}: the learning rate must be a finite number > 0")
    if args.until_flat is not None:  # --until-flat / --no-until-flat (default: on with --full)
        conf["until_flat"] = args.until_flat
    conf.setdefault("until_flat", False)
    # a mix: the sum of its families' warm-up steps (each family about as many examples as alone)
    conf["warm_steps"] = {t: (args.warm_steps if args.warm_steps is not None else
                              sum(WARM_STEPS.get(f, 0) for f in families(t))) for t in conf["tasks"]}
    if args.warm_target is not None:
        conf["warm_target"] = args.warm_target
    if args.teacher_recovery is not None:
        if not 0 < args.teacher_recovery < 1:
            p.error(f"--teacher-recovery {args.teacher_recovery}: a fraction of the teacher's examples, 0 < P < 1")
        if not any("chain" in families(t) for t in conf["tasks"]):
            p.error(f"--teacher-recovery: only the chain task has recovery examples; --tasks {','.join(conf['tasks'])}")
        conf["teacher_recovery"] = args.teacher_recovery
    conf.update(lr=args.lr, threads=args.threads, prep_threads=args.prep_threads or args.threads,
                teacher_steps=args.teacher_steps, teacher_size=args.teacher_size, teacher_device=args.teacher_device,
                prep_device=args.prep_device or args.device,
                student_size=args.student_size,
                teacher_min_accuracy=args.teacher_min_accuracy, device=args.device, jobs=args.jobs,
                flat_window=args.flat_window, flat_delta=args.flat_delta,
                evals_per_run=args.evals_per_run or (20 if conf["until_flat"] else 3))
    from opd.tiny import SIZES

    for flag, size in (("--teacher-size", args.teacher_size), ("--student-size", args.student_size)):
        if size is not None and size not in SIZES:
            p.error(f"{flag} {size!r}: choose from {', '.join(SIZES)}")
    for m in conf["methods"]:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    from rollout.tasks import TASKS

    for t in conf["tasks"]:
        for f in families(t):
            if f not in TASKS:
                p.error(f"unknown task {f!r}; choose from {', '.join(TASKS)} "
                        "(a mix of families: A+B, e.g. sort+reverse)")
        if len(set(families(t))) != len(families(t)):
            p.error(f"--tasks: the mix {t!r} names a family twice")
        if "+" in t and args.warm_target is not None:
            p.error(f"--warm-target: not for a mix of task families ({t!r}); use --warm-steps")
    if args.student_hints is not None:
        if not 0 < args.student_hints < 1:
            p.error(f"--student-hints {args.student_hints}: a fraction of the students' SFT examples, 0 < P < 1")
        bad = [t for t in conf["tasks"] if "+" in t or TASKS[t].tools]
        if bad:
            p.error(f"--student-hints: single tasks without tools only (the hinted prompt is one user message); "
                    f"not {', '.join(bad)}")
        conf["student_hints"] = args.student_hints
    if not args.methods:  # the default / --full set, less what applies to none of the tasks, plus a mix's
        conf["methods"] = [m for m in conf["methods"] if any(applies(m, t) for t in conf["tasks"])]
        if any("+" in t for t in conf["tasks"]):
            conf["methods"] += [m for m, scope in METHOD_SCOPE.items() if scope == "mix" and m not in conf["methods"]]
    scope_words = {"mix": "a mix of task families (--tasks A+B, e.g. sort+reverse)", "task": "single task families"}
    for m in conf["methods"]:
        if not any(applies(m, t) for t in conf["tasks"]):
            p.error(f"method {m!r} runs on {scope_words[METHOD_SCOPE.get(m, 'task')]}; --tasks "
                    f"{','.join(conf['tasks'])} has none")
    for flag, dev in (("--device", args.device), ("--teacher-device", args.teacher_device),
                      ("--prep-device", args.prep_device or "cpu")):
        if dev != "cpu" and not dev.startswith("cuda"):
            p.error(f"{flag} {dev!r}: choose cpu or cuda (cuda:N)")
    if args.jobs < 1 or args.threads < 1 or args.flat_window < 1 or (args.prep_threads or 1) < 1:
        p.error("--jobs, --threads, --prep-threads and --flat-window must be >= 1")
    return args, conf


def _machine(conf: dict) -> str:
    gpu = "no GPU"
    if conf["device"].startswith("cuda"):
        import subprocess

        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()[0] + " (student)"
        except (OSError, IndexError, subprocess.SubprocessError):
            gpu = "a CUDA GPU (student)"
    return f"{os.cpu_count()}-core CPU ({_cpu_name()}), {gpu}; {conf['jobs']} run(s) at once x {conf['threads']} threads"


def _cpu_name() -> str:
    """The CPU's model name and the kernel set torch dispatches to on it (AVX2, AVX512, ...): runs
    with the same thread count can still round differently on another CPU, so results name it."""
    import torch

    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{name or platform.processor() or 'unknown'}, torch {torch.backends.cpu.get_cpu_capability()}"


def _summarize_only(out: Path, conf: dict, command: str) -> int:
    if (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
    else:  # an unfinished run: the per-task preparations and the finished runs' records
        old = {"config": conf, "records": [json.loads(f.read_text()) for f in sorted(out.glob("*/*/seed*/record.json"))
                                                 + sorted(out.glob("*/*/lr_*/seed*/record.json"))],
               "teachers": {f.stem[len("prep_"):]: json.loads(f.read_text()) for f in out.glob("prep_*.json")}}
        conf["tasks"] = [t for t in conf["tasks"] if t in old["teachers"]]
    records = [r for r in old["records"] if r["task"] in conf["tasks"] and r["method"] in conf["methods"]
               and r["seed"] in conf["seeds"]]
    # grid_seeds: the execution's own (an older results.json has none: its grid ran its first seed)
    shown = {**{k: v for k, v in conf.items() if k != "grid_seeds"}, **old["config"],
             **{k: conf[k] for k in ("tasks", "methods")}}
    table = report.summarize(records, old["teachers"], shown, LABELS, old.get("command", command),
                             old["machine"] if "machine" in old else _machine(conf), old.get("lr_grid"))
    report.plot(records, old["teachers"], shown, LABELS, out / "accuracy_vs_tokens.png")
    print(table)
    return 0


class Bench:
    """The driver's state: the configuration, the output directory, the prepared tasks (teacher,
    students) and the teacher servers (one per task and job slot, started on first use)."""

    def __init__(self, conf: dict, out: Path, cache: Path):
        self.conf, self.out, self.cache = conf, out, cache
        self.teachers: dict = {}
        self.servers: dict = {}
        self.t0 = time.time()

    # ---- preparation: teachers and students, one task after the other (cached) ----
    def prepare(self) -> bool:
        """Every task's teacher and students; a task whose preparation fails (e.g. its teacher stays
        below --teacher-min-accuracy) is left out of the runs and named in the report. False when
        no task is left."""
        for task_name in list(self.conf["tasks"]):
            t_task = time.time()
            info_path, log = self.out / f"prep_{task_name}.json", self.out / f"prep_{task_name}.log"
            info_path.unlink(missing_ok=True)
            rc = in_child(prep_task, log, task_name, self.conf, self.cache, info_path)
            if rc != 0:
                print(f"[quality] {task_name}: preparation FAILED (rc {rc}); left out, see {log}", flush=True)
                self.conf["tasks"].remove(task_name)
                self.conf.setdefault("failed_tasks", []).append(task_name)
                continue
            self.teachers[task_name] = info = json.loads(info_path.read_text())
            print(f"[quality] {task_name}: teacher {info['accuracy']:.3f}, {info['start']} students "
                  f"{[round(s['accuracy'], 3) for s in info['students'].values()]} ({time.time() - t_task:.0f}s)",
                  flush=True)
        return bool(self.conf["tasks"])

    def teacher_url(self, name: str, model_dir, slot: int, log: Path | None = None) -> str:
        """The URL of the slot's teacher server `name` on `model_dir` (started on first use)."""
        self.start_servers({(name, slot): model_dir}, {(name, slot): log} if log else None)
        return self.servers[name, slot][1]

    def start_servers(self, want: dict, logs: dict | None = None) -> None:
        """Start the servers `want` ((name, slot) -> model directory) that are not running, side by
        side (a server's start is mostly imports: ~5-20 s each on a busy machine, which one after the
        other would keep the job slots idle), and wait until each serves. `logs`: (name, slot) -> its
        log file (default OUT/teacher_NAME_SLOT.log)."""
        from opd.demo import launch_teacher_process, wait_teacher_process

        os.environ["OMP_NUM_THREADS"] = str(self.conf["threads"])  # the servers' threads
        new = {key: launch_teacher_process(Path(d), self.conf.get("teacher_device", "cpu"))
               for key, d in want.items() if key not in self.servers}
        try:
            for (name, slot), proc in new.items():
                path = (logs or {}).get((name, slot)) or self.out / f"teacher_{name}_{slot}.log"
                self.servers[name, slot] = wait_teacher_process(proc, path)
        finally:  # one failed to start: stop the others launched here that are not serving yet
            for key, proc in new.items():
                if key not in self.servers and proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)

    def shared_servers(self, job: dict) -> dict[str, str]:
        """The task-teacher servers a job asks (name -> model directory; kept per job slot and
        shared by that slot's runs one after the other): a task's teacher, for a mix the first
        family's, with "ROUTES" every family's, with "GENERALIST" the mix's generalist. A self-teacher is
        the run's own (not shared)."""
        marks, info, fams = METHODS[job["method"]][1], self.teachers[job["task"]], families(job["task"])
        if "SELF" in marks:
            return {}
        if "ROUTES" in marks:
            return {f: info["families"][f]["dir"] for f in fams}
        if "GENERALIST" in marks:
            return {"generalist": info["generalist"]["dir"]}
        return {fams[0]: info["dir"]}

    def close(self, keys=None) -> None:
        """Stop the teacher servers of `keys` ((task, slot) pairs; default: all)."""
        for key in list(self.servers if keys is None else keys):
            proc, _ = self.servers.pop(key)
            proc.terminate()
            proc.wait(30)

    # ---- runs ----
    def job(self, task_name: str, method: str, seed: int, lr: float, run_dir: Path) -> dict:
        conf, info = self.conf, self.teachers[task_name]
        mnt = info["max_new_tokens"]
        # expected steps: the budget over sequences per step at the mean length of the reference
        # responses (those of the task's eval problems; a preparation from before that was recorded:
        # half the max length)
        per_seq = info.get("reference_tokens") or mnt // 2
        exp_steps = max(2, int(conf["token_budget"] // (conf["samples_per_step"] * max(1, per_seq))))
        steps_cap = exp_steps * 4
        return {"task": task_name, "method": method, "seed": seed, "lr": lr, "out": str(run_dir),
                "student": info["students"][str(seed)]["dir"], "url": None, "routes": None, "device": conf["device"],
                "token_budget": conf["token_budget"], "until_flat": conf["until_flat"],
                "flat_window": conf["flat_window"], "flat_delta": conf["flat_delta"], "max_new_tokens": mnt,
                "steps_cap": steps_cap, "threads": conf["threads"],
                "eval_every": max(1, exp_steps // conf["evals_per_run"]),
                "eval_prompts": min(64, conf["eval_size"]), "eval_size": conf["eval_size"],
                "overrides": _method_overrides(method, Path(info["dir"]), steps_cap, exp_steps // 2,
                                               conf["samples_per_step"])}

    def execute(self, jobs: list[dict]) -> dict[str, dict]:
        """Run the jobs that are not finished already (`conf['jobs']` at once); returns
        out dir -> record (failed runs absent)."""
        got, todo = {}, []
        for job in jobs:
            if _same_job(Path(job["out"]), job):
                got[job["out"]] = json.loads((Path(job["out"]) / "record.json").read_text())
            else:
                todo.append(job)

        left: dict[str, int] = {}  # server name -> jobs left to start that ask it
        for job in todo:
            for name in self.shared_servers(job):
                left[name] = left.get(name, 0) + 1
        own: dict[str, tuple] = {}  # run dir -> the key of its self-teacher server (stopped when it ends)

        def start(job, slot):
            need = self.shared_servers(job)
            for name in need:
                left[name] -= 1
            # this slot's servers that no job left to start asks are not needed any more (a self-teacher
            # started ahead for this job is its own)
            keep = {"self"} if "SELF" in METHODS[job["method"]][1] else set()
            self.close([(n, s) for n, s in self.servers
                        if s == slot and n not in need and n not in keep and not left.get(n)])
            run_dir = Path(job["out"])
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "record.json").unlink(missing_ok=True)
            urls = {name: self.teacher_url(name, d, slot) for name, d in need.items()}
            if "SELF" in METHODS[job["method"]][1]:  # a frozen copy of the run's own start (refresh changes it)
                own[job["out"]] = ("self", slot)
                job = {**job, "url": self.teacher_url("self", job["student"], slot, run_dir / "teacher_self.log")}
            elif "ROUTES" in METHODS[job["method"]][1]:
                job = {**job, "url": "", "routes": urls}
            else:  # the one shared server it asks (a task's teacher, a mix's first family's or generalist)
                (url,) = urls.values()
                job = {**job, "url": url}
            (run_dir / "job.json").write_text(json.dumps(job, indent=1))
            return start_child(run_one, run_dir / "stdout.log", job)

        def done(job, rc):
            if job["out"] in own:
                self.close([own.pop(job["out"])])
            run_dir = Path(job["out"])
            tag = f"{job['task']}/{job['method']}/seed{job['seed']} lr {job['lr']:g}"
            if not (run_dir / "record.json").exists():
                print(f"[quality] {tag} FAILED (rc {rc}); see {run_dir / 'stdout.log'}", flush=True)
                return
            rec = got[job["out"]] = json.loads((run_dir / "record.json").read_text())
            print(f"[quality] {tag}: accuracy {rec['accuracy']:.3f} tokens {rec['tokens']} steps {rec['steps']} "
                  f"({rec['stop']}) {rec['wall_s']:.0f}s (init {rec['init_s']:.0f}s, eval {rec['eval_s']:.0f}s) "
                  f"rss {rec['peak_rss_mb']:.0f}MB ({time.time() - self.t0:.0f}s so far)", flush=True)

        # the first jobs' servers, one per job slot, all at once (the pool gives job i slot i), their
        # self-teachers included (each logs to its run's directory, as when `start` starts it)
        first = list(enumerate(todo[:self.conf["jobs"]]))
        selfs = {("self", slot): job for slot, job in first if "SELF" in METHODS[job["method"]][1]}
        for job in selfs.values():
            Path(job["out"]).mkdir(parents=True, exist_ok=True)
        self.start_servers({**{(name, slot): d for slot, job in first for name, d in self.shared_servers(job).items()},
                            **{key: job["student"] for key, job in selfs.items()}},
                           {key: Path(job["out"]) / "teacher_self.log" for key, job in selfs.items()})
        run_pool(todo, self.conf["jobs"], start, done)
        return got

    def tune_lr(self) -> tuple[dict, dict]:
        """The learning-rate grid: the grid seeds (the first --grid-seeds) at every rate, per task
        and method; the rate with the best mean final accuracy over them is chosen (a rate where
        a grid seed's run failed is not). Returns the grid for the report and (task, method) -> the
        chosen rate; both empty without a grid."""
        conf, gseeds = self.conf, self.conf["grid_seeds"]
        lr_grid, chosen = {}, {}
        if not conf["lr_grid"] or all(m in conf["method_lr"] for m in conf["methods"]):
            return lr_grid, chosen
        jobs = [self.job(t, m, seed, lr, self.out / t / m / f"lr_{lr:g}" / f"seed{seed}")
                for t in conf["tasks"] for m in conf["methods"] if applies(m, t) and m not in conf["method_lr"]
                for lr in conf["lr_grid"] for seed in gseeds]
        got = self.execute(jobs)
        for t in conf["tasks"]:
            for m in conf["methods"]:
                per = {}  # lr -> {seed: accuracy}
                for j in jobs:
                    if j["task"] == t and j["method"] == m and j["out"] in got:
                        per.setdefault(j["lr"], {})[j["seed"]] = got[j["out"]]["accuracy"]
                accs, best = report.choose_lr(per, gseeds)
                if best is not None:
                    chosen[t, m] = best
                    lr_grid.setdefault(t, {})[m] = {"grid": {f"{k:g}": v for k, v in accs.items()},
                                                    "chosen": chosen[t, m]}
                    if len(gseeds) > 1:
                        lr_grid[t][m]["per_seed"] = {f"{k:g}": {str(s): a for s, a in v.items()}
                                                     for k, v in per.items()}
        where = f"seed {gseeds[0]}" if len(gseeds) == 1 else f"the mean of seeds {','.join(map(str, gseeds))}"
        print(f"[quality] learning rates chosen on {where}: "
              f"{ {f'{t}/{m}': f'{v:g}' for (t, m), v in chosen.items()} }", flush=True)
        return lr_grid, chosen

    def run_seeds(self, chosen: dict) -> list[dict]:
        """Every seed at its method's rate (with a grid, a grid seed's run at that rate is that
        seed's run); returns the finished runs' records."""
        conf, jobs = self.conf, []
        for t in conf["tasks"]:
            for m in conf["methods"]:
                fixed = conf["method_lr"].get(m)
                if not applies(m, t) or (conf["lr_grid"] and fixed is None and (t, m) not in chosen):
                    continue  # every grid run of this method failed
                lr = fixed or chosen.get((t, m), conf["lr"])
                for seed in conf["seeds"]:
                    reuse = conf["lr_grid"] and fixed is None and seed in conf["grid_seeds"]
                    jobs.append(self.job(t, m, seed, lr, self.out / t / m /
                                         (f"lr_{lr:g}/seed{seed}" if reuse else f"seed{seed}")))
        got = self.execute(jobs)
        return [got[j["out"]] for j in jobs if j["out"] in got]

    # ---- report ----
    def write_report(self, records: list[dict], lr_grid: dict, command: str) -> None:
        machine, out = _machine(self.conf), self.out
        table = report.summarize(records, self.teachers, self.conf, LABELS, command, machine, lr_grid)
        total = round(time.time() - self.t0, 1)
        (out / "results.json").write_text(json.dumps({"config": self.conf, "teachers": self.teachers,
                                                      "records": records, "lr_grid": lr_grid, "command": command,
                                                      "machine": machine, "total_wall_s": total}, indent=1))
        (out / "results.md").write_text(table + f"\nTotal wall time: {total:.0f} s.\n")
        try:
            report.plot(records, self.teachers, self.conf, LABELS, out / "accuracy_vs_tokens.png")
        except ImportError:
            print("[quality] matplotlib not installed: no PNG", flush=True)
        print(table)
        print(f"[quality] {len(records)} runs in {total:.0f}s; {out / 'results.json'}, "
              f"{out / 'results.md'}, {out / 'accuracy_vs_tokens.png'}", flush=True)


def main(argv=None) -> int:
    args, conf = parse_args(argv)
    command = " ".join([".venv/bin/python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        return _summarize_only(out, conf, command)
    # SIGTERM (e.g. from `timeout`) ends the driver like Ctrl-C: running children and teacher servers
    # are stopped, finished runs are kept, and the same command later resumes from them
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _set_env(conf["device"])
    _preimport(conf["device"])
    bench = Bench(conf, out, Path(args.cache_dir))
    if not bench.prepare():
        return 1
    try:
        lr_grid, chosen = bench.tune_lr()
        records = bench.run_seeds(chosen)
    finally:
        bench.close()
    bench.write_report(records, lr_grid, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
