"""Weight-only low-bit matmul: int8 or packed int4 weights times bf16/fp16/f32
activations, dequantized inside the kernel."""

from jqlm_kernels.wxa16.pallas import (
  can_use,
  pack_int4,
  reference,
  unpack_int4,
  wxa16_matmul,
)

__all__ = ["can_use", "pack_int4", "reference", "unpack_int4",
           "wxa16_matmul"]
