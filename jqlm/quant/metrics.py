"""Quantization error metrics and storage accounting."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class QuantError(NamedTuple):
  """Error of an approximation ``x_hat`` of ``x`` (float32 scalars).

  Attributes:
    mse: mean squared error.
    max_error: largest absolute error.
    sqnr_db: signal-to-quantization-noise ratio,
      ``10 log10(sum(x^2) / sum((x - x_hat)^2))``; ``inf`` when exact.
  """

  mse: jax.Array
  max_error: jax.Array
  sqnr_db: jax.Array


def quantization_error(x: jax.Array, x_hat: jax.Array) -> QuantError:
  """MSE, max error and SQNR (dB) of ``x_hat`` against ``x``.

  Example::

    err = quantization_error(x, fake_quant(x, QuantSpec(format="int4")))
  """
  x = jnp.asarray(x)
  x_hat = jnp.asarray(x_hat)
  if x.shape != x_hat.shape:
    raise ValueError(
      f"quantization_error: shapes differ, x {x.shape} vs x_hat "
      f"{x_hat.shape}. Pass the dequantized array (q.dequantize())."
    )
  x = x.astype(jnp.float32)
  d = x - x_hat.astype(jnp.float32)
  noise = jnp.sum(d * d)
  signal = jnp.sum(x * x)
  sqnr = jnp.where(noise > 0, 10.0 * jnp.log10(signal / noise), jnp.inf)
  return QuantError(
    mse=jnp.mean(d * d), max_error=jnp.max(jnp.abs(d)), sqnr_db=sqnr
  )


def _bits(dtype) -> int:
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.finfo(dtype).bits
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.iinfo(dtype).bits
  return 8 * dtype.itemsize


def tree_nbytes(tree) -> int:
  """Storage bytes of every array leaf of ``tree`` (arrays or
  ``jax.ShapeDtypeStruct``), each element at its dtype's bit width (``int4``
  codes count half a byte, as backends that pack them store them; PRNG keys
  count 8 bytes)."""
  total_bits = 0
  for leaf in jax.tree.leaves(tree):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      continue
    n = int(np.prod(leaf.shape, dtype=np.int64))
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      total_bits += 64 * n
    else:
      total_bits += _bits(leaf.dtype) * n
  return (total_bits + 7) // 8
