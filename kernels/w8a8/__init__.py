"""int8 x int8 matmul with int32 accumulation and row/column scales."""

from jqlm_kernels.w8a8.pallas import (
    can_use,
    quantize_rows,
    reference,
    w8a8_matmul,
    why_not,
)

__all__ = ["can_use", "quantize_rows", "reference", "w8a8_matmul",
           "why_not"]
