"""Evaluation: greedy accuracy (one function for the trainer, the demo and the quality bench), and
`opd eval`: sample k answers per problem, grade them, report avg@k and pass@k per data source.

`greedy_accuracy(engine, tokenizer, prompts, references, grade, max_new_tokens)` decodes one greedy
response per prompt through any rollout engine and averages ``grade(text, reference)``;
`model_accuracy(model, tokenizer, examples, grade)` does it for a transformers model on built-in
task examples (a `LocalEngine`, wrapped in the tool loop when the task names tools).

    opd tiny-model /tmp/tiny
    echo '{"problem": "What is 1+1?", "answer": "2"}' > /tmp/p.jsonl
    opd eval --model /tmp/tiny --data /tmp/p.jsonl --n 4 --max-new-tokens 16 --out /tmp/samples.jsonl

pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), averaged over problems.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections import defaultdict

from tqdm import tqdm

from rollout.data import BOXED_INSTRUCTION, DataConfig, load_prompts
from rollout.grading import get_reward_fn
from rollout.types import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct_by_source: dict[str, list[list[float]]], ks: list[int]) -> dict[str, dict]:
    """correct_by_source[source][problem] = per-sample rewards (1.0 = correct)."""
    table = {}
    for source, problems in correct_by_source.items():
        n = min(len(p) for p in problems)
        row = {"problems": len(problems), "samples": n,
               f"avg@{n}": sum(sum(p) / len(p) for p in problems) / len(problems)}
        for k in ks:
            if k <= n:
                row[f"pass@{k}"] = sum(pass_at_k(len(p), int(sum(r >= 1.0 for r in p)), k)
                                       for p in problems) / len(problems)
        table[source] = row
    return table


def format_table(table: dict[str, dict]) -> str:
    cols = sorted({c for row in table.values() for c in row}, key=lambda c: (c not in ("problems", "samples"), c))
    lines = ["source".ljust(24) + "".join(c.rjust(12) for c in cols)]
    for src, row in table.items():
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols]
        lines.append(src[:24].ljust(24) + "".join(c.rjust(12) for c in cells))
    return "\n".join(lines)


async def evaluate(engine, tokenizer, examples, params: SamplingParams, reward_fn, out_path: str | None = None):
    rewards: dict[int, list[float]] = defaultdict(list)
    out = open(out_path, "w") if out_path else None
    # A bar on a terminal only (tqdm's disable=None), on stderr beside the log.
    bar = tqdm(total=len(examples) * params.n, desc="eval", unit="sample", disable=None, dynamic_ncols=True)
    try:
        async for r in engine.generate([e.prompt_ids for e in examples], params):
            bar.update(1)
            ex = examples[r.prompt_index]
            text = tokenizer.decode(r.response_ids, skip_special_tokens=True)
            reward = float(await asyncio.to_thread(reward_fn, text, ex.answer))
            rewards[r.prompt_index].append(reward)
            if out:
                out.write(json.dumps({"source": ex.source, "index": ex.index, "sample": r.sample_index,
                                      "answer": ex.answer, "response": text, "reward": reward,
                                      "finish_reason": r.finish_reason, "response_tokens": len(r.response_ids)}) + "\n")
    finally:
        bar.close()
        if out:
            out.close()
    by_source: dict[str, list[list[float]]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_source[ex.source].append(rewards[i])
    return by_source


async def greedy_texts(engine, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    """One greedy response per prompt (token-id lists) through a rollout engine, decoded without
    special tokens, in prompt order."""
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    texts = [""] * len(prompts)
    async for ro in engine.generate(list(prompts), params):
        texts[ro.prompt_index] = tokenizer.decode(ro.response_ids, skip_special_tokens=True)
    return texts


def greedy_scores(engine, tokenizer, prompts, references, grade, max_new_tokens: int) -> list[float]:
    """``grade(text, reference)`` of one greedy response per prompt, in prompt order. Blocking (runs
    its own event loop)."""
    if not prompts:
        return []
    texts = asyncio.run(greedy_texts(engine, tokenizer, prompts, max_new_tokens))
    return [float(grade(t, ref)) for t, ref in zip(texts, references)]


def greedy_accuracy(engine, tokenizer, prompts, references, grade, max_new_tokens: int) -> float:
    """Mean of ``grade(text, reference)`` over one greedy response per prompt; NaN without prompts.
    Blocking (runs its own event loop)."""
    scores = greedy_scores(engine, tokenizer, prompts, references, grade, max_new_tokens)
    return sum(scores) / len(scores) if scores else float("nan")


def model_accuracy(model, tokenizer, examples, grade, *, tools=(), max_new_tokens: int | None = None,
                   max_batch_size: int = 512, device: str = "cpu") -> float:
    """Greedy accuracy of `model` (a transformers model, or a HF directory: then `tokenizer` may be
    None; it is loaded on `device`) on built-in task examples (`rollout.tasks`), graded by
    `grade(text, example)`; through the tool loop when `tools` names any. 0.0 without examples.
    The model's train/eval mode is kept."""
    from rollout.local_engine import LocalEngine
    from rollout.tasks.encoding import max_new_tokens_for, prompt_ids
    from rollout.tasks.tool_engine import ToolEngine

    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
        model = AutoModelForCausalLM.from_pretrained(str(model)).to(device)
    if not examples:
        return 0.0
    was_training = model.training
    engine = LocalEngine(model, tokenizer, max_batch_size=max_batch_size)
    try:
        eng = ToolEngine(engine, tokenizer, tools) if tools else engine
        return greedy_accuracy(eng, tokenizer, [prompt_ids(tokenizer, ex) for ex in examples], examples, grade,
                               max_new_tokens or max_new_tokens_for(tokenizer, examples))
    finally:
        engine.close()
        model.train(was_training)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory (tokenizer, and weights for --engine local)")
    parser.add_argument("--data", nargs="+", required=True, help="JSONL / JSON / Parquet files")
    parser.add_argument("--n", type=int, default=16, help="samples per problem")
    parser.add_argument("--k", default="1,4,16", help="comma-separated k for pass@k (k <= n)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reward", default="math", help="math | exact | module:function")
    parser.add_argument("--prompt-key", default=None)
    parser.add_argument("--answer-key", default=None)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--instruction", default=BOXED_INSTRUCTION, help="appended to string prompts ('' for none)")
    parser.add_argument("--enable-thinking", choices=["true", "false"], default=None)
    parser.add_argument("--max-prompt-tokens", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each file")
    parser.add_argument("--engine", choices=["local", "sglang"], default="local")
    parser.add_argument("--sglang-url", nargs="*", default=[], help="SGLang server URLs for --engine sglang")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="per-sample JSONL")


