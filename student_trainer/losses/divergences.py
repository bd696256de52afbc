"""Full-distribution divergences between teacher pT and student pS on a partial teacher view.

Notation: ``KL[p||q] = sum_i p_i (log p_i - log q_i)``. pT = teacher, pS = student, both at the
same temperature T (student: ``log_softmax(logits / T)``).

Supports (``support=``)
-----------------------
The teacher is known only on a set of ids U per row; everything else is lumped into ONE "rest"
bucket for BOTH distributions, giving two distributions over |U| + 1 categories:

* ``"topk"``:  U = teacher top-k; pT_rest = exp(tail_logmass) (sent by the teacher);
* ``"union"``: U = teacher top-k UNION the student's own top-M (``s_topk_ids`` with the teacher's
  ``extra_logprobs``; ids already in the teacher's top-k are counted once);
  pT_rest = pT_tail - sum_{extra ids not in top-k} pT, floored at ``REST_REL_FLOOR * pT_tail``
  because the subtraction of bf16-rounded log-probs is noise below that level;
* ``"full"``:  U = the whole vocabulary (``full_logprobs``), no bucket (exact mode).

The student's rest mass is exact: ``log pS_rest = logsumexp_{v not in U} z_v - logsumexp_v z_v``
(the complement is taken by writing -1e30 over U in a copy of the chunk's logits).

Every divergence below is the divergence between these coarsened distributions. By the data
processing inequality it is <= the true full-vocabulary divergence, equals it when U = V, and with
k = V (tail = -inf) the ``topk`` value equals the ``full`` value.

Why the bucket matters (reverse KL)
-----------------------------------
Renormalising both distributions over the top-k (as some peers do) makes the loss invariant to
how much total mass the student keeps on the top-k, so the student can drain mass into the
untracked tail at no cost (reported unstable). Here the bucket term
``pS_rest (log pS_rest - log pT_rest)`` is part of the loss: moving student mass out of U into the
rest raises it whenever pS_rest > pT_rest, and its minimum is at pS_rest = pT_rest, so the
student is pulled toward the teacher's total tail mass, not free to inflate it.

Divergences (each returns a per-row loss [C])
---------------------------------------------
* forward_kl:      KL[pT || pS]                      (mass-covering; needs pT on the support)
* reverse_kl:      KL[pS || pT]                      (mode-seeking; the OPD default)
* jsd(beta):       m = beta pT + (1-beta) pS;  beta KL[pT||m] + (1-beta) KL[pS||m].
                   Same convention as TRL's ``GKDTrainer.generalized_jsd_loss``; as in TRL,
                   beta = 0 means forward KL and beta = 1 reverse KL (the mixture form vanishes
                   at the endpoints, so those two values dispatch to the KLs).
* skew_forward_kl(a): KL[pT || a pT + (1-a) pS]     (DistiLLM's SKL; a = 0 is forward KL)
* skew_reverse_kl(a): KL[pS || a pS + (1-a) pT]     (DistiLLM's SRKL; a = 0 is reverse KL)
* tv:              0.5 sum_i |pT_i - pS_i|

Zero-mass categories: terms with p_i = 0 contribute 0 (x log x -> 0); teacher log-probs that
appear as a divisor are clamped at ``LOG_FLOOR`` so a zero-mass teacher bucket gives a large
finite penalty instead of inf/NaN (mixtures m, which contain the teacher, are clamped the same
way). The student's log-probs are never clamped: they come exactly from its logits, so forward KL
and its gradient (pS - pT on the support, with respect to the logits) stay exact however confident
the student is (log pS = -100 on a teacher token gives loss pT * 100 and a full pull). The one
exception is the "no such category" placeholder ``NEG`` (a duplicate id, or a rest bucket with no
token left in it): there the student has no mass to move, so it counts as ``LOG_FLOOR`` with no
gradient.

Padded teacher slots (``TeacherStats.topk_pad``): a teacher whose logit width exceeds the
student's vocabulary may name padding ids in its top-k. The trainer folds their mass into the tail
and marks the slot as padding (its id repeats a real top-k id of the row, its log-prob is -inf):
a padding slot counts for nothing on either side, so no student id is penalised for it.
"""
from __future__ import annotations

import math

import torch

