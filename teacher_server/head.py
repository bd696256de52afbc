"""The teacher's statistics head: lm-head, log-softmax and top-k over chunks of positions.

Memory is O(chunk x vocab): the [positions x vocab] logits of a batch are never materialised,
and positions outside the scored spans never reach the head (the caller gathers hidden states at
scored positions only).

Semantics: row r describes the distribution of the token AFTER its position given the prefix:
log p = log_softmax(logits / T) with T the row's temperature (T divides the logits).

Two implementations, equal up to float32 rounding (tests/test_teacher_stats.py,
tests/test_teacher_kernels.py):
- `head_statistics` (the default, "fast"). On CUDA (Triton importable, self-test passed; switch
  `OPD_TEACHER_KERNELS=auto|triton|eager`) it runs the kernels of `kernels.py` on the lm-head
  matmul output `l` (model dtype, e.g. bf16, never copied to fp32): per chunk one read of `l`
  gives max, sum exp and entropy sum of z = cap(l) / T (log-sum-exp, entropy) and the maxima of
  128-column blocks of `l`; the top-k is taken among the k best blocks (`topk_from_blocks`), and
  one more read gives the exact tail mass of every row (tie-aware; no cancellation, no host
  synchronisation). Elsewhere (CPU, or kernels off) per chunk: (1) top-k on `l` itself (softcap
  and 1/T are monotone, so the top-k ids of log_softmax(cap(l) / T) are those of `l`; half the
  bytes of an fp32 top-k), through block maxima (`topk_raw`) when the vocabulary is wide, (2) one
  row reduction giving the log-sum-exp and the entropy together (H = log S1 - S2 / S1 with
  S1 = sum e^d, S2 = sum e^d d, d = z - max z), fused into one kernel when `compiled=True`
  (torch.compile, CUDA), a few in-place fp32 passes otherwise, and (3) the tail mass as
  log(1 - sum p_topk), with an exact complement log-sum-exp for tails below TAIL_EXACT_BELOW.
  Either way sampled, top-k values and extra ids are computed on [chunk x k] gathers only; the
  full [chunk x vocab] log-probs are built only when FULL is asked for.
- `head_statistics_reference`: the former path (fp32 upcast, divide, log-sum-exp, subtract, top-k
  over fp32 log-probs), kept as the benchmark's "old head" row and as a test reference.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from teacher_server import kernels as K

log = logging.getLogger("opd.teacher")

SAMPLED, TOPK, TAIL, LSE, ENTROPY, EXTRA, FULL = "sampled", "topk", "tail", "lse", "entropy", "extra", "full"
TAIL_EXACT_BELOW = 1e-3  # eager path: tails smaller than this take the exact complement log-sum-exp


@dataclass
class HeadRequest:
    """Per-row inputs for one head pass over R rows (rows of many sequences, concatenated)."""
    hidden: torch.Tensor            # [R, H] final hidden states (after the model's last norm)
    targets: torch.Tensor           # [R] int64 next tokens (for SAMPLED)
    temperature: torch.Tensor | None  # [R] float32; None = every row has T = 1 (no division)
    top_k: int                      # max top-k over the rows (0 = none)
    row_k: torch.Tensor | None      # [R] int64 each row's own k (<= top_k), for the tail mass
    extra_ids: torch.Tensor | None  # [R, M] int64 caller-supplied ids (padded with 0)
    stats: frozenset[str]


def _transform(x: torch.Tensor, softcap: float | None, t: torch.Tensor | None) -> torch.Tensor:
    """z = cap(x) / T in float32 (x: raw logits or a gather of them; t [rows, 1] broadcasts)."""
    z = x.float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    if t is not None:
        z = z / t
    return z


def _row_stats_fused(l: torch.Tensor, temp: torch.Tensor, softcap: float | None):
    """Log-sum-exp and entropy of z = cap(l) / T per row; written for torch.compile (one kernel)."""
    z = _transform(l, softcap, temp)
    m = z.amax(-1, keepdim=True)
    d = z - m
    e = d.exp()
    s1 = e.sum(-1)
    s2 = torch.where(e > 0, e * d, torch.zeros((), dtype=e.dtype, device=e.device)).sum(-1)
    log_s1 = s1.log()
    return m.squeeze(-1) + log_s1, log_s1 - s2 / s1


def _row_stats_eager(l: torch.Tensor, temp: torch.Tensor | None, softcap: float | None, entropy: bool):
    """Same as `_row_stats_fused` with in-place fp32 passes (CPU, or compile off)."""
    z = l.float() if l.dtype != torch.float32 else l.clone()
    if softcap:
        z.div_(softcap).tanh_().mul_(softcap)
    if temp is not None:
        z.div_(temp)
    m = z.amax(-1, keepdim=True)
    z.sub_(m)                                   # d = z - max
    ent = None
    if entropy:
        e = z.exp()
        s1 = e.sum(-1)
        s2 = e.mul_(z).nan_to_num_(nan=0.0).sum(-1)  # e^d * d (0 * -inf -> 0)
        log_s1 = s1.log()
        ent = log_s1 - s2 / s1
    else:
        log_s1 = z.exp_().sum(-1).log()
    return m.squeeze(-1) + log_s1, ent


_compiled = {}
_compile_lock = threading.Lock()


def compiled_row_stats(backend: str = "inductor"):
    """The torch.compile'd fused row reduction (built once per backend; dynamic row count)."""
    with _compile_lock:
        fn = _compiled.get(backend)
        if fn is None:
            fn = _compiled[backend] = torch.compile(_row_stats_fused, dynamic=True, backend=backend)
        return fn


