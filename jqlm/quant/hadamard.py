r"""Fast Walsh-Hadamard transform for rotation-based quantization.

Rotating by an orthonormal Hadamard matrix spreads outliers over a whole
vector before quantization, so fewer bits are lost to them (QuaRot, arXiv
2404.00456; QuEST, arXiv 2502.05003; HALO, arXiv 2501.02625).

.. math:: y = \tfrac{1}{\sqrt{n}} H_n D x, \qquad x = D \tfrac{1}{\sqrt{n}}
          H_n y

with :math:`H_n` the Sylvester Hadamard matrix (:math:`H_{2n} = [[H_n, H_n],
[H_n, -H_n]]`) and :math:`D = \mathrm{diag}(\pm 1)` random signs drawn from
``key`` (the identity without a key). ``n`` must be a power of two; the
transform is :math:`O(n \log n)` butterflies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _signs(key, n: int) -> jax.Array:
  return jax.random.rademacher(key, (n,), jnp.float32)


def hadamard(
  x: jax.Array,
  axis: int = -1,
  *,
  key: jax.Array | None = None,
  inverse: bool = False,
) -> jax.Array:
  """Orthonormal (randomized) Walsh-Hadamard transform along ``axis``.

  Args:
    x: floating-point array; ``x.shape[axis]`` must be a power of two.
    axis: the axis to transform.
    key: optional PRNG key for random signs (a randomized Hadamard rotation).
      Use the same key for the inverse.
    inverse: apply the inverse rotation (``D H``) instead of ``H D``.

  Returns:
    An array of ``x``'s shape and dtype (computed in float32).
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
      f"hadamard expects a floating-point array, got dtype {x.dtype}."
    )
  if not -x.ndim <= axis < max(x.ndim, 1):
    raise ValueError(
      f"axis={axis} is out of range for an array of rank {x.ndim}."
    )
  axis = axis % x.ndim
  n = x.shape[axis]
  if n < 1 or n & (n - 1):
    raise ValueError(
      f"hadamard needs a power-of-two length along axis {axis}, got {n} "
      f"(shape {x.shape}). Pad that axis to {1 << max(n - 1, 0).bit_length()} "
      "or rotate blocks of a power-of-two size (reshape first)."
    )
  v = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  lead = v.shape[:-1]
  signs = None
  if key is not None:
    signs = _signs(key, n).reshape((1,) * len(lead) + (n,))
  if signs is not None and not inverse:
    v = v * signs
  h = 1
  while h < n:
    v = v.reshape(*lead, n // (2 * h), 2, h)
    a, b = v[..., 0, :], v[..., 1, :]
    v = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
    h *= 2
  v = v * (1.0 / float(n) ** 0.5)
  if signs is not None and inverse:
    v = v * signs
  return jnp.moveaxis(v, -1, axis).astype(x.dtype)
