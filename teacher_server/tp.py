"""Tensor-parallel teacher on one node (`opd teacher --tp N`, or under `torchrun --nproc_per_node N`).

Sharding: the model is loaded by transformers with its own tensor-parallel plan
(`from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`, i.e. `tp_plan="auto"`: the
model's `base_model_tp_plan`, DTensor-based). For Qwen3 this shards q/k/v/o, the dense MLP, the
embedding and the lm-head (vocabulary rows); a Qwen3-MoE's experts stay whole on every rank
(transformers' expert-parallel path, `ep_size`, gave wrong hidden states for batches of more
than one sequence on gloo in transformers 5.25, so it is not used). This works on CPU with gloo
(tests) and on CUDA with NCCL; nothing of ours shards the body.

Ranks: rank 0 is the server (gRPC, health, metrics, HTTP front, the queue, batching, the cache);
ranks 1..N-1 are followers. For every batch rank 0 broadcasts the batch (token ids, spans, top-k,
statistics, temperatures, extra ids) and the engine settings that shape its computation (prefix
sharing, packing, sub-batching, compile state, head chunking) as int64 tensors over a gloo group
of its own (no pickle); every rank then runs the same `ScoringEngine._launch_batch`: the same
body forward (transformers' TP layers all-reduce inside it) and the sharded head.

The head stays exact (`sharded_head_statistics`): rank r holds the lm-head rows
[r V/N, (r+1) V/N) and computes, per chunk of rows, its shard's log-sum-exp and entropy (the
same row reductions as `head.py`: Triton kernels on CUDA, fused/eager torch elsewhere), its
shard's top-k raw logits and ids, and the raw logits at the sampled token and extra ids it owns.
One all-gather gives every rank all shards' partials; each merges them the same way:
    lse = logsumexp_r lse_r,  w_r = exp(lse_r - lse),
    H = sum_r w_r (H_r - log w_r)             (the entropy of a mixture of disjoint supports),
    top-k = top-k of the N x k gathered candidates (raw values; ids are global),
    sampled / extra = the owning shard's value - lse.
The tail mass is exact and tie-aware like `kernels.tail_logmass`: with thr the row's k-th largest
raw logit, each rank sums exp(z - lse) over its columns below thr and counts its columns equal to
thr (one all-reduce), so tail = log(below + ties beyond the top-k x exp(z(thr) - lse)). That is
the CUDA path (the kernels' `tail_stats` per shard); the eager path, like `head._tail`, takes
log(1 - sum p_topk) from the merged top-k and the exact sum only when some row's tail is below
TAIL_EXACT_BELOW (the same rows on every rank: the merged top-k is the same). FULL gathers each
shard's log-probs. At --tp 1 the same code runs with no collectives.

Failures: a rank that dies breaks the group: rank 0 notices (a spawned follower exits, or a
collective raises), marks the engine failed, reports NOT_SERVING and shuts the server down with
exit status 1; followers blocked on rank 0's next batch see the gloo connection close and exit.
Under torchrun, torchrun itself tears the other ranks down when one exits.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from teacher_server import head as H
from teacher_server import kernels as K
from teacher_server.engine import ScoreItem, ScoringEngine
from teacher_server.fp8 import FP8Linear, dequantized, quantize_rows
from teacher_server.fp8 import quantize_body as fp8_quantize_body
from teacher_server.model import compile_body, uncompile_body

log = logging.getLogger("opd.teacher")

STAT_ORDER = (H.SAMPLED, H.TOPK, H.TAIL, H.LSE, H.ENTROPY, H.EXTRA, H.FULL)
IDLE_TIMEOUT = timedelta(days=365)    # followers wait for rank 0's next batch this long (idle server)
BATCH_TIMEOUT = timedelta(minutes=10)  # a collective inside a batch
_HEADER = 16


@dataclass
class TPGroup:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    ctrl: object          # a gloo group: batch broadcasts (CPU tensors; long idle waits)
    procs: list           # followers this process spawned (rank 0 of `opd teacher --tp N`)


    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's x (x itself at one rank)."""
        if self.world == 1:
            return x.unsqueeze(0)
        out = torch.empty((self.world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous())
        return out.view(self.world, *x.shape)

    def all_reduce(self, x: torch.Tensor) -> None:
        """x summed over the ranks, in place."""
        if self.world > 1:
            dist.all_reduce(x)


_GROUP: TPGroup | None = None


def current() -> TPGroup | None:
    return _GROUP


# ---- configuration checks (parse time, before any model loads) ---------------------------------
def check_args(args) -> str:
    """'' or what is wrong with --tp and the flags it meets (exit 2)."""
    tp = args.tp
    if tp < 1:
        return f"--tp {tp}: expected a number of ranks >= 1"
    world = os.environ.get("WORLD_SIZE")
    if world is not None and int(world) != tp:
        return (f"--tp {tp}: this process was started by torchrun with WORLD_SIZE={world}; expected "
                f"--tp equal to --nproc_per_node")
    dev = torch.device(args.device)
    if dev.type not in ("cpu", "cuda"):
        return f"--device {args.device}: expected cpu or cuda with --tp"
    if dev.type == "cuda" and tp > 1:
        if dev.index is not None:
            return (f"--device {args.device}: with --tp {tp} expected plain 'cuda' (rank r uses cuda:r, "
                    f"or cuda:LOCAL_RANK under torchrun)")
        n = torch.cuda.device_count()
        if n == 0:
            return f"--tp {tp} --device {args.device}: this machine has no CUDA GPU; expected --device cpu"
        if n < tp:
            return f"--tp {tp}: needs {tp} GPUs, this machine has {n}; expected --tp <= {n}"
    if getattr(args, "quantize", "none") == "fp8":
        from teacher_server.fp8 import supported

        why = supported(torch.device("cuda", 0) if dev.type == "cuda" else dev)
        if why:
            return why
    if args.head != "fast":
        return f"--head {args.head}: with --tp the sharded head is used; expected --head fast"
    cfg_path = Path(args.model) / "config.json"
    if not cfg_path.exists():
        return f"--model {args.model}: no config.json there (expected a Hugging Face model directory)"
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        return f"--model {args.model}: config.json does not parse ({exc})"
    cfg = cfg.get("text_config", cfg)
    for key in ("num_attention_heads", "num_key_value_heads", "vocab_size"):
        v = cfg.get(key)
        if isinstance(v, int) and v % tp:
            divisors = [d for d in range(1, v + 1) if v % d == 0 and d <= 64]
            return f"--tp {tp}: the model's {key} {v} is not divisible by it; expected one of {divisors}"
    if int(cfg.get("vocab_size", 0)) >= 1 << 24:
        return f"--tp: vocab_size {cfg['vocab_size']} >= 2^24 (ids travel as float32); not supported"
    return ""


# ---- process group -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> int | None:
    """Set up this process's rank. `opd teacher --tp N` outside torchrun spawns ranks 1..N-1 (the
    same command line, RANK/WORLD_SIZE/MASTER_* set) and becomes rank 0. Returns None on rank 0
    (go on and serve) and the exit status on a follower (after its loop ends)."""
    global _GROUP
    procs = []
    if "RANK" not in os.environ:  # spawn the followers ourselves
        port = _free_port()
        base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(args.tp))
        for r in range(1, args.tp):
            env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
            procs.append(subprocess.Popen([sys.executable, "-m", "opd", *sys.argv[1:]], env=env))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(args.tp),
                          RANK="0", LOCAL_RANK="0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(args.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kw = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=BATCH_TIMEOUT, **kw)
    ctrl = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    _GROUP = TPGroup(rank, world, local, dev, ctrl, procs)
    args.device = str(dev)
    log.info("tensor parallel: rank %d of %d on %s (%s)", rank, world, dev, backend)
    if rank == 0:
        return None
    return follow(args)


