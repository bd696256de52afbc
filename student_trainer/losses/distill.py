"""The trainer's entry point: ``distill_loss`` (one fused-head pass for every loss term).

Flow: row weights (mask x sample weights) -> reduction coefficients over ALL rows -> keep only
rows with weight > 0 (before the head: excluded rows cost no compute) -> one chunked pass of
``fused_head_loss`` whose per-chunk loss is ``sum_terms w_term * term(z_chunk, stats_chunk)``,
differentiated locally per chunk -> scalar loss + metrics.

Per-chunk gradient: in closed form from one in-place softmax (``analytic.py``) for the top-k and
union supports and every term (on CUDA the dense [C, V] work is two Triton sweeps,
``fused_kernels.py``; switch: ``OPD_LOSS_KERNELS=auto|triton|eager``); the ``"full"`` support (exact mode, small vocabularies) uses
autograd on the detached chunk (``fused_head.autograd_chunk_fn``). ``GRAD_MODE = "autograd"``
forces the autograd path everywhere (the tests' reference).

A micro-batch with no kept rows still returns a loss attached to ``hidden`` and ``weight``
(value 0, zero gradients), so every data-parallel rank runs the same backward collectives.

Temperature: the student's logits are divided by ``cfg.temperature`` before every log-softmax,
exactly as the teacher server does for the statistics it sends; the two must match.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .analytic import make_analytic_chunk_fn
from .divergences import FULL_DIVERGENCES, coarse_logprobs, resolve_support
from .estimators import ESTIMATORS, floor_teacher, opd_advantages, policy_gradient_loss, sampled_logprob
from .fused_head import autograd_chunk_fn, fused_head_loss, map_chunks
from .reductions import REDUCTIONS, row_coefficients
from .stats import TeacherStats

SAMPLED_TERMS = ("k1", "k2", "k3", "pg", "ppo", "sft")
GRAD_MODE = "analytic"  # "analytic" (closed form where available) | "autograd" (reference)
ALL_TERMS = tuple(FULL_DIVERGENCES) + SAMPLED_TERMS


@dataclass(frozen=True)
class DistillLossConfig:
    divergence: str = "reverse_kl"      # one term of ALL_TERMS, used when ``terms`` is empty
    terms: tuple = ()                   # ((term, weight), ...): a mix (see schedules.py)
    support: str = "auto"               # auto | topk | union | full (see divergences.py)
    temperature: float = 1.0
    beta: float = 0.5                   # jsd: m = beta pT + (1-beta) pS (TRL convention)
    skew_alpha: float = 0.1             # skew KLs
    gamma: float = 0.0                  # pg: discount of the per-token advantage
    clip_eps: float = 0.2               # pg/ppo: ratio clip when old log-probs are given
    chunk_size: int = 1024
    reduction: str = "token_mean"       # token_mean | seq_mean | sum (see reductions.py)
    fp32_weight_grad: bool = True       # accumulate grad_W in fp32 (V x H x 4 bytes)
    metrics: bool = True                # entropy, KLs, overlap, top-k mass in the same pass

    def resolved_terms(self) -> tuple:
        terms = tuple(self.terms) if self.terms else ((self.divergence, 1.0),)
        for name, _ in terms:
            if name not in ALL_TERMS:
                raise ValueError(f"DistillLossConfig: unknown term {name!r}; valid: {', '.join(ALL_TERMS)}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"DistillLossConfig.reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        return terms


def _need(name, value, term):
    if value is None:
        raise ValueError(f"loss term {term!r} needs {name}")
    return value


def distill_loss(
    hidden_N_H: torch.Tensor,
    weight_V_H: torch.Tensor,
    targets_N: torch.Tensor,
    stats: TeacherStats | None,
    mask_N: torch.Tensor | None = None,
    cfg: DistillLossConfig = DistillLossConfig(),
    global_tokens=None,
    *,
    seq_ids_N: torch.Tensor | None = None,
    global_seqs=None,
    rollout_logprobs_N: torch.Tensor | None = None,
    advantages_N: torch.Tensor | None = None,
    sft_targets_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Loss and metrics for N scored rows; see DistillLossConfig for the knobs.

    ``mask_N``: per-row weights (0 = excluded; may carry reward/PACED sample weights).
    ``global_tokens``: rows with weight > 0 over the whole optimiser step (``global_token_count``);
    defaults to this call's count. ``rollout_logprobs_N``: the student's log-probs when the rollout
    was sampled (pg: advantage source and importance ratio; ppo: old log-probs).
    ``advantages_N``: ppo advantages (e.g. GRPO, broadcast to tokens). ``sft_targets_N``: sft
    labels (default ``targets_N``).
    """
    terms = cfg.resolved_terms()
    names = [n for n, _ in terms]
    vocab = weight_V_H.shape[0]
    w = torch.ones(hidden_N_H.shape[0], device=hidden_N_H.device) if mask_N is None else mask_N.float()
    coef = row_coefficients(w, cfg.reduction, global_tokens, seq_ids_N, global_seqs)

    keep = w > 0
    if bool(keep.all()):  # nothing to drop: skip the gather and its scatter in backward
        sel = lambda x: x  # noqa: E731
        rows = slice(None)
    else:
        rows = torch.nonzero(keep).squeeze(-1)
        sel = lambda x: None if x is None else x.index_select(0, rows)  # noqa: E731
    h, tgt, coef, w = sel(hidden_N_H), sel(targets_N), sel(coef), sel(w)
    seq_ids, old_logp, adv_in = sel(seq_ids_N), sel(rollout_logprobs_N), sel(advantages_N)
    sft_tgt = tgt if sft_targets_N is None else sel(sft_targets_N)

    support = None
    if stats is not None:
        stats.validate(vocab)
        stats = stats.select(rows)
        if any(n in FULL_DIVERGENCES for n in names) or (cfg.metrics and stats.topk_ids is not None) \
                or stats.full_logprobs is not None:
            support = resolve_support(stats, cfg.support)
    elif any(n not in ("ppo", "sft") for n in names):
        raise ValueError(f"loss terms {names} need TeacherStats")
    t_sampled = None
    if any(n in ("k1", "k2", "k3", "pg") for n in names):
        # floored like the divergences' teacher log-probs: a -inf teacher gives finite values
        t_sampled = floor_teacher(_need("TeacherStats.sampled_logprob", stats.sampled_logprob, "k*/pg").float())
    if "ppo" in names:
        _need("advantages_N", adv_in, "ppo")

    pg_adv = None
    if "pg" in names and (cfg.gamma != 0.0 or old_logp is not None):
        # The discounted advantage couples rows across chunks: compute it before the pass,
        # from the rollout's log-probs when given, else from a no-grad pass of the head.
        logp_s = old_logp if old_logp is not None else map_chunks(
            h, weight_V_H, lambda z, r: sampled_logprob(z, tgt[r]),
            chunk_size=cfg.chunk_size, temperature=cfg.temperature)
        pg_adv = opd_advantages(logp_s.float(), t_sampled, seq_ids, cfg.gamma)

    metric_names = []
    if cfg.metrics:
        metric_names = ["entropy"]
        if support is not None:
            metric_names += ["forward_kl", "reverse_kl"]
            if stats.topk_ids is not None:
                metric_names += ["s_mass_on_t_topk", "topk_overlap"]
        if stats is not None and stats.sampled_logprob is not None:
            metric_names += ["k3_reverse_kl"]

    def row_loss(z, r):
        st = stats.select(r) if stats is not None else None
        lT = lS = logp_y = None
        if support is not None:
            lT, lS = coarse_logprobs(z, st, support)
        if any(n in ("k1", "k2", "k3", "pg", "ppo") for n in names) or "k3_reverse_kl" in metric_names:
            logp_y = sampled_logprob(z, tgt[r])
        loss = z.new_zeros(z.shape[0])
        for name, tw in terms:
            if name in FULL_DIVERGENCES:
                term = FULL_DIVERGENCES[name](lT, lS, cfg)
            elif name in ESTIMATORS:
                term = ESTIMATORS[name](logp_y, t_sampled[r].to(z.dtype))
            elif name == "pg":
                a = pg_adv[r] if pg_adv is not None else -(logp_y.detach() - t_sampled[r].to(z.dtype))
                term = policy_gradient_loss(logp_y, a.to(z.dtype), None if old_logp is None else old_logp[r],
                                            cfg.clip_eps)
            elif name == "ppo":
                term = policy_gradient_loss(logp_y, adv_in[r].to(z.dtype),
                                            None if old_logp is None else old_logp[r], cfg.clip_eps)
            else:  # sft
                term = -sampled_logprob(z, sft_tgt[r])
            loss = loss + tw * term
        met = None
        if metric_names:
            with torch.no_grad():
                met = _chunk_metrics(z.detach(), st, lT, lS, logp_y, metric_names)
        return loss, met

    if GRAD_MODE not in ("analytic", "autograd"):
        raise ValueError(f"distill.GRAD_MODE must be 'analytic' or 'autograd', got {GRAD_MODE!r}")
    if GRAD_MODE == "analytic" and support != "full":
        chunk_fn = make_analytic_chunk_fn(
            terms=terms, cfg=cfg, stats=stats, support=support, targets=tgt, sft_targets=sft_tgt,
            t_sampled=t_sampled, pg_adv=pg_adv, old_logp=old_logp, adv_in=adv_in,
            metric_names=metric_names, out_dtype=weight_V_H.dtype)
    else:
        chunk_fn = autograd_chunk_fn(row_loss)
    total, loss_rows, met_rows = fused_head_loss(
        h, weight_V_H, coef, chunk_fn, chunk_size=cfg.chunk_size,
        temperature=cfg.temperature, fp32_weight_grad=cfg.fp32_weight_grad)

    with torch.no_grad():
        wsum = w.double().sum().clamp_min(1e-12)
        metrics = {"loss_row_mean": (loss_rows.double() * w).sum() / wsum,
                   "tokens": (w > 0).sum()}
        for j, name in enumerate(metric_names):
            col = met_rows[:, j].double() if met_rows.shape[1] else w.double() * 0
            metrics[name] = (col * w).sum() / wsum
    return total, metrics


