"""`opd train --config FILE [--section.key=value ...] --teacher-url HOST:PORT[,HOST:PORT...]`."""

from __future__ import annotations

import json
import logging
import sys


ACCEPTS_OVERRIDES = True


def add_arguments(p):
    p.add_argument("--config", default=None, help="JSON or YAML file with sections model/data/rollout/teacher/loss/"
                   "warmup/optim/run (see student_trainer/config.py for every key and its default)")
    p.add_argument("--teacher-url", default=None, help="teacher server(s): HOST:PORT[,HOST:PORT...] (= teacher.url)")
    p.add_argument("--resume", action="store_true", help="continue from run.out_dir/checkpoints/latest exactly")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--log-level", default="INFO")
    p.epilog = ("Any config key can be overridden as --section.key=value, e.g. --loss.divergence=forward_kl "
                "--optim.zero_stage=3 --rollout.n=8. Several teachers: --teacher.routes.NAME.url=HOST:PORT (and "
                ".top_k/.temperature/.weight/.prompt_template) sends prompts whose teacher.route_key (data_source) is "
                "NAME there; --data.task=arithmetic,sort mixes built-in tasks; --teacher.prompt_template='{question} "
                "{solution}' gives the teacher a privileged prompt (docs/teachers.md). "
                "Multi-process: torchrun --nproc_per_node N -m opd train ...")


def main(args, extra: list[str] | None = None) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from student_trainer.config import ConfigError, load_config

    overrides = list(extra or getattr(args, "_extra", []) or [])
    if args.teacher_url:
        overrides.append(f"teacher.url={args.teacher_url}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"opd train: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    from student_trainer.trainer import Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume)
    except ConfigError as exc:
        print(f"opd train: config error: {exc}", file=sys.stderr)
        return 2
    try:
        last = trainer.run()
    finally:
        trainer.close()
        import torch.distributed as dist

        if dist.is_initialized():  # a live NCCL watchdog thread at exit aborts the process
            import deepspeed.comm as ds_comm

            if ds_comm.is_initialized():  # through DeepSpeed: it drops its cached groups too, so a
                ds_comm.destroy_process_group()  # second `opd train` in this process starts clean
            else:
                dist.destroy_process_group()
    # one write per line: the ranks of a torchrun launch share stdout, and a line written in one
    # write (< PIPE_BUF) never interleaves with another rank's
    sys.stdout.write(json.dumps({k: v for k, v in last.items() if isinstance(v, (int, float, str))}) + "\n")
    sys.stdout.flush()
    return 0
