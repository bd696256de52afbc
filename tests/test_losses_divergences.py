"""Divergences through the fused head vs a naive float64 reference written from the definitions.

The reference materialises the full logits, builds the coarsened (support + rest bucket)
distributions row by row with Python sets, and uses plain autograd: deliberately independent
of student_trainer.losses.
"""
import math

import pytest
import torch

from student_trainer.losses import DistillLossConfig, TeacherStats, distill_loss, student_topk_ids

DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"]


def make_problem(n=7, v=37, h=6, k=5, m=None, temperature=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) * 0.7
    t_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0
    t_lp = torch.log_softmax(t_logits / temperature, -1)
    top = torch.topk(t_lp, k, -1)
    ids, order = top.indices.sort(-1)
    lp = top.values.gather(-1, order)
    tail = torch.logsumexp(t_lp.scatter(-1, ids, -math.inf), -1)
    s_lp = torch.log_softmax((hidden.double() @ weight.double().T) / temperature, -1)
    targets = torch.multinomial(s_lp.exp(), 1, generator=g).squeeze(-1)
    stats = TeacherStats(ids, lp.float() if dtype != torch.float64 else lp, tail,
                         t_lp.gather(-1, targets[:, None]).squeeze(-1), full_logprobs=t_lp)
    if m:
        s_ids = student_topk_ids(hidden, weight, m, temperature)
        stats.s_topk_ids, stats.extra_logprobs = s_ids, t_lp.gather(-1, s_ids)
    return hidden, weight, targets, stats, t_lp


def _kl(p, q):
    return sum(pi * (pi.log() - qi.log()) for pi, qi in zip(p, q) if pi.item() > 0)


def ref_row(name, P, Q, beta=0.5, alpha=0.1):
    """P teacher, Q student: lists of 0-dim float64 tensors (Q differentiable)."""
    if name == "forward_kl":
        return _kl(P, Q)
    if name == "reverse_kl":
        return _kl(Q, P)
    if name == "jsd":
        Mx = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
        return beta * _kl(P, Mx) + (1 - beta) * _kl(Q, Mx)
    if name == "skew_forward_kl":
        return _kl(P, [alpha * p + (1 - alpha) * q for p, q in zip(P, Q)])
    if name == "skew_reverse_kl":
        return _kl(Q, [alpha * q + (1 - alpha) * p for p, q in zip(P, Q)])
    if name == "tv":
        return 0.5 * sum((p - q).abs() for p, q in zip(P, Q))
    raise KeyError(name)


def ref_loss(name, hidden, weight, stats, t_lp, support, temperature=1.0, weights=None):
    z = (hidden @ weight.T) / temperature
    s_p = torch.softmax(z, -1)
    total = 0.0
    for r in range(hidden.shape[0]):
        if support == "full":
            U = list(range(weight.shape[0]))
        else:
            U = [int(i) for i in stats.topk_ids[r]]
            if support == "union":
                U += [int(i) for i in stats.s_topk_ids[r] if int(i) not in U]
        P = [t_lp[r, i].exp() for i in U]
        Q = [s_p[r, i] for i in U]
        if support != "full":
            p_tail = stats.tail_logmass[r].exp()
            extra = sum(P[stats.topk_ids.shape[1]:], torch.zeros((), dtype=torch.float64))
            P.append(torch.maximum(p_tail - extra, 1e-3 * p_tail))
            Q.append(1 - sum(Q))
        wr = 1.0 if weights is None else float(weights[r])
        total = total + wr * ref_row(name, P, Q)
    return total / (hidden.shape[0] if weights is None else float((weights > 0).sum()))


def _grads(loss, hidden, weight):
    return torch.autograd.grad(loss, (hidden, weight))


@pytest.mark.parametrize("support", ["topk", "union", "full"])
@pytest.mark.parametrize("name", DIVS)
def test_divergence_and_grads_match_reference(name, support):
    hidden, weight, targets, stats, t_lp = make_problem(m=4 if support == "union" else None,
                                                        temperature=1.3)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    cfg = DistillLossConfig(divergence=name, support=support, chunk_size=3, temperature=1.3)  # 7 % 3 != 0
    loss, _ = distill_loss(hidden, weight, targets, stats, None, cfg)
    ref = ref_loss(name, hidden, weight, stats, t_lp, support, temperature=1.3)
    torch.testing.assert_close(loss, ref, atol=1e-9, rtol=1e-7)
    for a, b in zip(_grads(loss, hidden, weight), _grads(ref, hidden, weight)):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", DIVS)