def follow(args) -> int:
    """A follower rank: load the same model shard and run every batch rank 0 broadcasts."""
    g = _GROUP
    try:
        model = load_model(args.model, args.dtype, g.device, args.random_weights_seed)
        if args.quantize == "fp8":
            quantize_body(model.get_decoder())
            torch.cuda.empty_cache()
        engine = TPScoringEngine(model, device=g.device, group=g, compile="off")
        engine.serve_follower()
    except Exception:  # noqa: BLE001 - the group is broken: leave
        log.exception("tensor parallel rank %d: stopping", g.rank)
        return 1
    finally:
        _shutdown()
    return 0


def _shutdown() -> None:
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def watch(server, stop: threading.Event) -> None:
    """Rank 0: a follower this process spawned that exits, or an engine that failed, takes the
    server to NOT_SERVING and ends it (exit status 1)."""
    g = _GROUP
    eng = server.engine

    def lost(why: str) -> None:
        log.error("tensor parallel: %s; NOT_SERVING, shutting down", why)
        eng.failed = eng.failed or why
        server.set_serving(False)
        stop.set()

    eng.on_failure = lost

    def loop():
        while not stop.is_set():
            for r, p in enumerate(g.procs, 1):
                if p.poll() is not None and not eng.stopping:
                    lost(f"rank {r} exited with status {p.returncode}")
                    return
            stop.wait(0.5)

    if g.procs:
        threading.Thread(target=loop, name="opd-tp-watch", daemon=True).start()


