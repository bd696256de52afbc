"""Chunked lm-head with a fused per-chunk loss: logits are never materialised for the batch.

Memory argument
---------------
A naive distillation loss computes ``logits_N_V = hidden_N_H @ weight_V_H.T`` for all N scored
positions, then a log-softmax (fp32) and its backward: peak extra memory O(N x V) (27.8 GiB for
16k tokens at V = 151,936). Chunking only the forward does not help: autograd keeps every chunk's
fp32 intermediates until backward (the seed's defect 2).

``fused_head_loss`` runs the head chunk by chunk INSIDE one ``torch.autograd.Function.forward``:
for rows ``[s, e)`` it computes ``z_C_V = (h_C_H @ W_V_H.T) / T`` in fp32, asks a per-chunk loss
function for the per-row losses and ``dL/dz_C_V`` (``L = sum_r coef_r * loss_r``), and at once turns
that into ``grad_h_C_H = dz @ W / T`` and ``grad_W_V_H += dz.T @ h / T``. Only ``grad_h_N_H`` and
``grad_W_V_H`` (same sizes as the inputs) are kept; ``backward`` merely scales them by the scalar
``grad_output``. Peak extra memory: O(C x V) for the chunk plus O(V x H) for the fp32 weight-grad
accumulator (``fp32_weight_grad=False`` accumulates in the weight's dtype instead).

Because the loss is a weighted sum over rows with coefficients fixed before the call (see
``reductions.row_coefficients``), the gradient is exactly linear in ``grad_output``, which is why
saving the gradients in forward is valid. The head is run once per scored row: callers select
rows (mask, TIP) BEFORE calling, so skipped rows cost no head compute.

Shape legend: N scored rows, C chunk rows, V vocabulary, H hidden, K per-row extra columns.
"""
from __future__ import annotations

from typing import Callable

import torch

