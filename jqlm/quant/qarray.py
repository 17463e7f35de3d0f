"""QArray: a quantized array as a JAX pytree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jqlm.quant.spec import QuantSpec


def _norm_axis(axis: int, ndim: int) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"QArray.pack: axis={axis} is out of range for codes of "
                     f"rank {ndim}; expected -{ndim} <= axis < {ndim}.")
  return axis % ndim


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

  def pack(self, axis: int = -1) -> PackedQArray:
    """The codes packed two (4-bit) or four (2-bit) per ``uint8`` byte
    along ``axis`` (:func:`jqlm.quant.pack`'s segment layout): real 4-bit
    storage that any checkpoint format accepts. Zero points are held one per
    byte.

    A weight ``(..., K, N)`` packed along K (``axis=-2``, what
    :func:`jqlm.models.quantize_model` does) is the layout the W4A16 kernels
    read as stored (:mod:`jqlm_kernels.wxa16`).

    Raises:
      ValueError: codes that are not sub-byte, outliers, or an axis whose
        length is not divisible by the codes per byte.
    """
    from jqlm.quant.rounding import pack  # noqa: PLC0415 (cycle)

    if self.outlier_values is not None:
      raise ValueError("QArray.pack does not support kept outliers.")
    if jnp.dtype(self.codes.dtype).itemsize != 1 or not (
        jnp.issubdtype(self.codes.dtype, jnp.integer)
        and jnp.iinfo(self.codes.dtype).bits < 8):
      raise ValueError(
        f"QArray.pack needs 4-bit or 2-bit integer codes, got "
        f"{self.codes.dtype}.")
    axis = _norm_axis(axis, self.codes.ndim)
    return PackedQArray(
      packed=pack(self.codes, axis=axis), scale=self.scale,
      zero_point=self.with_byte_codes().zero_point, spec=self.spec,
      shape=self.shape, axis=axis - self.codes.ndim)

  def with_byte_codes(self) -> QArray:
    """The same values with sub-byte integer codes and zero points
    (``int4``, ``uint4``, ``int2``, ...) held one per ``int8`` / ``uint8``.

    Checkpoint formats (tensorstore, hence orbax) reject 4-bit dtypes, and
    XLA:CPU stores them one per byte anyway; ``nbytes`` still counts the
    format's bits. Codes that are already bytes, or float codes, are kept.
    """
    def widen(a):
      if a is None or not jnp.issubdtype(a.dtype, jnp.integer):
        return a
      if jnp.iinfo(a.dtype).bits >= 8:
        return a
      signed = jnp.issubdtype(a.dtype, jnp.signedinteger)
      return a.astype(jnp.int8 if signed else jnp.uint8)

    return dataclasses.replace(self, codes=widen(self.codes),
                               zero_point=widen(self.zero_point))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """Same as :func:`jqlm.quant.dequantize`."""
    from jqlm.quant.ops import dequantize  # noqa: PLC0415 (cycle)

    return dequantize(self, dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackedQArray:
  """A :class:`QArray` whose sub-byte codes are packed into ``uint8`` along
  one axis (from :meth:`QArray.pack`), in :func:`jqlm.quant.pack`'s segment
  layout. A pytree like QArray.

  Attributes:
    packed: ``uint8`` codes, last axis shortened by the codes per byte.
    scale: as :class:`QArray`.
    zero_point: integer zero points held in ``int8`` / ``uint8``, or None.
    spec: the static :class:`QuantSpec`.
    shape: the logical shape (static).
    axis: the packed axis, negative (counted from the end, so that a stack
      of packed weights keeps it; static).
  """

  packed: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None = None
  spec: QuantSpec
  shape: tuple[int, ...]
  axis: int = -1

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    total = 0
    for leaf in (self.packed, self.scale, self.zero_point):
      if leaf is not None:
        total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total

  def unpack(self) -> QArray:
    from jqlm.quant.rounding import unpack  # noqa: PLC0415 (cycle)

    dtype = self.spec.info.code_dtype
    zero = self.zero_point
    if zero is not None:
      zero = zero.astype(dtype)
    return QArray(codes=unpack(self.packed, dtype, axis=self.axis),
                  scale=self.scale,
                  zero_point=zero, spec=self.spec)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return self.unpack().dequantize(dtype)


jax.tree_util.register_dataclass(
  PackedQArray, data_fields=["packed", "scale", "zero_point"],
  meta_fields=["spec", "shape", "axis"])


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
