"""Closed-form per-chunk gradients for ``distill_loss`` (no autograd over [C, V] tensors).

Why: differentiating a detached chunk with autograd (``fused_head.autograd_chunk_fn``) keeps
log_softmax, exp, gather/scatter and their backward buffers -- several fp32 [C, V] tensors and
as many passes over them. Every loss here depends on the chunk's logits z only through a few
student log-probs, so its gradient has a closed form built from ONE softmax.

Derivation (per row; s = log_softmax(z), p = exp(s)). The student side of every term is a vector
of "category" log-probs: ``lS_i = s_{u_i}`` for support ids u_i (teacher top-k, plus student
top-M for union), the rest bucket ``lS_rest = log R`` with ``R = sum_{j not in U} p_j``, and the
sampled log-probs ``s_y`` (k1/k2/k3/pg/ppo) and ``s_y'`` (sft). With
``ds_u/dz_j = [u = j] - p_j`` and ``dlog R/dz_j = p_j [j not in U] / R - p_j``:

    dL/dz_j = p_j (G_rest / R * [j not in U] - Gtot) + sum_{i: u_i = j} G_i + d_y [y = j] + d_y' [y' = j]

where ``G_i = dL/dlS_i``, ``d = dL/ds_y`` and ``Gtot = sum_i G_i + G_rest + d_y + d_y'``. The
category gradients G are closed forms for every divergence (``divergences.ANALYTIC_CATEGORY_GRADS``:
elementwise ops on the small [C, U+1] category tensor: fewer small kernel launches per chunk than
autograd through the definitions); the d's are closed forms (``estimators.ESTIMATOR_GRADS``,
``policy_gradient_loss_with_grad``; sft: d = -1).
So dz is one dense scaled copy of the softmax plus at most U + 2 corrected columns per row.

Implementation (one fp32 [C, V] buffer + the [C, V] result in the weight's dtype, which the CUDA
kernels write into the same buffer): gather z at the sparse columns, then set the support
columns to -inf in place, so that everything dense is "off the support": R is a plain sum (no
cancellation in 1 - sum p_U) and the support's exact values come from the gathered columns.
Dense statistics per row: the max, ``S = sum exp(z - m)``, ``A = sum exp(z - m) (z - m)``
(entropy) and, for the top-k overlap metric, the max of every ``fused_kernels.SUB``-column block
(the student's top-k is then a top-k over the k best blocks, not a radix select over the whole
vocabulary: ``student_topk``). On CUDA ``fused_kernels.row_stats`` does this in one read of z
and ``fused_kernels.write_dz`` writes ``dz = exp(z - lse) * alpha`` in one more sweep; the eager
path (CPU, fallback) computes ``e = exp(z - m)`` in place and ``dz = e * alpha`` into the weight's
dtype. The sparse columns of dz are then overwritten with their exact fp32 values (duplicated
columns get the same value; each is computed from scratch, never as "dense value + correction",
since G_rest / R is huge when the rest bucket is nearly empty).
"""
from __future__ import annotations

import math

import torch

from . import fused_kernels
from .divergences import ANALYTIC_CATEGORY_GRADS, FULL_DIVERGENCES, NEG, support_categories
from .estimators import ESTIMATOR_GRADS, ESTIMATORS, policy_gradient_loss_with_grad

ENTROPY_BLOCK_ELEMS = 1 << 24  # entropy metric: temporaries of at most this many elements


def _category_grad(name, lT, lS, cfg):
    """(loss_C, dloss/dlS) for a divergence over categories: closed form, else (a divergence
    without one) autograd on the small category tensor."""
    if name in ANALYTIC_CATEGORY_GRADS:
        return ANALYTIC_CATEGORY_GRADS[name](lT, lS, cfg)
    leaf = lS.detach().requires_grad_(True)
    with torch.enable_grad():
        val = FULL_DIVERGENCES[name](lT, leaf, cfg)
        (g,) = torch.autograd.grad(val.sum(), leaf)
    return val.detach(), g


