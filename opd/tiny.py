"""A tiny built-in model family for demos and tests, made locally with no network.

`build_tokenizer(dir)` trains a byte-level BPE tokenizer in code (digits split one per token, so
arithmetic stays learnable) with a ChatML chat template that understands hermes-style tool calls;
`build_model(dir, size)` saves a random-weight Qwen3-style causal LM beside it in Hugging Face
format (safetensors). Anything that loads Hugging Face directories (the teacher server, the
trainer, SGLang) can load the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>"]

# A small built-in corpus: English-ish text, arithmetic and tool-call snippets, so the BPE learns
# useful merges for the demo task family without any download.
_WORDS = ("the of and to in is that it for as with was on be by at this from or an are which "
          "answer question compute what sum product difference number result step first then "
          "so total add subtract multiply carry digit value equals check final sort list copy "
          "reverse tool call calculator python expression error user assistant system").split()


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.4:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) + ".")
        elif kind < 0.8:
            a, b = rng.randint(0, 9999), rng.randint(0, 9999)
            op = rng.choice("+-*")
            lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {eval(f'{a}{op}{b}')}. Answer: \\boxed{{{eval(f'{a}{op}{b}')}}}")
        else:
            lines.append('<tool_call>{"name": "calculator", "arguments": {"expression": "%d*%d"}}</tool_call>'
                         % (rng.randint(0, 999), rng.randint(0, 999)))
    return lines


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512):
    """Train a byte-level BPE on the built-in corpus and save it as a HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


@dataclass(frozen=True)
class TinySize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int = 32


SIZES = {
    "teacher": TinySize(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=768),
    "student": TinySize(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384),
    "test": TinySize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, head_dim=16),
    # `opd demo`'s teacher: trains to ~98% on 2-digit addition in ~300 CPU SFT steps (opd.demo_models).
    "demo_teacher": TinySize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384),
}


def model_config(vocab_size: int, size: str | TinySize = "test", max_positions: int = 2048,
                 pad_token_id: int = 0, eos_token_id: int | None = None):
    from transformers import Qwen3Config

    s = SIZES[size] if isinstance(size, str) else size
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate,
        head_dim=s.head_dim, max_position_embeddings=max_positions, tie_word_embeddings=False,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
        rope_theta=10000.0, torch_dtype="float32",
    )


def build_model(out_dir: str | os.PathLike, size: str | TinySize = "test", seed: int = 0,
                tokenizer_dir: str | os.PathLike | None = None, vocab_size: int = 512):
    """Save a random-weight Qwen3-style model (and the built-in tokenizer) into `out_dir`."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tok = build_tokenizer(out_dir, vocab_size=vocab_size)
    else:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tok.save_pretrained(str(out_dir))
    random_model(tok, size, seed).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def random_model(tok, size: str | TinySize = "test", seed: int = 0):
    """A random-weight Qwen3-style model of `size` for tokenizer `tok` (its pad and eos ids), seeded."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(len(tok), size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model
