"""Run observability: JSONL metrics every step, a progress line with rate and ETA, TensorBoard
when installed, and a PNG of the main curves at the end."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

log = logging.getLogger("opd.train")

PLOTS = [("loss", "loss"), ("loss/reverse_kl", "reverse KL (student||teacher)"), ("loss/forward_kl", "forward KL"),
         ("reward", "reward / accuracy of rollouts"), ("eval_accuracy", "eval accuracy (greedy)"),
         ("loss/entropy", "student entropy"), ("tokens_per_s", "tokens/s"), ("teacher_wait_frac", "teacher wait / step")]


class RunLog:
    def __init__(self, out: Path, cfg, resume: bool = False, enabled: bool = True):
        self.out, self.enabled, self.cfg = Path(out), enabled, cfg
        self.path = self.out / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        if not resume and self.path.exists():
            self.path.unlink()
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        self.f = open(self.path, "a")
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            except Exception as exc:  # tensorboard is optional (torch's writer needs the tensorboard package)
                log.info("run.tensorboard: no event files (%s: %s; pip install tensorboard); metrics.jsonl has "
                         "every value", type(exc).__name__, exc)
                self.tb = None

    def step(self, m: dict) -> None:
        if not self.enabled:
            return
        m = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
        m["time_s"] = round(time.perf_counter() - self.t0, 3)
        self.rows.append(m)
        self.f.write(json.dumps(m) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, m["step"])
        if self.cfg.run.progress:
            done, total = m["step"], self.cfg.run.steps
            rate = len(self.rows) / max(1e-9, m["time_s"])
            eta = (total - done) / rate if rate > 0 else float("nan")
            extra = f" eval_acc {m['eval_accuracy']:.3f}" if m.get("eval_accuracy") is not None else ""
            kl = m.get("loss/reverse_kl")
            print(f"\r[train] step {done}/{total} | loss {m['loss']:.4f}"
                  + (f" | rkl {kl:.4f}" if kl is not None else "")
                  + f" | reward {m['reward']:.3f}{extra} | {m['tokens_per_s']:.0f} tok/s"
                  f" | teacher wait {100 * m['teacher_wait_frac']:.0f}% | {rate:.2f} step/s ETA {eta:.0f}s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.f.close()
        if self.tb is not None:
            self.tb.close()
        if self.cfg.run.plot:
            plot_metrics(self.path, self.out / "metrics.png")


def plot_metrics(jsonl: Path, png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        log.info("matplotlib not installed: no plot (pip install 'opd[plot]')")
        return None
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    panels = [(k, t) for k, t in PLOTS if any(r.get(k) is not None for r in rows)]
    if not panels:
        return None
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4.2 * cols, 3 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (k, title) in zip(axes.flat, panels):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
