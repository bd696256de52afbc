"""Sampled-token estimators, policy-gradient OPD and RL/SFT per-row losses.

These need only the log-probability of the rollout token y_t under student and teacher:
``log pS(y_t) = z[y_t] - logsumexp(z)`` (chunked through the fused head) and the teacher's
``sampled_logprob``. With r = pT(y)/pS(y), i.e. ``log r = log pT - log pS``:

* k1 = log pS - log pT = -log r          E_{y~pS}[k1] = KL[pS || pT]   (unbiased, high variance)
* k2 = 0.5 (log r)^2                     biased value, but on on-policy samples
                                         E[grad k2] = grad KL[pS || pT] (reverse KL gradient)
* k3 = (r - 1) - log r  (>= 0)           E[k3] = KL[pS || pT]; as a LOSS its expected gradient is
                                         -E_pS[r grad log pS] = grad KL[pT || pS] (forward KL!)

k1 used directly as a loss has zero expected gradient (E[grad log pS] = 0), so the reverse-KL
signal is taken as a per-token advantage instead (slime, tinker, verl style):

    a_t = -(log pS(y_t) - log pT(y_t)),    A_t = sum_{j >= t, same sequence} gamma^{j-t} a_j,
    loss_t = -A_t.detach() * log pS(y_t)                         (fresh rollouts), or
    loss_t = -min(ratio A_t, clip(ratio, 1-eps, 1+eps) A_t)      (rollout one step stale),
    ratio = exp(log pS_now(y_t) - log pS_rollout(y_t)).

Both have gradient -A_t grad log pS at ratio = 1.

Guards (the divergences' documented floor, ``divergences.LOG_FLOOR = log(1e-30)``): the teacher's
sampled log-prob is floored at LOG_FLOOR in k1/k2/k3 and in the advantage, so a teacher that gives
the sampled token probability 0 (log pT = -inf) yields a finite loss and finite gradients; and k3
evaluates r = exp(log r) with log r clamped at -LOG_FLOOR = log(1e30) (exp(88.7) overflows fp32):
beyond it the value is that of the clamp and the gradient 1 - r keeps the clamped r (it saturates
at a large finite pull instead of becoming inf / NaN). The discount runs over the scored rows of a
sequence in row order (rows of one sequence must be contiguous and in position order); excluded
rows (tool tokens) are simply absent.
"""
from __future__ import annotations

import torch

from .divergences import LOG_FLOOR

LOG_RATIO_MAX = -LOG_FLOOR  # k3: log r = log pT - log pS is clamped here (r <= 1e30)


def floor_teacher(logp_t: torch.Tensor) -> torch.Tensor:
    """The teacher's sampled log-prob floored at LOG_FLOOR (-inf -> log 1e-30)."""
    return logp_t.clamp_min(LOG_FLOOR)


def _k3_log_ratio(logp_s, logp_t):
    """log r with its value clamped at LOG_RATIO_MAX and its gradient passed straight through."""
    log_r = floor_teacher(logp_t) - logp_s
    return log_r - (log_r - log_r.clamp_max(LOG_RATIO_MAX)).detach()


