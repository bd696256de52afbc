"""What a `chain` model does after a mistake: does it carry a wrong running sum on, or restore it?

On-policy distillation is claimed to help most where a student's own early errors compound: the
teacher scores the states the student reaches, so (the argument goes) it can teach the way back.
That needs a teacher that, shown a wrong partial sum, continues towards the right answer. This
script measures it, for the teacher and for any trained student (the quality bench exports each
run's student under `RUN_DIR/hf`), on held-out `chain` problems:

- **own**: greedy generations from the prompt: the final accuracy; the share of steps `a+d=s`
  whose arithmetic is right on the operands the model wrote (`d` the problem's digit, `s = a + d`:
  "local"), and the share whose left operand `a` repeats the model's previous sum ("carried"). A
  model with high local accuracy but low final accuracy makes few errors, and they compound.
- **after an injected error at step k**: the reference response up to step k, with step k's sum
  off by +1 or -1 (alternating over problems), then `", "`; the model continues greedily. Reported:
  the share whose next step starts from the wrong sum (carries it), from the true sum (restores
  it), and whose final answer is right (recovers) or equals the truth shifted by the injected
  error (consistent with the error: every later step right relative to the wrong sum).

    PYTHONPATH=. python bench/quality_chain_probe.py --model teacher=CACHE/teacher-chain-... \\
        --model sft-seed4=runs/qchain_cpu/chain/sft/seed4/hf --n 256 --out docs/quality_chain/probe.json

Prints a table and writes the JSON (`--out`). CPU by default; `--device cuda` on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

STEP_RE = re.compile(r"^(\d+)\+(\d+)=(\d+)$")
ANSWER_RE = re.compile(r"Answer:\s*(\d+)")


def parse_steps(text: str) -> list[tuple[int, int, int] | None]:
    """The response's steps `a+d=s` in order (None for a step that does not parse), up to `. Answer:`."""
    body = text.split(". Answer:")[0]
    out = []
    for part in body.split(", "):
        m = STEP_RE.match(part.strip())
        out.append(tuple(int(g) for g in m.groups()) if m else None)
    return out


def final_answer(text: str) -> int | None:
    found = ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


def own_stats(text: str, digits: tuple) -> dict:
    """Per generation: steps whose arithmetic is right on the operands written, with the problem's
    digit ("local"), steps that carry the previous written sum, the parsed steps, and whether the
    answer is right."""
    steps = parse_steps(text)
    local = carried = n = 0
    prev = digits[0]
    for i, st in enumerate(steps[: len(digits) - 1]):
        if st is None:
            prev = None
            continue
        a, d, s = st
        n += 1
        local += int(d == digits[i + 1] and a + d == s)
        carried += int(prev is not None and a == prev)
        prev = s
    return {"steps": n, "local": local, "carried": carried, "correct": final_answer(text) == sum(digits)}


def injected_prefix(digits: tuple, k: int, delta: int) -> tuple[str, int]:
    """The reference response through step k (1-based; step k adds digit k) with step k's sum off by
    `delta`, then ", "; returns (prefix, the wrong sum)."""
    sums, total = [], 0
    for d in digits:
        total += d
        sums.append(total)
    parts = [f"{sums[i - 1]}+{digits[i]}={sums[i]}" for i in range(1, k)]
    wrong = sums[k] + delta
    parts.append(f"{sums[k - 1]}+{digits[k]}={wrong}")
    return ", ".join(parts) + ", ", wrong


def continuation_stats(cont: str, digits: tuple, k: int, wrong: int, delta: int) -> dict:
    steps = parse_steps(cont)
    first = steps[0] if steps else None
    truth = sum(digits)
    ans = final_answer(cont)
    return {"carries": first is not None and first[0] == wrong,
            "restores": first is not None and first[0] == sum(digits[: k + 1]),
            "recovers": ans == truth, "consistent": ans == truth + delta}


