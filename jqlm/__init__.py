"""jqlm: low-bit LLM training research in JAX.

Sub-packages:

* :mod:`jqlm.quant`: pure-function quantizers (int2-8, fp8, fp4, NF4,
  ternary, binary, MX), stochastic rounding, packing, Hadamard rotation.

Importing jqlm has no side effects: it never touches ``jax.config``.
"""

from jqlm import optim, quant

__version__ = "0.1.0"

__all__ = ["__version__", "optim", "quant"]
