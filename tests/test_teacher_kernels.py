"""The teacher head's Triton kernels (``teacher_server/kernels.py``) and its kernel path against
float64 and against ``head_statistics_reference``.

Run on a GPU machine: ``pytest -m gpu tests/test_teacher_kernels.py`` (skipped without CUDA).
The same tests run on the CPU under Triton's interpreter, on smaller shapes:
``TRITON_INTERPRET=1 pytest tests/test_teacher_kernels.py`` (needs ``triton`` importable).
"""
import pytest
import torch

from teacher_server import head as H
from teacher_server import kernels as K
from tests.triton_helpers import DEV, INTERP, MARKS, force_triton

pytestmark = list(MARKS)

V_SMALL = K.BLOCK + 300              # neither a multiple of 128 nor of a tile
VOCABS = [V_SMALL] + ([] if INTERP else [151936])
ALL = frozenset({H.SAMPLED, H.TOPK, H.TAIL, H.LSE, H.ENTROPY, H.EXTRA, H.FULL})


@pytest.fixture
def kernels(monkeypatch):
    return force_triton(monkeypatch, K)


def _z64(x, temp, softcap):
    """z = cap(x) / T in float64 from the fp32 values the kernel sees (fp32 division, like torch)."""
    z = x.float()
    if softcap:
        z = torch.tanh(z.double() / softcap) * softcap
    if temp is not None:
        z = z / (temp.double() if softcap else temp)[:, None]
    return z.double().cpu()


def _logits(c, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, v, generator=g) * 4
    x[1, :300] = float("-inf")        # masked columns
    x[2] = float("-inf")              # a row entirely -inf
    x[3, 5] = 60.0                    # a dominant logit
    return x.to(dtype).to(DEV)


@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("tempered", [False, True])
def test_row_kernel_matches_float64(v, dtype, softcap, tempered):
    c = 6 if INTERP else 64
    x = _logits(c, v, dtype)
    temp = (torch.linspace(0.5, 2.0, c) if tempered else None)
    temp = None if temp is None else temp.to(DEV)
    m, s, a, bmax = K.row_stats(x, temp, softcap, True, True)
    z = _z64(x, temp, softcap)
    m_ref = z.amax(-1)
    if softcap:  # the kernel's tanh is not torch's: close, not equal
        torch.testing.assert_close(m.double().cpu(), m_ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(m.double().cpu(), m_ref)
    ms = torch.where(torch.isfinite(m_ref), m_ref, torch.zeros_like(m_ref))
    e = torch.exp(z - ms[:, None])
    s_ref = e.sum(-1)
    a_ref = torch.where(e > 0, e * (z - ms[:, None]), torch.zeros_like(e)).sum(-1)
    torch.testing.assert_close(s.double().cpu(), s_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.double().cpu(), a_ref, rtol=1e-5, atol=1e-5)
    nb = bmax.shape[1]
    assert nb == -(-v // K.SUB)
    pad = torch.full((c, nb * K.SUB - v), float("-inf"), dtype=torch.float64)
    assert torch.equal(bmax.double().cpu(), torch.cat([x.double().cpu(), pad], -1).view(c, nb, K.SUB).amax(-1))
    if not softcap:  # the all -inf row: lse = -inf (as torch.logsumexp), S = 0
        assert m[2] == float("-inf") and s[2] == 0 and a[2] == 0
        assert (m + s.log())[2] == float("-inf")
    m2, s2, a2, b2 = K.row_stats(x, temp, softcap, False, False)  # the lean variant: same m and S
    assert a2 is None and b2 is None and torch.equal(m2, m) and torch.equal(s2, s)


def _tail_ref(z, k_row):
    """float64 log of the mass outside the row's k largest (tie-agnostic: sorted values)."""
    lp = z - torch.logsumexp(z, -1, keepdim=True)
    srt = lp.sort(-1, descending=True).values
    out = []
    for r, k in enumerate(k_row.tolist()):
        out.append(torch.logsumexp(srt[r, k:], 0) if k else torch.zeros((), dtype=torch.float64))
    return torch.stack(out)


def _tail_problem(v, dtype):
    g = torch.Generator().manual_seed(3)
    c, kk = 10, 8
    x = torch.randn(c, v, generator=g) * 2
    x[0] = torch.round(x[0] * 2) / 2     # few distinct values: many ties at the k-th place
    x[1] = 0.0                           # all equal: every column ties
    x[2, 17] = 40.0                      # peaked: tail ~ e^-40
    x[3] *= 0.01                         # flat: tail ~ 1
    x[4, : v - 3] = float("-inf")        # 3 finite columns, k = 8: the k-th value is -inf
    x[5, :4] = 50.0                      # the top 4 tied, and far above the rest
    x = x.to(dtype)
    k_row = torch.tensor([kk, kk, kk, kk, kk, 4, 0, 3, 1, kk])
    return x.to(DEV), k_row.to(DEV), kk


@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("softcap,tempered", [(None, False), (None, True), (30.0, True)])
def test_tail_kernel_matches_float64(v, dtype, softcap, tempered):
    x, k_row, kk = _tail_problem(v, dtype)
    c = x.shape[0]
    temp = torch.linspace(0.6, 1.7, c).to(DEV) if tempered else None
    m, s, _, _ = K.row_stats(x, temp, softcap, False, False)
    raw, _ = torch.topk(x, kk, dim=-1, sorted=True)
    thr = raw.float().gather(1, (k_row - 1).clamp(min=0)[:, None]).squeeze(1)
    thr = torch.where(k_row > 0, thr, torch.full_like(thr, float("inf")))
    below, eq = K.tail_stats(x, thr, m, temp, softcap)
    z = _z64(x, temp, softcap)
    xr = x.double().cpu()
    th = thr.double().cpu()[:, None]
    ms = m.double().cpu()
    ms = torch.where(torch.isfinite(ms), ms, torch.zeros_like(ms))
    below_ref = torch.where(xr < th, torch.exp(z - ms[:, None]), torch.zeros_like(z)).sum(-1)
    torch.testing.assert_close(below.double().cpu(), below_ref, rtol=1e-5, atol=1e-30)
    assert torch.equal(eq.cpu().long(), (xr == th).sum(-1))
    assert eq[1] == v and eq[0] > 1   # ties seen

    got = K.tail_logmass(x, raw, k_row, m, s, temp, softcap).double().cpu()
    ref = _tail_ref(z, k_row.cpu())
    assert got[6] == 0 and ref[6] == 0                            # k = 0: everything is tail
    if not softcap:  # nothing outside the top-k (with a softcap, -inf logits become -c)
        assert got[4] == float("-inf") and ref[4] == float("-inf")
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got))
    torch.testing.assert_close(got[fin], ref[fin], rtol=0, atol=2e-5)
    assert ref[2] < -14 and ref[3] > -0.1       # a tiny (< 1e-6) and a large tail


