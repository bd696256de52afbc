"""Where an UpdateWeights push spends its time: each stage alone, in one thread, no gRPC.

The tensors of bench_teacher_multi.py's `mid` shape (218M parameters, bf16, 436 MB) with random
values; argument: the message size in MiB (default 64, what the trainer uses). Rows: the client
building the serialized messages, the server parsing them, decoding each piece into the host copy,
the finite check, the final copy into the parameters; and, for comparison, the path before
(byte shuffle, tobytes, nested protobuf messages, unshuffle, isfinite().all()). The gRPC transfer
is what bench_teacher_multi.py --rows update measures beyond these.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/bench_weight_push_stages.py 64
"""
import sys
import time

import numpy as np
import torch

from teacher_server import codec
from teacher_server.client import _weight_messages
from teacher_server.wire import pb

torch.set_num_threads(1)
MB = float(sys.argv[1]) if len(sys.argv) > 1 else 64
torch.manual_seed(0)
# the mid shape's tensors (bf16): 2 x 32768x1024 embeddings + 12 layers
shapes = [(32768, 1024), (32768, 1024)] + [s for _ in range(12) for s in [(1024, 1024), (512, 1024), (512, 1024), (1024, 1024), (3072, 1024), (3072, 1024), (1024, 3072), (1024,), (1024,), (64,), (64,)]]
ts = [(f"t{i}", torch.randn(s).to(torch.bfloat16)) for i, s in enumerate(shapes)]
nbytes = sum(t.numel() * 2 for _, t in ts)
def best(f, r=3):
    out = []
    for _ in range(r):
        t = time.perf_counter(); v = f(); out.append(time.perf_counter() - t)
    return min(out), v
def row(name, s): print(f"{name:42s} {s:7.3f} s  {nbytes / s / 1e6:7.0f} MB/s")
print(f"{nbytes/1e6:.0f} MB bf16, {MB:g} MiB messages")
s, msgs = best(lambda: list(_weight_messages(ts, 1, "a", False, int(MB * (1 << 20)), pb.COMPRESSION_NONE)))
row("client: build serialized messages", s)
s, reqs = best(lambda: [pb.UpdateWeightsRequest.FromString(m) for m in msgs])
row("server: FromString", s)
staged = {n: torch.empty(t.numel(), dtype=t.dtype) for n, t in ts}
def decode():
    for r in reqs:
        for p in r.tensors:
            codec.decode_weight_into(p.data, staged[p.name][p.offset:])
s, _ = best(decode); row("server: decode into staging (getattr+copy)", s)
s, _ = best(lambda: [p.data.data for r in reqs for p in r.tensors])
row("  of which: read bytes field (copy)", s)
s, _ = best(lambda: [codec.all_finite(v) for v in staged.values()]); row("server: all_finite", s)
s, _ = best(lambda: [bool(torch.isfinite(v).all()) for v in staged.values()]); row("  (was: isfinite().all())", s)
params = {n: torch.empty_like(t) for n, t in ts}
s, _ = best(lambda: [params[n].copy_(staged[n].view(params[n].shape)) for n, _ in ts]); row("server: apply (copy into parameters)", s)
# old path, for comparison
def old_client():
    out = []
    msg, size = pb.UpdateWeightsRequest(model="a", version=1), 0
    per_b = int(MB * (1 << 20))
    for name, t in ts:
        flat = t.reshape(-1); per = per_b // 2
        for off in range(0, flat.numel(), per):
            part = flat[off:off + per]
            msg.tensors.append(pb.TensorPiece(name=name, shape=list(t.shape), offset=off,
                                              data=codec._pack(part.view(torch.int16).numpy().view(np.uint16), pb.BFLOAT16, 0, 3, True)))
            size += part.numel() * 2
            if size >= per_b:
                out.append(msg.SerializeToString()); msg, size = pb.UpdateWeightsRequest(model="a", version=1), 0
    if msg.tensors: out.append(msg.SerializeToString())
    return out
s, old = best(old_client, 2); row("(was) client: shuffle+tobytes+3 msg copies+serialize", s)
oreqs = [pb.UpdateWeightsRequest.FromString(m) for m in old]
def old_decode():
    for r in oreqs:
        for p in r.tensors:
            a = codec._unpack_raw(p.data)
            x = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
            assert torch.isfinite(x).all()
            len(p.data.data)
            staged[p.name][p.offset:p.offset + x.numel()] = x
s, _ = best(old_decode, 2); row("(was) server: unshuffle+copy+isfinite+stage", s)
