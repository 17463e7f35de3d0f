r"""quantize, dequantize and fake_quant: pure, jit/vmap/grad-safe functions.

Scales (per group :math:`g` of the granularity; all math in float32):

* symmetric integer: :math:`s = \max_g |x| / q_{max}` with
  :math:`q_{max} = 2^{b-1} - 1`, :math:`q = \mathrm{clip}(\mathrm{round}(x/s),
  -2^{b-1}, q_{max})`, :math:`\hat x = q s`.
* asymmetric integer (min-max, Q-GaLore ``_quantize``, spec §5.2):
  :math:`s = (\max_g x - \min_g x) / (q_{max} - q_{min})`,
  :math:`z = \mathrm{clip}(q_{min} - \mathrm{round}(\min_g x / s), q_{min},
  q_{max})`, :math:`q = \mathrm{clip}(\mathrm{round}(x/s) + z, q_{min},
  q_{max})`, :math:`\hat x = (q - z) s`. As in the reference, a group of one
  sign clamps :math:`z` to the end of the range, so its far end saturates.
* float and codebook formats (fp8, fp4, nf4): :math:`s = \max_g |x| / c_{max}`
  (``code_max``, default the format's largest value), codes are
  :math:`x / s` rounded onto the format's grid.
* ternary (BitNet b1.58, arXiv 2402.17764): :math:`s = \mathrm{mean}_g |x|`,
  :math:`q = \mathrm{clip}(\mathrm{round}(x/s), -1, 1)`.
* binary: :math:`s = \mathrm{mean}_g |x|`, :math:`q = \mathrm{sign}(x)`
  (0 maps to +1).
* MX (OCP Microscaling v1.0): :math:`s = 2^{\lfloor \log_2 \max_g |x|
  \rfloor - e_{max}}` stored as E8M0, elements cast (saturating) to
  e4m3 / e2m1, or int8 with the implied :math:`2^{-6}`.

With ``keep_outliers = k``, the ``k`` largest ``|x|`` of each group are kept
exactly and excluded from the scale (Stable-SPAM's activation quantizer,
spec §3.4).

NaN/Inf policy: a group that contains a NaN or an Inf is *poisoned*: its
scale is NaN and its codes are 0, so every element of that group (outliers
included) dequantizes to NaN. Other groups are unaffected. Nothing is
silently replaced by a finite value.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jqlm.quant import rounding as rnd
from jqlm.quant.qarray import QArray
from jqlm.quant.spec import (
  E1M2_VALUES,
  NF4_VALUES,
  Granularity,
  Kind,
  QuantSpec,
  Rounding,
)

_E1M2_MAGNITUDES = E1M2_VALUES[:8]


# ---------------------------------------------------------------------------
# Group layout: every granularity is mapped to a (num_groups, group_len) view.


def _norm_axis(spec: QuantSpec, shape: tuple[int, ...]) -> int:
  ndim = len(shape)
  if spec.granularity is Granularity.TENSOR or (
      spec.granularity is Granularity.FLAT_GROUP and ndim == 0):
    return 0
  if ndim == 0:
    raise ValueError(
      f"granularity={spec.granularity.value!r} needs an array with at least "
      "one axis; got a scalar. Use granularity='tensor'."
    )
  if not -ndim <= spec.axis < ndim:
    raise ValueError(
      f"axis={spec.axis} is out of range for shape {shape}; expected "
      f"-{ndim} <= axis < {ndim}. Set QuantSpec(axis=...) accordingly."
    )
  return spec.axis % ndim


def group_layout(spec: QuantSpec, shape: tuple[int, ...]):
  """Validates ``shape`` against ``spec``.

  Returns:
    ``(axis, num_groups, group_len, scale_shape)``.

  Raises:
    ValueError: if the group size does not divide the grouped extent, or
      ``keep_outliers`` is not smaller than the group.
  """
  shape = tuple(int(d) for d in shape)
  size = math.prod(shape)
  axis = _norm_axis(spec, shape)
  g = spec.granularity
  if g is Granularity.TENSOR:
    num, glen, sshape = 1, size, (1,) * len(shape)
  elif g is Granularity.CHANNEL:
    num = shape[axis]
    glen = size // max(num, 1)
    sshape = tuple(d if i == axis else 1 for i, d in enumerate(shape))
  elif g is Granularity.GROUP:
    n, gs = shape[axis], spec.group_size
    if n % gs:
      raise ValueError(
        f"group_size={gs} must divide the length {n} of axis {axis} "
        f"(shape {shape}). Use a divisor of {n} as group_size, another "
        "axis, or granularity='flat_group' (groups over the flattened array)."
      )
    num, glen = size // gs, gs
    sshape = tuple(d // gs if i == axis else d for i, d in enumerate(shape))
  else:  # FLAT_GROUP
    gs = spec.group_size
    if size % gs:
      raise ValueError(
        f"group_size={gs} must divide the number of elements {size} "
        f"(shape {shape}) for granularity='flat_group'. Use a divisor of "
        f"{size}."
      )
    num, glen, sshape = size // gs, gs, (size // gs,)
  if spec.keep_outliers and spec.keep_outliers >= glen:
    raise ValueError(
      f"keep_outliers={spec.keep_outliers} must be smaller than the group "
      f"length {glen} (shape {shape}, granularity={g.value!r}); otherwise no "
      "element is left to quantize. Use fewer outliers or larger groups."
    )
  return axis, num, glen, sshape


def _to_groups(x: jax.Array, spec: QuantSpec, axis: int) -> jax.Array:
  g = spec.granularity
  if g is Granularity.TENSOR:
    return x.reshape(1, -1)
  if g is Granularity.CHANNEL:
    return jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
  if g is Granularity.GROUP:
    return jnp.moveaxis(x, axis, -1).reshape(-1, spec.group_size)
  if x.ndim:  # FLAT_GROUP: `axis` varies fastest
    x = jnp.moveaxis(x, axis, -1)
  return x.reshape(-1, spec.group_size)


def _from_groups(v, spec: QuantSpec, axis: int, shape) -> jax.Array:
  g = spec.granularity
  if g is Granularity.CHANNEL:
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return jnp.moveaxis(v.reshape(moved), 0, axis)
  if g is Granularity.GROUP or (g is Granularity.FLAT_GROUP and len(shape)):
    moved = tuple(d for i, d in enumerate(shape) if i != axis) + (shape[axis],)
    return jnp.moveaxis(v.reshape(moved), -1, axis)
  return v.reshape(shape)


def _stat_from_groups(s, spec: QuantSpec, axis: int, sshape) -> jax.Array:
  """(num_groups,) -> the stored scale shape."""
  if spec.granularity is Granularity.GROUP:
    moved = tuple(d for i, d in enumerate(sshape) if i != axis)
    moved += (sshape[axis],)
    return jnp.moveaxis(s.reshape(moved), -1, axis)
  return s.reshape(sshape)


def _stat_to_groups(s, spec: QuantSpec, axis: int) -> jax.Array:
  """The stored scale shape -> (num_groups, 1)."""
  if spec.granularity is Granularity.GROUP:
    s = jnp.moveaxis(s, axis, -1)
  return s.reshape(-1, 1)


# ---------------------------------------------------------------------------
# quantize


def _check_input(x) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
      f"quantize expects a floating-point array, got dtype {x.dtype}. "
      "Integer data is already quantized; cast it with x.astype(jnp.float32) "
      "if you mean to re-quantize it."
    )
  return x


def _calibrate(v, live, spec: QuantSpec, glen: int):
  """Scale (G,) and zero point (G,) or None from the grouped values."""
  info = spec.info
  n_live = glen - spec.keep_outliers
  if info.mx:
    amax = jnp.max(jnp.abs(v), axis=1)
    e = jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))) - info.mx_emax
    # E8M0 spans 2^-127..2^127 but has no zero. XLA:CPU (jax 0.10-0.12)
    # converts 2^-127 and 2^-126 to E8M0 NaN, so the floor here is 2^-125;
    # only groups with absmax < 2^(emax-125) see the difference.
    e = jnp.where(amax > 0, jnp.clip(e, -125.0, 127.0), -125.0)
    return jnp.exp2(e), None
  if not spec.symmetric:
    mn = jnp.min(jnp.where(live, v, jnp.inf), axis=1)
    mx = jnp.max(jnp.where(live, v, -jnp.inf), axis=1)
    rng = mx - mn
    if spec.eps > 0:
      rng = jnp.maximum(rng, spec.eps)
    else:  # a constant group: represent its value exactly
      rng = jnp.where(rng > 0, rng, jnp.maximum(jnp.abs(mx), jnp.abs(mn)))
    scale = rng / float(info.qmax - info.qmin)
    safe = jnp.where(scale > 0, scale, 1.0)
    zero = jnp.clip(info.qmin - jnp.round(mn / safe), info.qmin, info.qmax)
    return scale, zero
  absv = jnp.abs(v)  # outliers were zeroed
  if info.kind in (Kind.TERNARY, Kind.BINARY):
    stat = jnp.sum(absv, axis=1) / float(n_live)
    cmax = 1.0
  else:
    stat = jnp.max(absv, axis=1)
    cmax = spec.code_max if spec.code_max is not None else float(info.qmax)
  if spec.eps > 0:
    stat = jnp.maximum(stat, spec.eps)
  return stat / cmax, None


def _encode(y, zero, spec: QuantSpec, u):
  """Scaled values -> codes (as float32/int32 values, pre-cast).

  The zero point is added after rounding, as the reference does
  (``round(w / s) + z``), which is not always ``round(w / s + z)`` in floats.
  """
  info = spec.info
  stochastic = spec.rounding is Rounding.STOCHASTIC
  kind = info.kind
  if kind in (Kind.INT, Kind.TERNARY):
    r = jnp.floor(y + u) if stochastic else jnp.round(y)
    if zero is not None:
      r = r + zero[:, None]
    return jnp.clip(r, info.qmin, info.qmax)
  if kind is Kind.BINARY:
    if stochastic:
      return jnp.where(u < (jnp.clip(y, -1.0, 1.0) + 1.0) / 2.0, 1.0, -1.0)
    return jnp.where(y >= 0, 1.0, -1.0)
  if kind is Kind.FLOAT:
    y = jnp.clip(y, info.qmin, info.qmax)
    dtype = jnp.dtype(info.code_dtype)
    if not stochastic:
      return y.astype(dtype)
    if dtype == jnp.float4_e2m1fn:
      mag = rnd.sr_magnitude_table(jnp.abs(y), rnd.FP4_E2M1_MAGNITUDES, u)
      return jnp.where(y < 0, -mag, mag).astype(dtype)
    return rnd.sr_float_bits(y, dtype, u)
  # CODEBOOK
  if spec.format.value == "nf4":
    if stochastic:
      return rnd.sr_index_table(y, NF4_VALUES, u)
    return rnd.nearest_index_table(y, NF4_VALUES)
  mag = jnp.minimum(jnp.abs(y), float(_E1M2_MAGNITUDES[-1]))
  if stochastic:
    idx = rnd.sr_index_table(mag, _E1M2_MAGNITUDES, u)
  else:
    idx = rnd.nearest_index_table(mag, _E1M2_MAGNITUDES)
  return idx + jnp.where(y < 0, 8, 0).astype(jnp.int32)


def quantize(
  x: jax.Array, spec: QuantSpec, *, key: jax.Array | None = None
) -> QArray:
  """Quantizes ``x`` according to ``spec``.

  Args:
    x: a floating-point array (f32, bf16, f16, ...).
    spec: the :class:`QuantSpec`. Pass it as a static argument under jit.
    key: PRNG key; required when ``spec.rounding`` is ``stochastic``.

  Returns:
    A :class:`QArray` whose ``codes`` have ``x.shape``.

  Raises:
    ValueError: integer input, a group size that does not divide, an axis out
      of range, or stochastic rounding without a key.
  """
  x = _check_input(x)
  if not isinstance(spec, QuantSpec):
    raise ValueError(
      f"spec must be a QuantSpec, got {type(spec).__name__}. Build one with "
      "jqlm.quant.QuantSpec(format=..., ...)."
    )
  stochastic = spec.rounding is Rounding.STOCHASTIC
  if stochastic:
    rnd.require_key(key, "Stochastic rounding (rounding='stochastic')")
  else:
    key = None
  group_layout(spec, x.shape)  # validate before tracing
  return _quantize(x, spec, key)


# One compiled program per (spec, shape): eager callers (notebooks, tests)
# would otherwise dispatch and compile dozens of small ops one by one. Under
# an outer jit this inner jit is simply inlined.
@functools.partial(jax.jit, static_argnums=1)
def _quantize(x: jax.Array, spec: QuantSpec, key) -> QArray:
  stochastic = key is not None
  axis, num, glen, sshape = group_layout(spec, x.shape)
  info = spec.info

  v = _to_groups(x.astype(jnp.float32), spec, axis)
  finite = jnp.all(jnp.isfinite(v), axis=1)
  v = jnp.where(jnp.isfinite(v), v, 0.0)
  live = jnp.ones(v.shape, bool)
  out_vals = out_idx = None
  if spec.keep_outliers:
    _, out_idx = jax.lax.top_k(jnp.abs(v), spec.keep_outliers)
    out_idx = out_idx.astype(jnp.int32)
    out_vals = jnp.take_along_axis(v, out_idx, axis=1)
    out_vals = jnp.where(finite[:, None], out_vals, jnp.nan)
    rows = jnp.arange(num)[:, None]
    v = v.at[rows, out_idx].set(0.0)
    live = live.at[rows, out_idx].set(False)

  scale, zero = _calibrate(v, live, spec, glen)
  safe = jnp.where(scale > 0, scale, 1.0)[:, None]
  y = v / safe
  if info.mx:
    y = y / info.mx_element_scale
  u = jax.random.uniform(key, v.shape, jnp.float32) if stochastic else None
  codes = _encode(y, zero, spec, u)
  if jnp.issubdtype(codes.dtype, jnp.floating) and codes.dtype.itemsize < 4:
    zero_code = jnp.zeros((), codes.dtype)
  else:
    zero_code = 0
  codes = jnp.where(finite[:, None], codes, zero_code)
  codes = _from_groups(codes, spec, axis, x.shape).astype(info.code_dtype)

  scale = jnp.where(finite, scale, jnp.nan)
  scale = _stat_from_groups(scale, spec, axis, sshape)
  if info.mx:
    scale = scale.astype(jnp.float8_e8m0fnu)
  if zero is not None:
    zero = jnp.where(finite, zero, 0.0)
    zero = _stat_from_groups(zero, spec, axis, sshape).astype(info.code_dtype)
  return QArray(
    codes=codes,
    scale=scale,
    zero_point=zero,
    spec=spec,
    outlier_values=out_vals,
    outlier_indices=out_idx,
  )


# ---------------------------------------------------------------------------
# dequantize


def _decode(c, spec: QuantSpec) -> jax.Array:
  """Codes (grouped) -> float32 code values (before scale)."""
  info = spec.info
  if info.kind is Kind.CODEBOOK:
    table = NF4_VALUES if spec.format.value == "nf4" else E1M2_VALUES
    return jnp.asarray(table, jnp.float32)[c.astype(jnp.int32)]
  return c.astype(jnp.float32)


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
  """Reconstructs ``x ~ (codes - zero_point) * scale`` in ``dtype``.

  Args:
    q: a :class:`QArray` from :func:`quantize`.
    dtype: a floating-point output dtype (default float32).
  """
  if not isinstance(q, QArray):
    raise ValueError(f"dequantize expects a QArray, got {type(q).__name__}.")
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(f"dequantize: dtype must be floating, got {dtype}.")
  return _dequantize(q, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: QArray, dtype) -> jax.Array:
  spec = q.spec
  shape = q.codes.shape
  axis, num, _, _ = group_layout(spec, shape)
  vals = _decode(_to_groups(q.codes, spec, axis), spec)
  if q.zero_point is not None:
    vals = vals - _stat_to_groups(q.zero_point, spec, axis).astype(jnp.float32)
  if spec.info.mx:
    vals = vals * spec.info.mx_element_scale
  vals = vals * _stat_to_groups(q.scale, spec, axis).astype(jnp.float32)
  if q.outlier_values is not None:
    rows = jnp.arange(num)[:, None]
    vals = vals.at[rows, q.outlier_indices].set(q.outlier_values)
  return _from_groups(vals, spec, axis, shape).astype(dtype)


def fake_quant(
  x: jax.Array, spec: QuantSpec, *, key: jax.Array | None = None
) -> jax.Array:
  r"""Quantize-dequantize with a straight-through gradient.

  Forward: exactly ``dequantize(quantize(x, spec, key=key), x.dtype)``.
  Backward: the identity, :math:`\partial \hat x / \partial x = I` (the STE of
  Bengio et al. 2013, arXiv 1308.3432, as in Stable-SPAM's
  ``ŵ.detach() + w - w.detach()``). Values that quantization clips (the
  saturated end of a one-signed asymmetric group, MX elements beyond the
  element range, int codes beyond ``code_max``) still pass their gradient
  unchanged: this is the plain STE, not a clipped one. The scale gets no
  gradient.
  """
  x = _check_input(x)
  q = jax.lax.stop_gradient(dequantize(quantize(x, spec, key=key), x.dtype))
  return q + (x - jax.lax.stop_gradient(x))
