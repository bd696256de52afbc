"""Triton kernels for the row statistics of [C, V] logits, shared by the teacher's head
(``head.py``) and the student's closed-form loss (``student_trainer/losses/fused_kernels.py``).

Both kernels run one program per row and sweep the vocabulary in tiles of ``BLOCK`` columns. The
input ``x`` may be bf16, fp16 or fp32 (loaded and converted to fp32: no fp32 copy of a chunk); the
row's values are ``z = cap(x) / T`` with the optional softcap ``cap(x) = tanh(x / c) * c`` and the
optional per-row temperature ``T``. Without either, ``z = x`` and the arithmetic is exactly the
student's. With T alone, the max is ``max(x) / T`` rounded like torch's division (division is
monotone: it equals the max of the eager path's z), while the exponents use ``x * (1 / T)``: an
IEEE division per element cost about 70 us per 1024 x 151,936 bf16 chunk on an H200 (a third of
the row kernel), and the one extra rounding (<= 1 ulp of z, unbiased) is of the size of exp's own
error. With a softcap (rare) every step divides.

* ``row_stats``: ONE read of x giving, per row, ``m = max z``, ``S = sum exp(z - m)``,
  ``A = sum exp(z - m) (z - m)`` (entropy: ``H = log S - A / S``; lse = ``m + log S``) and the max
  of every ``SUB``-column block of the RAW x (the top-k is then found among the k blocks with the
  largest maxima). Raw, not z: the softcap saturates and division rounds, so distinct raw values
  may share a z; block maxima, top-k and the tail's thresholds all compare raw values, so ties are
  decided one way throughout.
* ``tail_stats``: one more read of x, given per row a threshold ``thr`` (a RAW value: the row's own
  k-th largest, +inf when its k is 0) and m from ``row_stats``: ``below = sum over x < thr of
  exp(z - m)`` and ``eq = #{x == thr}``. With ``t_eq`` the number of the row's top-k values equal
  to thr (ties at the k-th place), the mass outside the top-k is exact, with no cancellation:

      complement = below + (eq - t_eq) * exp(z(thr) - m),   tail = log(complement) - log(S)

  (-inf when the complement is empty; 0 by definition when k is 0). bf16/fp16 -> fp32 is exact,
  so ties are detected exactly.

``m`` used as the shift is 0 for a row that is all -inf (S = 0 then). ``available(t, softcap)``
says whether the kernels may run for the head's logits ``t`` (CUDA, or Triton's interpreter on the
CPU when forced; triton importable; the switch ``KERNELS``, env ``OPD_TEACHER_KERNELS=auto|triton|
eager``, not "eager"; a one-off self-test per device passed). A failure logs one warning and
leaves the eager path in charge ("triton" raises instead).
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

# "auto": Triton on CUDA when it works, else eager | "triton": same, but a failure raises | "eager"
KERNELS = os.environ.get("OPD_TEACHER_KERNELS", "auto")
SUB = 128         # columns per block maximum
BLOCK = 4096      # columns per tile of the row kernel (a multiple of SUB)
TAIL_BLOCK = 2048  # columns per tile of the tail kernel
NUM_WARPS = 8
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

try:  # pragma: no cover - depends on the installation
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # noqa: BLE001
    triton = tl = None
    HAVE_TRITON = False

_STATE: dict = {}  # (device, softcap?) -> bool (self-test passed)


if HAVE_TRITON:

    @triton.jit
    def _tanh(y):
        # no tl.tanh, and libdevice does not run under the interpreter: odd Taylor series near 0
        # (no cancellation in 1 - q), (1 - q) / (1 + q) with q = e^{-2|y|} <= 1 elsewhere
        a = tl.abs(y)
        q = tl.exp(-2.0 * a)
        big = tl.math.div_rn(1.0 - q, 1.0 + q)
        a2 = a * a
        poly = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (
            62.0 / 2835.0 + a2 * (-1382.0 / 155925.0))))))
        r = tl.where(a < 0.25, poly, big)
        return tl.where(y < 0, -r, r)

    @triton.jit
    def _z(x, t, cap, HAS_T: tl.constexpr, HAS_CAP: tl.constexpr):
        z = x
        if HAS_CAP:
            z = _tanh(tl.math.div_rn(z, cap)) * cap
        if HAS_T:
            z = tl.math.div_rn(z, t)
        return z

    @triton.jit
    def _row_stats_kernel(z_ptr, stride_z, V, t_ptr, cap, m_ptr, s_ptr, a_ptr, bmax_ptr, stride_b, NB,
                          BLOCK: tl.constexpr, SUB: tl.constexpr, WANT_A: tl.constexpr,
                          WANT_BMAX: tl.constexpr, HAS_T: tl.constexpr = False,
                          HAS_CAP: tl.constexpr = False):
        row = tl.program_id(0)
        zrow = z_ptr + row.to(tl.int64) * stride_z
        offs = tl.arange(0, BLOCK)
        neg_inf = float("-inf")
        t = 1.0
        inv_t = 1.0
        if HAS_T:
            t = tl.load(t_ptr + row)
            inv_t = tl.math.div_rn(1.0, t)
        m = tl.max(tl.full([BLOCK], neg_inf, tl.float32), axis=0)  # running max (a scalar)
        s_vec = tl.zeros([BLOCK], dtype=tl.float32)  # per-lane sum exp(z - m)
        a_vec = tl.zeros([BLOCK], dtype=tl.float32)  # per-lane sum exp(z - m) (z - m)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = tl.load(zrow + idx, mask=idx < V, other=neg_inf).to(tl.float32)
            if WANT_BMAX:
                bm = tl.max(tl.reshape(x, [BLOCK // SUB, SUB]), axis=1)  # of the raw values
                bidx = start // SUB + tl.arange(0, BLOCK // SUB)
                tl.store(bmax_ptr + row.to(tl.int64) * stride_b + bidx, bm, mask=bidx < NB)
            if HAS_CAP:  # cap(-inf) = -c: the padding past V must stay -inf
                x = tl.where(idx < V, _z(x, t, cap, HAS_T, HAS_CAP), neg_inf)
                tile_max = tl.max(x, axis=0)
            elif HAS_T:  # the max exactly as x / T rounds (division is monotone); exponents by 1 / T
                if WANT_BMAX:
                    tile_max = tl.math.div_rn(tl.max(bm, axis=0), t)
                else:
                    tile_max = tl.math.div_rn(tl.max(x, axis=0), t)
                x = x * inv_t
            elif WANT_BMAX:
                tile_max = tl.max(bm, axis=0)
            else:
                tile_max = tl.max(x, axis=0)
            m_new = tl.maximum(m, tile_max)
            m_safe = tl.where(m_new > neg_inf, m_new, 0.0)  # all -inf so far: shift by 0
            alpha = tl.exp(m - m_safe)                      # m = -inf -> 0
            e = tl.exp(x - m_safe)                          # x = -inf -> 0
            if WANT_A:
                dm = tl.where(m > neg_inf, m - m_safe, 0.0)
                a_vec = alpha * (a_vec + dm * s_vec) + tl.where(e > 0, e * (x - m_safe), 0.0)
            s_vec = alpha * s_vec + e
            m = m_new
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, tl.sum(s_vec, axis=0))
        if WANT_A:
            tl.store(a_ptr + row, tl.sum(a_vec, axis=0))

    @triton.jit
    def _tail_kernel(x_ptr, stride_x, V, thr_ptr, m_ptr, t_ptr, cap, below_ptr, eq_ptr,
                     BLOCK: tl.constexpr, HAS_T: tl.constexpr, HAS_CAP: tl.constexpr):
        row = tl.program_id(0)
        xrow = x_ptr + row.to(tl.int64) * stride_x
        thr = tl.load(thr_ptr + row)
        m = tl.load(m_ptr + row)
        m_safe = tl.where(m > float("-inf"), m, 0.0)
        t = 1.0
        inv_t = 1.0
        if HAS_T:
            t = tl.load(t_ptr + row)
            inv_t = tl.math.div_rn(1.0, t)
        offs = tl.arange(0, BLOCK)
        b_vec = tl.zeros([BLOCK], dtype=tl.float32)
        n_vec = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            msk = idx < V
            x = tl.load(xrow + idx, mask=msk, other=0.0).to(tl.float32)
            if HAS_CAP:
                z = _z(x, t, cap, HAS_T, HAS_CAP)
            else:
                z = x * inv_t
            b_vec += tl.where(msk & (x < thr), tl.exp(z - m_safe), 0.0)
            n_vec += (msk & (x == thr)).to(tl.int32)
        tl.store(below_ptr + row, tl.sum(b_vec, axis=0))
        tl.store(eq_ptr + row, tl.sum(n_vec, axis=0))


def _check(x: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(1) == 1 and x.dtype in DTYPES, (x.shape, x.stride(), x.dtype)


def _temp_arg(temp: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if temp is None else temp.reshape(-1).to(torch.float32).contiguous()


def row_stats(x: torch.Tensor, temp: torch.Tensor | None = None, softcap: float | None = None,
              want_a: bool = True, want_bmax: bool = True, *, sub: int = SUB, block: int = BLOCK,
              num_warps: int = NUM_WARPS):
    """``(m_C, S_C, A_C | None, bmax_C_NB | None)`` of ``z = cap(x) / T`` (see the module
    docstring); bmax holds the raw x's block maxima (fp32, ``NB = ceil(V / sub)``)."""
    _check(x)
    c, v = x.shape
    dev = x.device
    m = torch.empty(c, dtype=torch.float32, device=dev)
    s = torch.empty(c, dtype=torch.float32, device=dev)
    a = torch.empty(c, dtype=torch.float32, device=dev) if want_a else s
    nb = triton.cdiv(v, sub)
    bmax = torch.empty(c, nb, dtype=torch.float32, device=dev) if want_bmax else s
    if c:
        _row_stats_kernel[(c,)](x, x.stride(0), v, _temp_arg(temp, m), float(softcap or 1.0), m, s, a, bmax,
                                nb if want_bmax else 0, nb, BLOCK=block, SUB=sub, WANT_A=want_a,
                                WANT_BMAX=want_bmax, HAS_T=temp is not None, HAS_CAP=bool(softcap),
                                num_warps=num_warps)
    return m, s, (a if want_a else None), (bmax if want_bmax else None)


