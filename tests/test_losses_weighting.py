"""TIP scoring/selection, reward weights per group, PACED kernel, schedules."""
import math

import pytest
import torch

from student_trainer.losses import (ForwardToReverseKL, ObjectiveMix, paced_kernel, paced_weights, reward_weights,
                                    score_tokens, select_tokens, token_entropy_divergence)
from tests.test_losses_divergences import make_problem


def test_reward_weights_per_group_mean_one():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    w = reward_weights(r, beta=0.5, group_size=4)
    e = math.exp(2.0)
    torch.testing.assert_close(w[:4], torch.tensor([4 * e / (e + 3), 4 / (e + 3), 4 / (e + 3), 4 / (e + 3)]))
    torch.testing.assert_close(w[4:], torch.ones(4))  # an all-wrong group still counts fully, per group
    torch.testing.assert_close(w.view(2, 4).mean(-1), torch.ones(2))
    ids = torch.tensor([7, 3, 7, 3])
    torch.testing.assert_close(reward_weights(torch.tensor([1.0, 1.0, 0.0, 0.0]), 1.0, group_ids_B=ids),
                               torch.tensor([2 * math.e / (math.e + 1), 2 * math.e / (math.e + 1),
                                             2 / (math.e + 1), 2 / (math.e + 1)]))


def test_paced_kernel_and_weights():
    p = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(paced_kernel(p), torch.tensor([0.0, 0.1875, 0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(paced_kernel(p, 2.0, 0.5), p ** 2 * (1 - p) ** 0.5)
    r = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.float32)  # p = .25, .5, 1
    w = paced_weights(r, group_size=4)
    k = torch.tensor([0.1875] * 4 + [0.25] * 4 + [0.0] * 4)
    torch.testing.assert_close(w, k / k.mean())
    assert (paced_weights(torch.ones(8), group_size=4) == 0).all()
    assert (paced_weights(torch.ones(8), group_size=4, all_zero="uniform") == 1).all()


def test_tip_scores_and_selection():
    hidden, weight, targets, stats, t_lp = make_problem(n=20, v=40, k=6)
    hd = token_entropy_divergence(hidden, weight, stats, chunk_size=7, support="topk")
    ls = torch.log_softmax(hidden @ weight.T, -1)
    torch.testing.assert_close(hd[:, 0], (-(ls.exp() * ls).sum(-1) / math.log(40)))
    assert ((hd >= 0) & (hd <= 1)).all()
    s = score_tokens(hidden, weight, stats, chunk_size=7, support="topk", alpha=1.0, gamma=2.0)
    torch.testing.assert_close(s, hd[:, 0] * hd[:, 1] ** 2)
    so = score_tokens(hidden, weight, stats, support="topk", form="soft_or", low_entropy=True)
    torch.testing.assert_close(so, 1 - hd[:, 0] * (1 - hd[:, 1]))
    top = select_tokens(s, ratio=0.25)
    assert top.tolist() == sorted(torch.topk(s, 5).indices.tolist())
    a = select_tokens(s, ratio=0.5, mode="sample", generator=torch.Generator().manual_seed(1))
    b = select_tokens(s, ratio=0.5, mode="sample", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(a) == 10 and len(set(a.tolist())) == 10
    assert torch.equal(select_tokens(s, threshold=float(s.median())), torch.nonzero(s >= s.median()).squeeze(-1))
    with pytest.raises(ValueError):
        select_tokens(s)


def test_forward_to_reverse_schedule():
    hard = ForwardToReverseKL(switch_step=10)
    assert hard.terms(9) == (("forward_kl", 1.0),) and hard.terms(10) == (("reverse_kl", 1.0),)
    lin = ForwardToReverseKL(switch_step=10, window=4)
    assert [lin.forward_weight(s) for s in (0, 10, 11, 12, 14, 20)] == [1.0, 1.0, 0.75, 0.5, 0.0, 0.0]
    assert lin.terms(12) == (("forward_kl", 0.5), ("reverse_kl", 0.5))
    mix = ObjectiveMix(distill=lin, distill_weight=2.0, rl_weight=0.5, sft_weight=0.1)
    assert mix.terms(11) == (("forward_kl", 1.5), ("reverse_kl", 0.5), ("ppo", 0.5), ("sft", 0.1))