from .stats import TeacherStats

NEG = -1e30          # "minus infinity" that keeps gradients finite
NEG_PLACEHOLDER = NEG / 2  # student log-probs at or below this are the NEG placeholder, not a value
LOG_FLOOR = math.log(1e-30)
REST_REL_FLOOR = 1e-3


def _dup_mask(s_ids_C_M: torch.Tensor, t_ids_C_K: torch.Tensor) -> torch.Tensor:
    """True where a student top-M id is already in the teacher's top-k (count it once)."""
    return (s_ids_C_M.unsqueeze(-1) == t_ids_C_K.unsqueeze(-2)).any(-1)


def resolve_support(stats: TeacherStats, support: str) -> str:
    if support == "auto":
        if stats.full_logprobs is not None:
            return "full"
        return "union" if stats.s_topk_ids is not None else "topk"
    if support not in ("topk", "union", "full"):
        raise ValueError(f"support must be one of auto|topk|union|full, got {support!r}")
    need = {"topk": "topk_ids", "union": "s_topk_ids", "full": "full_logprobs"}[support]
    if getattr(stats, need) is None:
        raise ValueError(f"support={support!r} needs TeacherStats.{need}")
    return support


def support_categories(stats: TeacherStats, support: str, dtype: torch.dtype):
    """The support of a chunk as ids and teacher log-probs: ``(ids_C_U, lT_C_U1, valid_C_U | None)``.

    ``support`` is ``"topk"`` or ``"union"``. ``ids`` lists the teacher top-k first (then, for
    union, the student top-M); ``lT`` has one more column, the teacher's rest bucket;
    ``valid`` marks the categories counted (a student id already in the teacher top-k is a
    duplicate: lT = -inf there and the student side is set to NEG).
    """
    ids = stats.topk_ids
    lT = stats.topk_logprobs.to(dtype)
    tail = stats.tail_logmass.to(dtype)
    valid = None if stats.topk_pad is None else ~stats.topk_pad
    if valid is not None:
        lT = lT.masked_fill(stats.topk_pad, -math.inf)
    if support == "union":
        dup = _dup_mask(stats.s_topk_ids, ids)
        extra = stats.extra_logprobs.to(dtype).masked_fill(dup, -math.inf)
        p_tail = tail.exp()
        p_rest = torch.maximum(p_tail - extra.exp().sum(-1), REST_REL_FLOOR * p_tail)
        tail = p_rest.log()  # -inf when the teacher's tail is exactly 0
        top_valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
        valid = torch.cat([top_valid, ~dup], dim=-1)
        ids = torch.cat([ids, stats.s_topk_ids], dim=-1)
        lT = torch.cat([lT, extra], dim=-1)
    return ids, torch.cat([lT, tail.unsqueeze(-1)], -1), valid


def coarse_logprobs(z_C_V: torch.Tensor, stats: TeacherStats, support: str):
    """Teacher and student log-probs over the support categories (+ rest bucket): ``(lT, lS)``.

    ``z_C_V`` are the temperature-scaled student logits of the chunk (differentiable);
    ``stats`` already holds the chunk's rows. Duplicate categories get lT = -inf, lS = NEG.
    """
    dt = z_C_V.dtype
    lse_C = torch.logsumexp(z_C_V, dim=-1)
    if support == "full":
        return stats.full_logprobs.to(dt), z_C_V - lse_C.unsqueeze(-1)
    ids, lT, valid = support_categories(stats, support, dt)
    lS = z_C_V.gather(-1, ids) - lse_C.unsqueeze(-1)
    if valid is not None:
        lS = torch.where(valid, lS, torch.full_like(lS, NEG))
    lS_rest = torch.logsumexp(z_C_V.scatter(-1, ids, NEG), dim=-1) - lse_C
    return lT, torch.cat([lS, lS_rest.unsqueeze(-1)], -1)