SUB = K.SUB  # columns per block for the block-maxima top-k


def use_blocks(v: int, k: int) -> bool:
    """Whether the block-maxima top-k pays off (a wide vocabulary, few blocks needed)."""
    return k * SUB * 4 <= v and v // SUB >= 2


def block_max(l: torch.Tensor) -> torch.Tensor:
    """[C, ceil(V / SUB)] maxima of SUB-column blocks (the last may be partial)."""
    c, v = l.shape
    nb = v // SUB
    bmax = l[:, : nb * SUB].view(c, nb, SUB).amax(-1)
    if v > nb * SUB:  # a last, partial block
        bmax = torch.cat([bmax, l[:, nb * SUB:].amax(-1, keepdim=True)], 1)
    return bmax


def topk_from_blocks(l: torch.Tensor, bmax: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(l, k, sorted=True)`` given the row's block maxima ``bmax`` (any dtype, the
    values of `block_max(l)`): the k largest entries of a row all lie in the k blocks with the
    largest maxima (a block outside those has k blocks above it, each holding an entry larger than
    anything in it), so a top-k over V / SUB maxima and one over k x SUB gathered candidates
    replace a top-k over V columns. Equal to torch.topk up to the order of tied values."""
    c, v = l.shape
    _, blocks = torch.topk(bmax, k, dim=-1, sorted=False)                     # [C, k]
    cand = (blocks.unsqueeze(-1) * SUB + torch.arange(SUB, device=l.device)).view(c, k * SUB)
    cvals = l.gather(1, cand.clamp(max=v - 1))
    if v % SUB:  # columns past the vocabulary (in the partial block) never win
        cvals.masked_fill_(cand >= v, float("-inf"))
    raw, j = torch.topk(cvals, k, dim=-1, sorted=True)
    return raw, cand.gather(1, j)


def topk_raw(l: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(l, k, sorted=True)`` over each row of the raw logits, by block maxima
    (`topk_from_blocks`) when the vocabulary is wide."""
    if not use_blocks(l.shape[1], k):
        return torch.topk(l, k, dim=-1, sorted=True)
    return topk_from_blocks(l, block_max(l), k)


