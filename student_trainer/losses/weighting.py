"""Which tokens and which samples count: TIP token selection, reward weights, PACED weights.

Token importance (TIP)
----------------------
Per scored row, a cheap no-grad chunked pass computes
  h = H(pS) / log V                         normalised student entropy, in [0, 1]
  d = JSD_{1/2}(pT, pS) / log 2             normalised teacher-student divergence, in [0, 1],
                                            on the teacher top-k + tail bucket (``divergences``)
and combines them as ``product``: h^alpha * d^gamma, or ``soft_or``: 1 - (1 - h)(1 - d).
TIP reports that LOW-entropy, HIGH-divergence tokens carry most of the signal; ``low_entropy=True``
uses 1 - h in place of h to target that quadrant. ``select_tokens`` keeps a ratio (top or
multinomial sampling without replacement, seeded) or a threshold. Selection happens BEFORE the
lm-head of the loss: zero the mask of the dropped rows (or index them away) and ``distill_loss``
never runs the head on them.

Sample weights (per rollout, multiply into the row weights of its tokens)
------------------------------------------------------------------------
* ``reward_weights``: w_i = n_g softmax_{j in g}(r_j / beta)_i within each prompt group g of n_g
  rollouts, so weights average 1 INSIDE each group (the seed normalised over the whole batch and
  again per micro-batch, which undoes the weighting).
* ``paced_weights``: PACED Beta kernel k(p) = p^a (1-p)^b of the prompt's pass rate p over its n
  rollouts (a = b = 1: p(1-p), zero for all-solved or all-failed prompts); every rollout of the
  prompt gets k(p), normalised to mean 1 over the rollouts of the batch. If every kernel value is
  0, ``all_zero="zero"`` returns zeros (no signal in this batch; the loss is 0) and
  ``all_zero="uniform"`` returns ones.
"""
from __future__ import annotations

import math

import torch

from .divergences import coarse_logprobs, jsd, resolve_support
from .estimators import _group_ids
from .fused_head import map_chunks
from .stats import TeacherStats


def token_entropy_divergence(
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    stats: TeacherStats,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    support: str = "auto",
) -> torch.Tensor:
    """[N, 2]: normalised student entropy h and normalised JSD_{1/2} d per row (no grad)."""
    support = resolve_support(stats, support)
    log_v = math.log(weight_V_H.shape[0])

    def fn(z, rows):
        ls = torch.log_softmax(z, dim=-1)
        ent = -(ls.exp() * ls).sum(-1)
        lT, lS = coarse_logprobs(z, stats.select(rows), support)
        d = jsd(lT, lS, 0.5) / math.log(2.0)
        return torch.stack([ent / log_v, d], -1).clamp(0.0, 1.0)

    return map_chunks(hidden_N_H, weight_V_H, fn, chunk_size=chunk_size, temperature=temperature)


def combine_scores(h: torch.Tensor, d: torch.Tensor, form: str = "product", alpha: float = 1.0,
                   gamma: float = 1.0, low_entropy: bool = False) -> torch.Tensor:
    if low_entropy:
        h = 1.0 - h
    if form == "product":
        return h.pow(alpha) * d.pow(gamma)
    if form == "soft_or":
        return 1.0 - (1.0 - h) * (1.0 - d)
    raise ValueError(f"form must be 'product' or 'soft_or', got {form!r}")


def score_tokens(hidden_N_H, weight_V_H, stats: TeacherStats, *, temperature: float = 1.0,
                 chunk_size: int = 1024, form: str = "product", alpha: float = 1.0,
                 gamma: float = 1.0, low_entropy: bool = False, support: str = "auto") -> torch.Tensor:
    """TIP importance score per row, [N] in [0, 1] (no grad, chunked; see module docstring)."""
    hd = token_entropy_divergence(hidden_N_H, weight_V_H, stats, temperature=temperature,
                                  chunk_size=chunk_size, support=support)
    return combine_scores(hd[:, 0], hd[:, 1], form, alpha, gamma, low_entropy)


def select_tokens(
    scores_N: torch.Tensor,
    ratio: float | None = None,
    threshold: float | None = None,
    mode: str = "top",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Row indices to keep, sorted ascending (int64).

    Exactly one of ``ratio`` (keep ceil(ratio * N) rows) or ``threshold`` (keep score >= it).
    ``mode="top"`` keeps the highest scores (deterministic); ``"sample"`` draws without
    replacement with probability proportional to score (plus 1e-12 so zero scores can fill up).
    """
    if (ratio is None) == (threshold is None):
        raise ValueError("select_tokens: give exactly one of ratio or threshold")
    n = scores_N.shape[0]
    if threshold is not None:
        return torch.nonzero(scores_N >= threshold).squeeze(-1)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    k = min(n, max(1, math.ceil(ratio * n))) if n else 0
    if mode == "top":
        idx = torch.topk(scores_N, k).indices
    elif mode == "sample":
        p = scores_N.double().clamp_min(0) + 1e-12
        idx = torch.multinomial(p, k, replacement=False, generator=generator)
    else:
        raise ValueError(f"mode must be 'top' or 'sample', got {mode!r}")
    return idx.sort().values


def reward_weights(rewards_B: torch.Tensor, beta: float = 1.0, group_size: int | None = None,
                   group_ids_B: torch.Tensor | None = None) -> torch.Tensor:
    """n_g * softmax(r / beta) within each prompt group (mean 1 per group)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    gid = _group_ids(rewards_B, group_size, group_ids_B)
    _, inv = torch.unique(gid, return_inverse=True)
    g = int(inv.max()) + 1 if inv.numel() else 0
    x = rewards_B.double() / beta
    gmax = torch.full((g,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, inv, x, "amax")
    e = (x - gmax[inv]).exp()
    tot = torch.zeros(g, dtype=x.dtype, device=x.device).index_add_(0, inv, e)
    cnt = torch.zeros(g, dtype=x.dtype, device=x.device).index_add_(0, inv, torch.ones_like(x))
    return (e / tot[inv] * cnt[inv]).float()


def paced_kernel(p: torch.Tensor, a: float = 1.0, b: float = 1.0) -> torch.Tensor:
    """Beta kernel p^a (1 - p)^b (unnormalised)."""
    return p.pow(a) * (1.0 - p).pow(b)


def paced_weights(rewards_B: torch.Tensor, group_size: int | None = None,
                  group_ids_B: torch.Tensor | None = None, a: float = 1.0, b: float = 1.0,
                  all_zero: str = "zero") -> torch.Tensor:
    """Per-rollout PACED weight k(pass rate of its prompt), mean 1 over the batch.

    ``rewards_B`` are binary (or in [0, 1]) correctness values; the pass rate is their group mean.
    """
    if all_zero not in ("zero", "uniform"):
        raise ValueError(f"all_zero must be 'zero' or 'uniform', got {all_zero!r}")
    gid = _group_ids(rewards_B, group_size, group_ids_B)
    _, inv = torch.unique(gid, return_inverse=True)
    g = int(inv.max()) + 1 if inv.numel() else 0
    r = rewards_B.double()
    cnt = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    p = torch.zeros_like(cnt).index_add_(0, inv, r) / cnt
    k = paced_kernel(p, a, b)[inv]
    mean = k.mean() if k.numel() else k.new_zeros(())
    if float(mean) <= 0.0:
        return (torch.zeros_like(k) if all_zero == "zero" else torch.ones_like(k)).float()
    return (k / mean).float()
