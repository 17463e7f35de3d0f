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
from jqlm.ops.quantized_dot import (
  STATS_SHAPE,
  native_recipes,
  native_supported,
  quantized_dot,
  quantized_dot_noise,
)

__all__ = ["STATS_SHAPE", "Impl", "KernelWeight", "TappedWeight", "is_prepared",
           "kernel_weight", "native_recipes", "native_supported", "prepare", "qmatmul", "qmatmul_fp8",
           "qmatmul_w8a8", "quantized_dot", "quantized_dot_noise", "scaled_matmul", "split_taps"]
