"""jqlm.ops: dispatch of low-bit matmuls to the best implementation.

:func:`qmatmul` runs ``x @ dequantize(qweight)`` through a Pallas kernel of
``jqlm_kernels`` when the backend, dtype and shape allow it, else through
the XLA reference (dequantize, then a float32-accumulating dot).
"""

from jqlm.ops.qmatmul import (
  Impl,
  KernelWeight,
  TappedWeight,
  is_prepared,
  kernel_weight,
  prepare,
  qmatmul,
  qmatmul_fp8,
  qmatmul_w8a8,
  scaled_matmul,
  split_taps,
)

__all__ = ["Impl", "KernelWeight", "TappedWeight", "is_prepared",
           "kernel_weight", "prepare", "qmatmul", "qmatmul_fp8",
           "qmatmul_w8a8", "scaled_matmul", "split_taps"]
