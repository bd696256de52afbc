"""Identity of a model and a tokenizer, compared by teacher and trainer at the handshake."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id), the special tokens and the chat template.

    Two tokenizers with the same fingerprint turn the same text into the same ids and the same
    chat into the same prompt."""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def model_hash(model_dir: str | Path, random_seed: int | None = None) -> str:
    """sha256 over config.json and every weight file (name + contents)."""
    d = Path(model_dir)
    h = hashlib.sha256()
    cfg = d / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    if random_seed is not None:
        h.update(f"random-weights:{random_seed}".encode())
        return h.hexdigest()
    for f in sorted(list(d.glob("*.safetensors")) + list(d.glob("*.bin"))):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()
