"""Sampled-token estimators, policy-gradient OPD, GRPO/PPO against their definitions."""
import math

import pytest
import torch

from student_trainer.losses import (DistillLossConfig, discounted_returns, distill_loss, grpo_advantages,
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
