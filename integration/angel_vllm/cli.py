"""``angel-kernels`` command line (console script of the package).

    angel-kernels demo [--model PATH] [--modes MODE ...] [--quick] [--max-tokens N] [--json FILE]
"""
import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import demo

    parser = argparse.ArgumentParser(prog="angel-kernels", description="angel-kernels: Triton kernels for cheaper LLM inference in vLLM")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "demo",
        help="run every plugin mode on a real model through vLLM and print one table",
        description="Runs the unquantized baseline, ifq, ifq_int4, the int8 KV cache, their combinations and n-gram "
        "speculative decoding through vLLM (GPU if present, else CPU) and prints tokens/s, perplexity on held-out "
        "Wikipedia summaries, greedy agreement with the baseline, KV bytes per token and accepted draft tokens.",
    )
    demo.add_arguments(p)
    p.set_defaults(run=demo.main_from_args)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