def finish(server, timeout: float = 30.0) -> int:
    """Rank 0 after the server stopped: followers told to stop (by the engine's worker) and
    joined; the process group destroyed. Returns 1 when the group had failed."""
    g = _GROUP
    failed = server.engine.failed
    for p in g.procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if not failed:
        _shutdown()
    return 1 if failed else 0


# ---- model ---------------------------------------------------------------------------------------
def load_model(model_dir: str, dtype: str, device, random_weights_seed: int | None = None):
    """The model sharded by transformers' TP plan over the group (plain, unsharded at --tp 1).
    Random weights with --tp > 1: rank 0 saves the random model once to a temporary directory
    every rank then loads sharded (the weights equal the one-rank server's for the same seed)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from teacher_server.model import DTYPES
    from teacher_server.model import load_model as load_plain

    g = _GROUP
    if g.world == 1:
        return load_plain(model_dir, dtype, str(device), random_weights_seed)
    tmp = None
    src = model_dir
    if random_weights_seed is not None:
        import tempfile

        tmp = Path(tempfile.gettempdir()) / f"opd-tp-random-{os.environ.get('MASTER_PORT', '0')}"
        if g.rank == 0:
            m = load_plain(model_dir, dtype, str(g.device), random_weights_seed)  # as one process builds it
            m.save_pretrained(str(tmp), safe_serialization=True)
            del m
            if g.device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier(group=g.ctrl)
        src = str(tmp)
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=DTYPES[dtype], attn_implementation="sdpa",
        distributed_config=DistributedConfig(tp_size=g.world, tp_plan="auto"))
    if tmp is not None:
        dist.barrier(group=g.ctrl)
        if g.rank == 0:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# ---- fp8 over the shards -------------------------------------------------------------------------
def _max_over_ranks(amax: torch.Tensor) -> None:
    dist.all_reduce(amax, op=dist.ReduceOp.MAX)


class FP8RowParallel(FP8Linear):
    """A row-parallel (input-sharded) linear layer as fp8 (`fp8.FP8Linear`): this rank's weight
    columns, the per-output-channel weight scales and the per-token activation scales taken over
    the WHOLE input dimension (a max all-reduce: once for the weights, one [tokens] vector per
    call), so every rank quantises exactly as one process would; the partial products are summed
    (all-reduce) and the bias added once. Replaces transformers' rowwise layer (its all-reduce
    included)."""

    def __init__(self, linear, emulate: bool = False):
        super().__init__(linear, emulate)
        self.weight_fp8, scale = quantize_rows(linear.weight.detach(), _max_over_ranks)
        self.weight_scale = scale.reshape(1, -1).contiguous()
        self.row_bias, self.bias = self.bias, None   # added once, after the sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.dequantized:
            y = torch.nn.functional.linear(x2, self.dequantized_weight(x.dtype))
        else:
            y = self.matmul(*quantize_rows(x2, _max_over_ranks))   # the bias: once, after the sum
        dist.all_reduce(y)
        if self.row_bias is not None:
            y = y + self.row_bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def quantize_body(body, emulate: bool = False) -> int:
    """`fp8.quantize_body` for a tensor-parallel body: every `nn.Linear` of the decoder layers whose
    local shard is a multiple of 16 both ways becomes fp8: column-parallel ones (weight rows
    sharded: q/k/v, gate/up; the input is whole on every rank, so `FP8Linear` of the local rows
    quantises as one process would) and row-parallel ones (`FP8RowParallel`: o, down). The
    replaced modules' transformers TP forwards go with them. Returns how many were replaced."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Shard

    def replace(mod):
        w = _local(mod.weight).detach()
        if w.shape[0] % 16 or w.shape[1] % 16:
            return None
        bias = None if mod.bias is None else torch.nn.Parameter(_local(mod.bias).detach(), requires_grad=False)
        lin = SimpleNamespace(weight=w, bias=bias, in_features=w.shape[1], out_features=w.shape[0])
        placements = getattr(mod.weight, "placements", ())
        row = bool(placements) and placements[0] == Shard(1)
        return FP8RowParallel(lin, emulate) if row else FP8Linear(lin, emulate)

    return fp8_quantize_body(body, emulate, replace=replace, what="tensor-parallel body")