def _append_gathered(out: dict[str, list[torch.Tensor]], req: HeadRequest, s: int, e: int, l: torch.Tensor,
                     lse: torch.Tensor, softcap: float | None, temp: torch.Tensor | None) -> None:
    """Rows [s, e)'s sampled, extra-id and full log-probs from the raw logits `l` (as asked)."""
    if SAMPLED in req.stats:
        out[SAMPLED].append(_transform(l.gather(1, req.targets[s:e, None]), softcap, temp).squeeze(1) - lse)
    if EXTRA in req.stats and req.extra_ids is not None:
        out[EXTRA].append(_transform(l.gather(1, req.extra_ids[s:e]), softcap, temp) - lse[:, None])
    if FULL in req.stats:
        out[FULL].append(_transform(l, softcap, temp) - lse[:, None])


@torch.inference_mode()
def head_statistics(req: HeadRequest, weight: torch.Tensor, chunk_size: int = 1024,
                    softcap: float | None = None, compiled: bool = False,
                    compile_backend: str = "inductor") -> dict[str, torch.Tensor]:
    """Compute the requested statistics for every row, chunk by chunk. Returns float32 tensors
    (top-k ids int64) on the weight's device; top-k comes sorted by DESCENDING log-prob."""
    if K.available(weight, softcap):
        return _head_statistics_kernels(req, weight, chunk_size, softcap)
    rows = req.hidden.shape[0]
    dev = weight.device
    want_k = req.top_k > 0 and (TOPK in req.stats or TAIL in req.stats)
    want_ent = ENTROPY in req.stats
    fused = compiled_row_stats(compile_backend) if compiled else None
    ones = None
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (SAMPLED, "topk_vals", "topk_ids", TAIL, LSE, ENTROPY, EXTRA, FULL)}
    for s in range(0, rows, chunk_size):
        e = min(rows, s + chunk_size)
        l = torch.matmul(req.hidden[s:e], weight.t())           # raw logits, model dtype
        temp = None if req.temperature is None else req.temperature[s:e, None].float()
        if fused is not None and e - s > 1:  # (one row would specialise the compiled graph: eager)
            if temp is None:
                if ones is None or ones.shape[0] < e - s:
                    ones = torch.ones((chunk_size, 1), device=dev)
                t_arg = ones[: e - s]
            else:
                t_arg = temp
            lse, ent = fused(l, t_arg, softcap)
        else:
            lse, ent = _row_stats_eager(l, temp, softcap, want_ent)
        if LSE in req.stats:
            out[LSE].append(lse)
        if want_ent:
            out[ENTROPY].append(ent)
        _append_gathered(out, req, s, e, l, lse, softcap, temp)
        if want_k:
            raw, ids = topk_raw(l, req.top_k)
            vals = _transform(raw, softcap, temp) - lse[:, None]
            out["topk_vals"].append(vals)
            out["topk_ids"].append(ids)
            if TAIL in req.stats:
                out[TAIL].append(_tail(req, s, e, vals, ids, dev,
                                       lambda r: _transform(l.index_select(0, r), softcap,
                                                            None if temp is None else temp.index_select(0, r)) - lse[r, None]))
        elif TAIL in req.stats:
            out[TAIL].append(torch.zeros(e - s, device=dev))  # top_k = 0: everything is tail
    return {k: torch.cat(v) for k, v in out.items() if v}


