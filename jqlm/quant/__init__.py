"""jqlm.quant: pure-function quantizers (imports jax only).

See :class:`QuantSpec` for the formats and granularities, :func:`quantize`,
:func:`dequantize` and :func:`fake_quant` for the maths, and
:func:`stochastic_round` for unbiased rounding, and :func:`recipe` for the
low-precision training recipes (per-GEMM quantization, ``jqlm.quant.recipes``).
"""

from jqlm.quant.hadamard import hadamard
from jqlm.quant.metrics import QuantError, quantization_error, tree_nbytes
from jqlm.quant.ops import dequantize, fake_quant, group_layout, quantize
from jqlm.quant.qarray import PackedQArray, QArray
from jqlm.quant.recipes import (
  RECIPE_SWITCHES,
  RECIPES,
  Elem,
  Mask,
  Operand,
  OperandNoise,
  OperandQuant,
  Recipe,
  Rotation,
  Scale,
  Signs,
  Source,
  check_shapes,
  operand_noise,
  quantize_operand,
  recipe,
)
from jqlm.quant.reference import qmatmul_reference
from jqlm.quant.rounding import hash_bits, pack, stochastic_round, unpack
from jqlm.quant.spec import (
  E1M2_VALUES,
  NF4_VALUES,
  Format,
  FormatInfo,
  Granularity,
  QuantSpec,
  Rounding,
  format_info,
  int_format,
)

__all__ = [
  "RECIPE_SWITCHES",
  "RECIPES",
  "Elem",
  "Mask",
  "Operand",
  "OperandNoise",
  "OperandQuant",
  "Recipe",
  "Rotation",
  "Scale",
  "Signs",
  "Source",
  "check_shapes",
  "operand_noise",
  "quantize_operand",
  "recipe",
  "E1M2_VALUES",
  "NF4_VALUES",
  "Format",
  "FormatInfo",
  "Granularity",
  "PackedQArray",
  "QArray",
  "QuantError",
  "QuantSpec",
  "Rounding",
  "dequantize",
  "fake_quant",
  "format_info",
  "group_layout",
  "hadamard",
  "hash_bits",
  "int_format",
  "pack",
  "qmatmul_reference",
  "quantization_error",
  "tree_nbytes",
  "quantize",
  "stochastic_round",
  "unpack",
]
