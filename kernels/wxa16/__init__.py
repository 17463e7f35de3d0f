"""Weight-only low-bit matmul: int8 or packed int4 weights times bf16/fp16/f32
activations, dequantized inside the kernel."""

from jqlm_kernels.wxa16.pallas import (
  can_use,
  dequantize,
  pack_int4,
  reference,
  reference_t,
  unpack_int4,
  why_not,
  wxa16_matmul,
  wxa16_matmul_t,
)

__all__ = ["can_use", "dequantize", "pack_int4", "reference", "reference_t",
           "unpack_int4", "why_not", "wxa16_matmul", "wxa16_matmul_t"]
