"""Trainer-side halves of SGLang's GPU weight-sync paths. GPU only; not run by the CPU tests.

NCCL broadcast (trainer and engines on different hosts), per optimizer step:
    engine = SGLangEngine(urls)
    group = await init_nccl_weight_group(engine, "10.0.0.5", 29613, gpus_per_engine=[1, 1])  # once
    await sync_weights_nccl(engine, group, model.named_parameters(), version=step)
The engine side (SGLang 0.5.23 `init_weights_update_group`) joins ranks rank_offset+tp_rank of a
group rendezvoused over tcp://master_address:master_port with the store prefixed by group_name;
the trainer is rank 0 and hosts that store. We build the trainer's group the same way, separate
from the trainer's default process group, so DeepSpeed's collectives are untouched.

CUDA IPC (trainer and engine on the same GPUs): `serialize_for_sglang` + `update_weights_from_tensor`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import torch


def _new_trainer_group(master_address: str, master_port: int, world_size: int, group_name: str, backend: str):
    """Rank 0 of a standalone group, created like SGLang's engine-side helper (tcp:// rendezvous,
    PrefixStore(group_name), its own NCCL communicator). Uses torch's private helper, as SGLang does."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _new_process_group_helper, rendezvous

    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", 0, world_size))
    store = dist.PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name)
    return pg


async def init_nccl_weight_group(engine, master_address: str, master_port: int, gpus_per_engine: list[int],
                                 group_name: str = "weight_update_group", backend: str = "nccl"):
    world_size = 1 + sum(gpus_per_engine)
    # The engines block in rendezvous until the trainer joins: start their calls, then join.
    engines_joined = asyncio.ensure_future(engine.init_weights_update_group(
        master_address, master_port, gpus_per_engine, group_name, backend))
    await asyncio.sleep(0.5)
    pg = await asyncio.to_thread(_new_trainer_group, master_address, master_port, world_size, group_name, backend)
    await engines_joined
    return pg


def _buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int):
    bucket, size = [], 0
    for name, t in named:
        if bucket and size + t.numel() * t.element_size() > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


async def sync_weights_nccl(engine, pg, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                            group_name: str = "weight_update_group", bucket_bytes: int = 1 << 30) -> None:
    """SGLang 0.5.23 order: pause(retract) -> flush -> begin -> per bucket (post metadata, broadcast
    each tensor in list order from rank 0, await replies) -> end -> flush -> continue.
    Tensors must be full (unsharded, gathered) HF-named CUDA tensors."""
    import torch.distributed as dist

    await engine.pause_generation("retract")
    await engine.flush_cache()
    await engine.begin_weight_update()
    try:
        for bucket in _buckets(named_tensors, bucket_bytes):
            names = [n for n, _ in bucket]
            dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
            shapes = [list(t.shape) for _, t in bucket]
            reply = asyncio.ensure_future(engine.update_weights_from_distributed(
                names, dtypes, shapes, version, group_name=group_name))

            def broadcast():
                for _, t in bucket:
                    opts = dist.BroadcastOptions()
                    opts.rootRank = 0
                    pg.broadcast([t.detach().contiguous()], opts).wait()
                torch.cuda.synchronize()
            await asyncio.to_thread(broadcast)
            await reply
    finally:
        await engine.end_weight_update()
        await engine.flush_cache()
        await engine.continue_generation()


def serialize_for_sglang(named_tensors: list[tuple[str, torch.Tensor]], tp_size: int = 1) -> list[str]:
    """CUDA-IPC payload for /update_weights_from_tensor (load_format null): the same serialized
    [(name, tensor)] list for every TP rank. Needs sglang importable in the trainer's env; keep the
    tensors alive until the engine replies."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()
    payload = MultiprocessingSerializer.serialize(named_tensors, output_str=True)
    return [payload] * tp_size
