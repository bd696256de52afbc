"""Sampled-token estimators, policy-gradient OPD, GRPO/PPO against their definitions."""
import math

import pytest
import torch

from student_trainer.losses import (DistillLossConfig, TeacherStats, discounted_returns, distill_loss, grpo_advantages,
                                    k1, k2, k3, policy_gradient_loss)
from tests.test_losses_divergences import make_problem


def test_k_estimators_values():
    ls = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    lt = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    r = [math.exp(b - a) for a, b in zip(ls.tolist(), lt.tolist())]
    torch.testing.assert_close(k1(ls, lt), ls - lt)
    torch.testing.assert_close(k2(ls, lt), torch.tensor([0.5 * math.log(x) ** 2 for x in r], dtype=torch.float64))
    torch.testing.assert_close(k3(ls, lt), torch.tensor([(x - 1) - math.log(x) for x in r], dtype=torch.float64))


def test_k_estimators_unbiased_for_reverse_kl():
    """E_{y~pS}[k1] = E[k3] = KL[pS||pT], exactly, by summing over the vocabulary."""
    g = torch.Generator().manual_seed(0)
    ls = torch.log_softmax(torch.randn(30, generator=g, dtype=torch.float64), -1)
    lt = torch.log_softmax(torch.randn(30, generator=g, dtype=torch.float64), -1)
    kl = (ls.exp() * (ls - lt)).sum()
    torch.testing.assert_close((ls.exp() * k1(ls, lt)).sum(), kl)
    torch.testing.assert_close((ls.exp() * k3(ls, lt)).sum(), kl)


def test_discounted_returns_respect_sequences():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    seq = torch.tensor([0, 0, 0, 1, 1])
    out = discounted_returns(a, seq, 0.5)
    torch.testing.assert_close(out, torch.tensor([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 4 + 0.5 * 5, 5],
                                                 dtype=torch.float64))
    assert torch.equal(discounted_returns(a, seq, 0.0), a)


def test_pg_loss_value_and_grad():
    """pg loss = -A.detach() * log pS(y), A = -(log pS - log pT); its gradient is -A grad log pS."""
    hidden, weight, targets, stats, t_lp = make_problem(n=8, v=31)
    hidden.requires_grad_(True)
    loss, _ = distill_loss(hidden, weight, targets, stats, None, DistillLossConfig(divergence="pg", chunk_size=3))
    lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    adv = -(lp - stats.sampled_logprob).detach()
    ref = (-adv * lp).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(ref, hidden)[0])


