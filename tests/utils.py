"""Shared test helpers (tolerances from dtypes, numpy references)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# (atol, rtol) for comparing a computation in `dtype` with its reference.
_TOL = {
  jnp.dtype(jnp.float64): (1e-12, 1e-12),
  jnp.dtype(jnp.float32): (1e-5, 1e-5),
  jnp.dtype(jnp.bfloat16): (1e-2, 1e-2),
  jnp.dtype(jnp.float16): (1e-3, 1e-3),
}


def tolerance(dtype) -> dict[str, float]:
  """``dict(atol=..., rtol=...)`` for results computed in ``dtype``."""
  atol, rtol = _TOL[jnp.dtype(dtype)]
  return dict(atol=atol, rtol=rtol)


def np32(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x).astype(jnp.float32))
