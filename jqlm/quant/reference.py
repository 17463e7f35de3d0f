"""Reference (oracle) matmul with a quantized weight.

Every low-bit matmul kernel in ``jqlm_kernels`` is checked against this
plain-jnp computation: dequantize the weight to float32, then a float32 dot
at ``Precision.HIGHEST``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqlm.quant.ops import dequantize
from jqlm.quant.qarray import QArray


def qmatmul_reference(x: jax.Array, w: QArray, out_dtype=None) -> jax.Array:
  """``x @ dequantize(w)`` in float32; ``x`` is ``(..., K)``, ``w`` ``(K, N)``.

  Args:
    x: activations of shape ``(..., K)``.
    w: a quantized ``(K, N)`` weight.
    out_dtype: output dtype (default: ``x.dtype``).
  """
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(
      f"qmatmul_reference: x {tuple(x.shape)} and weight {w.shape} do not "
      "match; expected x (..., K) and a 2-D weight (K, N)."
    )
  w_f32 = dequantize(w, jnp.float32)
  y = jnp.matmul(
    x.astype(jnp.float32), w_f32, precision=jax.lax.Precision.HIGHEST
  )
  return y.astype(out_dtype or x.dtype)