def tail_stats(x: torch.Tensor, thr: torch.Tensor, m: torch.Tensor, temp: torch.Tensor | None = None,
               softcap: float | None = None, *, block: int = TAIL_BLOCK,
               num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(below_C fp32, eq_C int32)``: per row, sum of exp(z - m) over x < thr and #{x == thr}."""
    _check(x)
    c, v = x.shape
    below = torch.empty(c, dtype=torch.float32, device=x.device)
    eq = torch.empty(c, dtype=torch.int32, device=x.device)
    if c:
        _tail_kernel[(c,)](x, x.stride(0), v, thr.to(torch.float32).contiguous(), m.to(torch.float32).contiguous(),
                           _temp_arg(temp, below), float(softcap or 1.0), below, eq, BLOCK=block,
                           HAS_T=temp is not None, HAS_CAP=bool(softcap), num_warps=num_warps)
    return below, eq


def tail_logmass(x: torch.Tensor, raw_topk: torch.Tensor, k_row: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                 temp: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """log of the probability mass outside each row's own top-k, exact and tie-aware (module
    docstring). ``raw_topk`` [C, K]: the row's K largest raw values sorted descending (x's dtype),
    ``k_row`` [C]: the row's own k (<= K); m and S from ``row_stats`` with the same T and softcap.
    No host synchronisation."""
    c, kk = raw_topk.shape
    has_k = k_row > 0
    raw = raw_topk.float()
    thr = raw.gather(1, (k_row - 1).clamp(min=0).view(c, 1)).squeeze(1)
    thr = torch.where(has_k, thr, torch.full_like(thr, float("inf")))
    below, eq = tail_stats(x, thr, m, temp, softcap)
    in_k = torch.arange(kk, device=x.device)[None, :] < k_row[:, None]
    extra = (eq.long() - ((raw == thr[:, None]) & in_k).sum(1)).clamp(min=0)  # tied columns left out
    z_thr = thr
    if softcap:
        z_thr = torch.tanh(z_thr / softcap) * softcap
    if temp is not None:
        z_thr = z_thr / temp.reshape(-1).float()
    m_safe = torch.where(m > float("-inf"), m, torch.zeros_like(m))
    ties = torch.where(extra > 0, extra.float() * torch.exp(z_thr - m_safe), torch.zeros_like(below))
    tail = torch.log(below + ties) - torch.log(s)
    return torch.where(has_k, tail, torch.zeros_like(tail))


def _self_test(device, softcap: float | None) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    c, v, k = 5, BLOCK + 2 * TAIL_BLOCK + 77, 8
    x = (torch.randn(c, v, device=device, generator=g) * 3).to(torch.bfloat16)
    x[1, :SUB + 5] = float("-inf")
    x[2, 7] = 40.0                                                # a peaked row: tiny tail
    t = torch.rand(c, device=device, generator=g) + 0.5
    m, s, a, bmax = row_stats(x, t, softcap, True, True)
    z = x.double()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    z = z / t.double()[:, None]
    m_ref = z.amax(-1)
    e = torch.exp(z - m_ref[:, None])
    s_ref = e.sum(-1)
    a_ref = torch.where(e > 0, e * (z - m_ref[:, None]), torch.zeros_like(e)).sum(-1)
    pad = torch.full((c, bmax.shape[1] * SUB - v), float("-inf"), device=device, dtype=torch.float64)
    b_ref = torch.cat([x.double(), pad], -1).view(c, -1, SUB).amax(-1)
    ok = bool(torch.equal(bmax.double(), b_ref) and torch.allclose(m.double(), m_ref, rtol=1e-6, atol=1e-6)
              and torch.allclose(s.double(), s_ref, rtol=1e-5, atol=1e-6)
              and torch.allclose(a.double(), a_ref, rtol=1e-5, atol=1e-5))
    raw, ids = torch.topk(x, k, dim=-1, sorted=True)
    k_row = torch.tensor([k, 3, k, 0, 1], device=device)
    got = tail_logmass(x, raw, k_row, m, s, t, softcap)
    lp = z - torch.logsumexp(z, -1, keepdim=True)
    for r in range(c):
        kr = int(k_row[r])
        ref = torch.logsumexp(lp[r].scatter(0, ids[r, :kr], float("-inf")), 0) if kr else torch.zeros((), device=device)
        ok = ok and bool(torch.allclose(got[r].double(), ref.double(), rtol=1e-5, atol=1e-5))
    return ok


def gate(t: torch.Tensor, mode: str, env_var: str, state: dict, key, self_test, what: str) -> bool:
    """The switch logic shared by this module's `available` and the student's
    (`fused_kernels.available`): `mode` "eager" never, else CUDA tensors (or the CPU under
    Triton's interpreter when `mode` is "triton"), triton importable, and `self_test()` passed
    once per `key` (cached in `state`). Failures log one warning and give False; with `mode`
    "triton" they raise instead."""
    if mode == "eager":
        return False
    if not t.is_cuda and not (mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False  # CPU: eager, except under Triton's interpreter when asked for (tests)
    if not HAVE_TRITON:
        if mode == "triton":
            raise RuntimeError(f"{env_var}=triton but triton does not import")
        return False
    if key not in state:
        try:
            ok = self_test()
            if not ok:
                raise RuntimeError(f"{what}: self-test mismatch")
        except Exception as exc:  # noqa: BLE001
            if mode == "triton":
                raise
            log.warning("%s unavailable on %s (%s); using the eager torch path", what, t.device, exc)
            ok = False
        state[key] = ok
    return state[key]


def available(t: torch.Tensor, softcap: float | None = None) -> bool:
    """Whether the kernels run for the head's chunk logits ``t`` (see the module docstring)."""
    if t.dtype not in DTYPES:
        return False
    return gate(t, KERNELS, "OPD_TEACHER_KERNELS", _STATE, (str(t.device), bool(softcap)),
                lambda: _self_test(t.device, softcap or None), "teacher head kernels")
