"""The quality benchmark's analysis and reporting (`bench/quality.py` writes the records this reads).

Pure functions over run records (no torch): the 95% confidence interval of a mean over seeds, the
student tokens / wall time a run takes to reach a fraction of the teacher's accuracy, the
flatness rule of `--until-flat`, the per-method learning-rate choice of `--lr-grid`, the markdown
tables and the plot.

A run record (``record.json``) has ``task``, ``method``, ``seed``, ``lr``, ``accuracy`` (held-out
greedy accuracy at the end), ``tokens``, ``wall_s``, ``steps``, ``stop`` ("budget" | "flat" |
"steps"), ``peak_rss_mb`` and ``curve``: the trainer's evals as ``[student tokens, accuracy,
seconds since the trainer started]`` (older records: without the seconds); on a mix also
``curve_by_family``: family -> ``[student tokens, accuracy]`` at the same evals.
"""

from __future__ import annotations

import math
import statistics

# Two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..30 (standard table values;
# tests/test_quality_tasks.py checks each against a float64 integration of the t density).
T_975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
Z_975 = 1.959964  # df > 30: the normal quantile (t_{0.975, 30} is already within 4% of it)

THRESHOLDS = (0.5, 0.8)  # fractions of the teacher's accuracy reported as tokens-to-threshold


def t_interval(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width) of the two-sided 95% Student-t confidence interval of the mean of `xs`
    (seeds as independent draws); half-width nan for fewer than two values."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    df = len(xs) - 1
    q = T_975[df - 1] if df <= len(T_975) else Z_975
    return m, q * statistics.stdev(xs) / math.sqrt(len(xs))


def mean_sd(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "-"
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.{digits}f} ± {s:.{digits}f}"