def test_chunk_size_invariance(name):
    hidden, weight, targets, stats, _ = make_problem(n=11, m=3)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = []
    for c in (1, 4, 64):
        loss, _ = distill_loss(hidden, weight, targets, stats, None,
                               DistillLossConfig(divergence=name, chunk_size=c))
        out.append((loss, *_grads(loss, hidden, weight)))
    for o in out[1:]:
        for a, b in zip(out[0], o):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", DIVS)
def test_topk_with_k_equal_vocab_is_exact(name):
    v = 23
    hidden, weight, targets, stats, _ = make_problem(v=v, k=v)
    assert torch.isinf(stats.tail_logmass).all()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    res = {}
    for support in ("topk", "full"):
        loss, _ = distill_loss(hidden, weight, targets, stats, None,
                               DistillLossConfig(divergence=name, support=support, chunk_size=5))
        res[support] = (loss, *_grads(loss, hidden, weight))
    for a, b in zip(res["topk"], res["full"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_reverse_kl_bucket_penalises_draining_topk():
    """Moving student mass from the teacher's top-k into the tail raises the loss."""
    v, k = 40, 4
    t_lp = torch.log_softmax(torch.cat([torch.full((k,), 5.0), torch.zeros(v - k)]).double(), -1)[None]
    stats = TeacherStats(torch.arange(k)[None], t_lp[:, :k],
                         torch.logsumexp(t_lp[:, k:], -1))
    weight = torch.eye(v, dtype=torch.float64)
    losses = []
    for drain in (0.0, 1.0, 2.0):
        hidden = (t_lp.exp().log() + torch.cat([torch.zeros(k), torch.full((v - k,), drain)]).double())
        loss, _ = distill_loss(hidden, weight, torch.zeros(1, dtype=torch.long), stats, None,
                               DistillLossConfig(divergence="reverse_kl", support="topk"))
        losses.append(float(loss))
    assert losses[0] < 1e-12 < losses[1] < losses[2]


def test_masked_rows_zero_grad_and_weighted_mean():
    hidden, weight, targets, stats, t_lp = make_problem(n=9)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.float64) * torch.linspace(0.5, 1.5, 9).double()
    loss, m = distill_loss(hidden, weight, targets, stats, mask,
                           DistillLossConfig(divergence="forward_kl", support="topk", chunk_size=2))
    ref = ref_loss("forward_kl", hidden, weight, stats, t_lp, "topk", weights=mask)
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-8)
    gh, gw = _grads(loss, hidden, weight)
    rh, rw = _grads(ref, hidden, weight)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    assert (gh[mask == 0] == 0).all()
    assert int(m["tokens"]) == 5


def test_metrics_match_definitions():
    hidden, weight, targets, stats, t_lp = make_problem(n=6, k=4)
    _, m = distill_loss(hidden, weight, targets, stats, None, DistillLossConfig(divergence="reverse_kl"))
    ls = torch.log_softmax(hidden @ weight.T, -1)
    torch.testing.assert_close(m["entropy"], -(ls.exp() * ls).sum(-1).mean())
    torch.testing.assert_close(m["s_mass_on_t_topk"], ls.gather(-1, stats.topk_ids).exp().sum(-1).mean())
    s_top = ls.topk(4, -1).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 4 for a, b in zip(s_top, stats.topk_ids)])
    torch.testing.assert_close(m["topk_overlap"], overlap.double().mean())


def _category_inputs(seed=0):
    """[C, U+1] float64 category log-probs with every edge case of the chunk functions.

    Columns 0-5 random; 6: duplicate (lT = -inf, lS = NEG); 7: teacher -inf, student finite;
    8: p = 0 with a finite lT (underflow); 9: lS below LOG_FLOOR; 10: lS = NEG, teacher finite;
    11: lT = lS (|pT - pS| kink); 12: lS just above LOG_FLOOR with teacher -inf (the mixture
    falls below the floor for beta, alpha near 1). Row 1: every lS = NEG; row 2: lT = -inf except
    the rest bucket; row 3: an empty student rest bucket (NEG); row 4: both below the floor.
    """
    from student_trainer.losses.divergences import LOG_FLOOR, NEG

    g = torch.Generator().manual_seed(seed)
    c, u1 = 6, 14
    lT = torch.log_softmax(torch.randn(c, u1, generator=g, dtype=torch.float64) * 2, -1)
    lS = torch.log_softmax(torch.randn(c, u1, generator=g, dtype=torch.float64) * 2, -1)
    lT[:, 6], lS[:, 6] = -math.inf, NEG
    lT[:, 7] = -math.inf
    lT[:, 8] = -800.0
    lS[:, 9] = LOG_FLOOR - 5.0
    lS[:, 10] = NEG
    lT[:, 11] = lS[:, 11]
    lT[:, 12], lS[:, 12] = -math.inf, LOG_FLOOR + 0.5
    lS[1] = NEG
    lT[2, :-1] = -math.inf
    lS[3, -1] = NEG
    lT[4], lS[4] = LOG_FLOOR - 3.0, LOG_FLOOR - 1.0
    return lT, lS


