"""`opd tiny-model OUT`: write the tiny built-in tokenizer + random-weight model to a directory."""

from __future__ import annotations


def add_arguments(p):
    from opd.tiny import SIZES

    p.add_argument("out", help="output directory (Hugging Face format)")
    p.add_argument("--size", default="test", choices=sorted(SIZES), help="model size preset")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size")


def main(args):
    from opd.tiny import build_model

    out = build_model(args.out, size=args.size, seed=args.seed, vocab_size=args.vocab_size)
    print(out)