def _head_statistics_kernels(req: HeadRequest, weight: torch.Tensor, chunk_size: int,
                             softcap: float | None) -> dict[str, torch.Tensor]:
    """`head_statistics` through the Triton kernels (`kernels.py`): per chunk one read of the raw
    logits for m, S (lse), A (entropy) and block maxima, a top-k among the best blocks, and one
    more read for the exact tail mass of every row. No host synchronisation."""
    rows = req.hidden.shape[0]
    dev = weight.device
    want_k = req.top_k > 0 and (TOPK in req.stats or TAIL in req.stats)
    want_ent = ENTROPY in req.stats
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (SAMPLED, "topk_vals", "topk_ids", TAIL, LSE, ENTROPY, EXTRA, FULL)}
    for s in range(0, rows, chunk_size):
        e = min(rows, s + chunk_size)
        l = torch.matmul(req.hidden[s:e], weight.t())           # raw logits, model dtype
        if l.stride(1) != 1:
            l = l.contiguous()
        t1 = None if req.temperature is None else req.temperature[s:e].float()
        temp = None if t1 is None else t1[:, None]
        blocks = want_k and use_blocks(l.shape[1], req.top_k)
        m, s_sum, a_sum, bmax = K.row_stats(l, t1, softcap, want_ent, blocks)
        log_s = s_sum.log()
        lse = m + log_s                                          # all -inf row: -inf (S = 0)
        if LSE in req.stats:
            out[LSE].append(lse)
        if want_ent:
            out[ENTROPY].append(log_s - a_sum / s_sum)
        _append_gathered(out, req, s, e, l, lse, softcap, temp)
        if want_k:
            raw, ids = topk_from_blocks(l, bmax, req.top_k) if blocks else torch.topk(l, req.top_k, dim=-1, sorted=True)
            out["topk_vals"].append(_transform(raw, softcap, temp) - lse[:, None])
            out["topk_ids"].append(ids)
            if TAIL in req.stats:
                k_row = req.row_k[s:e] if req.row_k is not None else torch.full((e - s,), req.top_k, device=dev)
                out[TAIL].append(K.tail_logmass(l, raw, k_row.clamp(max=req.top_k), m, s_sum, t1, softcap))
        elif TAIL in req.stats:
            out[TAIL].append(torch.zeros(e - s, device=dev))  # top_k = 0: everything is tail
    return {k: torch.cat(v) for k, v in out.items() if v}


def _tail(req: HeadRequest, s: int, e: int, vals: torch.Tensor, ids: torch.Tensor, dev, logp_rows) -> torch.Tensor:
    """log of the mass outside each row's own top-k. Cheap path: log(1 - sum p_topk) in float64
    from fp32 log-probs (relative error <= ~1e-7 / tail). Rows whose tail is below
    TAIL_EXACT_BELOW would cancel badly: they take the exact log-sum-exp over the complement
    instead (`logp_rows(rows)` gives their full log-prob rows)."""
    k_row = req.row_k[s:e] if req.row_k is not None else torch.full((e - s,), req.top_k, device=dev)
    cols = torch.arange(req.top_k, device=dev)[None, :]
    in_k = cols < k_row[:, None]
    covered = torch.where(in_k, vals.double().exp(), torch.zeros((), dtype=torch.float64, device=dev)).sum(-1)
    tail = torch.log1p(-covered.clamp(max=1.0)).float()
    small = covered > 1.0 - TAIL_EXACT_BELOW
    if bool(small.any()):
        rows_s = torch.nonzero(small).squeeze(1)
        sub = logp_rows(rows_s)
        masked_ids = torch.where(in_k[rows_s], ids[rows_s], ids[rows_s, :1])
        sub.scatter_(1, masked_ids, float("-inf"))
        tail[rows_s] = torch.logsumexp(sub, dim=-1)
    return tail


@torch.inference_mode()
def head_statistics_reference(req: HeadRequest, weight: torch.Tensor, chunk_size: int = 1024,
                              softcap: float | None = None, **_) -> dict[str, torch.Tensor]:
    """The former head (full fp32 passes over [chunk x vocab]); same outputs as `head_statistics`."""
    rows = req.hidden.shape[0]
    dev = weight.device
    temperature = req.temperature if req.temperature is not None else torch.ones(rows, device=dev)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (SAMPLED, "topk_vals", "topk_ids", TAIL, LSE, ENTROPY, EXTRA, FULL)}
    for s in range(0, rows, chunk_size):
        e = min(rows, s + chunk_size)
        logits = torch.matmul(req.hidden[s:e], weight.t()).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logits.div_(temperature[s:e, None])
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
                out[TAIL].append(_tail(req, s, e, vals, ids, dev, lambda r: logp.index_select(0, r)))
        elif TAIL in req.stats:
            out[TAIL].append(torch.zeros(e - s, device=dev))  # top_k = 0: everything is tail
    return {k: torch.cat(v) for k, v in out.items() if v}


HEADS = {"fast": head_statistics, "reference": head_statistics_reference}
