"""Opt-in FP8 body (`opd teacher --quantize fp8`): the decoder layers' linear layers run as
float8 e4m3 GEMMs with fp32 accumulation; embeddings, norms, attention and the lm-head stay in
the model dtype, so the statistics head is unchanged.

Scales (both fp32, "rowwise"):
- weights, once at load: one scale per output channel, s_w[n] = max_k |W[n, k]| / 448;
- activations, per call: one scale per token, s_x[m] = max_k |x[m, k]| / 448;
and y = (x / s_x)_fp8 @ ((W / s_w)_fp8)^T * s_x * s_w^T (+ bias), in the model dtype. On CUDA with
compute capability >= 8.9 (H100, H200, L40S, ...) the GEMM is `torch._scaled_mm`; the per-token
quantisation is a few elementwise ops that torch.compile fuses into the producer of x (a norm,
SiLU x mul, attention output). Elsewhere (`emulate=True`, tests) the same quantised operands are
multiplied in float32, which is what the GEMM computes up to accumulation order.

This changes the teacher's numbers: log-probs move by the quantisation error of every layer.
`bench/bench_teacher.py --quantize fp8` reports its speed and its distance from the bf16 teacher
(mean |delta log-prob| of the sampled token, KL between the two top-k distributions, top-k
agreement) on the same sequences; judge it on your own teacher before distilling from it.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

log = logging.getLogger("opd.teacher")

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
QUANTIZE_MODES = ("none", "fp8")


def supported(device: torch.device) -> str:
    """'' when the FP8 GEMM runs on `device`, else why not."""
    if device.type != "cuda":
        return "--quantize fp8 needs a CUDA GPU (compute capability >= 8.9: H100, H200, L40S, ...)"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"--quantize fp8 needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}"
    if not hasattr(torch, "_scaled_mm"):
        return "--quantize fp8 needs torch._scaled_mm (torch >= 2.5)"
    return ""


def quantize_rows(x: torch.Tensor, reduce_amax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / s)_fp8 and s [rows, 1] fp32, s = max |row| / 448 (1 for an all-zero row).
    `reduce_amax(amax)`, when given, combines the rows' maxima in place first (tensor parallel:
    a max all-reduce over the ranks' shards of each row, tp.FP8RowParallel)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    if reduce_amax is not None:
        reduce_amax(amax)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class FP8Linear(torch.nn.Module):
    """A drop-in for `nn.Linear` (inference only) with the weight held in float8 e4m3."""

    def __init__(self, linear: torch.nn.Linear, emulate: bool = False):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_rows(w)
        self.register_buffer("weight_fp8", q)                      # [N, K]
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # [1, N]
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.out_dtype = w.dtype
        self.emulate = emulate
        self.dequantized = False  # see `dequantized`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dequantized:
            return torch.nn.functional.linear(x, self.dequantized_weight(x.dtype),
                                              None if self.bias is None else self.bias.to(x.dtype))
        shape = x.shape
        xq, xs = quantize_rows(x.reshape(-1, self.in_features))
        return self.matmul(xq, xs, self.bias).reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The fp8 weight times its scales, in `dtype` (the `dequantized` stand-in)."""
        return (self.weight_fp8.float() * self.weight_scale.t()).to(dtype)

    def matmul(self, xq: torch.Tensor, xs: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(xq * xs) @ (weight_fp8 * weight_scale)^T (+ bias) in the model dtype, from the fp8
        activations `xq` [M, K] and their scales `xs` [M, 1]: `torch._scaled_mm`, or with
        `emulate` the same operands multiplied in float32 (the bias added before rounding)."""
        if self.emulate:
            y = (xq.float() @ self.weight_fp8.float().t()) * xs * self.weight_scale
            if bias is not None:
                y = y + bias.float()
            return y.to(self.out_dtype)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale, out_dtype=self.out_dtype)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, rowwise scales"


@contextlib.contextmanager
def dequantized(body: torch.nn.Module):
    """Within the block, every `FP8Linear` of `body` multiplies by its weight dequantised to the
    model dtype and does not round activations to fp8: a smooth stand-in of the same graph, for
    the engine's compiled-vs-eager warm-up check (fp8 activation rounding is a step function, so
    compile's reordered bf16 arithmetic flips roundings that a deep network amplifies). No-op
    for a body without fp8 layers."""
    mods = [m for m in body.modules() if isinstance(m, FP8Linear)]
    for m in mods:
        m.dequantized = True
    try:
        yield
    finally:
        for m in mods:
            m.dequantized = False


def quantize_body(body: torch.nn.Module, emulate: bool = False, replace=None, what: str = "body") -> int:
    """Replace every `nn.Linear` inside the body's decoder layers by an `FP8Linear` (in place;
    the bf16 weights are freed). Layers whose dimensions are not multiples of 16 (the FP8 GEMM's
    requirement) stay as they are. `replace(linear)`, when given, makes each layer's fp8 module
    instead, or None to keep the layer (tp.quantize_body: the shards); `what` names the body in
    the log line. Returns how many were replaced."""
    if replace is None:
        def replace(mod):
            return None if mod.in_features % 16 or mod.out_features % 16 else FP8Linear(mod, emulate=emulate)
    layers = getattr(body, "layers", None)
    if not layers:
        raise ValueError("--quantize fp8: the model's body has no `layers` to quantise")
    n = 0
    for layer in layers:
        for name, mod in list(layer.named_modules()):
            if type(mod) is not torch.nn.Linear:
                continue
            new = replace(mod)
            if new is None:
                continue
            parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            setattr(parent, name.rpartition(".")[2], new)
            n += 1
    if n == 0:
        raise ValueError("--quantize fp8: no linear layer in the body could be quantised")
    log.info("fp8: %d linear layers of the %s quantised (e4m3, rowwise scales)", n, what)
    return n


def distance(want: list[dict], got: list[dict]) -> dict:
    """How far a quantised teacher's statistics are from the exact one's, per position: mean
    and p99 |delta| of the sampled token's log-prob, KL(exact || quantised) over the exact top-k
    (renormalised; the quantised log-probs at those ids come from its own top-k where present,
    else its top-k floor), top-1 agreement and top-k id overlap."""
    d_s, kl, top1, overlap = [], [], [], []
    for a, b in zip(want, got):
        d_s.append(np.abs(a["sampled"] - b["sampled"]))
        for ia, va, ib, vb in zip(a["topk_ids"], a["topk_logprobs"], b["topk_ids"], b["topk_logprobs"]):
            qb = dict(zip(ib.tolist(), vb.tolist()))
            floor = float(vb.min())
            pa = np.exp(va - np.logaddexp.reduce(va))
            lq = np.array([qb.get(i, floor) for i in ia.tolist()])
            lq = lq - np.logaddexp.reduce(lq)
            kl.append(float(np.sum(pa * (np.log(pa) - lq))))
            top1.append(int(ia[np.argmax(va)]) == int(ib[np.argmax(vb)]))
            overlap.append(len(set(ia.tolist()) & set(ib.tolist())) / len(ia))
    d = np.concatenate(d_s)
    return {"positions": int(d.size), "sampled_abs_mean": float(d.mean()), "sampled_abs_p99": float(np.quantile(d, 0.99)),
            "topk_kl_mean": float(np.mean(kl)), "top1_agree": float(np.mean(top1)), "topk_overlap": float(np.mean(overlap))}