# ---- the sharded head ------------------------------------------------------------------------------
def _owned(l: torch.Tensor, ids: torch.Tensor, offset: int, softcap, temp) -> torch.Tensor:
    """z = cap(l) / T at global `ids` [C, M] where this shard owns them, -inf elsewhere."""
    loc = ids - offset
    own = (loc >= 0) & (loc < l.shape[1])
    z = H._transform(l.gather(1, loc.clamp(0, l.shape[1] - 1)), softcap, temp)
    return torch.where(own, z, torch.full((), float("-inf"), device=z.device))


@torch.inference_mode()
def sharded_head_statistics(req: H.HeadRequest, weight: torch.Tensor, offset: int, g: TPGroup,
                            chunk_size: int = 1024, softcap: float | None = None, compiled: bool = False,
                            compile_backend: str = "inductor") -> dict[str, torch.Tensor]:
    """`head.head_statistics` over a vocabulary shard (`weight` = this rank's lm-head rows, starting
    at global id `offset`), merged across the group (module docstring). Every rank returns the
    same merged statistics."""
    rows = req.hidden.shape[0]
    dev = weight.device
    vl = weight.shape[0]
    want_k = req.top_k > 0 and (H.TOPK in req.stats or H.TAIL in req.stats)
    want_ent = H.ENTROPY in req.stats
    kk = min(req.top_k, vl) if want_k else 0
    fused = H.compiled_row_stats(compile_backend) if compiled else None
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (H.SAMPLED, "topk_vals", "topk_ids", H.TAIL, H.LSE,
                                                          H.ENTROPY, H.EXTRA, H.FULL)}
    for s in range(0, rows, chunk_size):
        e = min(rows, s + chunk_size)
        c = e - s
        l = torch.matmul(req.hidden[s:e], weight.t())             # raw logits of the shard, model dtype
        t1 = None if req.temperature is None else req.temperature[s:e].float()
        temp = None if t1 is None else t1[:, None]
        kern = K.available(l, softcap)
        raw = ids = None
        if kern:
            if l.stride(1) != 1:
                l = l.contiguous()
            blocks = want_k and H.use_blocks(vl, kk)
            m, s_sum, a_sum, bmax = K.row_stats(l, t1, softcap, want_ent, blocks)
            log_s = s_sum.log()
            lse_r = m + log_s
            ent_r = log_s - a_sum / s_sum if want_ent else None
            if want_k:
                raw, ids = H.topk_from_blocks(l, bmax, kk) if blocks else torch.topk(l, kk, dim=-1, sorted=True)
        else:
            if fused is not None and c > 1:
                lse_r, ent_r = fused(l, temp if temp is not None else torch.ones((c, 1), device=dev), softcap)
            else:
                lse_r, ent_r = H._row_stats_eager(l, temp, softcap, want_ent)
            if want_k:
                raw, ids = H.topk_raw(l, kk)
        cols = [lse_r[:, None]]
        if want_ent:
            cols.append(ent_r[:, None])
        if H.SAMPLED in req.stats:
            cols.append(_owned(l, req.targets[s:e, None], offset, softcap, temp))
        m_extra = 0
        if H.EXTRA in req.stats and req.extra_ids is not None:
            m_extra = req.extra_ids.shape[1]
            cols.append(_owned(l, req.extra_ids[s:e], offset, softcap, temp))
        if want_k:
            cols += [raw.float(), (ids + offset).float()]
        allp = g.all_gather(torch.cat(cols, 1))                  # [world, C, W]
        j = 0
        lse_all = allp[:, :, j]
        j += 1
        lse = torch.logsumexp(lse_all, 0)                          # all -inf row: -inf
        if H.LSE in req.stats:
            out[H.LSE].append(lse)
        if want_ent:
            logw = lse_all - lse
            w = logw.exp()
            out[H.ENTROPY].append(torch.where(w > 0, w * (allp[:, :, j] - logw), torch.zeros((), device=dev)).sum(0))
            j += 1
        if H.SAMPLED in req.stats:
            out[H.SAMPLED].append(allp[:, :, j].amax(0) - lse)
            j += 1
        if m_extra:
            out[H.EXTRA].append(allp[:, :, j:j + m_extra].amax(0) - lse[:, None])
            j += m_extra
        if H.FULL in req.stats:
            full = g.all_gather(H._transform(l, softcap, temp))   # [world, C, Vl]
            out[H.FULL].append(full.permute(1, 0, 2).reshape(c, -1) - lse[:, None])
        if want_k:
            cand_raw = allp[:, :, j:j + kk].permute(1, 0, 2).reshape(c, -1)
            cand_ids = allp[:, :, j + kk:j + 2 * kk].permute(1, 0, 2).reshape(c, -1)
            g_raw, pick = torch.topk(cand_raw, req.top_k, dim=-1, sorted=True)
            g_ids = cand_ids.gather(1, pick).long()
            out["topk_vals"].append(H._transform(g_raw, softcap, temp) - lse[:, None])
            out["topk_ids"].append(g_ids)
            if H.TAIL in req.stats:
                if kern:
                    out[H.TAIL].append(_tail(req, s, e, l, g_raw, lse, t1, softcap, kern, g))
                else:
                    out[H.TAIL].append(_tail_eager(req, s, e, l, g_raw, out["topk_vals"][-1], lse, t1, softcap, g))
        elif H.TAIL in req.stats:
            out[H.TAIL].append(torch.zeros(c, device=dev))            # top_k = 0: everything is tail
    return {k: torch.cat(v) for k, v in out.items() if v}


