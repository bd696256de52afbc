"""Wire encodings of teacher statistics on a TRAINED teacher: bytes per scored token, the error
each lossy value encoding introduces, and what that error does to a KL.

    PYTHONPATH=. python bench/bench_encodings.py --teacher DIR --student DIR [--top-k 32 64]

The demo's models work (`opd demo` caches the teacher under ~/.cache/opd/demo and writes the
student to runs/demo/hf). Sequences are held-out addition prompts + the teacher's own greedy
answers. For each encoding and compression: bytes per scored token on the wire (whole ScoreResult
messages), max |error| of the top-k log-probs against fp32, and the per-token forward KL(teacher ||
student) over the teacher's top-k + tail bucket computed in float64 from the exact and from the
lossy values (max |difference| and the relative change of the mean). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def topk_tail_fkl(t_ids, t_lp, t_tail, s_logp):
    """sum_i pT_i (log pT_i - log pS_i) + pT_tail (log pT_tail - log pS_tail), per row, float64."""
    t_lp = t_lp.astype(np.float64)
    s_at = np.take_along_axis(s_logp, t_ids, 1)
    s_tail = np.log(np.clip(1.0 - np.exp(s_at).sum(1), 1e-300, None))
    pt = np.exp(t_lp)
    kl = (pt * (t_lp - s_at)).sum(1)
    tail = np.exp(t_tail.astype(np.float64))
    kl += np.where(tail > 0, tail * (t_tail - s_tail), 0.0)
    return kl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--top-k", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--n", type=int, default=64, help="sequences")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from opd import generation, model_cache
    from rollout.tasks import arithmetic
    from rollout.tasks.encoding import prompt_ids
    from teacher_server.app import TeacherConfig, build_server
    from teacher_server.client import ScoreSettings, TeacherClient
    from teacher_server.service import ServerConfig

    tok = model_cache.load_tokenizer(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    exs = arithmetic.make_examples("eval", args.n, seed=0, digits=2, style="worked")
    responses = generation.generate_responses(teacher, tok, exs, max_new_tokens=32)  # ids, through eos
    seqs, starts = [], []
    for ex, r in zip(exs, responses):
        p = prompt_ids(tok, ex)
        seqs.append(p + list(r))
        starts.append(len(p))
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float64).eval()
    s_logp = []
    with torch.no_grad():
        for ids, st in zip(seqs, starts):
            lp = torch.log_softmax(student(torch.tensor([ids])).logits[0].double(), -1)
            s_logp.append(lp[st - 1: len(ids) - 1].numpy())
    s_logp = np.concatenate(s_logp)
    srv = build_server(TeacherConfig(model=args.teacher, dtype="fp32", server=ServerConfig(port=0)))
    srv.start()
    srv.warm_up_and_serve()
    rows = []
    try:
        with TeacherClient(f"127.0.0.1:{srv.port}") as c:
            for k in args.top_k:
                ref = None
                for enc in ("fp32", "bf16", "fp16", "q16", "q8"):
                    for comp in ("zstd", "none"):
                        st = c.score(seqs, starts, settings=ScoreSettings(top_k=k, statistics=("sampled", "topk", "tail"),
                                                                           value_encoding=enc, compression=comp))
                        ids = np.concatenate([x.topk_ids for x in st])
                        lp = np.concatenate([x.topk_logprobs for x in st])
                        tail = np.concatenate([x.tail_logmass for x in st])
                        kl = topk_tail_fkl(ids, lp, tail, s_logp)
                        if ref is None:
                            ref = (lp, kl)
                        positions = sum(x.num_positions for x in st)
                        rows.append({"k": k, "encoding": enc, "compression": comp,
                                     "bytes_per_token": sum(x.wire_bytes for x in st) / positions,
                                     "max_abs_logprob_err": float(np.abs(lp - ref[0]).max()),
                                     "max_abs_kl_err": float(np.abs(kl - ref[1]).max()),
                                     "mean_kl_rel_change": float(abs(kl.mean() - ref[1].mean()) / ref[1].mean())})
    finally:
        srv.stop(1)
    print(f"\n{len(seqs)} sequences, {positions} scored tokens; teacher {args.teacher}; student {args.student}; "
          f"mean forward KL(teacher||student) over top-k + tail = {ref[1].mean():.4f}\n")
    print("| top-k | values | compression | bytes/token | max abs log-prob err | max abs per-token KL err | mean KL rel. change |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['encoding']} | {r['compression']} | {r['bytes_per_token']:.1f} | {r['max_abs_logprob_err']:.2e} | "
              f"{r['max_abs_kl_err']:.2e} | {r['mean_kl_rel_change']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
