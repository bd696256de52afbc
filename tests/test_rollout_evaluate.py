"""The one greedy-evaluation path (rollout.evaluate.greedy_accuracy / model_accuracy) used by the
trainer's periodic eval, `opd demo` and the quality bench."""

from __future__ import annotations

import math


def test_model_accuracy_grades_transformers_greedy_responses(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.evaluate import model_accuracy
    from rollout.tasks import get_task
    from rollout.tasks.encoding import prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = get_task("sort").make_examples("eval", 5, seed=0)
    # reference: transformers' own greedy decoding, one prompt at a time (no padding)
    want = {}
    with torch.no_grad():
        for ex in examples:
            p = prompt_ids(tok, ex)
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            want[ex] = tok.decode(out[0, len(p):], skip_special_tokens=True)
    seen = []

    def same_text(text, ex):
        seen.append(ex)
        return float(text == want[ex])

    model.train()
    assert model_accuracy(model, tok, examples, same_text, max_new_tokens=6) == 1.0
    assert sorted(seen, key=examples.index) == examples  # each example graded once, with its own response
    assert model.training  # the caller's mode is kept
    # from a directory (tokenizer loaded from it); the mean over examples
    assert model_accuracy(tiny_model_dir, None, examples[:4], lambda t, ex: float(ex == examples[0]),
                          max_new_tokens=6) == 0.25
    assert model_accuracy(model, tok, [], same_text) == 0.0


def test_greedy_accuracy_without_prompts_is_nan():
    from rollout.evaluate import greedy_accuracy

    assert math.isnan(greedy_accuracy(None, None, [], [], None, 8))
