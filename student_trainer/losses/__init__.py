"""Student-side losses for on-policy distillation from compact teacher statistics.

Everything runs the student's lm-head chunk by chunk (``fused_head``): no [tokens x vocab]
tensor exists in forward or backward. Start with ``distill_loss`` and ``DistillLossConfig``.

Modules: ``stats`` (TeacherStats), ``fused_head`` (chunked custom autograd over the lm-head),
``divergences`` (KLs, JSD, skew KLs, TV on top-k / union / full supports with a tail bucket),
``estimators`` (k1/k2/k3, policy-gradient OPD, PPO/GRPO, SFT), ``reductions`` (global token
mean), ``weighting`` (TIP selection, reward and PACED weights), ``schedules``, ``distill``,
``analytic`` (closed-form per-chunk gradients used by ``distill_loss``).
"""
from .distill import ALL_TERMS, DistillLossConfig, distill_loss, sft_loss
from .divergences import (FULL_DIVERGENCES, coarse_logprobs, forward_kl, jsd, reverse_kl,
                          skew_forward_kl, skew_reverse_kl, total_variation)
from .estimators import (discounted_returns, grpo_advantages, k1, k2, k3, opd_advantages,
                         policy_gradient_loss, sampled_logprob)
from .fused_head import autograd_chunk_fn, fused_head_loss, map_chunks, student_topk_ids
from .reductions import global_token_count, row_coefficients
from .schedules import ForwardToReverseKL, ObjectiveMix
from .stats import TeacherStats
from .weighting import (paced_kernel, paced_weights, reward_weights, score_tokens, select_tokens,
                        token_entropy_divergence)

__all__ = [
    "ALL_TERMS", "DistillLossConfig", "distill_loss", "sft_loss", "FULL_DIVERGENCES",
    "coarse_logprobs", "forward_kl", "jsd", "reverse_kl", "skew_forward_kl", "skew_reverse_kl",
    "total_variation", "discounted_returns", "grpo_advantages", "k1", "k2", "k3",
    "opd_advantages", "policy_gradient_loss", "sampled_logprob", "autograd_chunk_fn",
    "fused_head_loss", "map_chunks", "student_topk_ids", "global_token_count",
    "row_coefficients", "ForwardToReverseKL", "ObjectiveMix", "TeacherStats", "paced_kernel",
    "paced_weights", "reward_weights", "score_tokens", "select_tokens", "token_entropy_divergence",
]
