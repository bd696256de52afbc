"""Token layout shared by every built-in task: prompt ids from the chat template, response ids
from the target response text + eos, and the (prompt, response[, loss mask]) of a training example.

Single-turn examples (arithmetic, sort, reverse) have ``messages`` and ``response``; multi-turn ones
(calc) also have ``encode(tokenizer) -> (prompt ids, response ids, loss mask)``.
"""

from __future__ import annotations


class UserQuestion:
    """The prompt of a built-in task's example: one user chat message, the example's ``question``."""

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]


def prompt_ids(tokenizer, example) -> list[int]:
    ids = tokenizer.apply_chat_template(example.messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def response_ids(tokenizer, example) -> list[int]:
    return list(tokenizer.encode(example.response, add_special_tokens=False)) + [tokenizer.eos_token_id]


def encode_example(tokenizer, example) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the model sees prompt + response; loss on response ids only."""
    return prompt_ids(tokenizer, example), response_ids(tokenizer, example)


def encode(tokenizer, example) -> tuple[list[int], list[int], list[int] | None]:
    """(prompt ids, response ids, response loss mask or None = every response token): a multi-turn
    example's own `encode`, else `encode_example`."""
    if hasattr(example, "encode"):
        return example.encode(tokenizer)
    p, r = encode_example(tokenizer, example)
    return p, r, None


def max_new_tokens_for(tokenizer, examples) -> int:
    """Room for the longest target response (+ eos) plus a little slack."""
    return max(len(encode(tokenizer, ex)[1]) for ex in examples) + 4