def _xlogx_sum(e_C_V):
    """sum_j e_j log e_j per row (0 log 0 = 0), in column blocks of bounded temporaries."""
    c, v = e_C_V.shape
    block = max(1, ENTROPY_BLOCK_ELEMS // max(1, c))
    acc = torch.zeros(c, dtype=e_C_V.dtype, device=e_C_V.device)
    for v0 in range(0, v, block):
        eb = e_C_V[:, v0:v0 + block]
        acc += torch.xlogy(eb, eb).sum(-1)
    return acc


def _block_max(z_C_V):
    """Max of every ``fused_kernels.SUB``-column block, [C, ceil(V / SUB)] (the last may be partial)."""
    sub = fused_kernels.SUB
    c, v = z_C_V.shape
    f = v // sub
    parts = [z_C_V[:, :f * sub].unflatten(-1, (f, sub)).amax(-1)] if f else []
    if v > f * sub:
        parts.append(z_C_V[:, f * sub:].amax(-1, keepdim=True))
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def student_topk(z_C_V, bmax_C_B, zu_C_U, ids_C_U, k):
    """The student's top-k ids per row, [C, k] (unordered), of logits whose support columns are -inf.

    ``zu_C_U`` / ``ids_C_U``: the support columns' exact values (-inf for duplicates) and ids, or
    None. With block maxima (``_block_max`` / the row-stats kernel) the candidates are the
    ``SUB``-column blocks with the k largest maxima -- every top-k element off the support lies in
    one of them (each block holding one has a maximum >= the k-th value, and there are at most k
    such blocks) -- plus the partial last block and the support columns: a [C, k SUB] top-k instead
    of one over the vocabulary. Without block maxima: a top-k of the whole row.
    """
    c, v = z_C_V.shape
    sub = fused_kernels.SUB
    f = v // sub
    parts = []
    if bmax_C_B is not None and f >= k:
        top_b = torch.topk(bmax_C_B[:, :f], k, dim=-1).indices  # full blocks only
        blocks = z_C_V[:, :f * sub].unflatten(-1, (f, sub))
        parts.append(blocks.gather(1, top_b.unsqueeze(-1).expand(c, k, sub)).flatten(1))
        parts.append(z_C_V[:, f * sub:])  # the partial last block, always a candidate
        n_dense = k * sub + (v - f * sub)
    else:
        top_b = None
        cand_v, cand_i = torch.topk(z_C_V, min(k, v), dim=-1)
        parts.append(cand_v)
        n_dense = cand_v.shape[1]
    if zu_C_U is not None:
        parts.append(zu_C_U)
    allv = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
    pos = torch.topk(allv, k, dim=-1).indices
    if top_b is not None:
        in_blocks = pos < k * sub
        pb = pos.clamp_max(k * sub - 1)
        dense_ids = torch.where(in_blocks, top_b.gather(1, pb // sub) * sub + pb % sub, f * sub + (pos - k * sub))
    else:
        dense_ids = cand_i.gather(1, pos.clamp_max(n_dense - 1))
    if zu_C_U is None:
        return dense_ids
    sup_ids = ids_C_U.gather(1, (pos - n_dense).clamp(0, ids_C_U.shape[1] - 1))
    return torch.where(pos < n_dense, dense_ids, sup_ids)


def make_analytic_chunk_fn(*, terms, cfg, stats, support, targets, sft_targets, t_sampled, pg_adv,
                           old_logp, adv_in, metric_names, out_dtype):
    """A ``fused_head`` ChunkFn computing the loss, dz (in ``out_dtype``) and metrics in closed form.

    ``support`` is ``"topk"``, ``"union"`` or None (no teacher distribution in this call); the
    ``"full"`` support stays on the autograd path. Arguments mirror ``distill_loss``'s locals
    (already restricted to the kept rows).
    """
    div_terms = [(n, w) for n, w in terms if n in FULL_DIVERGENCES]
    samp_terms = [(n, w) for n, w in terms if n in ("k1", "k2", "k3", "pg", "ppo")]
    sft_w = sum(w for n, w in terms if n == "sft")
    has_sft = any(n == "sft" for n, _ in terms)
    need_y = bool(samp_terms) or "k3_reverse_kl" in metric_names
    if div_terms and support is None:
        raise ValueError("divergence terms need a teacher support")

    def chunk_fn(z, rows, coef_g):
        c = z.shape[0]
        dt = z.dtype
        cg = coef_g.to(dt)
        st = stats.select(rows) if stats is not None else None

        # -- sparse columns, gathered from the logits before the buffer is overwritten
        cols, n_u = [], 0
        lT = valid = None
        if support is not None:
            ids, lT, valid = support_categories(st, support, dt)
            cols.append(ids)
            n_u = ids.shape[1]
        if need_y:
            cols.append(targets[rows].unsqueeze(-1))
        if has_sft:
            cols.append(sft_targets[rows].unsqueeze(-1))
        cols = torch.cat(cols, -1) if len(cols) > 1 else cols[0]
        z_cols = z.gather(-1, cols)

        # -- dense statistics off the support: the support columns are set to -inf in place (their
        # exact values are in z_cols), so R (the rest bucket) is a plain sum, never 1 - sum p_U.
        ids = cols[:, :n_u] if n_u else None
        if n_u:
            z.scatter_(-1, ids, -math.inf)
        use_k = fused_kernels.available(z)
        want_ent = "entropy" in metric_names
        k_top = st.topk_ids.shape[-1] if "topk_overlap" in metric_names else 0
        zu_v = None
        if n_u:
            zu_v = z_cols[:, :n_u] if valid is None else z_cols[:, :n_u].masked_fill(~valid, -math.inf)
        if use_k:  # one read of z: max, sum exp, entropy sum and block maxima
            m_rest, s_rest, a_rest, bmax = fused_kernels.row_stats(z, want_ent, k_top > 0)
        else:
            bmax = _block_max(z) if k_top and z.shape[1] // fused_kernels.SUB >= k_top else None
            m_rest = z.amax(-1) if bmax is None else bmax.amax(-1)
        m_rs = torch.where(m_rest > -math.inf, m_rest, torch.zeros_like(m_rest))
        s_top = student_topk(z, bmax, zu_v, ids, k_top) if k_top else None  # before z is overwritten
        e = None
        if not use_k:  # eager: e = exp(z - m_rest) in place (0 on the support)
            e = z.sub_(m_rs.unsqueeze(-1)).exp_()
            s_rest = e.sum(-1)
            a_rest = _xlogx_sum(e) if want_ent else None
        e_src = z if use_k else None
        del z
        # combine with the exact support values; everything below is relative to the row max m
        m = torch.maximum(m_rest, zu_v.amax(-1)) if n_u else m_rs
        c_rest = torch.exp(m_rest - m)  # 0 when the whole row is on the support
        e_cols = torch.exp(z_cols - m.unsqueeze(-1))
        if n_u:
            r_e = s_rest * c_rest
            e_u_valid = e_cols[:, :n_u] if valid is None else e_cols[:, :n_u].masked_fill(~valid, 0.0)
            ssum = r_e + e_u_valid.sum(-1)
        else:
            r_e = None
            ssum = s_rest
        log_ssum = ssum.log()
        lse = m + log_ssum
        s_cols = z_cols - lse.unsqueeze(-1)  # exact student log-probs at the sparse columns
        p_cols = e_cols / ssum.unsqueeze(-1)
        entropy = None
        if want_ent:  # H = log S - sum_j e_j (z_j - m) / S, e = exp(z - m)
            ez = torch.where(s_rest > 0, c_rest * (a_rest + (m_rs - m) * s_rest), torch.zeros_like(s_rest))
            if n_u:
                ez = ez + (e_u_valid * (z_cols[:, :n_u] - m.unsqueeze(-1)).masked_fill(e_u_valid == 0, 0.0)).sum(-1)
            entropy = log_ssum - ez / ssum

        loss = torch.zeros(c, dtype=dt, device=z_cols.device)
        # -- divergence terms over the categories
        G = None
        lS = None
        if n_u:
            s_u = s_cols[:, :n_u]
            if valid is not None:
                s_u = torch.where(valid, s_u, torch.full_like(s_u, NEG))
            # log R from the rest's own max and sum: exact however small R is (r_e = s_rest *
            # exp(m_rest - m) underflows once the rest is e^-104 below the support)
            lS_rest = torch.where(s_rest > 0, m_rs + s_rest.clamp_min(1.0).log() - lse, torch.full_like(r_e, NEG))
            lS = torch.cat([s_u, lS_rest.unsqueeze(-1)], -1)
            for name, tw in div_terms:
                val, g = _category_grad(name, lT, lS, cfg)
                loss = loss + tw * val
                G = tw * g if G is None else G + tw * g
            if G is not None and valid is not None:
                G = G * torch.cat([valid, torch.ones_like(valid[:, :1])], -1)

        # -- sampled-token terms: d(loss)/d(log pS(y))
        d_y = d_s = None
        logp_y = s_cols[:, n_u] if need_y else None
        for name, tw in samp_terms:
            lt = t_sampled[rows].to(dt) if name in ESTIMATORS or name == "pg" else None
            if name in ESTIMATORS:
                val, d = ESTIMATORS[name](logp_y, lt), ESTIMATOR_GRADS[name](logp_y, lt)
            else:
                if name == "pg":
                    a = pg_adv[rows].to(dt) if pg_adv is not None else -(logp_y - lt)
                else:
                    a = adv_in[rows].to(dt)
                val, d = policy_gradient_loss_with_grad(
                    logp_y, a, None if old_logp is None else old_logp[rows].to(dt), cfg.clip_eps)
            loss = loss + tw * val
            d_y = tw * d if d_y is None else d_y + tw * d
        if has_sft:
            loss = loss - sft_w * s_cols[:, -1]
            d_s = torch.full_like(loss, -sft_w)

        # -- metrics, from the same softmax
        met = None
        if metric_names:
            met = _metrics(entropy, s_top, p_cols, st, lT, lS, logp_y, metric_names)

        # -- dz = e * alpha (dense) with exact values at the sparse columns
        Gc = G * cg.unsqueeze(-1) if G is not None else None
        gtot = torch.zeros_like(loss)
        if Gc is not None:
            gtot = gtot + Gc.sum(-1)
        if d_y is not None:
            d_y = d_y * cg
            gtot = gtot + d_y
        if d_s is not None:
            d_s = d_s * cg
            gtot = gtot + d_s
        # Off the support dz_j = p_j (G_rest / R - gtot) = e_j * dense, with e_j = exp(z_j - m_rest),
        # p_j = e_j exp(m_rest - lse) and p_j / R = e_j / s_rest: no division by a tiny R, so the pull
        # toward the teacher's rest mass stays exact however little the student leaves there.
        g_rest = torch.zeros_like(loss)
        if Gc is not None:
            g_rest = torch.where(s_rest > 0, Gc[:, -1] / s_rest.clamp_min(1.0), torch.zeros_like(s_rest))
        c_p = torch.where(s_rest > 0, torch.exp(m_rs - lse), torch.zeros_like(lse))  # p_j = e_j * c_p
        dense = g_rest - c_p * gtot
        # Sparse columns: dz_j = p_j * (-gtot if j in U else the dense value) + the additive terms
        # of every entry naming j (G_i for support categories, d_y, d_y'). Written from scratch,
        # never as "dense value + correction". The support columns hold 0 after the dense pass
        # (z was -inf there), so each support id gets its one valid entry by a scatter-add in
        # which duplicates (union extras already in the top-k, padding slots) add exactly 0;
        # then the sampled columns are overwritten with everything naming them summed in.
        du = None
        if n_u:
            du = Gc[:, :-1] if Gc is not None else torch.zeros_like(p_cols[:, :n_u])
            if valid is not None:
                du = du.masked_fill(~valid, 0.0)
            ex_u = p_cols[:, :n_u] * (-gtot).unsqueeze(-1) + du
            if valid is not None:
                ex_u = ex_u.masked_fill(~valid, 0.0)
        if use_k:  # dz = exp(z - m_rest) * dense, one sweep, in the weight's dtype (in place if enabled)
            out = fused_kernels.write_dz(e_src, m_rs, dense, out_dtype)
        else:  # e = exp(z - m_rest)
            out = e if out_dtype == dt else torch.empty(e.shape, dtype=out_dtype, device=e.device)
            torch.mul(e, dense.unsqueeze(-1), out=out)
        del e, e_src
        if n_u:
            out.scatter_add_(-1, cols[:, :n_u], ex_u.to(out_dtype))
        if cols.shape[1] > n_u:
            sc = cols[:, n_u:]
            deltas = [] if du is None else [du]
            if need_y:
                deltas.append((d_y if d_y is not None else torch.zeros_like(loss)).unsqueeze(-1))
            if has_sft:
                deltas.append(d_s.unsqueeze(-1))
            delta = torch.cat(deltas, -1) if len(deltas) > 1 else deltas[0]
            same = sc.unsqueeze(-1) == cols.unsqueeze(-2)  # [C, <=2, n]
            # off the support: p_y (G_rest / R - gtot), with p_y / R = exp(z_y - m_rest) / s_rest
            rest_part = torch.exp(z_cols[:, n_u:] - m_rs.unsqueeze(-1)) * g_rest.unsqueeze(-1)
            if n_u:
                rest_part = rest_part.masked_fill(same[:, :, :n_u].any(-1), 0.0)
            ex_s = p_cols[:, n_u:] * (-gtot).unsqueeze(-1) + rest_part + (same.to(dt) * delta.unsqueeze(-2)).sum(-1)
            out.scatter_(-1, sc, ex_s.to(out_dtype))
        return loss, out, met

    return chunk_fn


def _metrics(entropy, s_top, p_cols, st, lT, lS, logp_y, names):
    cols = []
    for name in names:
        if name == "entropy":
            cols.append(entropy)
        elif name in ("forward_kl", "reverse_kl"):
            cols.append(FULL_DIVERGENCES[name](lT, lS, None))
        elif name == "s_mass_on_t_topk":
            pk = p_cols[:, :st.topk_ids.shape[-1]]
            cols.append((pk if st.topk_pad is None else pk.masked_fill(st.topk_pad, 0.0)).sum(-1))
        elif name == "topk_overlap":
            hit = (s_top.unsqueeze(-1) == st.topk_ids.unsqueeze(-2)).any(-1)
            cols.append(hit.to(p_cols.dtype).mean(-1))
        elif name == "k3_reverse_kl":
            cols.append(ESTIMATORS["k3"](logp_y, st.sampled_logprob.to(p_cols.dtype)))
    return torch.stack(cols, -1)
