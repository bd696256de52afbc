"""Everything DeepSpeed: the one module of the trainer that imports it.

ZeRO stage 2 or 3, optimizer offloaded to the host (DeepSpeedCPUAdam), bf16, gradient clipping,
warm-up + cosine LR schedule. Single process needs the torch.distributed environment variables;
`ensure_dist_env` fills them in for a single process (so DeepSpeed does not go looking for MPI).
"""

from __future__ import annotations

import logging
import math
import os
import socket

import torch

log = logging.getLogger(__name__)


def ensure_dist_env(local_rank: int = 0) -> None:
    """Single process: fill in the torch.distributed variables. DeepSpeed places the model on
    ``cuda:LOCAL_RANK``, so LOCAL_RANK is the GPU this process trains on."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def cache_cpu_info() -> None:
    """DeepSpeed's CPU Adam asks py-cpuinfo about the CPU at every construction (twice), and
    py-cpuinfo runs subprocesses for each answer (a second or more on a busy host); the CPU does not
    change within a process, so the first answer is kept."""
    try:
        import cpuinfo
    except ImportError:
        return
    if getattr(cpuinfo.get_cpu_info, "opd_cached", False):
        return
    original, kept = cpuinfo.get_cpu_info, []

    def get_cpu_info():
        if not kept:
            kept.append(original())
        return dict(kept[0])

    get_cpu_info.opd_cached = True
    cpuinfo.get_cpu_info = get_cpu_info


def ds_config(optim, dtype: str, grad_accum: int = 1) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": {"stage": optim.zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": 1e-8,
                                                   "weight_decay": optim.weight_decay}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if optim.offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if optim.zero_stage == 3:
        cfg["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True})
    return cfg


def lr_lambda(optim, total_steps: int):
    def f(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        span = max(1, total_steps - optim.warmup_steps)
        t = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


class Engine:
    """A DeepSpeed engine around `module` plus the few operations the trainer needs."""

    def __init__(self, module: torch.nn.Module, optim, dtype: str, total_steps: int, device: str = "cpu"):
        index = 0
        if device.startswith("cuda"):
            index = torch.device(device).index or 0
            torch.cuda.set_device(index)
            # DS_ACCELERATOR=cpu (set for CPU runs, e.g. by the test suite) would make DeepSpeed keep
            # its tensors on the host and hand them to NCCL collectives, which refuse them
            if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
                log.warning("run.device=%s: DS_ACCELERATOR=%s replaced by cuda", device, os.environ["DS_ACCELERATOR"])
                os.environ["DS_ACCELERATOR"] = "cuda"
        else:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        ensure_dist_env(index)
        cache_cpu_info()
        import deepspeed
        from deepspeed.accelerator import get_accelerator, set_accelerator

        if device.startswith("cuda") and get_accelerator().device_name() != "cuda":
            # DeepSpeed was imported (and picked its accelerator) earlier in this process
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

            set_accelerator(CUDA_Accelerator())

        self._ds = deepspeed
        if not torch.distributed.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if os.environ.get("WORLD_SIZE") == "1":
                # one process: an in-memory store, so no MASTER_PORT has to stay free between being
                # chosen and being bound (on a busy host another process can take it in between:
                # EADDRINUSE); DeepSpeed adopts the initialised group
                torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0,
                                                     world_size=1)
            deepspeed.init_distributed(dist_backend=backend)
        cfg = ds_config(optim, dtype)
        self.zero_stage = optim.zero_stage
        schedule = lr_lambda(optim, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        if optim.zero_stage == 3:
            # lm_head.weight is read directly by the fused loss (its forward is never called)
            head = module.student.get_output_embeddings()
            deepspeed.zero.register_external_parameter(module, head.weight)

    @property
    def module(self):
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed scales by 1/grad_accum; we normalise by global token counts ourselves.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Apply the accumulated gradients; returns the gradient norm (pre-clipping)."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()  # also steps the LR schedule
        self.engine.set_gradient_accumulation_boundary(False)
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (gathered) weights of the wrapped student, keyed by HF names, on the host."""
        student = self.module.student
        if self.zero_stage == 3:
            params = list(student.parameters())
            with self._ds.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        return {k: v.detach().cpu() for k, v in student.state_dict().items()}

    def weight_buckets(self, bucket_bytes: int):
        """(number of buckets, iterator of buckets of (HF name, full tensor)) without a host copy
        of the model: under ZeRO-2 the parameters are whole on every rank and are read in place;
        under ZeRO-3 each bucket is gathered (every rank must consume the iterator, in step) and
        released before the next. The tensors are valid until the next bucket is taken."""
        from rollout.weight_sync import plan_buckets

        named = dict(self.module.student.named_parameters())  # tied weights appear once

        def nbytes(p):
            return (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size()
        plan = plan_buckets(((n, nbytes(p)) for n, p in named.items()), bucket_bytes)

        def gen():
            for names in plan:
                params = [named[n] for n in names]
                if self.zero_stage == 3:
                    with self._ds.zero.GatheredParameters(params, modifier_rank=None):
                        yield [(n, p.data) for n, p in zip(names, params)]
                else:
                    yield [(n, p.data) for n, p in zip(names, params)]
        return len(plan), gen()

    def save(self, path: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(path, tag=tag, client_state=client_state, save_latest=False)

    def load(self, path: str, tag: str) -> dict:
        _, client_state = self.engine.load_checkpoint(path, tag=tag, load_module_strict=True,
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
        return client_state or {}