def _tail_eager(req: H.HeadRequest, s: int, e: int, l: torch.Tensor, g_raw: torch.Tensor, vals: torch.Tensor,
                lse: torch.Tensor, t1, softcap, g: TPGroup) -> torch.Tensor:
    """The eager head's tail (`head._tail`): log(1 - sum p_topk) in float64 from the merged top-k,
    and the exact complement (`_tail`) when some row's tail is below TAIL_EXACT_BELOW. Every rank
    holds the same merged top-k, so all take the same branch."""
    c, kk = vals.shape
    dev = vals.device
    k_row = req.row_k[s:e].clamp(max=kk) if req.row_k is not None else torch.full((c,), kk, device=dev)
    in_k = torch.arange(kk, device=dev)[None, :] < k_row[:, None]
    covered = torch.where(in_k, vals.double().exp(), torch.zeros((), dtype=torch.float64, device=dev)).sum(-1)
    if bool((covered > 1.0 - H.TAIL_EXACT_BELOW).any()):
        exact = _tail(req, s, e, l, g_raw, lse, t1, softcap, False, g)
        return torch.where(covered > 1.0 - H.TAIL_EXACT_BELOW, exact, torch.log1p(-covered.clamp(max=1.0)).float())
    return torch.log1p(-covered.clamp(max=1.0)).float()


