"""Triton kernels for the memory-bound part of the closed-form chunk loss (``analytic.py``).

Per chunk the closed-form loss needs, over the fp32 logits ``z_C_V`` (support columns already
set to -inf, so everything here is "off the support"):

* ``row_stats``: ONE read of z giving, per row, the max ``m``, ``S = sum exp(z - m)``,
  ``A = sum exp(z - m) (z - m)`` (entropy) and the max of every 128-column block (the
  student's top-k is then found among the top-k blocks: no radix select over the vocabulary);
* ``write_dz``: ONE more read of z and one write of ``dz = exp(z - shift_r) * scale_r`` in the
  weight's dtype -- optionally in place, into the first half of each fp32 row of z's own storage
  (``dz`` is then a strided view, row stride 2V bf16 elements), so a chunk needs one fp32
  [C, V] buffer and no second [C, V] allocation.

The eager torch path (``analytic.py``) does the same arithmetic in about ten separate passes.
The row-statistics kernel lives in ``teacher_server/kernels.py`` (the teacher's head uses it too,
with a temperature and softcap this path never sets); ``write_dz`` is the student's own.
Both kernels run one program per row and sweep the vocabulary in tiles of ``BLOCK`` columns.

In-place dz: program r writes only row r's bytes ``[0, 2V)``, tile i's output lands on fp32
columns ``[i B/2, (i+1) B/2)``, which lie in tiles <= i, all already read; a CTA barrier after
each tile's loads (and ``num_stages=1``: no prefetch reordering) makes sure every warp has read
tile i before any warp overwrites part of it.

``available(t)`` says whether the kernels may run for a tensor (CUDA, triton importable, the
switch ``KERNELS`` not "eager", and a one-off self-test on a small problem passed); a failure to
compile or a wrong self-test result logs one warning and leaves the eager path in charge.
"""
from __future__ import annotations

import os

import torch

from teacher_server.kernels import HAVE_TRITON, tl, triton  # noqa: F401  (one Triton import, shared)
from teacher_server.kernels import gate
from teacher_server.kernels import row_stats as _row_stats

# "auto": Triton on CUDA when it works, else eager | "triton": same, but a failure raises | "eager"
KERNELS = os.environ.get("OPD_LOSS_KERNELS", "auto")
DZ_INPLACE = os.environ.get("OPD_LOSS_DZ_INPLACE", "1") != "0"
SUB = 128         # columns per block maximum (student top-k candidates)
BLOCK = 2048      # columns per tile (a multiple of SUB)
NUM_WARPS = 8

_STATE: dict = {}  # device -> bool (self-test passed)


if HAVE_TRITON:
    @triton.jit
    def _write_dz_kernel(z_ptr, stride_z, out_ptr, stride_o, V, shift_ptr, scale_ptr,
                         BLOCK: tl.constexpr, INPLACE: tl.constexpr):
        row = tl.program_id(0)
        zrow = z_ptr + row.to(tl.int64) * stride_z
        orow = out_ptr + row.to(tl.int64) * stride_o
        shift = tl.load(shift_ptr + row)
        scale = tl.load(scale_ptr + row)
        offs = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            idx = start + offs
            msk = idx < V
            x = tl.load(zrow + idx, mask=msk, other=float("-inf")).to(tl.float32)
            y = (tl.exp(x - shift) * scale).to(out_ptr.dtype.element_ty)
            if INPLACE:
                tl.debug_barrier()  # every warp has read this tile before any part is overwritten
            tl.store(orow + idx, y, mask=msk)


def row_stats(z_C_V: torch.Tensor, want_a: bool, want_bmax: bool):
    """``(m_C, S_C, A_C | None, bmax_C_NB | None)`` of fp32 logits (see the module docstring)."""
    assert z_C_V.dtype == torch.float32 and z_C_V.stride(1) == 1
    return _row_stats(z_C_V, None, None, want_a, want_bmax, sub=SUB, block=BLOCK, num_warps=NUM_WARPS)


def write_dz(z_C_V: torch.Tensor, shift_C: torch.Tensor, scale_C: torch.Tensor, out_dtype: torch.dtype,
             inplace: bool | None = None) -> torch.Tensor:
    """``exp(z - shift) * scale`` in ``out_dtype``; in place (a strided view of z's storage) if asked.

    After an in-place call z's contents are destroyed.
    """
    c, v = z_C_V.shape
    inplace = DZ_INPLACE if inplace is None else inplace
    if out_dtype == z_C_V.dtype:
        out = z_C_V if inplace else torch.empty_like(z_C_V)
    elif inplace and z_C_V.element_size() == 2 * torch.empty((), dtype=out_dtype).element_size() \
            and z_C_V.is_contiguous():
        out = z_C_V.view(out_dtype)[:, :v]  # [C, 2V] view -> first half of each row
    else:
        inplace = False
        out = torch.empty(c, v, dtype=out_dtype, device=z_C_V.device)
    if c:
        _write_dz_kernel[(c,)](z_C_V, z_C_V.stride(0), out, out.stride(0), v,
                               shift_C.to(torch.float32).contiguous(), scale_C.to(torch.float32).contiguous(),
                               BLOCK=BLOCK, INPLACE=bool(inplace and out.data_ptr() == z_C_V.data_ptr()
                                                         and out.dtype != z_C_V.dtype),
                               num_warps=NUM_WARPS, num_stages=1)
    return out


def _self_test(device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    c, v = 5, 3 * BLOCK + 77
    z = torch.randn(c, v, device=device, generator=g) * 3
    z[1, :SUB + 5] = float("-inf")
    z[2] = float("-inf")
    m, s, a, bmax = row_stats(z, True, True)
    zf = z.double()
    m_ref = zf.amax(-1)
    ms = torch.where(torch.isfinite(m_ref), m_ref, torch.zeros_like(m_ref))
    e = torch.exp(zf - ms[:, None])
    s_ref = e.sum(-1)
    a_ref = torch.where(e > 0, e * (zf - ms[:, None]), torch.zeros_like(e)).sum(-1)
    pad = torch.full((c, bmax.shape[1] * SUB - v), float("-inf"), device=device, dtype=torch.float64)
    b_ref = torch.cat([zf, pad], -1).view(c, -1, SUB).amax(-1)
    ok = bool(torch.equal(m.double(), m_ref) and torch.equal(bmax.double(), b_ref)
              and torch.allclose(s.double(), s_ref, rtol=1e-5, atol=1e-6)
              and torch.allclose(a.double(), a_ref, rtol=1e-5, atol=1e-5))
    shift, scale = torch.randn(c, device=device, generator=g), torch.randn(c, device=device, generator=g)
    ref = (torch.exp(zf - shift.double()[:, None]) * scale.double()[:, None])
    for dt in (torch.bfloat16, torch.float32):
        for inplace in (False, True):
            out = write_dz(z.clone(), shift, scale, dt, inplace)
            ok = ok and bool(torch.allclose(out.double(), ref, rtol=1e-2 if dt == torch.bfloat16 else 1e-5,
                                            atol=1e-6))
    return ok


def available(t: torch.Tensor) -> bool:
    """Whether the kernels run for the fp32 chunk logits ``t`` (see the module docstring)."""
    if t.dtype != torch.float32:
        return False
    return gate(t, KERNELS, "OPD_LOSS_KERNELS", _STATE, str(t.device), lambda: _self_test(t.device),
                "fused loss kernels")
