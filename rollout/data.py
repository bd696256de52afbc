"""Prompt datasets from JSONL / JSON / Parquet, turned into token ids with the chat template.

Common math layouts are recognised without flags (override with prompt_key / answer_key):
  MATH-500        problem / answer
  AIME 2024       Problem / Answer
  AIME 2025       problem / answer
  DAPO-Math-17k   prompt (a chat list) / reward_model.ground_truth
Dotted keys reach into nested objects. `data_source` (if present) names the source, else the file stem.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from rollout.chat import encode_chat

PROMPT_KEYS = ("prompt", "problem", "Problem", "question", "Question")
ANSWER_KEYS = ("reward_model.ground_truth", "answer", "Answer", "solution", "ground_truth")
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class DataConfig:
    path: str
    prompt_key: str | None = None  # default: the first of PROMPT_KEYS present
    answer_key: str | None = None  # default: the first of ANSWER_KEYS present
    source: str | None = None  # default: the record's data_source, else the file stem
    system_prompt: str | None = None
    instruction: str | None = None  # appended to string prompts, e.g. BOXED_INSTRUCTION
    enable_thinking: bool | None = None  # passed to the chat template when set
    max_prompt_tokens: int | None = None  # longer prompts are dropped (and counted)
    limit: int | None = None


@dataclass
class PromptExample:
    index: int
    prompt_ids: list[int]
    messages: list[dict]
    answer: str | None
    source: str
    metadata: dict = field(default_factory=dict)


def read_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise ValueError(f"data file {path!r} does not exist")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of records")
            return data
        records = []
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {lineno} is not a JSON object")
            records.append(rec)
        return records


def get_key(rec: dict, key: str):
    cur = rec
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(key)
        cur = cur[part]
    return cur


def _has(rec: dict, key: str) -> bool:
    try:
        get_key(rec, key)
        return True
    except KeyError:
        return False


def _pick(records: list[dict], given: str | None, candidates: tuple[str, ...], what: str, path: str) -> str | None:
    first = records[0]
    if given is not None:
        if not _has(first, given):
            raise ValueError(f"{path}: {what} column {given!r} not found; columns are {sorted(first)}")
        return given
    for k in candidates:
        if _has(first, k):
            return k
    if what == "prompt":
        raise ValueError(f"{path}: no prompt column (tried {list(candidates)}); columns are {sorted(first)}; "
                         "set prompt_key")
    return None


def to_messages(prompt, cfg: DataConfig) -> list[dict]:
    if isinstance(prompt, str):
        content = prompt if not cfg.instruction else f"{prompt}\n{cfg.instruction}"
        messages = [{"role": "user", "content": content}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        messages = [{"role": m["role"], "content": m.get("content", "")} for m in prompt]
    else:
        raise ValueError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    return messages


def load_prompts(cfg: DataConfig, tokenizer) -> tuple[list[PromptExample], dict]:
    """Returns (examples, stats) with stats = {"total", "kept", "dropped_too_long"}."""
    records = read_records(cfg.path)
    if not records:
        raise ValueError(f"{cfg.path}: no records")
    pkey = _pick(records, cfg.prompt_key, PROMPT_KEYS, "prompt", cfg.path)
    akey = _pick(records, cfg.answer_key, ANSWER_KEYS, "answer", cfg.path)
    stem = os.path.splitext(os.path.basename(cfg.path))[0]
    examples, dropped = [], 0
    for i, rec in enumerate(records[:cfg.limit] if cfg.limit else records):
        try:
            prompt = get_key(rec, pkey)
            answer = get_key(rec, akey) if akey else None
        except KeyError as e:
            raise ValueError(f"{cfg.path}: record {i} has no column {e.args[0]!r}") from None
        messages = to_messages(prompt, cfg)
        ids = encode_chat(tokenizer, messages, enable_thinking=cfg.enable_thinking)
        if cfg.max_prompt_tokens is not None and len(ids) > cfg.max_prompt_tokens:
            dropped += 1
            continue
        source = cfg.source or rec.get("data_source") or stem
        examples.append(PromptExample(i, ids, messages, None if answer is None else str(answer), str(source),
                                      {"data_source": str(source), "ground_truth": None if answer is None else str(answer),
                                       "index": i}))
    return examples, {"total": len(records), "kept": len(examples), "dropped_too_long": dropped}