def _chunk_metrics(z, st, lT, lS, logp_y, names):
    cols = []
    ls = torch.log_softmax(z, dim=-1)
    for name in names:
        if name == "entropy":
            cols.append(-(ls.exp() * ls).sum(-1))
        elif name == "forward_kl":
            cols.append(FULL_DIVERGENCES["forward_kl"](lT.detach(), lS.detach(), None))
        elif name == "reverse_kl":
            cols.append(FULL_DIVERGENCES["reverse_kl"](lT.detach(), lS.detach(), None))
        elif name == "s_mass_on_t_topk":
            pk = ls.gather(-1, st.topk_ids).exp()
            cols.append((pk if st.topk_pad is None else pk.masked_fill(st.topk_pad, 0.0)).sum(-1))
        elif name == "topk_overlap":
            k = st.topk_ids.shape[-1]
            s_top = torch.topk(z, k, dim=-1).indices
            hit = (s_top.unsqueeze(-1) == st.topk_ids.unsqueeze(-2)).any(-1)
            cols.append(hit.to(z.dtype).mean(-1))
        elif name == "k3_reverse_kl":
            lt = st.sampled_logprob.to(z.dtype)
            cols.append(ESTIMATORS["k3"](logp_y.detach(), lt))
    return torch.stack(cols, -1)


def sft_loss(hidden_N_H, weight_V_H, targets_N, mask_N=None, global_tokens=None, *,
             chunk_size: int = 1024, temperature: float = 1.0, reduction: str = "token_mean"):
    """Chunked NLL of ``targets_N`` through the same fused head (no teacher)."""
    cfg = DistillLossConfig(divergence="sft", chunk_size=chunk_size, temperature=temperature,
                            reduction=reduction, metrics=False)
    return distill_loss(hidden_N_H, weight_V_H, targets_N, None, mask_N, cfg, global_tokens)
