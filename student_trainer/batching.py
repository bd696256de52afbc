"""From rollouts + teacher statistics to packed micro-batches.

A `Sample` is one rollout with everything the loss needs for its response rows. Micro-batches
pack whole samples into one row of at most `budget` tokens (no padding): positions restart at 0
for every sample and a block-diagonal causal mask keeps samples from attending to each other.
Row r of a sample's statistics describes response token r, predicted at position
prompt_len + r - 1 of the packed sequence (the teacher server uses the same convention).

Attention implementations: the block mask is a 4-D boolean mask, which SDPA takes as is; eager
attention ADDS its mask to the scores (a boolean one would add 0/1 and let samples see each
other), so it gets the same mask as an additive float mask (0 / the dtype's minimum):
``attention_mask_for``. Implementations that take no 4-D mask (flash_attention_2, flex) are
refused by the config (``model.attn_implementation``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from student_trainer.losses import TeacherStats


@dataclass
class Sample:
    token_ids: list[int]
    prompt_len: int
    response_mask: list[int]          # per response token: 1 model, 0 tool/environment
    rollout_logprobs: list[float]
    group: int                        # prompt index within the step
    reward: float = 0.0
    weight: float = 1.0               # sample weight (reward-weighted / PACED)
    advantage: float = 0.0            # GRPO advantage (broadcast to tokens)
    teacher: dict = field(default_factory=dict)   # numpy arrays, one row per response token
    policy_version: int = 0
    num_turns: int = 1
    finish_reason: str = "stop"
    route: str = ""                   # the teacher that scored it (config.DEFAULT_TEACHER or a route's name)

    @property
    def num_response(self) -> int:
        return len(self.token_ids) - self.prompt_len


def pack(samples: list[Sample], budget: int) -> list[list[Sample]]:
    """Greedy first-fit in the given order; a sample longer than the budget gets its own batch."""
    out, cur, used = [], [], 0
    for s in samples:
        n = len(s.token_ids)
        if cur and used + n > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(s)
        used += n
    if cur:
        out.append(cur)
    return out


@dataclass
class MicroBatch:
    input_ids: torch.Tensor           # [1, L]
    position_ids: torch.Tensor        # [1, L]
    attention_mask: torch.Tensor | None   # [1, 1, L, L] bool block-causal (None: one sample)
    rows: torch.Tensor                # [N] positions whose hidden state predicts a response token
    targets: torch.Tensor             # [N]
    mask: torch.Tensor                # [N] float: response_mask x sample weight
    seq_ids: torch.Tensor             # [N] sample index within the step
    rollout_logprobs: torch.Tensor    # [N]
    advantages: torch.Tensor          # [N]
    stats: TeacherStats | None


def _stats(samples: list[Sample]) -> TeacherStats | None:
    if not samples[0].teacher:
        return None

    def cat(key, dtype):
        if key not in samples[0].teacher or samples[0].teacher[key] is None:
            return None
        return torch.from_numpy(np.concatenate([s.teacher[key] for s in samples])).to(dtype)

    pad = None
    if any(s.teacher.get("topk_pad") is not None for s in samples):
        pad = torch.from_numpy(np.concatenate([
            s.teacher["topk_pad"] if s.teacher.get("topk_pad") is not None
            else np.zeros(s.teacher["topk_ids"].shape, dtype=bool) for s in samples]))
    return TeacherStats(topk_ids=cat("topk_ids", torch.long), topk_logprobs=cat("topk_logprobs", torch.float32),
                        tail_logmass=cat("tail_logmass", torch.float32),
                        sampled_logprob=cat("sampled_logprobs", torch.float32),
                        s_topk_ids=cat("s_topk_ids", torch.long), extra_logprobs=cat("extra_logprobs", torch.float32),
                        full_logprobs=cat("full_logprobs", torch.float32), topk_pad=pad)


def build_micro_batch(samples: list[Sample], seq_offset: int = 0) -> MicroBatch:
    ids, pos, seg, rows, tg, mk, sid, lp, adv = [], [], [], [], [], [], [], [], []
    off = 0
    for j, s in enumerate(samples):
        L, P = len(s.token_ids), s.prompt_len
        ids += s.token_ids
        pos += range(L)
        seg += [j] * L
        rows += range(off + P - 1, off + L - 1)
        tg += s.token_ids[P:]
        mk += [m * s.weight for m in s.response_mask]
        sid += [seq_offset + j] * (L - P)
        lp += s.rollout_logprobs
        adv += [s.advantage] * (L - P)
        off += L
    L = len(ids)
    attn = None
    if len(samples) > 1:
        seg_t = torch.tensor(seg)
        attn = (torch.tril(torch.ones(L, L, dtype=torch.bool)) & (seg_t[:, None] == seg_t[None, :]))[None, None]
    return MicroBatch(
        input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), attention_mask=attn,
        rows=torch.tensor(rows), targets=torch.tensor(tg), mask=torch.tensor(mk, dtype=torch.float32),
        seq_ids=torch.tensor(sid), rollout_logprobs=torch.tensor(lp, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32), stats=_stats(samples))


def attention_mask_for(mask: torch.Tensor | None, attn_implementation: str, dtype: torch.dtype):
    """The micro-batch's boolean block mask in the form ``attn_implementation`` honours."""
    if mask is None or attn_implementation == "sdpa":
        return mask
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(f"packed micro-batches need sdpa or eager attention, not {attn_implementation!r}")


