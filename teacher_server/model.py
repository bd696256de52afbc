"""Loading a Hugging Face causal LM for scoring."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("opd.teacher")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def load_model(model_dir: str | Path, dtype: str = "bf16", device: str = "cpu",
               random_weights_seed: int | None = None, attn_implementation: str = "sdpa"):
    """Load `model_dir` (any transformers causal-LM directory). With `random_weights_seed`,
    build the model from its config.json alone with random weights (benchmarks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise ValueError(f"--model {model_dir}: no config.json there (expected a Hugging Face model directory)")
    dev = resolve_device(device)
    if random_weights_seed is not None:
        cfg = AutoConfig.from_pretrained(str(path))
        torch.manual_seed(random_weights_seed)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype],
                                                     attn_implementation=attn_implementation)
        model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return model