def _head_case(dtype, softcap, temps, v, rows=23, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = 24
    hidden = torch.randn(rows, hid, generator=g).to(dtype)
    w = (torch.randn(v, hid, generator=g) * 0.7).to(dtype)
    w[:, 0] *= torch.linspace(0, 30, v).to(dtype)       # some rows get very peaked (tiny tails)
    t = None if temps is None else torch.tensor(temps * rows)[:rows].float()
    row_k = torch.randint(1, k + 1, (rows,), generator=g)
    row_k[::5] = 0                                        # rows that ask for no top-k
    req = H.HeadRequest(hidden=hidden.to(DEV), targets=torch.randint(0, v, (rows,), generator=g).to(DEV),
                        temperature=None if t is None else t.to(DEV), top_k=k, row_k=row_k.to(DEV),
                        extra_ids=torch.randint(0, v, (rows, 5), generator=g).to(DEV), stats=ALL)
    return req, w.to(DEV)


def _check_head(got, ref, req, tol, tiny=True):
    assert set(got) == set(ref)
    # log p = z - lse: fp32 rounding of z and lse (|lse| up to ~170 here) bounds the error per row
    scale = 1 + ref[H.LSE].abs().double().cpu()

    def close(a, b, what):
        err = (a.double().cpu() - b.double().cpu()).abs()
        bound = tol * (scale if err.dim() == 1 else scale[:, None])
        assert (err <= bound).all(), f"{what}: max err {err.max():.3g} (scaled {(err / bound).max():.3g})"

    for key in (H.SAMPLED, H.LSE, H.ENTROPY, H.EXTRA, H.FULL, "topk_vals"):
        close(got[key], ref[key], key)
    # ids: the reference's log-probs at our ids are our values (ties may pick other ids)
    close(ref[H.FULL].gather(1, got["topk_ids"]), got["topk_vals"], "topk_ids")
    same = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / a.numel()
                         for a, b in zip(got["topk_ids"].cpu(), ref["topk_ids"].cpu())])
    assert same.mean() > 0.9
    # tail: exact for every row, against float64 over the complement of the row's own top-k
    tail64 = _tail_ref(ref[H.FULL].double().cpu(), req.row_k.cpu())
    g = got[H.TAIL].double().cpu()
    fin = torch.isfinite(tail64)
    assert torch.equal(fin, torch.isfinite(g))
    assert ((g - tail64).abs()[fin] <= 2 * tol * scale[fin]).all()   # (tail64 is built from fp32 log p)
    # the reference's log(1 - covered) loses ~1e-7 / tail (relative) near its 1e-3 switch
    torch.testing.assert_close(got[H.TAIL].exp(), ref[H.TAIL].exp(), rtol=1e-3, atol=1e-7)
    assert (g[req.row_k.cpu() == 0] == 0).all()
    assert g.min() < -15 or not tiny   # tiny tails hit (a softcap of 30 keeps them > e^-15 here)


