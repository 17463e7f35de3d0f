"""Optimizer-update benchmark: ``python experiments/bench_optim.py``.

Same as ``jqlm bench optim``: one jitted update of SPAM, Stable-SPAM and the
stochastic-rounding apply on LLaMA-130M-shaped params, against optax.adamw.
"""

import sys

from jqlm.cli import main

if __name__ == "__main__":
  sys.exit(main(["bench", "optim", *sys.argv[1:]]))