def fmt_ci(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "-"
    m, h = t_interval(xs)
    if math.isnan(h):
        return f"{m:.{digits}f} (n=1)"
    return f"{m:.{digits}f} [{m - h:.{digits}f}, {m + h:.{digits}f}]"


def trajectory(rec: dict, start: float) -> list[tuple[float, float, float]]:
    """(student tokens, accuracy, wall seconds) of a run: the start (0, start accuracy, 0), the
    trainer's evals, then the held-out accuracy at the end of the run."""
    pts = [(0.0, float(start), 0.0)]
    for p in rec.get("curve", []):
        pts.append((float(p[0]), float(p[1]), float(p[2]) if len(p) > 2 else float("nan")))
    pts.append((float(rec["tokens"]), float(rec["accuracy"]), float(rec["wall_s"])))
    return pts


def first_reach(points: list[tuple[float, float, float]], level: float) -> tuple[float, float] | None:
    """(tokens, wall seconds) of the first point whose accuracy is >= `level`; None if none is."""
    for tokens, acc, wall in points:
        if acc >= level - 1e-12:
            return tokens, wall
    return None


def is_flat(accuracies: list[float], window: int, delta: float) -> bool:
    """The `--until-flat` rule: True when the last `window` evals improve the best accuracy seen
    before them by no more than `delta` (needs window + 1 evals)."""
    if window < 1 or len(accuracies) < window + 1:
        return False
    return max(accuracies[-window:]) <= max(accuracies[:-window]) + delta


def all_flat(curves: list[list[float]], window: int, delta: float) -> bool:
    """`--until-flat` on a mix: True when every family's eval curve is flat (`is_flat`), so a run is
    not stopped on one family's plateau while another still climbs (one curve: `is_flat`)."""
    return bool(curves) and all(is_flat(c, window, delta) for c in curves)


def pick_lr(grid: dict[float, float]) -> float:
    """The learning rate with the best final accuracy; a tie goes to the smallest rate."""
    best = max(grid.values())
    return min(lr for lr, acc in grid.items() if acc == best)


def grid_seeds(conf: dict) -> list[int]:
    """The seeds an execution's learning-rate grid ran (results.json written before --grid-seeds:
    the first seed)."""
    return conf.get("grid_seeds") or conf.get("seeds", [0])[:1]


def choose_lr(per_seed: dict[float, dict[int, float]], seeds: list[int]) -> tuple[dict[float, float], float | None]:
    """`--lr-grid` with `--grid-seeds`: the mean final accuracy of each rate over `seeds` (a rate
    missing one of their runs is left out) and the rate `pick_lr` chooses among them (None when no
    rate has every seed's run)."""
    means = {lr: statistics.fmean(v[s] for s in seeds) for lr, v in per_seed.items() if all(s in v for s in seeds)}
    return means, (pick_lr(means) if means else None)


def threshold_cell(recs: list[dict], starts: dict[int, float], level: float) -> tuple[str, str]:
    """Median student tokens and median wall seconds over the seeds that reached `level`, with
    how many did; "not reached" when none did."""
    got = [first_reach(trajectory(r, starts.get(r["seed"], 0.0)), level) for r in recs]
    hit = [g for g in got if g is not None]
    if not hit:
        return "not reached", "-"
    tail = f" ({len(hit)}/{len(recs)})"
    walls = [w for _, w in hit if not math.isnan(w)]
    return (f"{statistics.median(t for t, _ in hit):.0f}{tail}",
            f"{statistics.median(walls):.0f}{tail}" if walls else "-")


def method_rows(records: list[dict], task: str, methods: list[str]) -> dict[str, list[dict]]:
    out = {}
    for m in methods:
        rs = sorted((r for r in records if r["task"] == task and r["method"] == m), key=lambda r: r["seed"])
        if rs:
            out[m] = rs
    return out


def summarize(records: list[dict], teachers: dict, conf: dict, labels: dict[str, str], command: str,
              machine: str, lr_grid: dict | None = None) -> str:
    """The markdown report: per task, a table of final accuracy (95% t-interval over seeds), gain
    over the start, tokens and wall time to 50% / 80% of the teacher, the budget actually used,
    then the learning-rate grid when there was one."""
    budget = (f"until the eval curve is flat (no gain > {conf['flat_delta']} over the last "
              f"{conf['flat_window']} evals) or {conf['token_budget']} student tokens"
              if conf.get("until_flat") else f"{conf['token_budget']} student tokens")
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "",
             f"Budget per run: {budget} ({conf['samples_per_step']} sampled sequences per step); seeds "
             f"{conf['seeds']}; greedy accuracy on {conf['eval_size']} held-out problems. Accuracy: mean over "
             f"seeds [95% Student-t interval]; Δ: paired gain over each seed's start, mean ± sample std; "
             f"to 50% / 80%: median student tokens (and wall seconds) over the seeds whose curve reached "
             f"that fraction of the teacher's accuracy (k/n: how many did).", ""]
    if conf.get("method_lr"):
        lines += ["Learning rates set by --method-lr (no grid for these): "
                  + ", ".join(f"{labels.get(m, m)} {v:g}" for m, v in conf["method_lr"].items()) + ".", ""]
    if conf.get("failed_tasks"):
        lines += [f"Left out (preparation failed, see prep_TASK.log): {', '.join(conf['failed_tasks'])}.", ""]
    for task in conf["tasks"]:
        t = teachers.get(task, {})
        starts = {int(k): v["accuracy"] for k, v in t.get("students", {}).items()}
        teacher_acc = t.get("accuracy", float("nan"))
        start_kind = t.get("start", "warm")
        recovery = (f", trained with {t['teacher_recovery']:.0%} recovery examples" if t.get("teacher_recovery")
                    else "")
        hints = (f" ({t['student_hints']:.0%} of its SFT examples with the reference in the prompt)"
                 if t.get("student_hints") else "")
        lines += [f"### {task} (teacher {teacher_acc:.3f}{recovery}; {start_kind} student{hints}, before "
                  f"{t.get('student_before', float('nan')):.3f})", ""]
        self_acc = {int(k): v["self_teacher_accuracy"] for k, v in t.get("students", {}).items()
                    if "self_teacher_accuracy" in v}
        if self_acc:
            lines += ["Self-teacher (each seed's warm student shown the question and its reference solution), "
                      f"held-out greedy accuracy: {statistics.fmean(self_acc.values()):.3f} ("
                      + ", ".join(f"seed {k} {v:.3f}" for k, v in sorted(self_acc.items())) + ").", ""]
        lines += ["| method | lr | accuracy [95% CI] | Δ vs start | tokens to 50% | tokens to 80% | s to 50% | "
                  "s to 80% | tokens used | stop | wall s | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, rs in method_rows(records, task, conf["methods"]).items():
            gain = [r["accuracy"] - starts[r["seed"]] for r in rs if r["seed"] in starts]
            cells = ([threshold_cell(rs, starts, f * teacher_acc) for f in THRESHOLDS] if teacher_acc > 0
                     else [("- (teacher at 0)", "-")] * len(THRESHOLDS))
            stops = sorted({r.get("stop", "budget") for r in rs})
            lrs = sorted({r.get("lr", conf.get("lr")) for r in rs})
            lines.append(f"| {labels.get(method, method)} | {', '.join(f'{x:g}' for x in lrs)} | "
                         f"{fmt_ci([r['accuracy'] for r in rs])} | {mean_sd(gain)} | {cells[0][0]} | {cells[1][0]} | "
                         f"{cells[0][1]} | {cells[1][1]} | {mean_sd([r['tokens'] for r in rs], 0)} | "
                         f"{'/'.join(stops)} | {mean_sd([r['wall_s'] for r in rs], 0)} | "
                         f"{max(r['peak_rss_mb'] for r in rs):.0f} |")
        lines.append("")
        if t.get("families"):
            lines += family_lines(records, task, t, conf["methods"], labels)
        lines += paired_lines(records, task, conf["methods"], labels, list(t.get("families") or ()))
        grid = (lr_grid or {}).get(task)
        if grid:
            gseeds = grid_seeds(conf)
            what = (f"seed {gseeds[0]}, final held-out accuracy" if len(gseeds) == 1 else
                    f"seeds {', '.join(map(str, gseeds))}, mean final held-out accuracy (per seed in results.json)")
            lines += [f"Learning-rate grid ({task}, {what}; chosen = best, ties to the smaller rate):", "",
                      "| method | " + " | ".join(f"lr {x:g}" for x in conf["lr_grid"]) + " | chosen |",
                      "|---|" + "---|" * (len(conf["lr_grid"]) + 1)]
            for method, g in grid.items():
                accs = {float(k): v for k, v in g["grid"].items()}
                lines.append(f"| {labels.get(method, method)} | " +
                             " | ".join(f"{accs[x]:.3f}" if x in accs else "-" for x in conf["lr_grid"]) +
                             f" | {g['chosen']:g} |")
            lines.append("")
    return "\n".join(lines)


# The methods every other one is compared with, seed by seed: on-policy distillation's main form,
# off-policy SFT on teacher samples and RL from the task reward; on a mix of families, the routed
# specialists.
ANCHORS = ("rkl", "sft", "grpo", "two-teacher")


def paired_differences(records: list[dict], task: str, a: str, b: str,
                       family: str | None = None) -> list[tuple[int, float]]:
    """(seed, accuracy of `a` - accuracy of `b`) over the seeds both methods finished on `task`;
    with `family`, the accuracies on that family of a mix."""
    acc = {}
    for r in records:
        if r["task"] == task and r["method"] in (a, b):
            acc.setdefault(r["method"], {})[r["seed"]] = r["by_family"][family] if family else r["accuracy"]
    return [(s, acc[a][s] - acc[b][s]) for s in sorted(set(acc.get(a, {})) & set(acc.get(b, {})))]


def paired_lines(records: list[dict], task: str, methods: list[str], labels: dict[str, str],
                 families: list[str] = ()) -> list[str]:
    """Each method against each anchor (ANCHORS) run on the same seeds: the mean paired difference of
    the final accuracy with its 95% t-interval (in bold when it excludes 0), the seeds on which the
    method is ahead, and the per-seed differences; on a mix, the same on each of `families` too.
    Nothing when fewer than two seeds pair up."""
    rows = []
    for anchor in (m for m in ANCHORS if m in methods):
        for m in methods:
            if m == anchor or (m in ANCHORS and ANCHORS.index(m) < ANCHORS.index(anchor)):
                continue  # each pair once
            for fam in (None, *families):
                d = paired_differences(records, task, m, anchor, fam)
                if len(d) < 2:
                    continue
                xs = [x for _, x in d]
                mean, h = t_interval(xs)
                cell = f"{mean:+.3f} [{mean - h:+.3f}, {mean + h:+.3f}]"
                if mean - h > 0 or mean + h < 0:
                    cell = f"**{cell}**"
                rows.append(f"| {labels.get(m, m)} - {labels.get(anchor, anchor)}{f' (on {fam})' if fam else ''} | "
                            f"{cell} | {sum(x > 0 for x in xs)}/{len(xs)} | {', '.join(f'{x:+.3f}' for x in xs)} |")
    if not rows:
        return []
    return [f"Paired differences ({task}): final accuracy of one method minus another's on the same seed (same "
            "start, same teacher), mean [95% t-interval over the seeds; bold: excludes 0], the seeds where the "
            "first is ahead, and each seed's difference (seeds in order):", "",
            "| comparison | mean difference [95% CI] | ahead | per seed |", "|---|---|---|---|", *rows, ""]


def family_lines(records: list[dict], task: str, t: dict, methods: list[str], labels: dict[str, str]) -> list[str]:
    """A mix of task families: the teachers per family and each method's final accuracy per family."""
    fams = list(t["families"])
    first = t.get("first_teacher_by_family", {})
    lines = [f"Per family ({task}; the accuracy above is the mean over the families). Teachers: "
             + ", ".join(f"{f}'s on {f} {v['accuracy']:.3f}" for f, v in t["families"].items())
             + (f"; one-teacher uses {fams[0]}'s teacher for every family: "
                + ", ".join(f"on {f} {first[f]:.3f}" for f in fams) if first else "")
             + (f"; the generalist (one teacher trained on every family): "
                + ", ".join(f"on {f} {t['generalist']['by_family'][f]:.3f}" for f in fams)
                if t.get("generalist") else "") + ".", "",
             "| method | " + " | ".join(f"{f} [95% CI]" for f in fams)
             + "".join(f" | {f}: tokens to {x:.0%}" for f in fams for x in THRESHOLDS) + " |",
             "|---|" + "---|" * (len(fams) * (1 + len(THRESHOLDS)))]
    students = t.get("students", {})
    starts = {f: [v["by_family"][f] for v in students.values() if "by_family" in v] for f in fams}
    if all(starts.values()):
        lines.append("| (start) | " + " | ".join(fmt_ci(starts[f]) for f in fams)
                     + " | -" * (len(fams) * len(THRESHOLDS)) + " |")
    for method, rs in method_rows(records, task, methods).items():
        if all("by_family" in r for r in rs):
            cells, curves = [], all(r.get("curve_by_family") for r in rs)
            for f in fams:  # against the family's own teacher, from the trainer's per-family evals
                level = t["families"][f]["accuracy"]
                fstart = {int(k): v["by_family"][f] for k, v in students.items() if "by_family" in v}
                frs = [family_record(r, f) for r in rs]
                cells += [threshold_cell(frs, fstart, x * level)[0] if level > 0 and curves else "-"
                          for x in THRESHOLDS]
            lines.append(f"| {labels.get(method, method)} | "
                         + " | ".join(fmt_ci([r["by_family"][f] for r in rs]) for f in fams)
                         + "".join(f" | {c}" for c in cells) + " |")
    return lines + [""]


def family_record(rec: dict, family: str) -> dict:
    """A mix's run record seen on one family: its final accuracy there and the trainer's evals of
    that family (``curve_by_family``; no wall time per eval), for `trajectory` / `threshold_cell`."""
    return {"seed": rec["seed"], "tokens": rec["tokens"], "accuracy": rec["by_family"][family],
            "wall_s": rec["wall_s"], "curve": rec.get("curve_by_family", {}).get(family, [])}


def mean_curve(recs: list[dict], start: dict[int, float], grid: list[float]) -> list[float]:
    """Mean accuracy over seeds on a common token grid: each seed's trajectory as a step function
    (the last eval at or before the grid point; a run that stopped earlier holds its final value)."""
    out = []
    for x in grid:
        vals = []
        for r in recs:
            pts = trajectory(r, start.get(r["seed"], 0.0))
            vals.append([a for tok, a, _ in pts if tok <= x][-1])
        out.append(statistics.fmean(vals))
    return out


def plot(records: list[dict], teachers: dict, conf: dict, labels: dict[str, str], path) -> None:
    """Top row: mean accuracy over seeds against student tokens per task and method (step-wise
    mean of the seeds' trajectories; dotted lines: the teacher and 50% / 80% of it). Bottom row:
    the held-out gain over each seed's start, mean with its 95% t-interval, dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = conf["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 8.0), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    cmap = plt.get_cmap("tab20")
    for col, task in enumerate(tasks):
        ax, bx = axes[0][col], axes[1][col]
        t = teachers.get(task, {})
        starts = {int(k): v["accuracy"] for k, v in t.get("students", {}).items()}
        rows = method_rows(records, task, conf["methods"])
        top = max([r["tokens"] for rs in rows.values() for r in rs] or [1])
        xs = [top * i / 60 for i in range(61)]
        names = []
        for k, method in enumerate(conf["methods"]):
            rs = rows.get(method)
            if not rs:
                continue
            color = cmap(2 * k % 20 + (k >= 10))
            ax.plot(xs, mean_curve(rs, starts, xs), color=color, lw=1.3, label=labels.get(method, method))
            gain = [r["accuracy"] - starts[r["seed"]] for r in rs if r["seed"] in starts]
            if gain:
                m, h = t_interval(gain)
                bx.bar(len(names), m, yerr=0.0 if math.isnan(h) else h, color=color, capsize=3)
                bx.plot([len(names)] * len(gain), gain, "k.", ms=3)
                names.append(method)
        teacher_acc = t.get("accuracy", 1.0)
        ax.axhline(teacher_acc, color="k", ls=":", lw=1, label="teacher")
        for f in THRESHOLDS:
            ax.axhline(f * teacher_acc, color="0.6", ls=":", lw=0.8)
        ax.set_title(f"{task}: accuracy vs student tokens")
        ax.set_xlabel("student tokens")
        ax.set_ylabel("greedy accuracy (mean over seeds)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        bx.axhline(0.0, color="k", lw=0.8)
        bx.set_xticks(range(len(names)))
        bx.set_xticklabels(names, rotation=30, fontsize=8)
        bx.set_ylabel("held-out gain over start")
        bx.set_title(f"{task}: final gain (mean, 95% t-interval, dots = seeds)", fontsize=9)
        bx.grid(alpha=0.3, axis="y")
    axes[0][-1].legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