@pytest.mark.parametrize("name,param", [
    ("forward_kl", None), ("reverse_kl", None), ("tv", None),
    *[("jsd", b) for b in (-0.5, 0.0, 0.1, 0.5, 0.9, 1.0, 1.5)],
    *[(n, a) for n in ("skew_forward_kl", "skew_reverse_kl") for a in (-0.5, 0.0, 0.1, 0.5, 0.9)],
])
@pytest.mark.parametrize("seed", [0, 1])
def test_category_closed_forms_match_autograd(name, param, seed):
    """Every closed form (loss, d loss / d lS) == autograd through the FULL_DIVERGENCES definition.

    Gradients to 1e-12 relative, measured against the size of the terms summed (up to pT + pS):
    where they cancel (JSD at pT = pS, whose exact gradient is 0) both sides are rounding residues.
    """
    from student_trainer.losses.divergences import ANALYTIC_CATEGORY_GRADS, FULL_DIVERGENCES

    kw = {} if param is None else {"beta": param, "skew_alpha": param}
    cfg = DistillLossConfig(**kw)
    lT, lS = _category_inputs(seed)
    leaf = lS.clone().requires_grad_(True)
    ref = FULL_DIVERGENCES[name](lT, leaf, cfg)
    (ref_g,) = torch.autograd.grad(ref.sum(), leaf)
    val, g = ANALYTIC_CATEGORY_GRADS[name](lT, lS, cfg)
    assert torch.isfinite(val).all() and torch.isfinite(g).all()
    assert torch.equal(val, ref.detach())
    scale = ref_g.abs() + lT.exp() + lS.exp()
    assert ((g - ref_g).abs() <= 1e-12 * scale).all(), ((g - ref_g).abs() / scale).max()


def test_category_closed_forms_cover_every_divergence():
    from student_trainer.losses.divergences import ANALYTIC_CATEGORY_GRADS, FULL_DIVERGENCES

    assert set(ANALYTIC_CATEGORY_GRADS) == set(FULL_DIVERGENCES)  # no autograd fallback left
    lT, lS = _category_inputs()
    for name in ("skew_forward_kl", "skew_reverse_kl"):  # alpha = 1: log(1 - alpha), as the definitions
        with pytest.raises(ValueError):
            FULL_DIVERGENCES[name](lT, lS, DistillLossConfig(skew_alpha=1.0))
        with pytest.raises(ValueError):
            ANALYTIC_CATEGORY_GRADS[name](lT, lS, DistillLossConfig(skew_alpha=1.0))


# ---- issue 17: a confident student, and padded teacher slots ----------------------------------

def _coarse_ref(z_V, ids, lT_u, lT_rest, name):
    """float64 coarsened divergence of one row from the definition: categories ``ids`` + rest."""
    ls = torch.log_softmax(z_V, -1)
    rest = torch.ones_like(ls, dtype=torch.bool)
    rest[ids] = False
    lS = torch.cat([ls[ids], torch.logsumexp(ls[rest], -1, keepdim=True)])
    lT = torch.cat([lT_u, lT_rest.reshape(1)])
    pT, pS = lT.exp(), lS.exp()
    if name == "forward_kl":
        return (pT * (lT - lS)).sum()
    return (pS * (lS - lT.clamp_min(math.log(1e-30)))).sum()


