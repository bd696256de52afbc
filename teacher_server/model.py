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


# ---- regional torch.compile of the body ---------------------------------------------------------
_SUBMODULES = ("mlp", "input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")


def _uses_cache(kw: dict) -> bool:
    return kw.get("past_key_values") is not None or kw.get("cache") is not None


def compile_body(body, backend: str = "inductor", dynamic: bool = True) -> bool:
    """Regional torch.compile of a decoder body (HF `model.model`): ONE compiled function for the
    decoder-layer class, shared by every layer (parameters are graph inputs, so 36 layers compile
    once per shape class), used for cache-free forwards (the plain path). Forwards with a KV cache
    (the prefix-sharing path: `cache.update` is per-layer Python state) run the layer eagerly but
    with its MLP and RMSNorms compiled (fused SiLU x mul, one-kernel norms). dynamic=True: varying
    [batch, length] reuse the graphs (batch 1 and masked batches are graphs of their own; the
    engine warms them up). Returns False (body untouched) when the body has no uniform `layers`.
    Compilation itself is lazy (first call); `uncompile_body` restores the eager forwards."""
    layers = getattr(body, "layers", None)
    if not layers or len({type(m) for m in layers}) != 1 or hasattr(body, "_opd_eager"):
        return False
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # batch 1 / >1 / masked / 3-D and 4-D norms
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 32))
    saved: list[tuple[torch.nn.Module, object]] = []
    compiled_cls: dict[type, object] = {}

    def compiled_for(cls):
        fn = compiled_cls.get(cls)
        if fn is None:
            fn = compiled_cls[cls] = torch.compile(cls.forward, dynamic=dynamic, backend=backend)
        return fn

    def install(mod, fwd):
        saved.append((mod, mod.__dict__.get("forward")))
        mod.forward = fwd

    def sub(root, path):
        for name in path.split("."):
            root = getattr(root, name, None)
            if root is None:
                return None
        return root

    for layer in layers:
        for path in _SUBMODULES:
            m = sub(layer, path)
            if isinstance(m, torch.nn.Module) and "forward" not in m.__dict__:
                c = compiled_for(type(m))
                install(m, (lambda c, m: lambda *a, **k: c(m, *a, **k))(c, m))
        whole = compiled_for(type(layer))
        eager = layer.forward  # (its submodules already compiled)

        def fwd(*a, _layer=layer, _whole=whole, _eager=eager, **kw):
            if _uses_cache(kw) or not getattr(body, "_opd_whole_layers", True):
                return _eager(*a, **kw)
            return _whole(_layer, *a, **kw)

        install(layer, fwd)
    norm = getattr(body, "norm", None)
    if isinstance(norm, torch.nn.Module) and "forward" not in norm.__dict__:
        c = compiled_for(type(norm))
        install(norm, lambda *a, **k: c(norm, *a, **k))
    body._opd_eager = saved
    body._opd_whole_layers = True
    return True


def uncompile_body(body) -> None:
    """Undo `compile_body` (eager forwards again)."""
    saved = getattr(body, "_opd_eager", None)
    if saved is None:
        return
    for mod, old in reversed(saved):
        if old is None:
            mod.__dict__.pop("forward", None)
        else:
            mod.forward = old
    del body._opd_eager
