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
category gradients G are closed forms for forward/reverse KL (``divergences.ANALYTIC_CATEGORY_GRADS``)
and autograd on the small [C, U+1] category tensor for JSD / skew KLs / TV; the d's are closed
forms (``estimators.ESTIMATOR_GRADS``, ``policy_gradient_loss_with_grad``; sft: d = -1).
So dz is one dense scaled copy of the softmax plus at most U + 2 corrected columns per row.

Implementation (one fp32 [C, V] buffer + the [C, V] result in the weight's dtype):
gather z at the sparse columns; ``e = exp(z - max)`` in place; R from the same buffer (zero the
support columns, sum, put them back: no cancellation in 1 - sum p_U); metrics from e (entropy in
column blocks); then ``dz = e * alpha`` written straight into the weight's dtype and the sparse
columns overwritten with their exact fp32 values (duplicated columns get the same value; each is
computed from scratch, never as "dense value + correction", since G_rest / R is huge when the
rest bucket is nearly empty).
"""
from __future__ import annotations

import torch

from .divergences import ANALYTIC_CATEGORY_GRADS, FULL_DIVERGENCES, NEG, support_categories
from .estimators import ESTIMATOR_GRADS, ESTIMATORS, policy_gradient_loss_with_grad

ENTROPY_BLOCK_ELEMS = 1 << 24  # entropy metric: temporaries of at most this many elements


def _category_grad(name, lT, lS, cfg):
    """(loss_C, dloss/dlS) for a divergence over categories: closed form or small autograd."""
    if name in ANALYTIC_CATEGORY_GRADS:
        return ANALYTIC_CATEGORY_GRADS[name](lT, lS)
    leaf = lS.detach().requires_grad_(True)
    with torch.enable_grad():
        val = FULL_DIVERGENCES[name](lT, leaf, cfg)
        (g,) = torch.autograd.grad(val.sum(), leaf)
    return val.detach(), g


def _entropy_from_exp(e_C_V, log_ssum_C, ssum_C):
    """H = log S - sum(e log e) / S for e = exp(z - max), S = sum e; column blocks bound temps."""
    c, v = e_C_V.shape
    block = max(1, ENTROPY_BLOCK_ELEMS // max(1, c))
    acc = torch.zeros(c, dtype=e_C_V.dtype, device=e_C_V.device)
    for v0 in range(0, v, block):
        eb = e_C_V[:, v0:v0 + block]
        acc += torch.xlogy(eb, eb).sum(-1)
    return log_ssum_C - acc / ssum_C


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

        # -- softmax, in place: e = exp(z - m); R_e = sum of e off the support
        m = z.amax(-1)
        e = z.sub_(m.unsqueeze(-1)).exp_()
        del z
        e_cols = e.gather(-1, cols)
        if n_u:
            ids = cols[:, :n_u]
            e_u = e_cols[:, :n_u]
            e.scatter_(-1, ids, 0.0)
            r_e = e.sum(-1)
            e.scatter_(-1, ids, e_u)
            e_u_valid = e_u if valid is None else e_u.masked_fill(~valid, 0.0)
            ssum = r_e + e_u_valid.sum(-1)
        else:
            r_e = None
            ssum = e.sum(-1)
        log_ssum = ssum.log()
        lse = m + log_ssum
        s_cols = z_cols - lse.unsqueeze(-1)  # exact student log-probs at the sparse columns
        p_cols = e_cols / ssum.unsqueeze(-1)

        loss = torch.zeros(c, dtype=dt, device=e.device)
        # -- divergence terms over the categories
        G = None
        lS = None
        if n_u:
            s_u = s_cols[:, :n_u]
            if valid is not None:
                s_u = torch.where(valid, s_u, torch.full_like(s_u, NEG))
            lS_rest = torch.where(r_e > 0, r_e.log() - log_ssum, torch.full_like(r_e, NEG))
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
            met = _metrics(e, ssum, log_ssum, p_cols, st, lT, lS, logp_y, metric_names)

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
        if Gc is not None:  # G_rest / R, with R = r_e / ssum
            ratio = torch.where(r_e > 0, Gc[:, -1] * ssum / r_e.clamp_min(torch.finfo(dt).tiny),
                                torch.zeros_like(r_e))
        else:
            ratio = torch.zeros_like(loss)
        dense = ratio - gtot  # dz_j = p_j * dense off the support and the sampled columns
        # Sparse columns: dz_j = p_j * (-gtot if j in U else dense) + the additive terms of every
        # entry naming j (G_i for support categories, d_y, d_y'). Written from scratch, never as
        # "dense value + correction": G_rest / R is huge when the rest bucket is nearly empty.
        # Scatter order makes repeated columns right without a [C, n, n] comparison: union extras
        # first (a duplicate of a top-k id is then overwritten by the top-k entry), then the
        # top-k ids (distinct), then the sampled columns with everything naming them summed in.
        n_k = st.topk_ids.shape[1] if n_u else 0
        du = None
        if n_u:
            du = Gc[:, :-1] if Gc is not None else torch.zeros_like(p_cols[:, :n_u])
            if valid is not None:
                du = du.masked_fill(~valid, 0.0)
            ex_u = p_cols[:, :n_u] * (-gtot).unsqueeze(-1) + du
        alpha = (dense / ssum).unsqueeze(-1)
        out = e if out_dtype == dt else torch.empty(e.shape, dtype=out_dtype, device=e.device)
        torch.mul(e, alpha, out=out)
        del e
        if n_u > n_k:
            out.scatter_(-1, cols[:, n_k:n_u], ex_u[:, n_k:].to(out_dtype))
        if n_u:
            out.scatter_(-1, cols[:, :n_k], ex_u[:, :n_k].to(out_dtype))
        if cols.shape[1] > n_u:
            sc = cols[:, n_u:]
            deltas = [] if du is None else [du]
            if need_y:
                deltas.append((d_y if d_y is not None else torch.zeros_like(loss)).unsqueeze(-1))
            if has_sft:
                deltas.append(d_s.unsqueeze(-1))
            delta = torch.cat(deltas, -1) if len(deltas) > 1 else deltas[0]
            same = sc.unsqueeze(-1) == cols.unsqueeze(-2)  # [C, <=2, n]
            base = dense.unsqueeze(-1).expand_as(sc)
            if n_u:
                base = torch.where(same[:, :, :n_u].any(-1), -gtot.unsqueeze(-1), base)
            ex_s = p_cols[:, n_u:] * base + (same.to(dt) * delta.unsqueeze(-2)).sum(-1)
            out.scatter_(-1, sc, ex_s.to(out_dtype))
        return loss, out, met

    return chunk_fn


def _metrics(e, ssum, log_ssum, p_cols, st, lT, lS, logp_y, names):
    cols = []
    for name in names:
        if name == "entropy":
            cols.append(_entropy_from_exp(e, log_ssum, ssum))
        elif name in ("forward_kl", "reverse_kl"):
            cols.append(FULL_DIVERGENCES[name](lT, lS, None))
        elif name == "s_mass_on_t_topk":
            cols.append(p_cols[:, :st.topk_ids.shape[-1]].sum(-1))
        elif name == "topk_overlap":
            k = st.topk_ids.shape[-1]
            s_top = torch.topk(e, k, dim=-1, sorted=False).indices
            hit = (s_top.unsqueeze(-1) == st.topk_ids.unsqueeze(-2)).any(-1)
            cols.append(hit.to(e.dtype).mean(-1))
        elif name == "k3_reverse_kl":
            cols.append(ESTIMATORS["k3"](logp_y, st.sampled_logprob.to(e.dtype)))
    return torch.stack(cols, -1)
