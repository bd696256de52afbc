"""Full-vocabulary generalized JSD vs TRL's GKDTrainer.generalized_jsd_loss (float64).

Beta mapping: identical convention. TRL mixes m = beta pT + (1-beta) pS and returns
beta KL[pT||m] + (1-beta) KL[pS||m]; beta = 0 is forward KL[pT||pS], beta = 1 reverse KL[pS||pT].
Our ``DistillLossConfig(divergence="jsd", beta=b, support="full")`` is the same function.
"""
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd")

from student_trainer.losses import DistillLossConfig, TeacherStats, distill_loss  # noqa: E402


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_jsd_matches_trl(beta, temperature):
    g = torch.Generator().manual_seed(3)
    n, v, h = 9, 53, 7
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    stats = TeacherStats(full_logprobs=torch.log_softmax(t_logits / temperature, -1))
    cfg = DistillLossConfig(divergence="jsd", beta=beta, support="full", temperature=temperature, chunk_size=4)
    ours, _ = distill_loss(hidden, weight, torch.zeros(n, dtype=torch.long), stats, None, cfg)
    # [N, 1, V]: TRL's "batchmean" divides by dim 0, i.e. a token mean here.
    ref = gkd.GKDTrainer.generalized_jsd_loss((hidden @ weight.T)[:, None], t_logits[:, None], beta=beta,
                                              temperature=temperature)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-6)
