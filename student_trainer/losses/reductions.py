"""How per-row losses become one scalar: per-row coefficients fixed before the fused head.

With coefficients c_r the loss is ``sum_r c_r * loss_r``; ``w_r`` is the row's weight (mask x
sample weight, 0 = excluded):

* ``token_mean``: c_r = w_r / global_tokens, where ``global_tokens`` counts the rows with
  w_r > 0 over the WHOLE optimiser step (all micro-batches and all data-parallel ranks; see
  ``global_token_count``). Summing the micro-batch losses then gives the global token mean, so
  micro-batch 1 x accumulation 4 equals micro-batch 4 x accumulation 1, and every rank divides by
  the same number (the seed averaged per micro-batch, which weights short micro-batches up).
  An engine that AVERAGES gradients over R data-parallel ranks (DDP, DeepSpeed) divides once
  more by R: the caller multiplies the loss by R (the world size) to keep the global token mean.
* ``seq_mean``: each sequence's token mean, averaged over ``global_seqs`` sequences:
  c_r = w_r / (n_tokens(seq(r)) * global_seqs); a sequence must sit whole in one micro-batch.
* ``sum``: c_r = w_r.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

REDUCTIONS = ("token_mean", "seq_mean", "sum")


def global_token_count(mask_N: torch.Tensor, group=None) -> torch.Tensor:
    """Number of rows with mask > 0, summed over ranks if torch.distributed is initialised.

    Call it once per optimiser step on the concatenation (or the sum over micro-batches) of the
    masks, BEFORE the first forward, so every rank has the same denominator.
    """
    n = (mask_N > 0).sum().to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        n = n.to(mask_N.device)
        dist.all_reduce(n, op=dist.ReduceOp.SUM, group=group)
    return n


def row_coefficients(
    weights_N: torch.Tensor,
    reduction: str,
    global_tokens=None,
    seq_ids_N: torch.Tensor | None = None,
    global_seqs=None,
) -> torch.Tensor:
    """Per-row coefficients c_r (see module docstring); rows with weight 0 get 0."""
    w = weights_N.to(torch.float64)
    if reduction == "sum":
        return w
    if reduction == "token_mean":
        denom = global_tokens if global_tokens is not None else (w > 0).sum()
        denom = torch.as_tensor(denom, dtype=torch.float64, device=w.device).clamp_min(1)
        return w / denom
    if reduction == "seq_mean":
        if seq_ids_N is None:
            raise ValueError("reduction='seq_mean' needs seq_ids (one sequence id per row)")
        _, inv = torch.unique(seq_ids_N, return_inverse=True)
        ns = int(inv.max()) + 1 if inv.numel() else 0
        counts = torch.zeros(ns, dtype=torch.float64, device=w.device).index_add_(0, inv, (w > 0).double())
        n_seqs = global_seqs if global_seqs is not None else (counts > 0).sum()
        n_seqs = torch.as_tensor(n_seqs, dtype=torch.float64, device=w.device).clamp_min(1)
        return w / (counts[inv].clamp_min(1) * n_seqs)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