def probe(model_dir: str, n: int, error_steps: list[int], device: str, seed: int = 0) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from opd import model_cache
    from rollout.evaluate import greedy_texts
    from rollout.local_engine import LocalEngine
    from rollout.tasks.chain import make_chain_examples
    from rollout.tasks.encoding import max_new_tokens_for, prompt_ids

    torch.manual_seed(seed)
    tok = model_cache.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    examples = make_chain_examples("eval", n, seed=seed)
    mnt = max_new_tokens_for(tok, examples)
    engine = LocalEngine(model, tok, max_batch_size=512)
    t0 = time.time()
    try:
        texts = asyncio.run(greedy_texts(engine, tok, [prompt_ids(tok, ex) for ex in examples], mnt))
        own = [own_stats(t, ex.digits) for t, ex in zip(texts, examples)]
        steps = sum(o["steps"] for o in own)
        res = {"model": model_dir, "n": n, "own": {
            "accuracy": sum(o["correct"] for o in own) / n,
            "local_step_accuracy": sum(o["local"] for o in own) / max(steps, 1),
            "carried_share": sum(o["carried"] for o in own) / max(steps, 1),
            "steps_per_response": steps / n}, "injected": {}}
        for k in error_steps:
            prompts, meta = [], []
            for i, ex in enumerate(examples):
                delta = 1 if i % 2 == 0 else -1
                prefix, wrong = injected_prefix(ex.digits, k, delta)
                prompts.append(prompt_ids(tok, ex) + list(tok.encode(prefix, add_special_tokens=False)))
                meta.append((ex.digits, wrong, delta))
            conts = asyncio.run(greedy_texts(engine, tok, prompts, mnt))
            st = [continuation_stats(c, d, k, w, dl) for c, (d, w, dl) in zip(conts, meta)]
            res["injected"][str(k)] = {key: sum(s[key] for s in st) / n
                                       for key in ("carries", "restores", "recovers", "consistent")}
    finally:
        engine.close()
    res["seconds"] = round(time.time() - t0, 1)
    return res


def table(results: dict[str, dict], error_steps: list[int]) -> str:
    head = ("| model | accuracy | local step acc. | carried | "
            + " | ".join(f"err@{k}: carries / restores / recovers / consistent" for k in error_steps) + " |")
    lines = [head, "|---|---|---|---|" + "---|" * len(error_steps)]
    for name, r in results.items():
        o = r["own"]
        cells = [" / ".join(f"{r['injected'][str(k)][x]:.3f}" for x in ("carries", "restores", "recovers", "consistent"))
                 for k in error_steps]
        lines.append(f"| {name} | {o['accuracy']:.3f} | {o['local_step_accuracy']:.3f} | {o['carried_share']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, help="NAME=HF_DIR (repeatable)")
    p.add_argument("--n", type=int, default=256, help="held-out chain problems")
    p.add_argument("--error-steps", default="2,7,12", help="comma-separated steps (1-14) where an error is injected")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    models = {}
    for item in args.model:
        name, _, path = item.partition("=")
        if not name or not path:
            p.error(f"--model {item!r}: expected NAME=HF_DIR")
        if not (Path(path) / "config.json").exists():
            p.error(f"--model {item!r}: {path} has no config.json (a Hugging Face model directory is expected)")
        models[name] = path
    try:
        steps = [int(x) for x in args.error_steps.split(",")]
    except ValueError:
        p.error(f"--error-steps {args.error_steps!r}: expected comma-separated integers 1-14")
    if not steps or any(not 1 <= k <= 14 for k in steps):
        p.error(f"--error-steps {args.error_steps!r}: each step must be in 1-14 (a chain response has 15 steps)")
    if args.n < 1:
        p.error(f"--n {args.n}: must be >= 1")
    results = {name: probe(path, args.n, steps, args.device) for name, path in models.items()}
    print(table(results, steps))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(["python", "bench/quality_chain_probe.py",
                                                                   *(argv if argv is not None else sys.argv[1:])]),
                                              "error_steps": steps, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
