"""What the benchmarks share: the model shapes they build random-weight models of, the teacher
benches' workload flags, and the loopback helpers (a free port, a Prometheus scrape)."""

from __future__ import annotations

import socket
import urllib.request

# Qwen3 layer shapes with the real vocabulary width. The tiny ones keep that width too, so a smoke
# test exercises ids a tiny tokenizer does not know (random models sample them), as the full shapes do.
QWEN3 = {
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, tie_word_embeddings=False),
    "qwen3-1.7b": dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=6144, tie_word_embeddings=True),
    "tiny-t": dict(vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, intermediate_size=128, tie_word_embeddings=False),
    "tiny-s": dict(vocab_size=151936, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, intermediate_size=64, tie_word_embeddings=True),
}

# The teacher-server benches' models: the full shapes with Qwen3's own position settings, and a tiny
# one with a small vocabulary (the server's statistics cost scales with it).
TEACHER_SHAPES = {
    "qwen3-8b": dict(QWEN3["qwen3-8b"], max_position_embeddings=40960, rope_theta=1000000.0),
    "qwen3-1.7b": dict(QWEN3["qwen3-1.7b"], max_position_embeddings=40960, rope_theta=1000000.0),
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=384, max_position_embeddings=8192, rope_theta=10000.0),
}


def qwen3_config(shape: dict, **overrides):
    """A transformers `Qwen3Config` of `shape`, with `overrides` replacing or adding keys."""
    from transformers import Qwen3Config

    return Qwen3Config(**{**shape, **overrides})


def tokenizer_config(shape: dict, tok):
    """A `Qwen3Config` of `shape` for tokenizer `tok` (its pad and eos ids; 8,192 positions), as the
    trainer and weight-sync benches build their random models."""
    return qwen3_config(shape, max_position_embeddings=8192, rope_theta=1e6, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, bos_token_id=None)


def add_workload_args(p, shapes, device_help: str | None = None) -> None:
    """The teacher benches' model and workload flags on parser `p`: --shape (one of `shapes`),
    --device, --dtype, --top-k, and the workload sizes (--seqs x --seq-len; --prompts x --samples x
    (--prompt-len + --response-len)), left None for `fill_sizes`."""
    p.add_argument("--shape", default="qwen3-8b", choices=sorted(shapes))
    p.add_argument("--device", default="cuda", help=device_help)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--top-k", type=int, default=64)
    for flag in ("--seqs", "--seq-len", "--prompts", "--samples", "--prompt-len", "--response-len"):
        p.add_argument(flag, type=int, default=None)


def fill_sizes(args, sizes: dict) -> None:
    """Flags left None take the shape's sizes: `sizes["tiny"]` for the tiny shapes, else `sizes["full"]`
    (keys are the flags' attribute names)."""
    for k, v in sizes["tiny" if args.shape.startswith("tiny") else "full"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """A teacher's /metrics on 127.0.0.1:`port` as {'name{labels}': value} (`teacher_server.metrics.parse_text`)."""
    from teacher_server.metrics import parse_text

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return parse_text(r.read().decode())
