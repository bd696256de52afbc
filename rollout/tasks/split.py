"""The train/eval split of the built-in tasks: a problem belongs to the eval split when a stable
hash of its key (which includes the task's seed) falls in one of `EVAL_BUCKETS` buckets, so the
split is the same on every machine and for every number of examples drawn."""

from __future__ import annotations

import hashlib

EVAL_BUCKETS = 10  # one problem in EVAL_BUCKETS belongs to the eval split


def in_eval(key: str) -> bool:
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % EVAL_BUCKETS == 0


def check_split(split: str) -> bool:
    """True for "eval", False for "train"; ValueError otherwise."""
    if split not in ("train", "eval"):
        raise ValueError("split must be 'train' or 'eval'")
    return split == "eval"
