"""The opt-in FP8 body (`teacher_server/fp8.py`): the quantised GEMM against its definition in
float64, the engine's statistics of a quantised teacher against the unquantised one, and the
errors for machines without FP8 GEMMs. The `torch._scaled_mm` path itself runs in the gpu tests
(an H100 or newer)."""

import numpy as np
import pytest
import torch

from teacher_server import fp8
from teacher_server.app import TeacherConfig, build_server
from teacher_server.engine import ScoreItem, ScoringEngine
from teacher_server.model import load_model


def _definition(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float64 y from the module docstring's definition (fp8 rounding by torch's cast)."""
    def q(a):
        amax = a.double().abs().amax(-1, keepdim=True)
        s = torch.where(amax > 0, (amax.float() / 448.0).double(), torch.ones_like(amax))
        return (a.float() / s.float()).clamp(-448, 448).to(torch.float8_e4m3fn).double(), s
    xq, xs = q(x)
    wq, ws = q(w)
    return (xq @ wq.t()) * xs * ws.t()


def test_fp8_linear_equals_its_definition_and_stays_near_the_exact_product():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=g) * torch.logspace(-3, 2, 37)[:, None]  # rows of very different scales
    x[5] = 0.0                                                                  # an all-zero row
    lin = torch.nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
        lin.weight[3] = 0.0                                                     # an all-zero output channel
        lin.bias.copy_(torch.randn(48, generator=g))
    mod = fp8.FP8Linear(lin, emulate=True)
    assert mod.weight_fp8.dtype == torch.float8_e4m3fn and mod.weight_scale.shape == (1, 48)
    y = mod(x.reshape(37, 1, 64)).reshape(37, 48)
    ref = _definition(x, lin.weight.detach()) + lin.bias.detach().double()
    np.testing.assert_allclose(y.double().numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[5], lin.bias.detach())                                 # zero row: bias only
    exact = x.double() @ lin.weight.detach().double().t()
    rel = ((y.double() - lin.bias.detach().double() - exact).norm(dim=1) / exact.norm(dim=1).clamp(min=1e-30))
    rel = rel[torch.arange(37) != 5]
    # e4m3 keeps 3 mantissa bits: per-element rounding <= 2^-4 relative, much less on a sum of 64
    assert 1e-4 < rel.median().item() < 0.05, rel


def test_quantize_body_replaces_the_decoder_linears_only(tiny_model_dir):
    model = load_model(tiny_model_dir, "fp32")
    body = model.get_decoder()
    n_layers = len(body.layers)
    assert fp8.quantize_body(body, emulate=True) == 7 * n_layers               # q k v o gate up down
    assert type(model.get_output_embeddings()) is torch.nn.Linear               # the head stays
    assert not any(type(m) is torch.nn.Linear for m in body.layers.modules())

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 10))])
    odd = Odd()
    assert fp8.quantize_body(odd, emulate=True) == 1                           # 10 outputs: not a multiple of 16
    assert type(odd.layers[0][1]) is torch.nn.Linear
    with pytest.raises(ValueError, match="no `layers`"):
        fp8.quantize_body(torch.nn.Linear(16, 16))


def test_quantised_teacher_stays_close_to_the_exact_one(tiny_model_dir):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 512, n).astype(np.int64) for n in (40, 57, 23)]

    def score(quantize):
        model = load_model(tiny_model_dir, "fp32")
        if quantize:
            fp8.quantize_body(model.get_decoder(), emulate=True)
        eng = ScoringEngine(model, max_batch_tokens=10_000)
        return eng.score([ScoreItem(f"r{i}", s, 1, len(s), top_k=8, stats=frozenset({"sampled", "topk", "tail", "lse"}))
                          for i, s in enumerate(seqs)], use_cache=False)

    exact, quant = score(False), score(True)
    diffs = np.concatenate([np.abs(a["sampled"] - b["sampled"]) for a, b in zip(exact, quant)])
    assert 0 < diffs.mean() < 0.05 and diffs.max() < 0.5, (diffs.mean(), diffs.max())
    same_top1 = np.mean(np.concatenate([a["topk_ids"][np.arange(len(a["topk_ids"])), np.argmax(a["topk_logprobs"], 1)] ==
                                        b["topk_ids"][np.arange(len(b["topk_ids"])), np.argmax(b["topk_logprobs"], 1)]
                                        for a, b in zip(exact, quant)]))
    assert same_top1 > 0.9


def test_fp8_needs_a_capable_gpu(tiny_model_dir):
    assert "needs a CUDA GPU" in fp8.supported(torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        build_server(TeacherConfig(model=tiny_model_dir, dtype="fp32", quantize="fp8"))
    with pytest.raises(ValueError, match="expected one of"):
        build_server(TeacherConfig(model=tiny_model_dir, dtype="fp32", quantize="int4"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fp8.supported(torch.device("cuda")) != "",
                    reason="needs a GPU with FP8 GEMMs")
def test_scaled_mm_path_equals_the_emulated_one():
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1024, 4096, device="cuda", generator=g) * 0.02)
    x = torch.randn(333, 4096, device="cuda", generator=g).bfloat16()
    fast, emu = fp8.FP8Linear(lin), fp8.FP8Linear(lin, emulate=True)
    a, b = fast(x).double(), emu(x).double()
    # same quantised operands; only the accumulation order and the final bf16 rounding differ
    assert ((a - b).abs() <= 1e-2 * b.abs() + 1e-2).all()
    assert torch.compile(fast)(x).double().sub(a).abs().max().item() <= 1e-2 * a.abs().max().item()


def test_distance_is_zero_for_equal_statistics_and_exact_for_a_known_shift():
    ids = np.array([[3, 5, 9], [1, 2, 4]])
    lp = np.log(np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]]))
    a = {"sampled": np.array([-1.0, -2.0]), "topk_ids": ids, "topk_logprobs": lp}
    d = fp8.distance([a], [dict(a)])
    assert d == {"positions": 2, "sampled_abs_mean": 0.0, "sampled_abs_p99": 0.0, "topk_kl_mean": 0.0,
                 "top1_agree": 1.0, "topk_overlap": 1.0}
    # row 0 of b swaps the mass of ids 3 and 5 and drops id 9 for id 7; row 1 is equal
    b = {"sampled": np.array([-1.5, -2.0]), "topk_ids": np.array([[3, 5, 7], [1, 2, 4]]),
         "topk_logprobs": np.log(np.array([[0.3, 0.5, 0.1], [0.6, 0.2, 0.1]]))}
    d = fp8.distance([a], [b])
    pa = np.array([0.5, 0.3, 0.1]) / 0.9
    q = np.array([0.3, 0.5, 0.1]) / 0.9          # id 9 missing from b's top-k: b's floor (0.1) stands in
    assert d["sampled_abs_mean"] == 0.25 and d["top1_agree"] == 0.5 and d["topk_overlap"] == pytest.approx(5 / 6)
    assert d["topk_kl_mean"] == pytest.approx(np.sum(pa * np.log(pa / q)) / 2, rel=1e-12)


def test_dequantized_stand_in_and_the_engine_warm_up_of_an_fp8_body(tiny_model_dir):
    """Inside `dequantized` an FP8Linear is exactly the linear layer with its dequantised weight
    (no activation rounding); outside it quantises again. An engine with an fp8 body compiles,
    passes its warm-up check (made in the stand-in mode) and keeps compile on."""
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(32, 16, bias=True)
    mod = fp8.FP8Linear(lin, emulate=True)
    body = torch.nn.ModuleDict({"p": mod})
    x = torch.randn(5, 32, generator=g)
    w = mod.weight_fp8.float() * mod.weight_scale.t()
    with fp8.dequantized(body):
        assert torch.equal(mod(x), torch.nn.functional.linear(x, w, lin.bias))
    assert not torch.equal(mod(x), torch.nn.functional.linear(x, w, lin.bias))   # activations rounded again
    assert mod.dequantized is False

    model = load_model(tiny_model_dir, "fp32")
    fp8.quantize_body(model.get_decoder(), emulate=True)
    eng = ScoringEngine(model, max_batch_tokens=10_000, compile="all", compile_backend="eager")
    assert eng.quantized
    eng.prepare()
    assert eng.compile == "all" and eng.compiled_body
    rng = np.random.default_rng(2)
    seqs = [rng.integers(1, 512, n).astype(np.int64) for n in (30, 41)]
    out = eng.score([ScoreItem(f"r{i}", s, 1, len(s), top_k=8, stats=frozenset({"sampled", "topk"}))
                     for i, s in enumerate(seqs)], use_cache=False)
    assert all(np.isfinite(o["sampled"]).all() for o in out)
