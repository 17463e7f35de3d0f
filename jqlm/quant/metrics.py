"""Quantization error metrics."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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