def test_pg_discount_and_stale_ratio():
    hidden, weight, targets, stats, _ = make_problem(n=6, v=29)
    hidden.requires_grad_(True)
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    old = torch.log_softmax(hidden.detach() @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1) + 0.3
    cfg = DistillLossConfig(divergence="pg", gamma=0.9, clip_eps=0.2, chunk_size=4)
    loss, _ = distill_loss(hidden, weight, targets, stats, None, cfg, seq_ids_N=seq, rollout_logprobs_N=old)
    lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    a = -(old - stats.sampled_logprob)
    A = torch.stack([sum(0.9 ** (j - t) * a[j] for j in range(t, 3 * (t // 3) + 3)) for t in range(6)])
    ratio = torch.exp(lp - old)
    ref = (-torch.minimum(ratio * A, ratio.clamp(0.8, 1.2) * A)).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(ref, hidden)[0])


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv = grpo_advantages(r, group_size=4)
    for g in range(2):
        x = r[4 * g:4 * g + 4].double()
        torch.testing.assert_close(adv[4 * g:4 * g + 4], ((x - x.mean()) / (x.std() + 1e-6)).float())
    same = grpo_advantages(torch.ones(4), group_size=4)
    assert (same == 0).all()
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(r, group_size=3)


def test_ppo_clip():
    lp = torch.tensor([0.0, 0.5, -0.5], requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss = policy_gradient_loss(lp, adv, old, 0.2)
    expect = [-1.0, -1.2, 1 * math.exp(-0.5) if math.exp(-0.5) > 0.8 else 0.8]
    torch.testing.assert_close(loss, torch.tensor(expect))
    loss.sum().backward()
    assert lp.grad[1] == 0 and lp.grad[2] == 0  # clipped branches carry no gradient


def test_objective_mix_is_sum_of_terms():
    hidden, weight, targets, stats, _ = make_problem(n=7, v=33)
    adv = torch.linspace(-1, 1, 7, dtype=torch.float64)
    terms = (("reverse_kl", 0.7), ("forward_kl", 0.3), ("sft", 0.1), ("ppo", 0.5))
    mixed, _ = distill_loss(hidden, weight, targets, stats, None, DistillLossConfig(terms=terms), advantages_N=adv)
    parts = sum(w * distill_loss(hidden, weight, targets, stats, None, DistillLossConfig(divergence=n),
                                 advantages_N=adv)[0] for n, w in terms)
    torch.testing.assert_close(mixed, parts)


# ---- issue 17: the teacher floor and the k3 log-ratio clamp, at the edges ----------------------

LOG_FLOOR = math.log(1e-30)


def _k_ref(name, ls, lt):
    """float64 definitions with the documented guards: log pT floored at log(1e-30), k3's log r
    clamped at log(1e30) in value with the gradient 1 - r of the clamped r."""
    lt = max(lt, LOG_FLOOR)
    log_r = lt - ls
    if name == "k1":
        return -log_r, 1.0
    if name == "k2":
        return 0.5 * log_r ** 2, -log_r
    c = min(log_r, -LOG_FLOOR)
    return math.expm1(c) - c, -math.expm1(c)


@pytest.mark.parametrize("mode", ["analytic", "autograd"])
@pytest.mark.parametrize("name", ["k1", "k2", "k3", "pg"])
def test_sampled_terms_finite_at_the_edges(name, mode):
    """Rows: a teacher log-prob of -inf; log pT - log pS = 100 (k3's r overflows fp32 past 88.7);
    an ordinary row. fp32 through the fused head (the trainer's path): finite loss and gradients,
    equal to the float64 references of the guarded definitions."""
    import importlib

    distill_mod = importlib.import_module("student_trainer.losses.distill")
    v = 6
    z = torch.zeros(3, v, dtype=torch.float64)
    z[1, 0] = -100.0 - math.log(5.0)   # row 1: log pS(0) ~ -100 - log 5 ... targets 0
    z[2] = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5, -1.0], dtype=torch.float64)
    targets = torch.tensor([0, 0, 2])
    ls = torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1)
    lt = torch.tensor([-math.inf, -0.5, -1.7], dtype=torch.float64)
    stats = TeacherStats(sampled_logprob=lt.float())
    cfg = DistillLossConfig(divergence=name, reduction="sum", metrics=False, chunk_size=2)
    h = z.clone().float().requires_grad_(True)
    old = distill_mod.GRAD_MODE
    distill_mod.GRAD_MODE = mode
    try:
        loss, _ = distill_loss(h, torch.eye(v), targets, stats, None, cfg)
        loss.backward()
    finally:
        distill_mod.GRAD_MODE = old
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    if name == "pg":  # -A log pS with A = -(log pS - max(log pT, floor)), detached
        vals = [(-(-(a - max(b, LOG_FLOOR))) * a, a - max(b, LOG_FLOOR)) for a, b in zip(ls.tolist(), lt.tolist())]
    else:
        vals = [_k_ref(name, a, b) for a, b in zip(ls.tolist(), lt.tolist())]
    ref_loss = sum(v_ for v_, _ in vals)
    ps = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(targets, v).double()
    ref_grad = torch.stack([d * (onehot[r] - ps[r]) for r, (_, d) in enumerate(vals)])  # d/dz of f(log pS(y))
    assert abs(loss.item() - ref_loss) <= 1e-5 * abs(ref_loss) + 1e-5
    torch.testing.assert_close(h.grad.double(), ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())


def test_k_functions_guarded():
    """The library functions themselves: -inf teacher and a log-ratio of 100 stay finite (float32),
    and k3's gradient there is 1 - r of the clamped r (a saturated pull, not inf / NaN)."""
    ls = torch.tensor([-1.0, -100.5, -2.0], requires_grad=True)
    lt = torch.tensor([-math.inf, -0.5, -1.0])
    for fn in (k1, k2, k3):
        ls.grad = None
        val = fn(ls, lt)
        val.sum().backward()
        assert torch.isfinite(val).all() and torch.isfinite(ls.grad).all(), fn.__name__
    assert k3(ls, lt)[1].item() == pytest.approx(math.expm1(-LOG_FLOOR) + LOG_FLOOR, rel=1e-6)
    torch.testing.assert_close(ls.grad[1], torch.tensor(-math.expm1(-LOG_FLOOR)), rtol=1e-6, atol=0)
    torch.testing.assert_close(k1(ls, lt)[0], torch.tensor(-1.0 - LOG_FLOOR))
