"""The cache of prepared models (`opd demo`, the quality bench): the built-in tokenizer, and
directories keyed by the settings of the models in them.

A prepared model is a Hugging Face directory (safetensors + tokenizer) with an ``opd_demo.json``
record of its settings (and accuracy); its name is `cache_key(kind, settings)`, a hash of the
settings, so a second call with the same settings finds it. Directories are written to a
temporary name and renamed into place, so concurrent runs never see a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

CACHE_VERSION = 1


def cache_key(kind: str, settings) -> str:
    """The directory name of a prepared model: `kind` and a hash of its settings (and size spec).
    A setting that is None is left out of the hash, so a field added later with default None keeps
    the keys of everything cached before it."""
    from opd.tiny import SIZES

    payload = {"kind": kind, "version": CACHE_VERSION, **{k: v for k, v in asdict(settings).items() if v is not None}}
    size = payload.get("size")
    if size in SIZES:
        payload["size_spec"] = asdict(SIZES[size])
    blob = json.dumps(payload, sort_keys=True).encode()
    return f"{kind}-{hashlib.sha256(blob).hexdigest()[:12]}"


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


def load_tokenizer(path):
    """The tokenizer of a model (or tokenizer) directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _write_info(out: Path, info: dict) -> None:
    (out / "opd_demo.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def read_info(model_dir: str | os.PathLike) -> dict:
    """The settings/accuracy record saved beside a prepared model ({} when none)."""
    p = Path(model_dir) / "opd_demo.json"
    return json.loads(p.read_text()) if p.exists() else {}


def save_model(out: Path, model, tok, info: dict) -> Path:
    """Write model + tokenizer + info record to a temporary directory, then rename it to `out`."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    _write_info(tmp, info)
    _publish(tmp, out)
    return out
