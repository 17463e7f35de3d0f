"""QArray: a quantized array as a JAX pytree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jqlm.quant.spec import QuantSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class QArray:
  r"""A quantized array: ``x ~ (codes - zero_point) * scale``.

  A registered pytree: ``codes``, ``scale``, ``zero_point`` and the optional
  outliers are leaves (so a QArray can sit in a params pytree, be sharded,
  jitted, vmapped and checkpointed); ``spec`` is static metadata.

  Attributes:
    codes: the element codes, same shape as the original array, in the
      narrowest jnp dtype that holds them (``int4``, ``uint2``,
      ``float8_e4m3fn``, ``float4_e2m1fn``, ...). For ``nf4`` and
      ``fp4_e1m2`` they are indices into the format's value table.
    scale: per-group scales (shape: see :class:`QuantSpec`), float32, or
      ``float8_e8m0fnu`` for MX formats. NaN marks a group whose input held
      a NaN or Inf.
    zero_point: integer zero points with the codes' dtype and the scale's
      shape, or ``None`` for symmetric specs.
    spec: the static :class:`QuantSpec`.
    outlier_values: ``(num_groups, keep_outliers)`` float32 values kept
      exactly, or ``None``.
    outlier_indices: ``(num_groups, keep_outliers)`` int32 positions of the
      outliers inside their group, or ``None``.
  """

  codes: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None = None
  spec: QuantSpec
  outlier_values: jax.Array | None = None
  outlier_indices: jax.Array | None = None

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    """Storage in bytes with the codes bit-packed at the format's width."""
    bits = self.size * self.spec.bits
    for leaf in (self.scale, self.outlier_values, self.outlier_indices):
      if leaf is not None:
        bits += leaf.size * jnp.dtype(leaf.dtype).itemsize * 8
    if self.zero_point is not None:
      bits += self.zero_point.size * self.spec.bits
    return (bits + 7) // 8

  @property
  def bits_per_element(self) -> float:
    """Average storage bits per element, scales and zero points included."""
    return 8.0 * self.nbytes / max(self.size, 1)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """Same as :func:`jqlm.quant.dequantize`."""
    from jqlm.quant.ops import dequantize  # noqa: PLC0415 (cycle)

    return dequantize(self, dtype)


jax.tree_util.register_dataclass(
  QArray,
  data_fields=[
    "codes",
    "scale",
    "zero_point",
    "outlier_values",
    "outlier_indices",
  ],
  meta_fields=["spec"],
)
