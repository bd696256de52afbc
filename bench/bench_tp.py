"""Benchmark the tensor-parallel teacher (`opd teacher --tp N`) against the plain server, end to end.

Builds a random-weight model config in code (default: the Qwen3-8B shape, bf16; `--shape` also
has the Qwen3-32B shape, a Qwen3-30B-A3B-shaped MoE, and tiny shapes for a CPU smoke run), starts
each server as its own `python -m opd teacher --random-weights-seed 0` process on 127.0.0.1 and
measures tokens/s through gRPC (TeacherClient -> server -> client decode; every call sends new
random sequences, so nothing is served from a cache):
  - "plain": `--seqs` x `--seq-len` tokens, target_start 1, top-k + sampled + tail;
  - "prefix": `--prompts` prompts x `--samples` samples (`--prompt-len` + `--response-len`), the
    spans on the responses (prefix sharing on, as served).
Variants: the plain server and `--tp N` for every N given (`--tp 1` runs the tensor-parallel code
path with one rank: batch broadcast skipped, sharded head with no collectives). With
`--together` (the default when every variant fits one device: only --tp 1) all servers run at
once and the measurements alternate between them, round by round (`--rounds`), so drift hits
every variant alike; otherwise each variant runs alone, one after the other. Prints a markdown
table (median tokens/s per variant and workload, the ratio to the plain server, and for one fixed
batch every variant scores the max |difference| of the sampled log-probs and the top-k id overlap
against the first variant: 0 and 1 at --tp 1; bf16 rounding of the all-reduces at --tp > 1); --out
writes the JSON.

One H200 (the lead runs this; ~10 min incl. two 8B builds and their compiles):
    PYTHONPATH=. python bench/bench_tp.py --device cuda --tp 1 --out docs/bench_tp_h200.json
Multi-GPU (later, one node): PYTHONPATH=. python bench/bench_tp.py --device cuda --shape qwen3-32b --tp 2 4 8
CPU smoke run (tiny shape, ~1 min):
    PYTHONPATH=. python bench/bench_tp.py --shape tiny --device cpu --tp 1 2 --out /tmp/bench_tp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import add_workload_args, fill_sizes  # noqa: E402

DENSE = "qwen3"
MOE = "qwen3_moe"
SHAPES = {
    "qwen3-8b": (DENSE, dict(vocab_size=151936, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                             max_position_embeddings=40960, rope_theta=1000000.0)),
    "qwen3-32b": (DENSE, dict(vocab_size=151936, hidden_size=5120, num_hidden_layers=64, num_attention_heads=64,
                              num_key_value_heads=8, head_dim=128, intermediate_size=25600,
                              max_position_embeddings=40960, rope_theta=1000000.0)),
    "qwen3-30b-a3b": (MOE, dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                                moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                max_position_embeddings=40960, rope_theta=1000000.0)),
    "tiny": (DENSE, dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, intermediate_size=384, max_position_embeddings=8192,
                         rope_theta=10000.0)),
    "tiny-moe": (MOE, dict(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, intermediate_size=384, moe_intermediate_size=64,
                           num_experts=8, num_experts_per_tok=2, max_position_embeddings=8192, rope_theta=10000.0)),
}
SIZES = {  # seqs x seq_len; prompts x samples x (prompt_len + response_len)
    "full": dict(seqs=8, seq_len=2048, prompts=8, samples=8, prompt_len=1024, response_len=1024,
                 max_batch_tokens=32768),
    "tiny": dict(seqs=4, seq_len=128, prompts=2, samples=4, prompt_len=64, response_len=64, max_batch_tokens=4096),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, SHAPES, device_help="cuda or cpu (--tp N > 1 on cuda uses GPUs 0..N-1)")
    p.add_argument("--tp", type=int, nargs="+", default=[1], help="tensor-parallel sizes to run beside the plain server")
    p.add_argument("--no-plain", action="store_true", help="leave the plain server out (multi-GPU runs)")
    p.add_argument("--together", default="auto", choices=["auto", "yes", "no"],
                   help="run every server at once and alternate the measurements (auto: when all are --tp 1)")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per variant and workload (median)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="every server's --max-batch-tokens (default 32768, tiny shapes 4096: fixed, since servers "
                        "side by side would size an automatic budget from what the others left free)")
    p.add_argument("--ready-timeout-s", type=float, default=1800.0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    fill_sizes(args, SIZES)
    if any(n < 1 for n in args.tp):
        p.error(f"--tp {args.tp}: expected sizes >= 1")
    return args


def write_config(shape: str, out_dir: str) -> None:
    from transformers import Qwen3Config, Qwen3MoeConfig

    kind, kw = SHAPES[shape]
    cls = Qwen3MoeConfig if kind == MOE else Qwen3Config
    cls(**kw, tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None).save_pretrained(out_dir)


class Server:
    """`python -m opd teacher` in its own process (with `--tp N` unless N is None)."""

    def __init__(self, name: str, args, model_dir: str, tp: int | None):
        self.name, self.tp, self.port, self.lines = name, tp, None, []
        self.ready = threading.Event()
        cmd = [sys.executable, "-m", "opd", "teacher", "--model", model_dir, "--port", "0", "--device", args.device,
               "--dtype", args.dtype, "--random-weights-seed", "0", "--max-top-k", str(max(256, args.top_k)),
               "--max-queue-tokens", str(1 << 22), "--max-batch-tokens", str(args.max_batch_tokens),
               "--log-level", "INFO"]
        if tp is not None:
            cmd += ["--tp", str(tp)]
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=ROOT, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines = (self.lines + [line])[-200:]
            if self.port is None and "serving" in line and "on 127.0.0.1:" in line:
                self.port = int(line.rsplit(":", 1)[1])
                self.ready_s = time.perf_counter() - self.t0
                print(f"[{self.name}] ready after {self.ready_s:.0f}s", file=sys.stderr, flush=True)
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float) -> str:
        if not self.ready.wait(timeout) or self.port is None:
            raise RuntimeError(f"{self.name} did not start:\n" + "".join(self.lines[-40:]))
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its ranks
                self.proc.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from teacher_server.client import ScoreSettings, TeacherClient

    tmp = tempfile.mkdtemp(prefix="opd-bench-tp-")
    write_config(args.shape, tmp)
    vocab = SHAPES[args.shape][1]["vocab_size"]
    variants = ([] if args.no_plain else [("plain", None)]) + [(f"tp{n}", n) for n in args.tp]
    together = args.together == "yes" or (args.together == "auto" and all(n == 1 for n in args.tp))
    settings = ScoreSettings(top_k=args.top_k, statistics=("sampled", "topk", "tail"))
    rng = np.random.default_rng(0)
    n_plain = args.seqs * args.seq_len
    n_prefix = args.prompts * args.samples * (args.prompt_len + args.response_len)

    def workload(kind: str):
        if kind == "plain":
            seqs = [rng.integers(0, vocab, args.seq_len).tolist() for _ in range(args.seqs)]
            return seqs, [1] * len(seqs), n_plain
        seqs, starts = [], []
        for _ in range(args.prompts):
            prompt = rng.integers(0, vocab, args.prompt_len).tolist()
            for _ in range(args.samples):
                seqs.append(prompt + rng.integers(0, vocab, args.response_len).tolist())
                starts.append(args.prompt_len)
        return seqs, starts, n_prefix

    times: dict[str, dict[str, list[float]]] = {v: {"plain": [], "prefix": []} for v, _ in variants}
    info: dict[str, dict] = {}

    def measure(name: str, client) -> None:
        for kind in ("plain", "prefix"):
            seqs, starts, _ = workload(kind)
            t = time.perf_counter()
            client.score(seqs, starts, settings=settings)
            times[name][kind].append(time.perf_counter() - t)

    check_seqs, check_starts, _ = workload("plain")   # one fixed batch every variant scores: same numbers?
    check: dict[str, list] = {}

    def warm(client, name: str) -> None:
        for kind in ("plain", "prefix"):
            seqs, starts, _ = workload(kind)
            client.score(seqs, starts, settings=settings)
        check[name] = client.score(check_seqs, check_starts, settings=ScoreSettings(
            top_k=args.top_k, statistics=("sampled", "topk", "tail"), value_encoding="fp32"))

    servers: list[Server] = []
    try:
        if together:
            servers = [Server(v, args, tmp, n) for v, n in variants]
            clients = {s.name: TeacherClient(s.wait_ready(args.ready_timeout_s), timeout_s=3600) for s in servers}
            for s in servers:
                info[s.name] = {"ready_seconds": s.ready_s, "tp": s.tp}
                warm(clients[s.name], s.name)
            for _ in range(args.rounds):
                for s in servers:
                    measure(s.name, clients[s.name])
            for c in clients.values():
                c.close()
        else:
            for v, n in variants:
                s = Server(v, args, tmp, n)
                servers.append(s)
                c = TeacherClient(s.wait_ready(args.ready_timeout_s), timeout_s=3600)
                info[v] = {"ready_seconds": s.ready_s, "tp": n}
                warm(c, v)
                for _ in range(args.rounds):
                    measure(v, c)
                c.close()
                s.stop()
    finally:
        for s in servers:
            s.stop()
    R = {"env": {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
                 or platform.machine(), "torch": torch.__version__,
                 "transformers": __import__("transformers").__version__, "host": platform.node()},
         "args": vars(args), "together": together, "tokens": {"plain": n_plain, "prefix": n_prefix}, "variants": {}}
    for v, _ in variants:
        row = dict(info.get(v, {}))
        for kind, n_tok in (("plain", n_plain), ("prefix", n_prefix)):
            ts = times[v][kind]
            med = statistics.median(ts)
            row[kind] = {"seconds": ts, "median_seconds": med, "tokens_per_s": n_tok / med}
        ref = check.get(variants[0][0])
        if ref is not None and v in check:  # vs the first variant (the plain server unless --no-plain)
            row["max_abs_diff_sampled_vs_first"] = max(
                float(np.abs(a.sampled_logprobs - b.sampled_logprobs).max()) for a, b in zip(check[v], ref))
            row["topk_id_agreement_vs_first"] = float(np.mean(
                [np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.topk_ids, b.topk_ids)])
                 for a, b in zip(check[v], ref)]))
        R["variants"][v] = row
    print(report(R, args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(R, f, indent=1)
    return 0


def report(R, args) -> str:
    base = R["variants"].get("plain")
    lines = [f"### Tensor-parallel teacher vs plain server: {args.shape} (random weights, {args.dtype}) on "
             f"{R['env']['device']}", "",
             f"torch {R['env']['torch']}, transformers {R['env']['transformers']}; top-{args.top_k}; "
             f"{args.rounds} timed calls per cell (median), "
             f"{'servers side by side, calls alternating' if R['together'] else 'one server at a time'}; "
             f"plain = {args.seqs} x {args.seq_len} tokens, prefix = {args.prompts} prompts x {args.samples} samples x "
             f"({args.prompt_len} + {args.response_len}).", "",
             "| variant | workload | tokens/s | vs plain server | calls (s) | max abs diff sampled, top-k agreement "
             "(vs the first row's server, one batch) |", "|---|---|---|---|---|---|"]
    for v, row in R["variants"].items():
        for kind in ("plain", "prefix"):
            tps = row[kind]["tokens_per_s"]
            ratio = f"{tps / base[kind]['tokens_per_s']:.3f}x" if base else "n/a"
            calls = ", ".join(f"{t:.2f}" for t in row[kind]["seconds"])
            same = (f"{row['max_abs_diff_sampled_vs_first']:.3g}, {row['topk_id_agreement_vs_first']:.4f}"
                    if kind == "plain" and "max_abs_diff_sampled_vs_first" in row else "")
            lines.append(f"| {v} | {kind} | {tps:,.0f} | {ratio} | {calls} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
