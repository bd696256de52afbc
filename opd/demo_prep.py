"""Models for `opd demo`: a tiny teacher trained on the demo task, and a small untrained student.

`prepare_teacher(cache_dir)` builds the built-in tokenizer and a "demo_teacher" model, trains it
with plain torch SFT (AdamW, cross entropy on response tokens only) on the addition task of
`rollout.tasks.arithmetic` until its greedy accuracy on the eval split is at least `min_accuracy`, and saves
a Hugging Face directory (safetensors + tokenizer). The directory name is a key of the settings,
so a second call with the same settings loads from the cache at once.

`prepare_student(cache_dir)` saves a smaller random-weight student (optionally briefly
pre-trained on English-ish text without any arithmetic) that scores ~0% on the task.

`evaluate_accuracy(model_or_dir, tokenizer, examples)` is batched greedy decoding + `grade`.

`prototype_opd(teacher_dir, student_dir)` is a plain-torch on-policy distillation loop
(student samples at temperature 1, per-token KL to the teacher over the full vocabulary on the
response tokens), the reference the real teacher-server/trainer/rollout pipeline is checked
against.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from rollout.tasks import arithmetic
from rollout.tasks.encoding import encode, prompt_ids

CACHE_VERSION = 1


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


def _key(kind: str, settings) -> str:
    from opd.tiny import SIZES

    payload = {"kind": kind, "version": CACHE_VERSION, **asdict(settings)}
    size = payload.get("size")
    if size in SIZES:
        payload["size_spec"] = asdict(SIZES[size])
    blob = json.dumps(payload, sort_keys=True).encode()
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:12]}"


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def tokenizer_dir(cache_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    """The built-in tokenizer, built once into `cache_dir/tokenizer-<vocab>`."""
    from opd.tiny import build_tokenizer

    out = Path(cache_dir) / f"tokenizer-v{CACHE_VERSION}-{vocab_size}"
    if not (out / "tokenizer.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tokenizer(tmp, vocab_size=vocab_size)
        _publish(tmp, out)
    return out


def _publish(tmp: Path, out: Path) -> None:
    try:
        os.replace(tmp, out)
    except OSError:  # a concurrent run published first
        shutil.rmtree(tmp, ignore_errors=True)


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _new_model(tok, size: str, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    from opd.tiny import model_config

    cfg = model_config(len(tok), size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def collate(tokenizer, examples) -> tuple:
    """Right-padded (input_ids, attention_mask, loss_mask) for prompt + response + eos."""
    import torch

    rows = [encode(tokenizer, ex) for ex in examples]
    length = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(rows), length), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (p, r, m) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        att[i, :n] = 1
        if m is None:
            loss_mask[i, len(p):n] = True
        else:  # multi-turn examples (rollout.tasks.calc.CalcExample): no loss on tool-response tokens
            loss_mask[i, len(p):n] = torch.tensor(m, dtype=torch.bool)
    return ids, att, loss_mask


def _warmup_cosine(steps: int, warmup: int, floor: float = 0.05) -> Callable[[int], float]:
    def f(s: int) -> float:
        w = min(1.0, (s + 1) / max(1, warmup))
        return w * max(floor, 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    return f


def sft_step(model, tokenizer, batch, opt, sched):
    """One SFT step on `batch` (cross entropy on response tokens only, grad-norm clip 1.0).
    Returns the loss tensor."""
    import torch
    import torch.nn.functional as F

    ids, att, lmask = collate(tokenizer, batch)
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    tmask = lmask[:, 1:]
    loss = F.cross_entropy(logits[tmask].float(), ids[:, 1:][tmask])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss


def sft_train(model, tokenizer, examples, *, steps: int, batch_size: int, lr: float,
              warmup_steps: int = 15, log: Callable[[str], None] | None = None,
              log_every: int = 50) -> float:
    """Plain torch SFT: AdamW, cross entropy on response tokens only. Returns the last loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps, warmup_steps))
    from tqdm import tqdm

    model.train()
    loss_val = float("nan")
    # On a terminal a progress bar (tqdm, disable=None: off when stderr is not a terminal); the
    # log lines every `log_every` steps stay for logs and pipes.
    bar = tqdm(range(steps), desc="sft", unit="step", disable=None, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = [examples[(step * batch_size + i) % len(examples)] for i in range(batch_size)]
        loss_val = sft_step(model, tokenizer, batch, opt, sched).item()
        bar.set_postfix(loss=f"{loss_val:.3f}", refresh=False)
        if log and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(f"  sft step {step + 1}/{steps} loss {loss_val:.4f}")
    bar.close()
    model.eval()
    return loss_val


def generate_responses(model, tokenizer, examples, *, max_new_tokens: int, temperature: float = 0.0,
                       batch_size: int = 512) -> list[list[int]]:
    """Batched decoding (greedy when temperature == 0) of the examples' prompts; token ids per
    response, up to and including eos (no padding)."""
    import torch

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out_rows: list[list[int]] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            prompts = [prompt_ids(tokenizer, ex) for ex in chunk]
            length = max(map(len, prompts))
            ids = torch.full((len(prompts), length), pad, dtype=torch.long)
            att = torch.zeros_like(ids)
            for i, p in enumerate(prompts):  # left padding
                ids[i, length - len(p):] = torch.tensor(p)
                att[i, length - len(p):] = 1
            kw = {"do_sample": False} if temperature <= 0 else {
                "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos, **kw)[:, length:]
            for row in gen.tolist():
                if eos in row:
                    row = row[:row.index(eos) + 1]
                out_rows.append(row)
    if was_training:
        model.train()
    return out_rows


def evaluate_accuracy(model, tokenizer, examples, max_new_tokens: int | None = None) -> float:
    """Greedy accuracy of `model` (a model or a HF directory) on arithmetic `examples`
    (`rollout.evaluate.model_accuracy`). `tokenizer` may be None when `model` is a directory."""
    from rollout.evaluate import model_accuracy

    return model_accuracy(model, tokenizer, examples, arithmetic.grade, max_new_tokens=max_new_tokens)


def eval_examples(digits: int = 2, style: str = "worked", n: int = 256, seed: int = 0):
    return arithmetic.make_examples("eval", n, seed=seed, digits=digits, style=style)


def _write_info(out: Path, info: dict) -> None:
    (out / "opd_demo.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def read_info(model_dir: str | os.PathLike) -> dict:
    """The settings/accuracy record saved beside a prepared model ({} when none)."""
    p = Path(model_dir) / "opd_demo.json"
    return json.loads(p.read_text()) if p.exists() else {}


def train_to_accuracy(model, tok, s, train, evaluate: Callable, more_examples: Callable, *, name: str,
                      log: Callable[[str], None] | None, t0: float, log_every: int = 50) -> tuple[float, float]:
    """SFT on `train` for `s.steps`; then, while `evaluate(model)` < `s.min_accuracy`, up to
    `s.extra_rounds` rounds of `s.steps // 2` more steps at lr/3 on `more_examples(n, round)`.
    Returns (accuracy, seconds since t0); RuntimeError when the accuracy is still too low."""
    import torch

    torch.manual_seed(s.seed)
    sft_train(model, tok, train, steps=s.steps, batch_size=s.batch_size, lr=s.lr,
              warmup_steps=s.warmup_steps, log=log, log_every=log_every)
    acc = evaluate(model)
    rounds = 0
    while acc < s.min_accuracy and rounds < s.extra_rounds:
        rounds += 1
        if log:
            log(f"{name}: eval accuracy {acc:.3f} < {s.min_accuracy}; training {s.steps // 2} more steps")
        sft_train(model, tok, more_examples((s.steps // 2) * s.batch_size, rounds), steps=s.steps // 2,
                  batch_size=s.batch_size, lr=s.lr / 3, warmup_steps=1, log=log, log_every=log_every)
        acc = evaluate(model)
    seconds = time.time() - t0
    if acc < s.min_accuracy:
        raise RuntimeError(f"{name} reached only {acc:.3f} accuracy (< {s.min_accuracy})")
    if log:
        log(f"{name}: eval accuracy {acc:.3f} after {seconds:.0f}s")
    return acc, seconds


def save_model(out: Path, model, tok, info: dict) -> Path:
    """Write model + tokenizer + info record to a temporary directory, then rename it to `out`."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    _write_info(tmp, info)
    _publish(tmp, out)
    return out


def prepare_teacher(cache_dir: str | os.PathLike, settings: TeacherSettings | None = None, *,
                    log: Callable[[str], None] | None = _log_default, **overrides) -> Path:
    """Train (first run) or load (cached) the demo teacher; returns its HF directory.

    `overrides` replace fields of `settings` (e.g. steps=200). Raises RuntimeError when the
    teacher cannot reach `min_accuracy`.
    """
    s = TeacherSettings(**{**asdict(settings or TeacherSettings()), **overrides})
    cache_dir = Path(cache_dir)
    out = cache_dir / _key("teacher", s)
    if (out / "opd_demo.json").exists():
        if log:
            log(f"teacher: cached at {out} (accuracy {read_info(out).get('accuracy')})")
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = tokenizer_dir(cache_dir, s.vocab_size)
    tok = _load_tokenizer(tok_dir)
    t0 = time.time()
    model = _new_model(tok, s.size, s.seed)
    train = arithmetic.make_examples("train", s.steps * s.batch_size, seed=s.seed, digits=s.digits,
                                    style=s.style, sample_seed=s.seed + 1000)
    evals = eval_examples(s.digits, s.style, s.eval_size, s.seed)
    if log:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"teacher: training {s.size} ({n_params / 1e6:.2f}M params) on {s.digits}-digit addition, "
            f"{s.steps} steps x {s.batch_size}")
    acc, seconds = train_to_accuracy(
        model, tok, s, train, lambda m: evaluate_accuracy(m, tok, evals),
        lambda n, r: arithmetic.make_examples("train", n, seed=s.seed, digits=s.digits, style=s.style,
                                             sample_seed=s.seed + 2000 + r),
        name="demo teacher", log=log, t0=t0)
    save_model(out, model, tok, {"role": "teacher", "settings": asdict(s), "accuracy": acc,
                                 "eval_size": len(evals), "train_seconds": round(seconds, 1)})
    return out


def _word_lines(n: int, seed: int) -> list[str]:
    """English-ish lines from the tokenizer's word list: no digits, no arithmetic."""
    import random

    from opd.tiny import _WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16))) + "." for _ in range(n)]


def _pretrain_on_words(model, tok, steps: int, batch_size: int, lr: float, seed: int) -> None:
    import torch
    import torch.nn.functional as F

    lines = _word_lines(steps * batch_size, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    for step in range(steps):
        enc = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
               for t in lines[step * batch_size:(step + 1) * batch_size]]
        length = max(map(len, enc))
        ids = torch.full((len(enc), length), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, :len(e)] = torch.tensor(e)
            att[i, :len(e)] = 1
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        m = att[:, 1:].bool()
        loss = F.cross_entropy(logits[m].float(), ids[:, 1:][m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def prepare_student(cache_dir: str | os.PathLike, settings: StudentSettings | None = None, *,
                    log: Callable[[str], None] | None = _log_default, **overrides) -> Path:
    """Save (first run) or load (cached) the demo student; returns its HF directory."""
    s = StudentSettings(**{**asdict(settings or StudentSettings()), **overrides})
    cache_dir = Path(cache_dir)
    out = cache_dir / _key("student", s)
    if (out / "opd_demo.json").exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok = _load_tokenizer(tokenizer_dir(cache_dir, s.vocab_size))
    model = _new_model(tok, s.size, s.seed)
    if s.pretrain_steps > 0:
        if log:
            log(f"student: pre-training {s.size} on word text for {s.pretrain_steps} steps")
        _pretrain_on_words(model, tok, s.pretrain_steps, s.pretrain_batch_size, s.pretrain_lr, s.seed)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    _write_info(tmp, {"role": "student", "settings": asdict(s)})
    _publish(tmp, out)
    return out


@dataclass
class OPDSettings:
    steps: int = 300
    prompts_per_step: int = 64
    samples_per_prompt: int = 1
    lr: float = 3e-3
    warmup_steps: int = 10
    divergence: str = "forward_kl"   # "forward_kl" | "reverse_kl"
    temperature: float = 1.0
    max_new_tokens: int = 28
    digits: int = 2
    style: str = "worked"
    seed: int = 0
    eval_every: int = 50
    eval_size: int = 256
    history: list = field(default_factory=list)


def prototype_opd(teacher_dir, student_dir, settings: OPDSettings | None = None, *,
                  log: Callable[[str], None] | None = _log_default, save_dir=None, **overrides):
    """A plain-torch on-policy distillation loop; returns (student model, history).

    Each step: the student samples one response per prompt at `temperature`; the teacher scores
    the same sequences; the loss is the per-token KL (full vocabulary) between the two next-token
    distributions on the response tokens (through the first eos), averaged over tokens.
    `history` holds {"step", "accuracy", "seconds"} (seconds exclude evaluation).
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    s = settings or OPDSettings()
    for k, v in overrides.items():
        setattr(s, k, v)
    tok = _load_tokenizer(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(str(student_dir))
    evals = eval_examples(s.digits, s.style, s.eval_size, s.seed)
    prompts = arithmetic.make_examples("train", s.steps * s.prompts_per_step, seed=s.seed, digits=s.digits,
                                      style=s.style, sample_seed=s.seed + 3000)
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(1, s.warmup_steps)))
    torch.manual_seed(s.seed)
    pad = tok.pad_token_id
    history = s.history
    acc = evaluate_accuracy(student, tok, evals, s.max_new_tokens)
    history.append({"step": 0, "accuracy": acc, "seconds": 0.0})
    if log:
        log(f"opd: step 0 student accuracy {acc:.3f}")
    train_seconds = 0.0
    cpu0 = time.process_time()
    for step in range(s.steps):
        t0 = time.time()
        batch = [ex for ex in prompts[step * s.prompts_per_step:(step + 1) * s.prompts_per_step]
                 for _ in range(s.samples_per_prompt)]
        rows = generate_responses(student, tok, batch, max_new_tokens=s.max_new_tokens,
                                  temperature=s.temperature)
        seqs = [prompt_ids(tok, ex) for ex in batch]
        plen = [len(p) for p in seqs]
        seqs = [p + r for p, r in zip(seqs, rows)]
        length = max(map(len, seqs))
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        lmask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, q in enumerate(seqs):
            ids[i, :len(q)] = torch.tensor(q)
            att[i, :len(q)] = 1
            lmask[i, plen[i]:len(q)] = True
        tmask = lmask[:, 1:]
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=ids, attention_mask=att).logits[:, :-1][tmask].float(), -1)
        student.train()
        s_logp = F.log_softmax(student(input_ids=ids, attention_mask=att).logits[:, :-1][tmask].float(), -1)
        if s.divergence == "reverse_kl":
            per_tok = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
        elif s.divergence == "forward_kl":
            per_tok = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        else:
            raise ValueError(f"unknown divergence {s.divergence!r}")
        loss = per_tok.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        student.eval()
        train_seconds += time.time() - t0
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            cpu = time.process_time() - cpu0
            e0 = time.process_time()
            acc = evaluate_accuracy(student, tok, evals, s.max_new_tokens)
            cpu0 += time.process_time() - e0  # evaluation is not counted
            history.append({"step": step + 1, "accuracy": acc, "seconds": round(train_seconds, 1),
                            "cpu_seconds": round(cpu, 1), "loss": round(loss.item(), 4)})
            if log:
                log(f"opd: step {step + 1} loss {loss.item():.4f} accuracy {acc:.3f} ({train_seconds:.0f}s)")
    if save_dir is not None:
        student.save_pretrained(str(save_dir), safe_serialization=True)
        tok.save_pretrained(str(save_dir))
    return student, history
