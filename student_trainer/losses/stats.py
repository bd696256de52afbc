"""Teacher statistics as they reach the student trainer (one row per scored position).

Legend: N scored rows, K teacher top-k, M student top-M (ids the trainer sent to the teacher),
V student vocabulary. All log-probabilities are normalised and taken at the same temperature T
that the student applies to its own logits (``logits / T`` before log-softmax).

Id contract: every id is a STUDENT vocabulary index, ``0 <= id < V``. Teachers of the same
family may pad their vocabulary (e.g. 152,064 vs 151,936 rows); the caller must drop or remap
padded teacher ids before building ``TeacherStats`` (``validate`` checks it): the trainer folds
their mass into the tail and marks the slots in ``topk_pad`` (``batching.teacher_arrays``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TeacherStats:
    topk_ids: Optional[torch.Tensor] = None          # [N, K] int64, sorted ascending per row
    topk_logprobs: Optional[torch.Tensor] = None     # [N, K] fp32, log pT at topk_ids
    tail_logmass: Optional[torch.Tensor] = None      # [N] fp32, log(1 - sum pT_topk); -inf if k covers all
    sampled_logprob: Optional[torch.Tensor] = None   # [N] fp32, log pT(y_t) of the rollout token
    s_topk_ids: Optional[torch.Tensor] = None        # [N, M] int64, the student's own top-M ids
    extra_logprobs: Optional[torch.Tensor] = None    # [N, M] fp32, log pT at s_topk_ids
    full_logprobs: Optional[torch.Tensor] = None     # [N, V] exact mode (small vocab only)
    # [N, K] bool, optional: padding slots of the top-k (a teacher vocabulary padded beyond the
    # student's: the id repeats a real top-k id of the row and the slot counts for nothing; its
    # mass is already in tail_logmass). See batching.teacher_arrays.
    topk_pad: Optional[torch.Tensor] = None

    def _tensors(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def select(self, rows) -> "TeacherStats":
        """Rows ``rows`` (index tensor, bool mask or slice) of every present field."""
        return TeacherStats(**{k: (None if v is None else v[rows]) for k, v in self._tensors().items()})

    def to(self, device) -> "TeacherStats":
        return TeacherStats(**{k: (None if v is None else v.to(device)) for k, v in self._tensors().items()})

    @property
    def num_rows(self) -> int:
        for v in self._tensors().values():
            if v is not None:
                return v.shape[0]
        return 0

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the bad field (shapes, id range, paired fields)."""
        n = self.num_rows
        for k, v in self._tensors().items():
            if v is not None and v.shape[0] != n:
                raise ValueError(f"TeacherStats.{k} has {v.shape[0]} rows, expected {n}")
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ValueError("TeacherStats.topk_ids and topk_logprobs must be given together")
        if self.topk_ids is not None and self.tail_logmass is None:
            raise ValueError("TeacherStats.tail_logmass is required with topk_ids (use -inf if k = V)")
        if self.topk_pad is not None and (self.topk_ids is None or self.topk_pad.shape != self.topk_ids.shape):
            raise ValueError("TeacherStats.topk_pad must have the shape of topk_ids")
        if (self.s_topk_ids is None) != (self.extra_logprobs is None):
            raise ValueError("TeacherStats.s_topk_ids and extra_logprobs must be given together")
        for k in ("topk_ids", "s_topk_ids"):
            ids = getattr(self, k)
            if ids is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ValueError(
                    f"TeacherStats.{k} holds ids outside [0, {vocab_size}); drop or remap the "
                    "teacher's padded vocabulary rows before building TeacherStats")
        if self.full_logprobs is not None and self.full_logprobs.shape[-1] != vocab_size:
            raise ValueError(
                f"TeacherStats.full_logprobs has vocab {self.full_logprobs.shape[-1]}, student has {vocab_size}")