@pytest.mark.parametrize("mode", ["analytic", "autograd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_kl_exact_for_a_confident_student(mode, dtype):
    """log pS = -100 on the teacher's two tokens (row 0) and a rest bucket e^-110 below the support
    (row 1): the loss is the float64 value and d loss / d logits = pS - pT on the support (the
    student's log-probs are not clamped; the old clamp at log(1e-30) lost the pull entirely)."""
    import importlib

    distill_mod = importlib.import_module("student_trainer.losses.distill")
    v = 8
    z = torch.zeros(2, v, dtype=torch.float64)
    z[0, 2:4] = -100.0 + math.log(6.0)          # 6 ids at 0: log pS(2) = log pS(3) = -100 (to 1e-43)
    z[1, 2:] = -110.0                          # row 1: all but e^-108 of the mass on ids 0, 1
    ids = torch.tensor([[2, 3], [0, 1]])
    lT = torch.log(torch.tensor([[0.4, 0.4], [0.3, 0.3]], dtype=torch.float64))
    tail = torch.log(torch.tensor([0.2, 0.4], dtype=torch.float64))
    stats = TeacherStats(topk_ids=ids, topk_logprobs=lT.to(dtype), tail_logmass=tail.to(dtype))
    cfg = DistillLossConfig(divergence="forward_kl", support="topk", reduction="sum", metrics=False, chunk_size=1)
    # hidden = logits, weight = I: the hidden gradient is d loss / d logits
    h = z.clone().to(dtype).requires_grad_(True)
    w = torch.eye(v, dtype=dtype)
    old = distill_mod.GRAD_MODE
    distill_mod.GRAD_MODE = mode
    try:
        loss, _ = distill_loss(h, w, torch.zeros(2, dtype=torch.long), stats, None, cfg)
        loss.backward()
    finally:
        distill_mod.GRAD_MODE = old
    zr = z.clone().requires_grad_(True)  # a leaf of its own
    rows = [_coarse_ref(zr[r], ids[r], lT[r], tail[r], "forward_kl") for r in range(2)]
    ref = rows[0] + rows[1]
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert abs(rows[0].item() - 0.8 * (math.log(0.4) + 100) - 0.2 * math.log(0.2)) < 1e-9
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(h.grad.double(), zr.grad, **tol)
    pS = torch.softmax(z, -1)
    # on the support: pS - pT exactly (-0.4 on row 0's teacher tokens, whatever pS's size)
    torch.testing.assert_close(h.grad[0, 2:4].double(), pS[0, 2:4] - 0.4, **tol)
    torch.testing.assert_close(h.grad[1, :2].double(), pS[1, :2] - 0.3, **tol)
    # row 1's rest ids: pS_j - pT_rest pS_j / R = -0.4 / 6 each, though R ~ e^-108
    torch.testing.assert_close(h.grad[1, 2:].double(), torch.full((6,), -0.4 / 6, dtype=torch.float64), **tol)


@pytest.mark.parametrize("name", DIVS)
@pytest.mark.parametrize("support", ["topk", "union"])
def test_padding_slots_count_for_nothing(name, support):
    """A top-k slot marked ``topk_pad`` (its id repeats a real top-k id, log-prob -inf) gives the same
    loss and gradients as the row without it: compared with a copy of the problem whose padded
    slots are real entries of a (k-1)-wide row, analytic and autograd paths, float64."""
    import importlib

    distill_mod = importlib.import_module("student_trainer.losses.distill")
    hidden, weight, targets, stats, _ = make_problem(n=6, v=23, k=5, m=4 if support == "union" else None, seed=3)
    stats.full_logprobs = None
    # reference: the first 4 slots only; padded: slot 4 becomes padding (id of slot 0, -inf) and its
    # mass goes into the tail
    ref_stats = TeacherStats(topk_ids=stats.topk_ids[:, :4], topk_logprobs=stats.topk_logprobs[:, :4],
                             tail_logmass=torch.logaddexp(stats.tail_logmass, stats.topk_logprobs[:, 4]),
                             sampled_logprob=stats.sampled_logprob, s_topk_ids=stats.s_topk_ids,
                             extra_logprobs=stats.extra_logprobs)
    ids = stats.topk_ids.clone()
    ids[:, 4] = ids[:, 0]
    lp = stats.topk_logprobs.clone()
    lp[:, 4] = -math.inf
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[:, 4] = True
    order = torch.argsort(ids * 2 + pad.long(), -1)  # sorted ids, the padding after its twin
    pad_stats = TeacherStats(topk_ids=ids.gather(-1, order), topk_logprobs=lp.gather(-1, order),
                             tail_logmass=ref_stats.tail_logmass, sampled_logprob=stats.sampled_logprob,
                             s_topk_ids=stats.s_topk_ids, extra_logprobs=stats.extra_logprobs,
                             topk_pad=pad.gather(-1, order))
    if support == "union":  # an extra id equal to the padded slot's id must stay a duplicate
        pad_stats.s_topk_ids = ref_stats.s_topk_ids = stats.s_topk_ids.clone()
    cfg = DistillLossConfig(divergence=name, support=support, chunk_size=4)
    out = {}
    for mode in ("analytic", "autograd"):
        old = distill_mod.GRAD_MODE
        distill_mod.GRAD_MODE = mode
        try:
            for tag, st in (("ref", ref_stats), ("pad", pad_stats)):
                h = hidden.clone().requires_grad_(True)
                w = weight.clone().requires_grad_(True)
                loss, met = distill_loss(h, w, targets, st, None, cfg)
                loss.backward()
                out[mode, tag] = (loss.detach(), h.grad, w.grad, met["s_mass_on_t_topk"])
        finally:
            distill_mod.GRAD_MODE = old
    for mode in ("analytic", "autograd"):
        for a, b in zip(out[mode, "pad"], out[mode, "ref"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
