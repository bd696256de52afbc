"""Chat template -> token ids, applied once per conversation.

The prompt is rendered and tokenised once. Later pieces (tool results) are rendered by the same
template and only the appended text is tokenised, so the trajectory stays one exact token
sequence and the model's own tokens are never decoded and re-encoded.
"""

from __future__ import annotations

from collections.abc import Sequence


def encode_chat(tokenizer, messages: Sequence[dict], *, tools: list[dict] | None = None,
                enable_thinking: bool | None = None, add_generation_prompt: bool = True) -> list[int]:
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template(list(messages), tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kw)
    return tokenizer.encode(text, add_special_tokens=False)


class ToolTurnFormatter:
    """Token ids to append after a model turn that ended with eos: the template's rendering of the
    tool messages plus the next assistant header. Found by rendering a dummy conversation with and
    without the tool messages and keeping the text after the assistant turn's eos."""

    def __init__(self, tokenizer, *, enable_thinking: bool | None = None):
        self.tokenizer = tokenizer
        self.kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos_token; the tool loop needs one to end model turns")

    def tool_turn_text(self, outputs: Sequence[str]) -> str:
        base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        render = self.tokenizer.apply_chat_template
        base_text = render(base, tokenize=False, add_generation_prompt=False, **self.kw)
        full = render(base + [{"role": "tool", "content": o} for o in outputs], tokenize=False,
                      add_generation_prompt=True, **self.kw)
        eos = self.tokenizer.eos_token
        cut = base_text.rfind(eos)
        if cut < 0 or not full.startswith(base_text[:cut + len(eos)]):
            raise ValueError("the chat template does not render tool messages as a suffix of the conversation; "
                             "the tool loop cannot keep an exact token trajectory with it")
        return full[cut + len(eos):]

    def tool_turn_ids(self, outputs: Sequence[str]) -> list[int]:
        return self.tokenizer.encode(self.tool_turn_text(outputs), add_special_tokens=False)
