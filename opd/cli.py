"""The one `opd` command. Each subcommand lives in its own module, imported only when used.

A subcommand module exposes `add_arguments(parser)` and `main(args) -> int | None`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported lazily so `opd --help` stays instant.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "teacher": ("teacher_server.cli", "serve teacher statistics over gRPC from a Hugging Face model"),
    "train": ("student_trainer.cli", "on-policy distillation of a student against a remote teacher server"),
    "demo": ("opd.demo", "the whole pipeline on a tiny built-in model, on CPU, in minutes"),
    "rollout-server": ("rollout.server", "serve the local rollout engine over SGLang's HTTP API subset"),
    "eval": ("rollout.evaluate", "evaluate a model on a prompt dataset: avg@k / pass@k per data source"),
    "tiny-model": ("opd.tiny_cli", "build the tiny built-in tokenizer and model into a directory"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd", description="Disaggregated on-policy distillation: teacher server, student trainer, rollouts.")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    argv = sys.argv[1:]
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        # Only the chosen subcommand's module is imported (and may add its flags).
        if argv and argv[0] == name:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = _build_parser()
    args, extra = parser.parse_known_args()
    if extra:
        # only subcommands that take `--section.key=value` config overrides accept extra flags
        mod = importlib.import_module(SUBCOMMANDS[args.command][0]) if getattr(args, "command", None) else None
        bad = [e for e in extra if not (e.startswith("--") and "." in e.split("=", 1)[0] and "=" in e)]
        if mod is None or not getattr(mod, "ACCEPTS_OVERRIDES", False) or bad:
            parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
        args._extra = extra
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
