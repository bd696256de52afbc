"""Rewards: math answers checked with math-verify (symbolic equivalence, with a timeout), exact
match, or any `module:function`. A reward function is `fn(response_text, ground_truth) -> float`.

The final answer is taken from the last `\\boxed{...}` (nested braces handled), else from the last
`Answer: ...` line; with neither, the response scores 0 (no guessing from free text).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

RewardFn = Callable[[str, str], float]
_ANSWER_RE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:：]\s*(.+)", re.IGNORECASE)
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="grader")
logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call made without its SIGALRM timeout


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, with nested braces."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = text[m.end():i - 1]
    return best


def extract_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = _ANSWER_RE.findall(text)
    if matches:
        ans = matches[-1].strip().rstrip(".").strip()
        return ans.strip("$ ").strip() or None
    return None


def _verify(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    # math-verify's own timeouts use SIGALRM, which only works in the main thread; we time out outside.
    g = parse(f"${gold}$", parsing_timeout=None)
    p = parse(f"${pred}$", parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def math_reward(response: str, ground_truth: str, timeout_s: float = 5.0) -> float:
    pred = extract_answer(response)
    if pred is None or ground_truth is None:
        return 0.0
    gold = extract_answer(ground_truth) or str(ground_truth).strip()
    if _normalize(pred) == _normalize(gold):
        return 1.0
    fut = _pool.submit(_verify, gold, pred)
    try:
        return 1.0 if fut.result(timeout=timeout_s) else 0.0
    except FutureTimeout:
        return 0.0  # a pathological expression; the worker thread finishes on its own
    except Exception:
        return 0.0


def _normalize(s: str) -> str:
    s = s.strip().strip("$").replace(" ", "").replace("\\!", "").replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    return s.rstrip(".")


def exact_reward(response: str, ground_truth: str) -> float:
    pred = extract_answer(response)
    return float(pred is not None and _normalize(pred) == _normalize(str(ground_truth)))


REWARDS: dict[str, RewardFn] = {"math": math_reward, "exact": exact_reward}


def get_reward_fn(name: str) -> RewardFn:
    """'math', 'exact', or 'package.module:function'."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        mod, _, fn = name.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {name!r}: cannot import ({e})") from e
        if not callable(obj):
            raise ValueError(f"reward {name!r} is not callable")
        return obj
    raise ValueError(f"unknown reward {name!r}; use one of {sorted(REWARDS)} or 'module:function'")
