"""FP8 (e4m3 x e4m3) matmul with float32 accumulation and tensor- or
row/column-wise scales."""

from jqlm_kernels.fp8.pallas import (
  E4M3_MAX,
  can_use,
  fp8_matmul,
  quantize_fp8,
  reference,
  why_not,
)

__all__ = ["E4M3_MAX", "can_use", "fp8_matmul", "quantize_fp8", "reference",
           "why_not"]