@pytest.mark.parametrize("v", [V_SMALL, 1000])           # block top-k (k * 512 <= V) and plain top-k
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("temps", [None, [0.7, 1.3, 1.0]])
def test_head_kernel_path_fp32_equals_reference(kernels, v, softcap, temps):
    req, w = _head_case(torch.float32, softcap, temps, v)
    for chunk in (7, 1024):
        ref = H.head_statistics_reference(req, w, chunk_size=chunk, softcap=softcap)
        got = H.head_statistics(req, w, chunk_size=chunk, softcap=softcap)
        assert K._STATE == {(str(w.device), bool(softcap)): True}
        _check_head(got, ref, req, 1e-5, tiny=not softcap)
        if not softcap:  # distinct fp32 logits: the same ids, in the same order
            assert torch.equal(got["topk_ids"], ref["topk_ids"])


@pytest.mark.parametrize("softcap,temps", [(None, [0.8]), (30.0, [0.7, 1.3, 1.0])])
def test_head_kernel_path_bf16_equals_reference(kernels, softcap, temps):
    """bf16 logits (many ties): values as the reference's on the same logits, ids up to ties."""
    req, w = _head_case(torch.bfloat16, softcap, temps, V_SMALL, seed=1)
    ref = H.head_statistics_reference(req, w, chunk_size=8, softcap=softcap)
    got = H.head_statistics(req, w, chunk_size=8, softcap=softcap)
    _check_head(got, ref, req, 1e-5, tiny=not softcap)


def test_head_kernels_off_is_the_eager_path(monkeypatch):
    """OPD_TEACHER_KERNELS=eager (or a CPU tensor without the interpreter forced): no kernels."""
    monkeypatch.setattr(K, "KERNELS", "eager")
    monkeypatch.setattr(K, "_STATE", {})
    req, w = _head_case(torch.float32, None, None, 1000)
    assert not K.available(w)
    H.head_statistics(req, w, chunk_size=7)
    assert K._STATE == {}


@pytest.mark.skipif(INTERP, reason="CUDA only")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5)])
def test_head_kernel_path_large_vocab_no_host_sync(kernels, dtype, tol):
    """Vocabulary 151,936, top-64, 300 rows: equals the reference, and the head never syncs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, hid, v, k = 300, 256, 151936, 64
    hidden = torch.randn(rows, hid, device="cuda", generator=g).to(dtype)
    w = (torch.randn(v, hid, device="cuda", generator=g) * 0.2).to(dtype)
    row_k = torch.randint(0, k + 1, (rows,), device="cuda", generator=g)
    req = H.HeadRequest(hidden=hidden, targets=torch.randint(0, v, (rows,), device="cuda", generator=g),
                        temperature=torch.rand(rows, device="cuda", generator=g) + 0.5, top_k=k, row_k=row_k,
                        extra_ids=None, stats=frozenset({H.SAMPLED, H.TOPK, H.TAIL, H.LSE, H.ENTROPY}))
    ref = H.head_statistics_reference(req, w, chunk_size=128)
    H.head_statistics(req, w, chunk_size=128)  # self-test and compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = H.head_statistics(req, w, chunk_size=128)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for key in (H.SAMPLED, H.LSE, H.ENTROPY, "topk_vals"):
        torch.testing.assert_close(got[key], ref[key], rtol=tol, atol=tol, msg=key)
    assert (got[H.TAIL][row_k == 0] == 0).all()
    for r in range(0, rows, 13):  # float64 tail over the complement of our top-k, a sample of rows
        kr = int(row_k[r])
        if kr:
            c0 = r // 128 * 128  # the logits of the row's chunk, as the head computed them
            lr = torch.matmul(hidden[c0: c0 + 128], w.t())[r - c0].double() / req.temperature[r].double()
            lpr = torch.log_softmax(lr, 0).scatter(0, got["topk_ids"][r, :kr], float("-inf"))
            torch.testing.assert_close(got[H.TAIL][r].double(), torch.logsumexp(lpr, 0), rtol=0, atol=2e-5)
