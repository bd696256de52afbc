"""Weight sync time per step, trainer -> rollout engine on the same GPU: `disk` against `tensor`.

The trainer side is a random-weight student on the GPU (Qwen3-1.7B and Qwen3-8B shapes, bf16);
the engine is `opd rollout-server --device cuda` in a second process on the same GPU, speaking
SGLang 0.5.23's weight-update protocol. Each step perturbs the weights in place (as an optimizer
step would) and pushes them with the trainer's own code (rollout.weight_sync):

    disk    save_pretrained into --sync-dir (what the trainer's export does), then
            /update_weights_from_disk; the engine reads the safetensors back onto its GPU
    tensor  pause -> flush -> begin -> per bucket /update_weights_from_tensor with CUDA-IPC
            handles (no tensor bytes over HTTP) -> end -> flush -> continue; the engine copies
            from the trainer's memory on the device

Reported per shape and mode: the median push time over the steps after the first, and the bytes
moved (disk: written + read back; tensor: JSON payload bytes over HTTP, and bytes copied on the
device). The engine is the stand-in, not SGLang: its loads are a plain state-dict copy, so the
numbers are the transport's cost (disk I/O and serialisation against IPC handles), not SGLang's
loader. The NCCL broadcast path needs two GPUs and is not measured here.

    PYTHONPATH=. python bench/bench_weight_sync.py --out bench_weight_sync.json
    PYTHONPATH=. python bench/bench_weight_sync.py --shapes tiny-s --modes disk --device cpu --steps 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import QWEN3, tokenizer_config  # noqa: E402

# the student shapes of bench_trainer; the smoke shape with the tiny tokenizer's vocabulary
SHAPES = {"qwen3-1.7b": QWEN3["qwen3-1.7b"], "qwen3-8b": QWEN3["qwen3-8b"], "tiny-s": dict(QWEN3["tiny-s"], vocab_size=512)}


def build(root: Path, shape: str, device: str, dtype: torch.dtype):
    """A random model of the shape on `device`, and a directory the engine can start from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.tiny import build_tokenizer

    tok_dir = root / "tok"
    if not tok_dir.exists():
        build_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = tokenizer_config(SHAPES[shape], tok)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    d = root / shape
    model.save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return model, d


def start_engine(model_dir: Path, device: str, dtype: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "opd", "rollout-server", "--model-path", str(model_dir), "--port",
                             "0", "--device", device, "--dtype", dtype], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if " at http://" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, line.rsplit(" at ", 1)[1].strip()
    raise RuntimeError("opd rollout-server did not start")


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def push_disk(model, url: str, sync_dir: Path, version: int) -> dict:
    from rollout.weight_sync import DiskSync

    sync = DiskSync([url])
    try:
        t0 = time.perf_counter()
        tmp = sync_dir.with_name(sync_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(sync_dir, ignore_errors=True)
        os.replace(tmp, sync_dir)
        t_write = time.perf_counter() - t0
        sync.push(str(sync_dir), version)
        total = time.perf_counter() - t0
    finally:
        sync.close()
    written = sum(f.stat().st_size for f in sync_dir.glob("*.safetensors"))
    return {"push_s": total, "write_s": t_write, "load_s": total - t_write, "disk_bytes_written": written,
            "disk_bytes_read": written, "http_bytes": 0, "device_bytes": 0}


def push_tensor(model, url: str, bucket_mb: float, version: int) -> dict:
    from rollout import weight_sync as ws

    sync = ws.TensorSync([url])
    sent = [0]
    original = ws.serialize_named_tensors

    def counting(named, tp_size=1):
        out = original(named, tp_size)
        sent[0] += sum(len(x) for x in out)
        return out
    ws.serialize_named_tensors = counting
    try:
        sync.connect()
        named = dict(model.named_parameters())
        plan = ws.plan_buckets(((n, p.numel() * p.element_size()) for n, p in named.items()),
                               int(bucket_mb * 2**20))
        buckets = ([(n, named[n].data) for n in names] for names in plan)
        t0 = time.perf_counter()
        sync.push(buckets, len(plan), version)
        total = time.perf_counter() - t0
    finally:
        ws.serialize_named_tensors = original
        sync.close()
    return {"push_s": total, "buckets": len(plan), "disk_bytes_written": 0, "disk_bytes_read": 0,
            "http_bytes": sent[0], "device_bytes": model_bytes(model)}


def check_engine(model, url: str, version: int) -> None:
    """The engine holds the pushed values (a few rows of two tensors) and reports the version."""
    from rollout.sglang_client import http_json

    assert http_json(url + "/model_info", method="GET")[1]["weight_version"] == str(version)
    for name in ("model.norm.weight", "model.layers.0.mlp.down_proj.weight"):
        s, got = http_json(url + "/get_weights_by_name", {"name": name, "truncate_size": 4})
        want = dict(model.named_parameters())[name].detach().float().cpu()[:4]
        assert s == 200 and torch.equal(torch.tensor(got), want), f"{name} differs on the engine"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-1.7b,qwen3-8b")
    ap.add_argument("--modes", default="disk,tensor")
    ap.add_argument("--steps", type=int, default=4, help="pushes per shape and mode; the first is a warm-up")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--bucket-mb", type=float, default=512.0)
    ap.add_argument("--workdir", default=None, help="model and sync directories (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if "tensor" in args.modes and not torch.cuda.is_available():
        ap.error("--modes tensor needs CUDA (CUDA-IPC handles); use --modes disk on a CPU machine")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="opd-bench-wsync-"))
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in args.shapes.split(","):
        model, mdir = build(root, shape, args.device, dtype)
        nbytes = model_bytes(model)
        proc, url = start_engine(mdir, args.device, args.dtype)
        try:
            version = 0
            for mode in args.modes.split(","):
                times, last = [], {}
                for k in range(args.steps):
                    with torch.no_grad():  # an optimizer step's worth of change
                        for p in model.parameters():
                            p.add_(1e-3)
                    version += 1
                    last = (push_disk(model, url, root / "sync", version) if mode == "disk"
                            else push_tensor(model, url, args.bucket_mb, version))
                    check_engine(model, url, version)
                    if k > 0 or args.steps == 1:
                        times.append(last["push_s"])
                row = {"shape": shape, "mode": mode, "params": sum(p.numel() for p in model.parameters()),
                       "model_bytes": nbytes, "push_s_median": statistics.median(times), "push_s_all": times,
                       **{k: v for k, v in last.items() if k != "push_s"}}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            proc.kill()
            proc.wait()
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print()
    print("| shape | mode | model GB | push s (median) | disk GB written+read | HTTP MB | device GB copied |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['mode']} | {r['model_bytes'] / 1e9:.2f} | {r['push_s_median']:.2f} | "
              f"{(r['disk_bytes_written'] + r['disk_bytes_read']) / 1e9:.2f} | {r['http_bytes'] / 1e6:.2f} | "
              f"{r['device_bytes'] / 1e9:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "command": " ".join(sys.argv), "rows": rows},
                                             indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
