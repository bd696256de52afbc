"""Rollouts: the engine interface, a local transformers engine, an SGLang client and its HTTP
stand-in, the multi-turn tool loop, prompt data, grading and evaluation. See docs/rollout.md."""

from rollout.engine import RolloutEngine, SyncEngine, group_rollouts
from rollout.types import Rollout, SamplingParams

__all__ = ["Rollout", "SamplingParams", "RolloutEngine", "SyncEngine", "group_rollouts"]
