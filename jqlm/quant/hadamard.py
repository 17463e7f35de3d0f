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


# ---------------------------------------------------------------------------
# Blockwise transforms of the low-precision training recipes
# (../shared/spec/lowp_training.md §1.3, §6.3, §7, §8, §10).

TE_RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
"""Transformer Engine's hard-coded random-Hadamard sign vector for NVFP4
(``nvfp4_tensor.py:49-60``; JAX ``quantize/hadamard.py:8-10``): computed
once, shared by every layer, never redrawn (spec §6.3)."""


def hadamard_matrix(n: int, dtype=jnp.float32) -> jax.Array:
  """The normalized Sylvester Hadamard matrix :math:`H_n / \\sqrt{n}`
  (symmetric, orthogonal), built in float32 and cast to ``dtype``: in
  bfloat16 the entries of :math:`H_{128}` round to ±0.08837890625, so
  :math:`H H^\\top = 0.999786\\,I` (QuEST's and Quartet-II's matrix,
  spec §8.3, §10)."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"hadamard_matrix needs a power-of-two size, got {n}.")
  h = jnp.ones((1, 1), jnp.float32)
  while h.shape[0] < n:
    h = jnp.block([[h, h], [h, -h]])
  return (h * (1.0 / float(n) ** 0.5)).astype(dtype)


def block_hadamard(
  x: jax.Array,
  axis: int,
  block: int,
  *,
  signs: jax.Array | None = None,
  sign_side: str = "pre",
  matrix_dtype=jnp.float32,
  transpose: bool = False,
) -> jax.Array:
  r"""Multiplies every ``block``-chunk of ``x`` along ``axis`` by ``T``.

  .. math:: T = \mathrm{diag}(s)\,H_b \;(\text{"pre"}) \quad\text{or}\quad
            T = H_b\,\mathrm{diag}(s) \;(\text{"post"})

  with :math:`H_b` from :func:`hadamard_matrix` in ``matrix_dtype`` and
  ``signs`` :math:`s` (length ``block``; none: the identity). Each chunk
  ``c`` (a row vector) becomes ``c T``, or ``c T^\top`` with ``transpose``
  (the inverse when ``T`` is exactly orthogonal). "pre" flips then
  rotates (TE, Quartet-II); "post" rotates then flips (the original
  Quartet, whose flips cancel in the GEMM: spec §1.3, §7.3 quirk 1). The
  product runs in float32 (a bf16 matrix is upcast exactly); the result
  is float32.
  """
  x = jnp.asarray(x)
  axis = axis % x.ndim
  n = x.shape[axis]
  if block < 1 or block & (block - 1) or n % block:
    raise ValueError(
      f"block_hadamard: axis {axis} has length {n}, which needs to be a "
      f"multiple of the power-of-two block {block}. Pad that dim, or keep "
      "this layer in high precision.")
  if sign_side not in ("pre", "post"):
    raise ValueError(f"sign_side must be 'pre' or 'post', got {sign_side!r}.")
  t = hadamard_matrix(block, matrix_dtype).astype(jnp.float32)
  if signs is not None:
    s = jnp.asarray(signs, jnp.float32)
    t = s[:, None] * t if sign_side == "pre" else t * s[None, :]
  if transpose:
    t = t.T
  v = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  lead = v.shape[:-1]
  v = v.reshape(*lead, n // block, block)
  v = jnp.einsum("...b,bc->...c", v, t, precision="highest")
  return jnp.moveaxis(v.reshape(*lead, n), -1, axis)
