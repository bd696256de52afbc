"""Plain torch SFT for the demo's and the quality bench's tiny models: cross entropy on the
response tokens only (multi-turn examples: not on tool tokens), AdamW, warm-up + cosine schedule,
grad-norm clip 1.0. `train_to_accuracy` trains until a greedy accuracy is reached;
`pretrain_on_words` is a brief language-model pre-training on word text (no digits, no arithmetic).
"""

from __future__ import annotations

import math
import time
from typing import Callable

from rollout.tasks.encoding import encode


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


def warmup_cosine(steps: int, warmup: int, floor: float = 0.05) -> Callable[[int], float]:
    def f(s: int) -> float:
        w = min(1.0, (s + 1) / max(1, warmup))
        return w * max(floor, 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    return f


def sft_step(model, tokenizer, batch, opt, sched):
    """One SFT step on `batch` (cross entropy on response tokens only, grad-norm clip 1.0).
    Returns the loss tensor."""
    import torch
    import torch.nn.functional as F

    dev = next(model.parameters()).device
    ids, att, lmask = (t.to(dev) for t in collate(tokenizer, batch))
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warmup_steps))
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


def _word_lines(n: int, seed: int) -> list[str]:
    """English-ish lines from the tokenizer's word list: no digits, no arithmetic."""
    import random

    from opd.tiny import _WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16))) + "." for _ in range(n)]


def pretrain_on_words(model, tok, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Next-token cross entropy on `_word_lines` (AdamW, constant lr), `steps` batches of `batch_size`."""
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
