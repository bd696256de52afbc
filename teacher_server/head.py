"""The teacher's statistics head: lm-head, log-softmax and top-k over chunks of positions.

Memory is O(chunk x vocab): the [positions x vocab] logits of a batch are never materialised,
and positions outside the scored spans never reach the head (the caller gathers hidden states at
scored positions only).

Semantics: row r describes the distribution of the token AFTER its position given the prefix:
log p = log_softmax(logits / T) with T the row's temperature (T divides the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLED, TOPK, TAIL, LSE, ENTROPY, EXTRA, FULL = "sampled", "topk", "tail", "lse", "entropy", "extra", "full"
TAIL_EXACT_BELOW = 1e-3  # tails smaller than this take the exact complement log-sum-exp


@dataclass
class HeadRequest:
    """Per-row inputs for one head pass over R rows (rows of many sequences, concatenated)."""
    hidden: torch.Tensor            # [R, H] final hidden states (after the model's last norm)
    targets: torch.Tensor           # [R] int64 next tokens (for SAMPLED)
    temperature: torch.Tensor       # [R] float32
    top_k: int                      # max top-k over the rows (0 = none)
    row_k: torch.Tensor | None      # [R] int64 each row's own k (<= top_k), for the tail mass
    extra_ids: torch.Tensor | None  # [R, M] int64 caller-supplied ids (padded with 0)
    stats: frozenset[str]


@torch.inference_mode()
def head_statistics(req: HeadRequest, weight: torch.Tensor, chunk_size: int = 1024,
                    softcap: float | None = None) -> dict[str, torch.Tensor]:
    """Compute the requested statistics for every row, chunk by chunk. Returns float32 tensors
    (top-k ids int64) on the weight's device; top-k comes sorted by DESCENDING log-prob."""
    rows = req.hidden.shape[0]
    dev = weight.device
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (SAMPLED, "topk_vals", "topk_ids", TAIL, LSE, ENTROPY, EXTRA, FULL)}
    for s in range(0, rows, chunk_size):
        e = min(rows, s + chunk_size)
        logits = torch.matmul(req.hidden[s:e], weight.t()).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logits.div_(req.temperature[s:e, None])
        lse = torch.logsumexp(logits, dim=-1)
        logp = logits.sub_(lse[:, None])  # in place: logits are not needed any more
        if LSE in req.stats:
            out[LSE].append(lse)
        if SAMPLED in req.stats:
            out[SAMPLED].append(logp.gather(1, req.targets[s:e, None]).squeeze(1))
        if ENTROPY in req.stats:
            out[ENTROPY].append(-(logp.exp() * logp).sum(-1))
        if EXTRA in req.stats and req.extra_ids is not None:
            out[EXTRA].append(logp.gather(1, req.extra_ids[s:e]))
        if FULL in req.stats:
            out[FULL].append(logp.clone())
        if req.top_k > 0 and (TOPK in req.stats or TAIL in req.stats):
            vals, ids = torch.topk(logp, req.top_k, dim=-1, sorted=True)
            out["topk_vals"].append(vals)
            out["topk_ids"].append(ids)
            if TAIL in req.stats:
                # log of the mass outside each row's own top-k. Cheap path: log(1 - sum p_topk)
                # in float64 from fp32 log-probs (relative error <= ~1e-7 / tail). Rows whose tail
                # is below TAIL_EXACT_BELOW would cancel badly: they take the exact log-sum-exp over
                # the complement instead (one more pass over their logits only).
                k_row = req.row_k[s:e] if req.row_k is not None else torch.full((e - s,), req.top_k, device=dev)
                cols = torch.arange(req.top_k, device=dev)[None, :]
                in_k = cols < k_row[:, None]
                covered = torch.where(in_k, vals.double().exp(), torch.zeros((), dtype=torch.float64, device=dev)).sum(-1)
                tail = torch.log1p(-covered.clamp(max=1.0)).float()
                small = covered > 1.0 - TAIL_EXACT_BELOW
                if bool(small.any()):
                    rows_s = torch.nonzero(small).squeeze(1)
                    sub = logp.index_select(0, rows_s)
                    masked_ids = torch.where(in_k[rows_s], ids[rows_s], ids[rows_s, :1])
                    sub.scatter_(1, masked_ids, float("-inf"))
                    tail[rows_s] = torch.logsumexp(sub, dim=-1)
                out[TAIL].append(tail)
        elif TAIL in req.stats:
            out[TAIL].append(torch.zeros(e - s, device=dev))  # top_k = 0: everything is tail
    return {k: torch.cat(v) for k, v in out.items() if v}