def _tail(req: H.HeadRequest, s: int, e: int, l: torch.Tensor, g_raw: torch.Tensor, lse: torch.Tensor,
          t1: torch.Tensor | None, softcap, kern: bool, g: TPGroup) -> torch.Tensor:
    """log of the mass outside each row's own top-k, exact and tie-aware across the shards."""
    c, kk = g_raw.shape
    dev = l.device
    k_row = req.row_k[s:e].clamp(max=kk) if req.row_k is not None else torch.full((c,), kk, device=dev)
    has_k = k_row > 0
    thr = g_raw.gather(1, (k_row - 1).clamp(min=0).view(c, 1)).squeeze(1)
    thr = torch.where(has_k, thr, torch.full_like(thr, float("inf")))
    shift = torch.where(lse > float("-inf"), lse, torch.zeros_like(lse))
    if kern:
        below, eq = K.tail_stats(l, thr, shift, t1, softcap)
        part = torch.stack([below, eq.float()], 1)
    else:
        x = l.float()
        z = H._transform(l, softcap, None if t1 is None else t1[:, None])
        below = torch.where(x < thr[:, None], (z - shift[:, None]).exp(), torch.zeros((), device=dev)).sum(1)
        part = torch.stack([below, (x == thr[:, None]).sum(1).float()], 1)
    g.all_reduce(part)
    below, eq = part[:, 0], part[:, 1]
    in_k = torch.arange(kk, device=dev)[None, :] < k_row[:, None]
    extra = (eq - ((g_raw == thr[:, None]) & in_k).sum(1)).clamp(min=0)
    z_thr = H._transform(thr, softcap, t1)
    ties = torch.where(extra > 0, extra * torch.exp(z_thr - shift), torch.zeros_like(below))
    tail = torch.log(below + ties)
    return torch.where(has_k, tail, torch.zeros_like(tail))


def _takes_mask_dict(body) -> bool:
    """Whether the body's forward accepts `attention_mask={"full_attention": mask}` (packed.py)."""
    import inspect

    try:
        src = inspect.getsource(type(body).forward)
    except (OSError, TypeError):
        return False
    return "attention_mask, dict)" in src