def sampled_logprob(z_C_V: torch.Tensor, targets_C: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[y] per row."""
    return z_C_V.gather(-1, targets_C.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z_C_V, dim=-1)


def k1(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    return logp_s - floor_teacher(logp_t)


def k2(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (floor_teacher(logp_t) - logp_s) ** 2


def k3(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    log_r = _k3_log_ratio(logp_s, logp_t)
    return torch.expm1(log_r) - log_r


ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def discounted_returns(a_N: torch.Tensor, seq_ids_N: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """A_t = sum_{j>=t, same sequence} gamma^{j-t} a_j (reverse scan, float64 on the host).

    ``gamma = 0`` returns ``a`` unchanged. Sequence boundaries come from ``seq_ids_N``
    (contiguous runs); without it all rows are one sequence.
    """
    if gamma == 0.0:
        return a_N
    a = a_N.detach().double().cpu().tolist()
    sid = seq_ids_N.cpu().tolist() if seq_ids_N is not None else [0] * len(a)
    out = [0.0] * len(a)
    acc = 0.0
    for t in range(len(a) - 1, -1, -1):
        if t == len(a) - 1 or sid[t + 1] != sid[t]:
            acc = 0.0
        acc = a[t] + gamma * acc
        out[t] = acc
    return torch.tensor(out, dtype=a_N.dtype, device=a_N.device)


def opd_advantages(logp_s_N: torch.Tensor, logp_t_N: torch.Tensor, seq_ids_N=None, gamma: float = 0.0):
    """Per-token reverse-KL advantage a_t = -(log pS - log pT), discounted within sequences."""
    return discounted_returns(-(logp_s_N - floor_teacher(logp_t_N)).detach(), seq_ids_N, gamma)


def policy_gradient_loss(
    logp_C: torch.Tensor,
    adv_C: torch.Tensor,
    old_logp_C: torch.Tensor | None = None,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """Per-row PPO-clip loss -min(r A, clip(r) A); plain -A log p when ``old_logp_C`` is None."""
    adv = adv_C.detach()
    if old_logp_C is None:
        return -adv * logp_C
    ratio = torch.exp(logp_C - old_logp_C.detach())
    return -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)


# ---- closed-form d(loss)/d(log pS(y)) for the fused head's analytic path ----------------------

ESTIMATOR_GRADS = {
    "k1": lambda logp_s, logp_t: torch.ones_like(logp_s),
    "k2": lambda logp_s, logp_t: logp_s - floor_teacher(logp_t),
    "k3": lambda logp_s, logp_t: -torch.expm1((floor_teacher(logp_t) - logp_s).clamp_max(LOG_RATIO_MAX)),
}


def policy_gradient_loss_with_grad(logp_C, adv_C, old_logp_C=None, clip_eps: float = 0.2):
    """``(policy_gradient_loss, its derivative w.r.t. logp_C)``, as autograd computes it.

    Clipped form: d/dlogp = -ratio * A where the unclipped branch is the minimum (ties, i.e.
    ratio inside the clip range, included: autograd splits a tie half-half and both halves are
    -ratio * A there), else 0.
    """
    adv = adv_C.detach()
    if old_logp_C is None:
        return -adv * logp_C, -adv
    ratio = torch.exp(logp_C - old_logp_C.detach())
    u = ratio * adv
    c = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    return -torch.minimum(u, c), torch.where(u <= c, -u, torch.zeros_like(u))


def grpo_advantages(
    rewards_B: torch.Tensor,
    group_size: int | None = None,
    group_ids_B: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """GRPO group-normalised advantages (r - mean_g) / (std_g + eps), per prompt group.

    Groups are given by ``group_ids_B`` (any ints) or by ``group_size`` (consecutive blocks).
    std is the unbiased sample std (as in GRPO); a group of one gets advantage 0.
    """
    gid = _group_ids(rewards_B, group_size, group_ids_B)
    r = rewards_B.double()
    _, inv = torch.unique(gid, return_inverse=True)
    g = int(inv.max()) + 1 if inv.numel() else 0
    cnt = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros_like(cnt).index_add_(0, inv, r) / cnt
    dev = r - mean[inv]
    var = torch.zeros_like(cnt).index_add_(0, inv, dev * dev) / (cnt - 1).clamp_min(1)
    adv = dev / (var.sqrt()[inv] + eps) if scale_by_std else dev
    return adv.to(rewards_B.dtype if rewards_B.is_floating_point() else torch.float32)


def _group_ids(x_B: torch.Tensor, group_size, group_ids_B) -> torch.Tensor:
    if group_ids_B is not None:
        if group_ids_B.shape != x_B.shape:
            raise ValueError(f"group_ids shape {tuple(group_ids_B.shape)} != values shape {tuple(x_B.shape)}")
        return group_ids_B
    if not group_size or x_B.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} must divide the batch size {x_B.shape[0]}")
    return torch.arange(x_B.shape[0], device=x_B.device) // group_size