# chunk_fn(z_C_V, rows: slice, coef_C) -> (loss_C, dz_C_V, metrics_C_M or None)
# z is the temperature-scaled student logits of rows ``rows`` in the compute dtype;
# dz = d(sum_r coef_r * loss_r) / dz.
ChunkFn = Callable[[torch.Tensor, slice, torch.Tensor], tuple]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 inputs stay fp64 (tests); everything else is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _mm_out_fp32(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b with the result in ``dtype`` (fp32 accumulate); avoids a bf16 round trip on CUDA."""
    if a.dtype == dtype:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (TypeError, RuntimeError):
            pass
    return (a @ b).to(dtype)


def chunk_logits(hidden_C_H: torch.Tensor, weight_V_H: torch.Tensor, temperature: float) -> torch.Tensor:
    """Student logits of a chunk divided by the temperature, in the compute dtype."""
    z = _mm_out_fp32(hidden_C_H, weight_V_H.t(), compute_dtype(hidden_C_H))
    if temperature != 1.0:
        z = z / temperature
    return z


def autograd_chunk_fn(row_loss: Callable[[torch.Tensor, slice], tuple]) -> ChunkFn:
    """Build a ChunkFn from a differentiable ``row_loss(z_C_V, rows) -> (loss_C, metrics_C_M|None)``.

    The chunk's logits are detached, differentiated locally with ``torch.autograd.grad`` and the
    graph is freed before the next chunk, so only one chunk's intermediates are ever alive.
    """

    def chunk_fn(z: torch.Tensor, rows: slice, coef: torch.Tensor):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, metrics = row_loss(z, rows)
            (dz,) = torch.autograd.grad(loss, z, grad_outputs=coef.to(loss.dtype))
        return loss.detach(), dz, metrics

    return chunk_fn


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, coef, chunk_fn, chunk_size, temperature, fp32_weight_grad):
        n = hidden.shape[0]
        cdt = compute_dtype(hidden)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        if need_w:
            gw_dtype = cdt if fp32_weight_grad else weight.dtype
            grad_w = torch.zeros(weight.shape, dtype=gw_dtype, device=weight.device)
        total = torch.zeros((), dtype=cdt, device=hidden.device)
        losses, metrics = [], []
        for s in range(0, n, chunk_size):
            rows = slice(s, min(s + chunk_size, n))
            h = hidden[rows]
            z = chunk_logits(h, weight, temperature)
            loss_c, dz, met = chunk_fn(z, rows, coef[rows])
            del z
            total += (loss_c * coef[rows].to(cdt)).sum()
            losses.append(loss_c)
            if met is not None:
                metrics.append(met)
            if need_h or need_w:
                if temperature != 1.0:
                    dz = dz / temperature  # chain rule through z = logits / T
                dz = dz.to(weight.dtype)
                if need_h:
                    grad_h[rows] = dz @ weight
                if need_w:
                    if grad_w.dtype == weight.dtype:
                        grad_w.addmm_(dz.t(), h)
                    else:
                        grad_w += _mm_out_fp32(dz.t(), h, grad_w.dtype)
            del dz
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        loss_rows = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=cdt)
        met_rows = torch.cat(metrics) if metrics else hidden.new_zeros(n, 0, dtype=cdt)
        ctx.mark_non_differentiable(loss_rows, met_rows)
        return total, loss_rows, met_rows

    @staticmethod
    def backward(ctx, grad_total, _grad_rows, _grad_met):
        grad_h, grad_w = ctx.saved_tensors
        gh = gw = None
        if grad_h is not None:
            gh = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            g = grad_total.to(grad_w.dtype)
            if grad_w.dtype == ctx.weight_dtype:
                gw = grad_w * g
            else:  # cast first, scale the fresh copy in place: no second fp32 [V, H] buffer
                gw = grad_w.to(ctx.weight_dtype).mul_(g.to(ctx.weight_dtype))
        return gh, gw, None, None, None, None, None


def fused_head_loss(
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    coef_N: torch.Tensor,
    chunk_fn: ChunkFn,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    fp32_weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(sum_r coef_r * loss_r, loss_N, metrics_N_M)``; only the first is differentiable.

    ``coef_N`` holds the reduction weights (mask x sample weight / normaliser) and is treated as a
    constant. Gradients flow to ``hidden_N_H`` and ``weight_V_H`` (whichever requires grad).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _FusedHeadLoss.apply(
        hidden_N_H, weight_V_H, coef_N.detach(), chunk_fn, int(chunk_size), float(temperature),
        bool(fp32_weight_grad),
    )


@torch.no_grad()
def map_chunks(
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    fn: Callable[[torch.Tensor, slice], torch.Tensor],
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """No-grad chunked pass: ``cat([fn(z_C_V, rows) for each chunk])`` (scoring, top-k ids)."""
    n = hidden_N_H.shape[0]
    outs = []
    for s in range(0, n, chunk_size):
        rows = slice(s, min(s + chunk_size, n))
        outs.append(fn(chunk_logits(hidden_N_H[rows], weight_V_H, temperature), rows))
    if not outs:
        return fn(chunk_logits(hidden_N_H[:0], weight_V_H, temperature), slice(0, 0))
    return torch.cat(outs)


def student_topk_ids(
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The student's own top-k token ids per row, [N, k] int64 sorted ascending (no grad, chunked).

    The trainer sends these to the teacher, which returns its log-probs at them
    (``TeacherStats.extra_logprobs``) so reverse-KL-type losses see the teacher where the student
    puts its mass. Temperature does not change the top-k set; it is accepted for symmetry.
    """
    if not 1 <= k <= weight_V_H.shape[0]:
        raise ValueError(f"k must be in [1, vocab={weight_V_H.shape[0]}], got {k}")

    def fn(z, rows):
        return torch.topk(z, k, dim=-1).indices.sort(dim=-1).values

    return map_chunks(hidden_N_H, weight_V_H, fn, chunk_size=chunk_size, temperature=temperature)