# ---- the engine ------------------------------------------------------------------------------------
class TPScoringEngine(ScoringEngine):
    """`ScoringEngine` over a tensor-parallel model: rank 0 broadcasts each batch before running it,
    followers (`serve_follower`) run what it broadcasts; the head is `sharded_head_statistics`."""

    # a sharded model's parameters are DTensor shards on every rank: the UpdateWeights RPC (whole
    # tensors into rank 0's copy) would not reach them; refused with FAILED_PRECONDITION
    updatable_weights = False

    def __init__(self, model, *, group: TPGroup, **kw):
        super().__init__(model, **kw)
        self.group = group
        self.weight_local = _local(self.weight)
        self.vocab_offset = group.rank * self.weight_local.shape[0]
        self.failed: str | None = None
        self.on_failure = None        # rank 0: called once with the reason when the group breaks
        self.stopping = False
        self._followers_stopped = False
        self._tp_lock = threading.Lock()  # one batch at a time through the group (worker vs warm-up)
        self._fp8 = [m for m in self.body.modules() if isinstance(m, FP8Linear)]
        self._follower_packing = False
        if not self._packing_broken and not _takes_mask_dict(self.body):
            # a packed batch would fail on every rank (the fallback of the one-process engine would
            # then leave the group out of step): no packing for this model (Qwen3-MoE in transformers 5.25)
            log.info("packing: %s takes no per-layer-type mask dict; prefixes share a KV cache", type(self.body).__name__)
            self._packing_broken = True

    # the hook of `ScoringEngine._head`
    def _head_fn(self, req: H.HeadRequest) -> dict[str, torch.Tensor]:
        return sharded_head_statistics(req, self.weight_local, self.vocab_offset, self.group, self.chunk_size,
                                       self.softcap, compiled=self.compiled_head,
                                       compile_backend=self.compile_backend)

    def resolved_compile(self) -> str:
        """auto with --tp > 1: the head's row reduction only (compiling the body's layers with
        transformers' DTensor TP hooks inside is not verified; `--compile all` asks for it, and
        then a failed compile ends the server, since the group cannot fall back in step)."""
        if self.compile == "auto" and self.group.world > 1:
            return "head" if self.device.type == "cuda" else "off"
        return super().resolved_compile()

    def packing_active(self) -> bool:
        if self.group.rank != 0:
            return self._follower_packing
        return super().packing_active()

    def _launch_batch(self, batch):
        if self.group.rank != 0:
            return super()._launch_batch(batch)
        with self._tp_lock:
            if self.failed:
                raise RuntimeError(f"tensor-parallel group failed ({self.failed}); the server is shutting down")
            if self.group.world == 1:  # no group to break: the one-process fallbacks apply
                return super()._launch_batch(batch)
            try:
                self._send(batch)
                return super()._launch_batch(batch)
            except Exception as exc:
                self._fail(f"a batch failed on rank 0 ({type(exc).__name__}: {exc})")
                raise

    def _fail(self, why: str) -> None:
        if self.failed:
            return
        self.failed = why
        log.error("tensor parallel: %s", why)
        cb = self.on_failure
        if cb is not None:
            cb(why)

    def launch_batch(self, batch):
        if self.group.rank == 0 and self.failed:  # no fallbacks on a broken group
            raise RuntimeError(f"tensor-parallel group failed ({self.failed}); the server is shutting down")
        return super().launch_batch(batch)

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            self.stop_followers()

    def stop_followers(self) -> None:
        """Rank 0: tell the followers to leave their loop (once; not on a failed group)."""
        self.stopping = True
        if self.group.rank == 0 and self.group.world > 1 and not self.failed and not self._followers_stopped:
            self._followers_stopped = True
            with self._tp_lock:
                try:
                    dist.broadcast(torch.zeros(_HEADER, dtype=torch.long), 0, group=self.group.ctrl)
                except Exception:  # noqa: BLE001 - followers already gone
                    pass

    # ---- wire: a batch and the settings that shape its computation, as int64 tensors ----------
    def _settings(self) -> list[int]:
        f = struct.unpack("<q", struct.pack("<d", float(self.split_max_pad)))[0]
        flags = (int(self.packing_active()) | int(self.compiled_body) << 1 | int(self.compiled_head) << 2
                 | int(self.split_uneven) << 3 | int(self.prefix_sharing) << 4
                 | int(bool(self._fp8) and self._fp8[0].dequantized) << 5)
        return [flags, self.chunk_size, self.head_part_rows, self.prefix_min_tokens, self.split_min_tokens, f,
                self.pad_id]

    def _send(self, batch: list[ScoreItem]) -> None:
        n = len(batch)
        meta = np.zeros((n, 8), dtype=np.int64)
        for i, it in enumerate(batch):
            mask = sum(1 << b for b, name in enumerate(STAT_ORDER) if name in it.stats)
            p, m = it.extra_ids.shape if it.extra_ids is not None else (0, 0)
            meta[i] = (len(it.token_ids), it.target_start, it.target_end, it.top_k, mask, p, m, 0)
            meta[i, 7] = np.float64(it.temperature).view(np.int64)
        tokens = np.concatenate([it.token_ids.astype(np.int64) for it in batch])
        extra = [it.extra_ids.astype(np.int64).ravel() for it in batch if it.extra_ids is not None]
        extra = np.concatenate(extra) if extra else np.zeros(0, np.int64)
        payload = torch.from_numpy(np.concatenate([meta.ravel(), tokens, extra]))
        settings = self._settings()
        header = torch.tensor([1, n, len(tokens), len(extra), payload.numel(), *settings]
                              + [0] * (_HEADER - 5 - len(settings)), dtype=torch.long)
        dist.broadcast(header, 0, group=self.group.ctrl)
        dist.broadcast(payload, 0, group=self.group.ctrl)

    def _receive(self) -> list[ScoreItem] | None:
        header = torch.zeros(_HEADER, dtype=torch.long)
        dist.broadcast(header, 0, group=self.group.ctrl)
        h = header.tolist()
        if h[0] == 0:
            return None
        n, n_tok, n_extra, size = h[1:5]
        flags, self.chunk_size, self.head_part_rows, self.prefix_min_tokens, self.split_min_tokens, f, self.pad_id \
            = h[5:12]
        self.split_max_pad = struct.unpack("<d", struct.pack("<q", f))[0]
        self._follower_packing = bool(flags & 1)
        body, self.compiled_head = bool(flags & 2), bool(flags & 4)
        self.split_uneven, self.prefix_sharing = bool(flags & 8), bool(flags & 16)
        self._dequant = bool(flags & 32)
        if body and not self.compiled_body:
            self.compiled_body = compile_body(self.body, backend=self.compile_backend)
        elif not body and self.compiled_body:
            uncompile_body(self.body)
            self.compiled_body = False
        payload = torch.zeros(size, dtype=torch.long)
        dist.broadcast(payload, 0, group=self.group.ctrl)
        a = payload.numpy()
        meta = a[: 8 * n].reshape(n, 8)
        tokens, extra = a[8 * n: 8 * n + n_tok], a[8 * n + n_tok:]
        batch, t0, x0 = [], 0, 0
        for ln, ts, te, k, mask, p, m, tbits in meta.tolist():
            ext = None
            if p:
                ext = extra[x0: x0 + p * m].reshape(p, m).copy()
                x0 += p * m
            stats = frozenset(name for b, name in enumerate(STAT_ORDER) if mask >> b & 1)
            temp = float(np.int64(tbits).view(np.float64))
            batch.append(ScoreItem("tp", tokens[t0:t0 + ln].copy(), ts, te, k, stats, temp, ext))
            t0 += ln
        return batch

    def serve_follower(self) -> None:
        """A follower's loop: receive a batch, run it (results are rank 0's to deliver), until
        rank 0 says stop; an exception (a lost rank) propagates."""
        self._prepared = "follower"
        while True:
            batch = self._receive()
            if batch is None:
                log.info("tensor parallel rank %d: rank 0 stopped", self.group.rank)
                return
            if self._fp8 and self._dequant:
                with dequantized(self.body):
                    launched = ScoringEngine._launch_batch(self, batch)
            else:
                launched = ScoringEngine._launch_batch(self, batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            del launched
