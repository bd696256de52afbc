"""Batched decoding with transformers' `generate` (greedy, or sampling at a temperature) of task
examples' prompts, as token ids: the benches that need a teacher's own responses as ids
(bench_encodings, bench_fp8_quality, the quality bench's format rate). Accuracy goes through the
rollout engine instead (`rollout.evaluate.model_accuracy`).
"""

from __future__ import annotations

from rollout.tasks.encoding import prompt_ids


def generate_responses(model, tokenizer, examples, *, max_new_tokens: int, temperature: float = 0.0,
                       batch_size: int = 512) -> list[list[int]]:
    """Batched decoding (greedy when temperature == 0) of the examples' prompts; token ids per
    response, up to and including eos (no padding)."""
    import torch

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out_rows: list[list[int]] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            prompts = [prompt_ids(tokenizer, ex) for ex in chunk]
            length = max(map(len, prompts))
            ids = torch.full((len(prompts), length), pad, dtype=torch.long)
            att = torch.zeros_like(ids)
            for i, p in enumerate(prompts):  # left padding
                ids[i, length - len(p):] = torch.tensor(p)
                att[i, length - len(p):] = 1
            kw = {"do_sample": False} if temperature <= 0 else {
                "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos, **kw)[:, length:]
            for row in gen.tolist():
                if eos in row:
                    row = row[:row.index(eos) + 1]
                out_rows.append(row)
    if was_training:
        model.train()
    return out_rows
