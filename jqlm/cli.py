"""The ``jqlm`` command line.

Sub-commands:

* ``jqlm demo``: quantize random data in every format and print a table of
  storage bits and errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
  from jqlm.demo import format_table, quant_error_table  # noqa: PLC0415

  rows = quant_error_table(
    rows=args.rows, cols=args.cols, seed=args.seed, outliers=args.outliers
  )
  print(
    f"jqlm quantizers on a ({args.rows}, {args.cols}) float32 Gaussian"
    + (f" with {args.outliers} large outliers" if args.outliers else "")
    + f", seed {args.seed}"
  )
  print(format_table(rows))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="jqlm",
    description="jqlm: low-bit LLM training research in JAX.",
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  demo = sub.add_parser(
    "demo",
    help="print a table of quantization formats and their errors",
    description="Quantize random data in every jqlm format and print the "
    "storage bits per element, MSE, max error and SQNR.",
  )
  demo.add_argument("--rows", type=int, default=256, help="matrix rows")
  demo.add_argument("--cols", type=int, default=1024, help="matrix columns")
  demo.add_argument("--seed", type=int, default=0, help="PRNG seed")
  demo.add_argument(
    "--outliers",
    type=int,
    default=8,
    help="number of large (20 sigma) outliers planted in the data",
  )
  demo.set_defaults(func=_cmd_demo)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 0
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
