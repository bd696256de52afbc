"""Loss schedules: forward KL -> reverse KL, and the mix of distillation, RL and SFT terms.

A loss mix is a tuple of ``(term, weight)`` pairs, summed per row inside ONE fused-head pass
(``DistillLossConfig.terms``). Terms: any divergence name (``divergences.FULL_DIVERGENCES``),
``k1|k2|k3`` (sampled-token estimators used as losses), ``pg`` (policy-gradient OPD with the
reverse-KL advantage), ``ppo`` (RL: PPO-clip on given advantages, e.g. ``grpo_advantages``),
``sft`` (NLL of the given targets).

``ForwardToReverseKL`` (PACED's two-stage recipe): weight of forward KL
  w_f(step) = 1                              for step <  switch_step
            = 1 - (step - switch_step)/window for switch_step <= step < switch_step + window
            = 0                              afterwards
and reverse KL gets 1 - w_f. ``window = 0`` is a hard switch at ``switch_step``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardToReverseKL:
    switch_step: int = 0
    window: int = 0

    def forward_weight(self, step: int) -> float:
        if step < self.switch_step:
            return 1.0
        if self.window <= 0:
            return 0.0
        return max(0.0, 1.0 - (step - self.switch_step) / self.window)

    def terms(self, step: int) -> tuple[tuple[str, float], ...]:
        wf = self.forward_weight(step)
        return tuple((n, w) for n, w in (("forward_kl", wf), ("reverse_kl", 1.0 - wf)) if w > 0.0)


@dataclass(frozen=True)
class ObjectiveMix:
    """Weighted sum of a distillation term, an RL term and an SFT term (constant weights).

    ``distill`` may itself be a schedule; ``terms(step)`` returns the pairs for
    ``DistillLossConfig.terms``.
    """
    distill: str | ForwardToReverseKL = "reverse_kl"
    distill_weight: float = 1.0
    rl_weight: float = 0.0
    sft_weight: float = 0.0

    def terms(self, step: int = 0) -> tuple[tuple[str, float], ...]:
        if isinstance(self.distill, ForwardToReverseKL):
            out = [(n, w * self.distill_weight) for n, w in self.distill.terms(step)]
        else:
            out = [(self.distill, self.distill_weight)]
        out += [("ppo", self.rl_weight), ("sft", self.sft_weight)]
        return tuple((n, w) for n, w in out if w != 0.0)
