"""Models for `opd demo`: a tiny teacher trained on the demo task, and a small untrained student.

`prepare_teacher(cache_dir)` builds the built-in tokenizer and a "demo_teacher" model, trains it
with plain torch SFT (`opd.sft`) on the addition task of `rollout.tasks.arithmetic` until its
greedy accuracy on the eval split is at least `min_accuracy`, and saves a Hugging Face directory
in the cache (`opd.model_cache`), so a second call with the same settings loads it at once.

`prepare_student(cache_dir)` saves a smaller random-weight student (optionally briefly
pre-trained on English-ish text without any arithmetic) that scores ~0% on the task.

`evaluate_accuracy(model_or_dir, tokenizer, examples)` is the greedy accuracy on arithmetic
examples (`rollout.evaluate.model_accuracy`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from opd import sft
from opd.model_cache import cache_key, load_tokenizer, read_info, save_model, tokenizer_dir
from opd.tiny import random_model
from rollout.tasks import arithmetic


@dataclass(frozen=True)
class TeacherSettings:
    size: str = "demo_teacher"
    digits: int = 2
    style: str = "worked"
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 15
    seed: int = 0
    vocab_size: int = 512
    eval_size: int = 256
    min_accuracy: float = 0.9
    extra_rounds: int = 3          # more training (steps // 2 each) while below min_accuracy


@dataclass(frozen=True)
class StudentSettings:
    size: str = "student"
    seed: int = 1
    vocab_size: int = 512
    pretrain_steps: int = 0        # > 0: brief LM pre-training on word text (no digits)
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def evaluate_accuracy(model, tokenizer, examples, max_new_tokens: int | None = None) -> float:
    """Greedy accuracy of `model` (a model or a HF directory) on arithmetic `examples`
    (`rollout.evaluate.model_accuracy`). `tokenizer` may be None when `model` is a directory."""
    from rollout.evaluate import model_accuracy

    return model_accuracy(model, tokenizer, examples, arithmetic.grade, max_new_tokens=max_new_tokens)


def eval_examples(digits: int = 2, style: str = "worked", n: int = 256, seed: int = 0):
    return arithmetic.make_examples("eval", n, seed=seed, digits=digits, style=style)


def prepare_teacher(cache_dir: str | os.PathLike, settings: TeacherSettings | None = None, *,
                    log: Callable[[str], None] | None = _log_default, **overrides) -> Path:
    """Train (first run) or load (cached) the demo teacher; returns its HF directory.

    `overrides` replace fields of `settings` (e.g. steps=200). Raises RuntimeError when the
    teacher cannot reach `min_accuracy`.
    """
    s = TeacherSettings(**{**asdict(settings or TeacherSettings()), **overrides})
    cache_dir = Path(cache_dir)
    out = cache_dir / cache_key("teacher", s)
    if (out / "opd_demo.json").exists():
        if log:
            log(f"teacher: cached at {out} (accuracy {read_info(out).get('accuracy')})")
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = tokenizer_dir(cache_dir, s.vocab_size)
    tok = load_tokenizer(tok_dir)
    t0 = time.time()
    model = random_model(tok, s.size, s.seed)
    train = arithmetic.make_examples("train", s.steps * s.batch_size, seed=s.seed, digits=s.digits,
                                    style=s.style, sample_seed=s.seed + 1000)
    evals = eval_examples(s.digits, s.style, s.eval_size, s.seed)
    if log:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"teacher: training {s.size} ({n_params / 1e6:.2f}M params) on {s.digits}-digit addition, "
            f"{s.steps} steps x {s.batch_size}")
    acc, seconds = sft.train_to_accuracy(
        model, tok, s, train, lambda m: evaluate_accuracy(m, tok, evals),
        lambda n, r: arithmetic.make_examples("train", n, seed=s.seed, digits=s.digits, style=s.style,
                                             sample_seed=s.seed + 2000 + r),
        name="demo teacher", log=log, t0=t0)
    save_model(out, model, tok, {"role": "teacher", "settings": asdict(s), "accuracy": acc,
                                 "eval_size": len(evals), "train_seconds": round(seconds, 1)})
    return out


def prepare_student(cache_dir: str | os.PathLike, settings: StudentSettings | None = None, *,
                    log: Callable[[str], None] | None = _log_default, **overrides) -> Path:
    """Save (first run) or load (cached) the demo student; returns its HF directory."""
    s = StudentSettings(**{**asdict(settings or StudentSettings()), **overrides})
    cache_dir = Path(cache_dir)
    out = cache_dir / cache_key("student", s)
    if (out / "opd_demo.json").exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer_dir(cache_dir, s.vocab_size))
    model = random_model(tok, s.size, s.seed)
    if s.pretrain_steps > 0:
        if log:
            log(f"student: pre-training {s.size} on word text for {s.pretrain_steps} steps")
        sft.pretrain_on_words(model, tok, s.pretrain_steps, s.pretrain_batch_size, s.pretrain_lr, s.seed)
    return save_model(out, model, tok, {"role": "student", "settings": asdict(s)})
