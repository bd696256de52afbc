"""Combine the finished runs of several `bench/quality.py` executions into one comparison.

Long budgets are run in pieces (a grid on one machine, the other seeds on another, a method added
later), each piece writing its own `results.json`. This reads any number of them (or the
`grid_runs.json` files of docs/, whose runs carry no task), keeps per method the runs at the
learning rate named with `--pick METHOD=LR` (every rate of a method without one), and prints, as
markdown, each (method, rate)'s final accuracy over seeds [95% t-interval] with the per-seed
values, then the paired differences against the anchor methods (`quality_report.ANCHORS`); on a
mix of task families, the same per family and the per-family table of the bench's results.md.

    .venv/bin/python bench/quality_combine.py --task chain --seeds 0,1,2,3,4 \\
        --pick rkl=1e-3,sft=1e-3,fkl=1e-3 docs/quality_chain_long/results.json \\
        docs/quality_chain_long/rates500/results.json ...

A (method, rate, seed) found in two files is taken from the first and named on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_report as report  # noqa: E402


def load_runs(files: list[tuple[str, dict]], task: str) -> tuple[list[dict], list[str]]:
    """The records of `task` in these (path, parsed results.json / grid_runs.json) files, first
    file first; returns them and the (method, lr, seed) duplicates that were dropped."""
    seen, out, dups = {}, [], []
    for p, d in files:
        recs = d.get("records") if "records" in d else [{"task": task, **r} for r in d.get("runs", [])]
        recs = recs + grid_runs(d, task)
        for r in recs:
            if r.get("task") != task:
                continue
            key = (r["method"], float(r["lr"]), int(r["seed"]))
            if key in seen:
                dups.append(f"{key} again in {p} (accuracy {r['accuracy']:.3f} there, {seen[key]:.3f} kept)")
                continue
            seen[key] = r["accuracy"]
            out.append({**r, "source": str(p)})
    return out, dups


def grid_runs(results: dict, task: str) -> list[dict]:
    """The learning-rate grid's runs of a results.json, as records with the final accuracy only
    (the chosen rate's grid runs are among its records too; those are kept first)."""
    gseeds = report.grid_seeds(results.get("config", {}))
    out = []
    for method, g in (results.get("lr_grid") or {}).get(task, {}).items():
        for lr, acc in g["grid"].items():
            per = g.get("per_seed", {}).get(lr) or {str(gseeds[0]): acc}
            out += [{"task": task, "method": method, "lr": float(lr), "seed": int(s), "accuracy": a}
                    for s, a in per.items()]
    return out


def load_teacher(files: list[tuple[str, dict]], task: str, seeds: list[int]) -> dict | None:
    """The `teachers[task]` entry of the first file that has one, with the warm students of `seeds`
    gathered from every file (first file first): a mix's per-family starts come from all pieces."""
    first, students = None, {}
    for _, d in files:
        t = (d.get("teachers") or {}).get(task)
        if not t:
            continue
        first = first or t
        for s, v in t.get("students", {}).items():
            if int(s) in seeds:
                students.setdefault(s, v)
    return {**first, "students": students} if first else None


def combine(records: list[dict], task: str, seeds: list[int], pick: dict[str, float],
            labels: dict[str, str] | None = None, teacher: dict | None = None) -> str:
    """The markdown: one row per (method, rate) over `seeds` (missing seeds named), then the
    paired differences of the picked runs (one rate per method). On a mix (`teacher` with
    families, every picked run with its per-family accuracies): the pairs on each family too, and
    the per-family table (final accuracy, tokens to 50% / 80% of each family's teacher)."""
    labels = labels or {}
    rows = [r for r in records if int(r["seed"]) in seeds and (r["method"] not in pick
                                                                 or abs(float(r["lr"]) - pick[r["method"]]) < 1e-12)]
    keys = sorted({(r["method"], float(r["lr"])) for r in rows})
    lines = [f"Final held-out accuracy ({task}), seeds {', '.join(map(str, seeds))} in order:", "",
             "| method | lr | accuracy [95% CI] | per seed | missing seeds |", "|---|---|---|---|---|"]
    for m, lr in keys:
        by = {int(r["seed"]): r["accuracy"] for r in rows if r["method"] == m and float(r["lr"]) == lr}
        miss = [s for s in seeds if s not in by]
        lines.append(f"| {labels.get(m, m)} | {lr:g} | {report.fmt_ci(list(by.values()))} | "
                     + " / ".join(f"{by[s]:.3f}" if s in by else "-" for s in seeds)
                     + f" | {', '.join(map(str, miss)) or '-'} |")
    picked = [r for r in rows if r["method"] in pick]
    mix = bool(teacher and teacher.get("families") and picked and all("by_family" in r for r in picked))
    fams = list(teacher["families"]) if mix else []
    return "\n".join(lines + [""] + report.paired_lines(picked, task, list(pick), labels, fams)
                     + (report.family_lines(picked, task, teacher, list(pick), labels) if mix else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="results.json / grid_runs.json files")
    p.add_argument("--task", required=True)
    p.add_argument("--seeds", required=True, help="comma-separated seeds")
    p.add_argument("--pick", default="", help="comma-separated METHOD=LR: the rate whose runs each method shows "
                   "and is paired at (methods without one: every rate, no pairing)")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        pick = {m: float(v) for m, _, v in (x.partition("=") for x in args.pick.split(",") if x)}
    except ValueError:
        p.error(f"--seeds {args.seeds!r} / --pick {args.pick!r}: expected 0,1,2 and METHOD=LR,...")
    from quality import LABELS

    for m in pick:
        if m not in LABELS:
            p.error(f"--pick: unknown method {m!r}; choose from {', '.join(LABELS)}")
    for f in args.files:
        if not Path(f).is_file():
            p.error(f"{f}: no such file (expected a results.json or grid_runs.json)")
    files = []
    for f in args.files:
        try:
            d = json.loads(Path(f).read_text())
        except ValueError as e:
            p.error(f"{f}: not JSON ({e}); expected a results.json or grid_runs.json")
        if not isinstance(d, dict):
            p.error(f"{f}: a JSON {type(d).__name__}, expected a results.json or grid_runs.json object")
        files.append((f, d))
    records, dups = load_runs(files, args.task)
    for d in dups:
        print(f"[combine] dropped {d}", file=sys.stderr)
    print(combine(records, args.task, seeds, pick, LABELS, load_teacher(files, args.task, seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
