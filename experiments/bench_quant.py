"""Quantizer benchmark: ``python experiments/bench_quant.py``.

Same as ``jqlm bench quant``: jitted quantize -> dequantize round trips of a
4096x4096 float32 matrix per format, against a bf16 cast round trip.
"""

import sys

from jqlm.cli import main

if __name__ == "__main__":
  sys.exit(main(["bench", "quant", *sys.argv[1:]]))