def teacher_arrays(stats, student_vocab: int, s_topk_ids: np.ndarray | None = None) -> dict:
    """Client `TeacherStats` -> the arrays a Sample carries.

    A teacher whose logit width exceeds the student's by padding rows may name ids >= student_vocab
    in its top-k: their mass moves into the tail bucket (log-add), and the slot becomes padding
    (``topk_pad``): its id repeats the row's most probable real id and its log-prob is -inf, so it
    counts for nothing in the loss (no student id is penalised for it). A row whose whole top-k is
    padding keeps id 0 as a real category with log-prob -inf. ``full_logprobs`` wider than the
    student is cut to the student's ids and renormalised. ``s_topk_ids``: the student's top ids
    the teacher was asked about (``extra_logprobs`` are its log-probs there)."""
    out = {"sampled_logprobs": stats.sampled_logprobs, "topk_ids": stats.topk_ids,
           "topk_logprobs": stats.topk_logprobs, "tail_logmass": stats.tail_logmass,
           "extra_logprobs": stats.extra_logprobs, "full_logprobs": stats.full_logprobs}
    if s_topk_ids is not None:
        out["s_topk_ids"] = np.asarray(s_topk_ids, dtype=np.int64)
    ids = stats.topk_ids
    if ids is not None and ids.size and ids.max() >= student_vocab:
        ids, lps, tail = ids.copy(), stats.topk_logprobs.astype(np.float32), stats.tail_logmass.astype(np.float32)
        pad = ids >= student_vocab
        for r in np.nonzero(pad.any(1))[0]:
            bad = pad[r]
            tail[r] = np.logaddexp(tail[r], np.logaddexp.reduce(lps[r][bad]))
            if bad.all():
                ids[r], lps[r], pad[r] = 0, -np.inf, True
                pad[r, 0] = False
                continue
            good = np.nonzero(~bad)[0]
            ids[r][bad] = ids[r][good[np.argmax(lps[r][good])]]
            lps[r][bad] = -np.inf
            order = np.lexsort((pad[r], ids[r]))  # by id, the padding after its twin
            ids[r], lps[r], pad[r] = ids[r][order], lps[r][order], pad[r][order]
        out.update(topk_ids=ids, topk_logprobs=lps, tail_logmass=tail, topk_pad=pad)
    if stats.full_logprobs is not None and stats.full_logprobs.shape[1] > student_vocab:
        full = stats.full_logprobs[:, :student_vocab].astype(np.float64)
        out["full_logprobs"] = (full - np.logaddexp.reduce(full, axis=1, keepdims=True)).astype(np.float32)
    return out