def _plogp_ratio(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) with 0 log 0 = 0; lq clamped at LOG_FLOOR."""
    p = lp.exp()
    lp_safe = torch.where(p > 0, lp, torch.zeros_like(lp))
    return (p * (lp_safe - lq.clamp_min(LOG_FLOOR))).sum(-1)


def _log_mix(a: float, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """log(a p + (1-a) q), for 0 < a < 1."""
    return torch.logaddexp(lp + math.log(a), lq + math.log1p(-a))


def _student_lp(lS: torch.Tensor) -> torch.Tensor:
    """The student's category log-probs as forward KL uses them: exact, except the NEG placeholder
    (a category the student has no token in), which counts as LOG_FLOOR."""
    return torch.where(lS > NEG_PLACEHOLDER, lS, torch.full_like(lS, LOG_FLOOR))


def forward_kl(lT: torch.Tensor, lS: torch.Tensor) -> torch.Tensor:
    """KL[pT || pS] = sum pT (log pT - log pS); log pS is not clamped (see the module notes)."""
    pT = lT.exp()
    lT_safe = torch.where(pT > 0, lT, torch.zeros_like(lT))
    return (pT * (lT_safe - _student_lp(lS))).sum(-1)


def reverse_kl(lT: torch.Tensor, lS: torch.Tensor) -> torch.Tensor:
    """KL[pS || pT] = sum pS (log pS - log pT)."""
    return _plogp_ratio(lS, lT)


def jsd(lT: torch.Tensor, lS: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """beta KL[pT||m] + (1-beta) KL[pS||m], m = beta pT + (1-beta) pS (TRL's convention)."""
    if beta <= 0.0:
        return forward_kl(lT, lS)
    if beta >= 1.0:
        return reverse_kl(lT, lS)
    lm = _log_mix(beta, lT, lS)
    return beta * _plogp_ratio(lT, lm) + (1.0 - beta) * _plogp_ratio(lS, lm)


def skew_forward_kl(lT: torch.Tensor, lS: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """KL[pT || alpha pT + (1-alpha) pS]."""
    if alpha <= 0.0:
        return forward_kl(lT, lS)
    return _plogp_ratio(lT, _log_mix(alpha, lT, lS))


def skew_reverse_kl(lT: torch.Tensor, lS: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """KL[pS || alpha pS + (1-alpha) pT]."""
    if alpha <= 0.0:
        return reverse_kl(lT, lS)
    return _plogp_ratio(lS, _log_mix(alpha, lS, lT))


def total_variation(lT: torch.Tensor, lS: torch.Tensor) -> torch.Tensor:
    """0.5 sum |pT - pS|."""
    return 0.5 * (lT.exp() - lS.exp()).abs().sum(-1)


FULL_DIVERGENCES = {
    "forward_kl": lambda lT, lS, cfg: forward_kl(lT, lS),
    "reverse_kl": lambda lT, lS, cfg: reverse_kl(lT, lS),
    "jsd": lambda lT, lS, cfg: jsd(lT, lS, cfg.beta),
    "skew_forward_kl": lambda lT, lS, cfg: skew_forward_kl(lT, lS, cfg.skew_alpha),
    "skew_reverse_kl": lambda lT, lS, cfg: skew_reverse_kl(lT, lS, cfg.skew_alpha),
    "tv": lambda lT, lS, cfg: total_variation(lT, lS),
}


# ---- closed-form gradients with respect to the student's category log-probs --------------------
# Each returns (loss_C, dloss/dlS_C_U1), matching autograd through the functions above to float
# rounding (clamp_min passes the gradient where lq >= LOG_FLOOR; categories with p = 0 get 0).
# The mixtures enter through lm = log(wp p + wq q), whose derivative d lm / d lq = wq q / m is
# computed as exp(log wq + lq - lm): 0 where q = 0 (lq = NEG), 1 where p = 0 (lT = -inf).

def forward_kl_with_grad(lT: torch.Tensor, lS: torch.Tensor):
    pT = lT.exp()
    lT_safe = torch.where(pT > 0, lT, torch.zeros_like(lT))
    val = (pT * (lT_safe - _student_lp(lS))).sum(-1)
    return val, -pT * (lS > NEG_PLACEHOLDER)


def reverse_kl_with_grad(lT: torch.Tensor, lS: torch.Tensor):
    pS = lS.exp()
    r = torch.where(pS > 0, lS, torch.zeros_like(lS)) - lT.clamp_min(LOG_FLOOR)
    return (pS * r).sum(-1), pS * (r + 1.0)


def _dlogmix(lq: torch.Tensor, log_wq: float, lm: torch.Tensor) -> torch.Tensor:
    """d lm / d lq for lm = log(wp p + wq q), 0 where lm < LOG_FLOOR (the clamp passes no gradient)."""
    return torch.exp(lq + log_wq - lm).masked_fill_(lm < LOG_FLOOR, 0.0)


def jsd_with_grad(lT: torch.Tensor, lS: torch.Tensor, beta: float = 0.5):
    """L = beta KL[pT||m] + (1-beta) KL[pS||m]; with m = beta pT + (1-beta) pS:

    dL/dlS = (1-beta) pS (log pS - log m + 1) - m dlog m/dlS,   dlog m/dlS = (1-beta) pS / m

    (the pS / m terms cancel analytically, to (1-beta) pS (log pS - log m); they are kept apart as
    autograd has them, so the clamps and zero-mass categories come out the same).
    """
    if beta <= 0.0:
        return forward_kl_with_grad(lT, lS)
    if beta >= 1.0:
        return reverse_kl_with_grad(lT, lS)
    pT, pS = lT.exp(), lS.exp()
    lm = _log_mix(beta, lT, lS)
    lmc = lm.clamp_min(LOG_FLOOR)
    lT_safe = torch.where(pT > 0, lT, torch.zeros_like(lT))
    rS = torch.where(pS > 0, lS, torch.zeros_like(lS)) - lmc
    val = beta * (pT * (lT_safe - lmc)).sum(-1) + (1.0 - beta) * (pS * rS).sum(-1)
    m = beta * pT + (1.0 - beta) * pS
    return val, (1.0 - beta) * pS * (rS + 1.0) - m * _dlogmix(lS, math.log1p(-beta), lm)


def skew_forward_kl_with_grad(lT: torch.Tensor, lS: torch.Tensor, alpha: float = 0.1):
    """L = KL[pT || mix], mix = alpha pT + (1-alpha) pS:  dL/dlS = -pT (1-alpha) pS / mix."""
    if alpha <= 0.0:
        return forward_kl_with_grad(lT, lS)
    pT = lT.exp()
    lmix = _log_mix(alpha, lT, lS)
    val = (pT * (torch.where(pT > 0, lT, torch.zeros_like(lT)) - lmix.clamp_min(LOG_FLOOR))).sum(-1)
    return val, -pT * _dlogmix(lS, math.log1p(-alpha), lmix)


def skew_reverse_kl_with_grad(lT: torch.Tensor, lS: torch.Tensor, alpha: float = 0.1):
    """L = KL[pS || mix], mix = alpha pS + (1-alpha) pT:

    dL/dlS = pS (log pS - log mix + 1) - pS alpha pS / mix.
    """
    if alpha <= 0.0:
        return reverse_kl_with_grad(lT, lS)
    pS = lS.exp()
    lmix = _log_mix(alpha, lS, lT)
    r = torch.where(pS > 0, lS, torch.zeros_like(lS)) - lmix.clamp_min(LOG_FLOOR)
    return (pS * r).sum(-1), pS * (r + 1.0) - pS * _dlogmix(lS, math.log(alpha), lmix)


def total_variation_with_grad(lT: torch.Tensor, lS: torch.Tensor):
    """L = 0.5 sum |pT - pS|:  dL/dlS = -0.5 sign(pT - pS) pS (0 where they are equal)."""
    pS = lS.exp()
    d = lT.exp() - pS
    return 0.5 * d.abs().sum(-1), -0.5 * d.sign() * pS


ANALYTIC_CATEGORY_GRADS = {
    "forward_kl": lambda lT, lS, cfg: forward_kl_with_grad(lT, lS),
    "reverse_kl": lambda lT, lS, cfg: reverse_kl_with_grad(lT, lS),
    "jsd": lambda lT, lS, cfg: jsd_with_grad(lT, lS, cfg.beta),
    "skew_forward_kl": lambda lT, lS, cfg: skew_forward_kl_with_grad(lT, lS, cfg.skew_alpha),
    "skew_reverse_kl": lambda lT, lS, cfg: skew_reverse_kl_with_grad(lT, lS, cfg.skew_alpha),
    "tv": lambda lT, lS, cfg: total_variation_with_grad(lT, lS),
}