def main(args) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    thinking = None if args.enable_thinking is None else args.enable_thinking == "true"
    examples = []
    for path in args.data:
        cfg = DataConfig(path, prompt_key=args.prompt_key, answer_key=args.answer_key, system_prompt=args.system_prompt,
                         instruction=args.instruction or None, enable_thinking=thinking,
                         max_prompt_tokens=args.max_prompt_tokens, limit=args.limit)
        exs, stats = load_prompts(cfg, tok)
        print(f"{path}: {stats['kept']} prompts ({stats['dropped_too_long']} dropped as too long)", flush=True)
        examples += exs
    ks = [int(k) for k in args.k.split(",") if k]
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.engine == "local":
        from rollout.local_engine import LocalEngine

        engine = LocalEngine.from_pretrained(args.model, device=args.device, max_batch_size=args.max_batch_size)
    else:
        from rollout.sglang_client import SGLangEngine

        if not args.sglang_url:
            raise SystemExit("--engine sglang needs --sglang-url")
        engine = SGLangEngine(args.sglang_url)
    t0 = time.time()
    by_source = asyncio.run(evaluate(engine, tok, examples, params, get_reward_fn(args.reward), args.out))
    engine.close()
    table = summarize(by_source, ks)
    print(format_table(table))
    print(f"{len(examples)} problems x {args.n} samples in {time.time() - t0:.1f} s"
          + (f"; samples in {args.out}" if args.out else ""))
    return 0
