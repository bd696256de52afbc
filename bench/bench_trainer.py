"""The trainer against a remote teacher, as users run it: one `opd teacher` process and one or
more `opd train` processes, each placed on a device of your choice, talking gRPC over loopback.

The teacher is a random-weight Qwen3-8B-shaped model; each trainer a random-weight
Qwen3-1.7B-shaped student (DeepSpeed ZeRO-2, optimizer offloaded to the CPU, gradient
checkpointing) with the local rollout engine on the trainer's device. One teacher process serves
every scenario in turn (the product's point: launch the teacher once, point trainers at it).

Scenarios (`--scenarios NAME=DEV[+DEV...],...`; one trainer per DEV, run at the same time):
    split=cuda:1          teacher on GPU 0, trainer + rollout on GPU 1
    shared=cuda:0         teacher, trainer and rollout on one GPU (two processes)
    two=cuda:1+cuda:1     two trainers at once against the one teacher

For each trainer: per-phase step times averaged over the steady steps (2..N), response tokens/s,
the fraction of step time spent waiting on the teacher, bytes/token received. For the teacher
(from its Prometheus /metrics, before and after each scenario): tokens scored, busy fraction,
tokens/s while busy, and each trainer's share.

    PYTHONPATH=. python bench/bench_trainer.py --device cuda --out bench_trainer.json
    PYTHONPATH=. python bench/bench_trainer.py --shape tiny --device cpu --steps 3   # smoke test

Every command line the benchmark runs is printed (and stored in the JSON) so any row can be rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import QWEN3, free_port, scrape, tokenizer_config  # noqa: E402

STEP_KEYS = ["step_s", "rollout_s", "teacher_tail_s", "wait_rollout_teacher_s", "teacher_wait_s", "train_s",
             "weight_sync_s", "teacher_wait_frac", "tokens", "tokens_per_s", "wire_bytes_per_token"]


def model_dir(root: Path, shape: str, tok_dir: Path) -> Path:
    from transformers import AutoTokenizer

    d = root / shape
    d.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tokenizer_config(QWEN3[shape], tok).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def start_teacher(cmd: list[str], env: dict, log_path: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    logf = open(log_path, "w")
    port = None
    for line in proc.stdout:
        logf.write(line)
        logf.flush()
        sys.stderr.write("[teacher] " + line)
        if "serving" in line and "on 127.0.0.1:" in line:
            port = int(line.rsplit(":", 1)[1])
            break
    if port is None:
        raise SystemExit(f"teacher did not start; see {log_path}")

    def drain():  # keep reading its output, or a full pipe blocks the server
        for x in proc.stdout:
            logf.write(x)
            logf.flush()
    threading.Thread(target=drain, daemon=True).start()
    return proc, port


def trainer_cmd(args, sdir: Path, port: int, device: str, out_dir: Path, seed: int) -> list[str]:
    dtype = "bf16" if device.startswith("cuda") else "fp32"
    return [sys.executable, "-m", "opd", "train", "--teacher-url", f"127.0.0.1:{port}", "--log-level", "WARNING",
            f"--model.student={sdir}", f"--model.dtype={dtype}", "--model.random_init=true",
            "--model.gradient_checkpointing=true", "--data.task=arithmetic",
            f"--data.prompts_per_step={args.prompts}", f"--rollout.n={args.n}",
            f"--rollout.max_new_tokens={args.max_new_tokens}", f"--rollout.staleness={args.staleness}",
            "--rollout.max_batch_size=128", f"--teacher.top_k={args.top_k}", "--teacher.concurrency=4",
            "--loss.divergence=reverse_kl", "--loss.chunk_size=1024", "--optim.lr=1e-6",
            f"--optim.micro_batch_tokens={args.micro_batch_tokens}", "--optim.zero_stage=2",
            "--optim.offload_optimizer=true", f"--run.steps={args.steps}", f"--run.device={device}",
            f"--run.out_dir={out_dir}", f"--run.seed={seed}", "--run.export_hf=false", "--run.plot=false",
            "--run.progress=false", "--run.tensorboard=false"]


def run_scenario(name: str, devices: list[str], args, sdir: Path, port: int, mport: int, root: Path) -> dict:
    before = scrape(mport)
    procs, t_start = [], time.time()
    for i, dev in enumerate(devices):
        out_dir = root / f"{name}-{i}"
        cmd = trainer_cmd(args, sdir, port, dev, out_dir, seed=i)
        print(f"[{name}] trainer {i}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        logf = open(root / f"{name}-{i}.log", "w")
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        procs.append(dict(proc=p, cmd=cmd, out=out_dir, log=root / f"{name}-{i}.log", first_row_t=None,
                          device=dev))
    # watch for each trainer's first metrics row (= initialisation + first step done) and the
    # moment all trainers are past step 1 (the teacher's steady window starts there)
    steady_mark = None
    while any(t["proc"].poll() is None for t in procs):
        for t in procs:
            f = t["out"] / "metrics.jsonl"
            if t["first_row_t"] is None and f.exists() and f.stat().st_size > 0:
                t["first_row_t"] = time.time()
        if steady_mark is None and all(t["first_row_t"] for t in procs):
            steady_mark = (time.time(), scrape(mport))
        time.sleep(0.25)
    t_end = time.time()
    after = scrape(mport)
    res = {"scenario": name, "devices": devices, "trainers": []}
    for i, t in enumerate(procs):
        rc = t["proc"].returncode
        rows = []
        f = t["out"] / "metrics.jsonl"
        if f.exists():
            rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if not rows or (rc != 0 and len(rows) < args.steps):
            tail = t["log"].read_text()[-3000:]
            raise SystemExit(f"[{name}] trainer {i} failed (rc {rc}); log tail:\n{tail}")
        if rc != 0:
            print(f"[{name}] trainer {i} finished all {len(rows)} steps but exited with rc {rc}", file=sys.stderr)
        steady = rows[1:] or rows
        mean = {k: sum(float(r.get(k, 0.0)) for r in steady) / len(steady) for k in STEP_KEYS}
        res["trainers"].append({"device": t["device"], "command": shlex.join(t["cmd"]), "rows": rows, "rc": rc,
                                "steady_mean": mean, "wall_s": t_end - t_start,
                                "first_step_done_s": (t["first_row_t"] or t_end) - t_start})
    d = lambda k, a=before, b=after: b.get(k, 0.0) - a.get(k, 0.0)  # noqa: E731
    teacher = {"tokens": d("opd_teacher_engine_tokens_total"), "busy_s": d("opd_teacher_engine_busy_seconds_total"),
               "wall_s": t_end - t_start, "wire_bytes": d("opd_teacher_response_bytes_total")}
    if steady_mark is not None:
        ts, mid = steady_mark
        teacher.update({"steady_tokens": d("opd_teacher_engine_tokens_total", mid, after),
                        "steady_busy_s": d("opd_teacher_engine_busy_seconds_total", mid, after),
                        "steady_wall_s": t_end - ts})
    res["teacher"] = teacher
    return res


def report(results: list[dict], header: str) -> str:
    lines = [header, "",
             "| scenario | trainer device | step s | rollout s | teacher tail s | train s | weight sync s | "
             "wait on teacher s | teacher wait / step | response tok/s | B/token | first step done s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for t in r["trainers"]:
            m = t["steady_mean"]
            lines.append(f"| {r['scenario']} | {t['device']} | {m['step_s']:.2f} | {m['rollout_s']:.2f} | "
                         f"{m['teacher_tail_s']:.2f} | {m['train_s']:.2f} | {m['weight_sync_s']:.2f} | "
                         f"{m['teacher_wait_s']:.2f} | {100 * m['teacher_wait_frac']:.1f}% | {m['tokens_per_s']:,.0f} | "
                         f"{m['wire_bytes_per_token']:.0f} | {t['first_step_done_s']:.0f} |")
    lines += ["", "| scenario | teacher tokens scored | teacher busy (steady) | teacher tok/s while busy | "
              "teacher tok/s of wall (steady) | share per trainer |", "|---|---|---|---|---|---|"]
    for r in results:
        te = r["teacher"]
        sb, sw, stok = te.get("steady_busy_s", 0.0), te.get("steady_wall_s", 0.0), te.get("steady_tokens", 0.0)
        shares = []
        tot = sum(t["steady_mean"]["tokens_per_s"] for t in r["trainers"]) or 1.0
        for t in r["trainers"]:
            shares.append(f"{100 * t['steady_mean']['tokens_per_s'] / tot:.0f}%")
        lines.append(f"| {r['scenario']} | {te['tokens']:,.0f} | {100 * sb / sw if sw else 0:.0f}% | "
                     f"{te['tokens'] / te['busy_s'] if te['busy_s'] else 0:,.0f} | "
                     f"{stok / sw if sw else 0:,.0f} | {' / '.join(shares)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda or cpu (picks the default scenarios and dtypes)")
    ap.add_argument("--teacher-device", default=None, help="default cuda:0 (cpu on cpu)")
    ap.add_argument("--scenarios", default=None,
                    help="NAME=DEV[+DEV...],... (default: split, shared and two with 2+ GPUs; shared with one)")
    ap.add_argument("--shape", default="full", choices=["full", "tiny"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--staleness", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--out", default=None, help="write every row, command and log path as JSON here")
    ap.add_argument("--keep", default=None, help="directory for models, runs and logs (default: a temp dir)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if args.scenarios is None:
        if cuda:
            import torch

            ngpu = torch.cuda.device_count()
            args.scenarios = "split=cuda:1,shared=cuda:0,two=cuda:1+cuda:1" if ngpu >= 2 else "shared=cuda:0"
        else:
            args.scenarios = "shared=cpu"
    scenarios = []
    for part in args.scenarios.split(","):
        name, _, devs = part.partition("=")
        if not name or not devs:
            raise SystemExit(f"--scenarios: {part!r} is not NAME=DEV[+DEV...]")
        scenarios.append((name, devs.split("+")))
    tdev = args.teacher_device or ("cuda:0" if cuda else "cpu")

    from opd.tiny import build_tokenizer

    root = Path(args.keep or tempfile.mkdtemp(prefix="opd-bench-train-"))
    root.mkdir(parents=True, exist_ok=True)
    build_tokenizer(root / "tok")
    t_shape, s_shape = ("qwen3-8b", "qwen3-1.7b") if args.shape == "full" else ("tiny-t", "tiny-s")
    tdir, sdir = model_dir(root, t_shape, root / "tok"), model_dir(root, s_shape, root / "tok")
    mport = free_port()
    tcmd = [sys.executable, "-m", "opd", "teacher", "--model", str(tdir), "--port", "0", "--device", tdev,
            "--dtype", "bf16" if tdev.startswith("cuda") else "fp32", "--random-weights-seed", "0",
            "--max-batch-tokens", "32768", "--chunk-size", "2048", "--metrics-port", str(mport),
            "--log-level", "INFO"]
    print(f"teacher: {shlex.join(tcmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    teacher, port = start_teacher(tcmd, dict(os.environ, PYTHONUNBUFFERED="1"), root / "teacher.log")
    t_ready = time.time() - t0
    results = []
    try:
        for name, devs in scenarios:
            results.append(run_scenario(name, devs, args, sdir, port, mport, root))
            print(report(results[-1:], f"### {name}"), file=sys.stderr, flush=True)
    finally:
        teacher.terminate()
        teacher.wait(120)
    gpu = ""
    if cuda:
        import torch

        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    header = (f"## Trainer vs teacher: teacher {t_shape} on {tdev}, student {s_shape}; {args.prompts} prompts x "
              f"{args.n} samples x {args.max_new_tokens} new tokens, staleness {args.staleness}, top-{args.top_k}; "
              f"steps 2..{args.steps} averaged {gpu}\n\nteacher ready in {t_ready:.0f} s")
    print("\n" + report(results, header))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "teacher_command": shlex.join(tcmd),
                                              "teacher_ready_s": t_ready, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
