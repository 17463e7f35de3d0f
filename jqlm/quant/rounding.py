"""Stochastic rounding and bit packing of narrow integer codes.

Stochastic rounding (SR) rounds ``x`` to one of its two neighbours on the
target grid, up with probability equal to the fractional distance to the lower
neighbour: ``P(up) = (x - lo) / (hi - lo)``, so ``E[SR(x)] = x``. It is what
keeps pure-bf16 (no fp32 master copy) training and Q-GaLore's int8 weights
unbiased (Gupta et al. 2015, arXiv 1502.02551; Q-GaLore arXiv 2407.08296).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# Magnitude tables of the 4-bit floats, indexed by their 3 magnitude bits.
FP4_E2M1_MAGNITUDES = np.array(
  [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32
)

_UINT_OF_WIDTH = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}


def require_key(key, what: str) -> None:
  """Raises ValueError if ``key`` is None: stochastic rounding never draws
  hidden randomness (style.md §3.2). ``what`` names the caller."""
  if key is None:
    raise ValueError(
      f"{what} needs an explicit PRNG key: pass key=jax.random.key(seed) "
      "(split it per call; the same key gives the same rounding)."
    )


def _check_float_input(x, what: str):
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
    raise ValueError(
      f"{what} expects a floating-point array, got dtype "
      f"{jnp.asarray(x).dtype}. Cast integer data with x.astype(jnp.float32) "
      "first."
    )


def _lowbias32(h: jax.Array) -> jax.Array:
  # C. Wellons' "lowbias32" integer hash (bias ~0.17 of murmur3's fmix32).
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Fast keyed pseudo-random uint32 bits: a counter-based integer hash.

  Two 32-bit seeds are drawn from ``key`` with ``jax.random``; each element
  gets ``lowbias32(lowbias32(i ^ s0) + s1)`` of its flat index ``i``. The
  hash fuses into the consumer's loop, so it costs a few integer ops per
  element, against ~12 ns per element for threefry on a CPU core. It is
  deterministic in ``key`` and statistically adequate for stochastic
  rounding (tested unbiased), but not a general-purpose PRNG.
  """
  require_key(key, "hash_bits")
  size = int(np.prod(shape, dtype=np.int64))
  if size >= 2**32:
    raise ValueError(
      f"hash_bits supports up to 2^32 - 1 elements, got shape {shape}."
    )
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
      stride)
    stride *= shape[axis]
  return _lowbias32(_lowbias32(idx ^ seeds[0]) + seeds[1])


def _uniform(key, shape, noise: str) -> jax.Array:
  """U[0, 1) float32 from ``jax.random`` or :func:`hash_bits`."""
  if noise == "jax":
    return jax.random.uniform(key, shape, jnp.float32)
  bits = hash_bits(key, shape) >> jnp.uint32(8)
  return bits.astype(jnp.float32) * jnp.float32(2.0**-24)


def check_noise(noise: str) -> None:
  """Raises ValueError unless ``noise`` is ``"jax"`` or ``"hash"``, the
  random-bit sources of :func:`stochastic_round` (used by every caller that
  forwards a ``noise=`` argument, e.g. :func:`jqlm.optim.stochastic_rounding`,
  to fail at construction rather than at trace time)."""
  if noise not in ("jax", "hash"):
    raise ValueError(
      f"noise must be 'jax' (jax.random with the key's PRNG) or 'hash' (fast "
      f"counter-based hash seeded by the key), got {noise!r}."
    )


def stochastic_round(
  x: jax.Array, dtype, *, key: jax.Array, noise: str = "jax"
) -> jax.Array:
  r"""Unbiased stochastic rounding of ``x`` to ``dtype``.

  .. math:: \mathrm{SR}(x) = \begin{cases} hi & u < (x - lo)/(hi - lo) \\
            lo & \text{otherwise} \end{cases}, \quad u \sim U[0, 1)

  where ``lo <= x <= hi`` are the neighbouring values of ``dtype``, so
  ``E[SR(x)] = x`` for every ``x`` inside the finite range of ``dtype``.

  * ``bfloat16``: the bit-level method: add 16 random bits to the low half of
    the float32 pattern and truncate (exact SR, subnormals included).
  * ``float16`` and every fp8 dtype: bit-level neighbours (the RNE cast and
    the adjacent bit pattern), exact SR including subnormals.
  * ``float4_e2m1fn``: neighbours from the 8-entry magnitude table.
  * integer dtypes: ``floor(x + u)``, i.e. SR onto the integer grid.

  Edge cases: values beyond the largest finite value saturate to it
  (formats without inf: e4m3fn, e2m1fn, integers) or round to nearest (inf
  for bf16/f16/e5m2), so SR is unbiased only inside the range; NaN stays NaN
  for float targets and becomes 0 for integer targets. The input is rounded
  from its float32 value.

  Args:
    x: floating-point array (any float dtype; computed in float32).
    dtype: the target dtype.
    key: a PRNG key (required). The same key gives the same result.
    noise: ``"jax"`` draws the random bits with ``jax.random`` (the key's
      PRNG implementation, threefry by default); ``"hash"`` uses
      :func:`hash_bits`, several times faster for large arrays.

  Returns:
    An array of ``dtype`` with ``x``'s shape.
  """
  require_key(key, "stochastic_round")
  _check_float_input(x, "stochastic_round")
  check_noise(noise)
  dtype = jnp.dtype(dtype)
  x32 = jnp.asarray(x).astype(jnp.float32)
  if dtype == jnp.float32:
    return x32
  if jnp.issubdtype(dtype, jnp.integer):
    info = jnp.iinfo(dtype)
    u = _uniform(key, x32.shape, noise)
    r = jnp.clip(jnp.floor(x32 + u), float(info.min), float(info.max))
    return jnp.where(jnp.isnan(r), 0.0, r).astype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"stochastic_round cannot target dtype {dtype}.")
  if dtype == jnp.bfloat16:
    if noise == "jax":
      bits = jax.random.bits(key, x32.shape, jnp.uint32)
    else:
      bits = hash_bits(key, x32.shape)
    return _sr_bfloat16(x32, bits)
  if dtype.itemsize * 8 in _UINT_OF_WIDTH and dtype != jnp.float4_e2m1fn:
    return sr_float_bits(x32, dtype, _uniform(key, x32.shape, noise))
  if dtype == jnp.float4_e2m1fn:
    u = _uniform(key, x32.shape, noise)
    mag = sr_magnitude_table(jnp.abs(x32), FP4_E2M1_MAGNITUDES, u)
    out = jnp.where(x32 < 0, -mag, mag)
    return jnp.where(jnp.isnan(x32), jnp.nan, out).astype(dtype)
  raise ValueError(
    f"stochastic_round supports bfloat16, float16, fp8, float4_e2m1fn and "
    f"integer dtypes; got {dtype}."
  )


def _sr_bfloat16(x32: jax.Array, random_bits: jax.Array) -> jax.Array:
  bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
  noise = random_bits & jnp.uint32(0xFFFF)
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
  out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
  out = jnp.where(jnp.isnan(x32), x32, out)
  return out.astype(jnp.bfloat16)  # exact: the low 16 bits are zero


def _has_inf(dtype) -> bool:
  return bool(np.isinf(np.array(np.inf, np.float32).astype(dtype)))


def sr_float_bits(x32: jax.Array, dtype, u: jax.Array) -> jax.Array:
  """SR of float32 ``x32`` to a 8/16-bit float ``dtype`` given uniforms ``u``.

  The neighbours are the round-to-nearest cast ``r`` and the value whose bit
  pattern is one step away (bits of positive floats are monotone in value).
  """
  dtype = jnp.dtype(dtype)
  uint = _UINT_OF_WIDTH[dtype.itemsize * 8]
  fmax = float(ml_dtypes.finfo(dtype).max)
  a = jnp.minimum(jnp.abs(x32), fmax)
  r = a.astype(dtype)
  rf = r.astype(jnp.float32)
  r_bits = jax.lax.bitcast_convert_type(r, uint)
  below = rf < a  # r is the lower neighbour
  above = rf > a  # r is the upper neighbour
  one = jnp.ones((), uint)
  nb_bits = jnp.where(below, r_bits + one, jnp.where(above, r_bits - one, r_bits))
  nb = jax.lax.bitcast_convert_type(nb_bits, dtype).astype(jnp.float32)
  lo = jnp.where(below, rf, nb)
  hi = jnp.where(below, nb, rf)
  gap = jnp.where(hi > lo, hi - lo, 1.0)
  mag = jnp.where(u < (a - lo) / gap, hi, lo)
  mag = jnp.where(rf == a, rf, mag)
  out = jnp.where(x32 < 0, -mag, mag)
  if _has_inf(dtype):
    out = jnp.where(jnp.abs(x32) > fmax, x32, out)
  out = jnp.where(jnp.isnan(x32), jnp.nan, out)
  return out.astype(dtype)


def _neighbours(v: jax.Array, table: np.ndarray):
  t = jnp.asarray(table, jnp.float32)
  v = jnp.clip(v, float(table[0]), float(table[-1]))
  # Tables have <= 16 entries: comparing against all of them vectorizes far
  # better than a binary search.
  hi = jnp.searchsorted(t, v, side="right", method="compare_all")
  hi_idx = jnp.clip(hi, 1, len(table) - 1)
  lo_idx = hi_idx - 1
  return v, t, lo_idx, hi_idx


def sr_index_table(v: jax.Array, table: np.ndarray, u: jax.Array) -> jax.Array:
  """SR of ``v`` onto a sorted value ``table``; returns int32 indices."""
  v, t, lo_idx, hi_idx = _neighbours(v, table)
  lo, hi = t[lo_idx], t[hi_idx]
  p_up = (v - lo) / jnp.where(hi > lo, hi - lo, 1.0)
  return jnp.where(u < p_up, hi_idx, lo_idx).astype(jnp.int32)


def sr_magnitude_table(
  a: jax.Array, table: np.ndarray, u: jax.Array
) -> jax.Array:
  """SR of magnitudes ``a >= 0`` onto a sorted magnitude table (values)."""
  return jnp.asarray(table, jnp.float32)[sr_index_table(a, table, u)]


def nearest_index_table(v: jax.Array, table: np.ndarray) -> jax.Array:
  """Round-to-nearest onto a sorted ``table``; a tie goes to the even index.

  For a magnitude table of a sign-magnitude float the index is the bit
  pattern, so ties-to-even-index is IEEE round-half-to-even.
  """
  mid_np = (table[1:] + table[:-1]) / 2
  mid = jnp.asarray(mid_np, jnp.float32)
  # v == mid[i] -> i (the lower neighbour)
  idx = jnp.searchsorted(mid, v, side="left", method="compare_all")
  is_tie = (idx < len(mid_np)) & (mid[jnp.minimum(idx, len(mid_np) - 1)] == v)
  idx = jnp.where(is_tie & (idx % 2 == 1), idx + 1, idx)
  return idx.astype(jnp.int32)


# ---------------------------------------------------------------------------
# Bit packing of 4-bit and 2-bit codes.

_PACKABLE = {
  jnp.dtype(jnp.int4): (4, True),
  jnp.dtype(jnp.uint4): (4, False),
  jnp.dtype(jnp.int2): (2, True),
  jnp.dtype(jnp.uint2): (2, False),
  jnp.dtype(jnp.float4_e2m1fn): (4, False),
}


def _norm_axis(axis: int, ndim: int, what: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(
      f"{what}: axis={axis} is out of range for an array of rank {ndim}; "
      f"expected -{ndim} <= axis < {ndim}."
    )
  return axis % ndim


def pack(codes: jax.Array, bits: int | None = None, *, axis: int = -1):
  """Packs 4-bit or 2-bit codes into ``uint8``, two or four per byte.

  Layout (*segments*): ``axis`` (length ``n``) is cut into ``per = 8 //
  bits`` contiguous segments of ``n / per`` codes, and byte ``j`` holds code
  ``j`` of segment ``s`` in bits ``[s * bits, (s + 1) * bits)``: for 4-bit
  codes, the low nibbles are the first half of the axis and the high nibbles
  the second half. Any contiguous run of bytes therefore unpacks into
  ``per`` contiguous runs of codes with no interleaving, which is what lets
  the low-bit matmul kernels read a packed weight as it is stored (a K-block
  of packed rows is two contiguous K-blocks of codes, each multiplied by a
  contiguous slice of the activations; the idea of Marlin's offline
  repacking). This one layout serves the packed weights, the 4-bit optimizer
  states, checkpoints and the kernels (:mod:`jqlm_kernels.wxa16`). Signed
  codes are stored in two's complement; ``float4_e2m1fn`` codes as their bit
  pattern.

  Args:
    codes: ``int4``/``uint4``/``int2``/``uint2``/``float4_e2m1fn`` codes, or
      integer codes of a wider dtype together with ``bits`` (values are then
      masked to their low ``bits`` bits).
    bits: 4 or 2; inferred from narrow dtypes.
    axis: the axis to pack along; its length must be divisible by
      ``8 // bits``.

  Returns:
    ``uint8`` array with ``axis`` shortened by ``8 // bits``.
  """
  codes = jnp.asarray(codes)
  dtype = jnp.dtype(codes.dtype)
  if dtype in _PACKABLE:
    inferred, _ = _PACKABLE[dtype]
    if bits is not None and bits != inferred:
      raise ValueError(
        f"bits={bits} contradicts codes of dtype {dtype} ({inferred} bits). "
        "Drop bits, or cast the codes."
      )
    bits = inferred
  elif not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(
      f"pack expects integer or float4 codes, got dtype {dtype}. Quantize "
      "first (jqlm.quant.quantize) and pack q.codes."
    )
  if bits not in (2, 4):
    raise ValueError(
      f"pack supports 2-bit and 4-bit codes, got bits={bits!r}. 8-bit codes "
      "need no packing."
    )
  axis = _norm_axis(axis, codes.ndim, "pack")
  per = 8 // bits
  n = codes.shape[axis]
  if n % per:
    raise ValueError(
      f"pack: axis {axis} has length {n}, not divisible by {per} "
      f"({bits}-bit codes, {per} per byte). Pad that axis to a multiple of "
      f"{per} or pack along another axis."
    )
  if dtype == jnp.float4_e2m1fn:
    codes = jax.lax.bitcast_convert_type(codes, jnp.uint4)
  mask = (1 << bits) - 1
  v = codes.astype(jnp.int32) & mask
  v = jnp.moveaxis(v, axis, -1)
  seg = n // per
  packed = v[..., :seg]
  for s in range(1, per):
    packed = packed | (v[..., s * seg:(s + 1) * seg] << (s * bits))
  return jnp.moveaxis(packed.astype(jnp.uint8), -1, axis)


def unpack(packed: jax.Array, dtype, *, axis: int = -1) -> jax.Array:
  """Inverse of :func:`pack`: ``unpack(pack(c), c.dtype, axis=a) == c``.

  Args:
    packed: ``uint8`` array from :func:`pack`.
    dtype: the codes' dtype: ``int4``, ``uint4``, ``int2``, ``uint2`` or
      ``float4_e2m1fn``.
    axis: the axis that was packed.
  """
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise ValueError(f"unpack expects uint8 input, got {packed.dtype}.")
  dtype = jnp.dtype(dtype)
  if dtype not in _PACKABLE:
    valid = ", ".join(str(d) for d in _PACKABLE)
    raise ValueError(f"unpack: dtype must be one of {valid}; got {dtype}.")
  bits, signed = _PACKABLE[dtype]
  axis = _norm_axis(axis, packed.ndim, "unpack")
  per = 8 // bits
  v = jnp.moveaxis(packed, axis, -1).astype(jnp.int32)
  mask = (1 << bits) - 1
  v = jnp.concatenate([(v >> (s * bits)) & mask for s in range(per)],
                      axis=-1)
  if signed:
    v = jnp.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
  v = jnp.moveaxis(v, -1, axis)
  if dtype == jnp.float4_e2m1fn:
    return jax.lax.bitcast_convert_type(v.astype(jnp.uint4), dtype)
  return v.astype(dtype)


# ---------------------------------------------------------------------------
# Element rounding of the low-precision training recipes
# (../shared/spec/lowp_training.md §1.1-§1.2). Inputs are already-scaled
# float32 values; outputs are the rounded values as float32.

FP4_TIES = ("even", "away", "zero")
"""The three round-to-nearest tie rules of official FP4 code (spec §1.1):
``"even"`` (IEEE RNE: TE, torchao), ``"away"`` (``>=`` thresholds:
Quartet-II's Triton code), ``"zero"`` (``>`` thresholds: Quartet's)."""

FP4_SR_VARIANTS = ("exact", "quartet2", "te")
"""The stochastic rounding variants onto E2M1 (spec §1.2): ``"exact"`` (up
iff ``u < p_up``, grid points kept: Quartet), ``"quartet2"`` (a grid point
``0 < g < 6`` moves to a neighbour with probability 1/2 each: unbiased with
more variance), ``"te"`` (PTX ``cvt.rs``: 8 random bits, biased toward zero
by up to 1/256 step)."""


def check_choice(value, choices, what: str) -> str:
  """Returns ``value`` if it is one of ``choices``, else raises a ValueError
  that lists them (``what`` names the argument)."""
  if value not in choices:
    raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))};"
                     f" got {value!r}.")
  return value


def _signed(mag: jax.Array, v: jax.Array) -> jax.Array:
  out = jnp.where(v < 0, -mag, mag)
  return jnp.where(jnp.isnan(v), jnp.nan, out)


def round_fp4(v: jax.Array, tie: str = "even") -> jax.Array:
  """Round-to-nearest onto the signed E2M1 grid {0, ±0.5, ..., ±6},
  saturating at ±6, with one of the tie rules :data:`FP4_TIES`.

  * ``"even"``: a midpoint goes to the neighbour with an even code
    (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4);
  * ``"away"``: to the larger magnitude (thresholds ``|v| >= mid``);
  * ``"zero"``: to the smaller magnitude (thresholds ``|v| > mid``).

  NaN stays NaN.
  """
  check_choice(tie, FP4_TIES, "tie")
  a = jnp.minimum(jnp.abs(v.astype(jnp.float32)), 6.0)
  table = FP4_E2M1_MAGNITUDES
  if tie == "even":
    idx = nearest_index_table(a, table)
  else:
    mid = jnp.asarray((table[1:] + table[:-1]) / 2, jnp.float32)
    side = "right" if tie == "away" else "left"
    idx = jnp.searchsorted(mid, a, side=side, method="compare_all")
  return _signed(jnp.asarray(table)[idx], v)


def _fp4_step(a: jax.Array) -> jax.Array:
  return jnp.where(a < 2.0, 0.5, jnp.where(a < 4.0, 1.0, 2.0))


def sr_fp4(v: jax.Array, u: jax.Array, variant: str = "exact") -> jax.Array:
  """Stochastic rounding onto the signed E2M1 grid given uniforms ``u`` in
  [0, 1) of ``v``'s shape; magnitudes above 6 become 6, the sign is kept.

  Variants (:data:`FP4_SR_VARIANTS`, spec §1.2):

  * ``"exact"``: ``hi`` iff ``u < (|v| - lo) / (hi - lo)``; grid points are
    kept (Quartet, ``mxfp4_triton.py:70-129``). Unbiased inside [-6, 6].
  * ``"quartet2"``: ``hi`` is the grid point above by ``>=`` thresholds and
    ``lo`` the one below by ``>`` thresholds (``nvfp4_triton.py:48-113``), so
    a grid point ``0 < g < 6`` moves to one of its neighbours, up with
    ``p_up = (g - lo) / (hi - lo)`` (1/2 where the grid is evenly spaced):
    unbiased, with extra variance on every exact hit.
  * ``"te"``: PTX ``cvt.rs``: ``r = floor(256 u)`` (8 random bits),
    ``t = |v| + (r / 256) step(|v|)``, ``q = floor(t / step(t)) step(t)``,
    capped at 6, with ``step`` 0.5 below 2, 1 in [2, 4), 2 from 4 up. This
    gives ``p_up = floor(256 f) / 256`` for fractional position ``f``: a
    bias toward zero of up to 1/256 step (``ptx.cuh:532-550``).
  """
  check_choice(variant, FP4_SR_VARIANTS, "variant")
  a = jnp.abs(v.astype(jnp.float32))
  if variant == "te":
    r = jnp.floor(u * 256.0) / 256.0
    am = jnp.minimum(a, 6.0)
    t = am + r * _fp4_step(am)
    st = _fp4_step(t)
    mag = jnp.minimum(jnp.floor(t / st) * st, 6.0)
    return _signed(mag, v)
  if variant == "exact":
    return _signed(sr_magnitude_table(a, FP4_E2M1_MAGNITUDES, u), v)
  # quartet2: thresholds as in the Triton kernel
  g = jnp.asarray(FP4_E2M1_MAGNITUDES)
  hi_idx = jnp.clip(jnp.searchsorted(g, a, side="right",
                                     method="compare_all"), 1, 7)
  lo_idx = jnp.clip(jnp.searchsorted(g, a, side="left",
                                     method="compare_all") - 1, 0, 6)
  hi, lo = g[hi_idx], g[lo_idx]
  hi = jnp.where(a >= 4.0, 6.0, hi)
  lo = jnp.where(a > 4.0, 4.0, lo)
  p_up = (a - lo) / (hi - lo)
  mag = jnp.where(u < p_up, hi, lo)
  return _signed(mag, v)


_FLOAT_ELEMS = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2,
                "bf16": jnp.bfloat16}


def round_float(v: jax.Array, elem: str, *, u: jax.Array | None = None,
                tie: str = "even", sr: str = "exact") -> jax.Array:
  """Rounds scaled float32 ``v`` onto an element format and returns the
  rounded values as float32.

  ``elem``: ``"e4m3"``/``"e5m2"`` (RNE or exact SR, saturating at ±448 /
  ±57344 as PTX ``satfinite`` does: spec §1.1), ``"e2m1"`` (with ``tie`` or
  the SR ``sr`` variant), ``"bf16"``, or ``"int8"`` (round half to even, no
  clamp: HALO's INT8, whose scale maps the max to 127). With ``u`` (uniforms
  of ``v``'s shape) the rounding is stochastic.
  """
  v = v.astype(jnp.float32)
  if elem == "e2m1":
    return round_fp4(v, tie) if u is None else sr_fp4(v, u, sr)
  if elem == "int8":
    return jnp.round(v) if u is None else jnp.floor(v + u)
  check_choice(elem, ("e4m3", "e5m2", "e2m1", "bf16", "int8"), "elem")
  dtype = jnp.dtype(_FLOAT_ELEMS[elem])
  if elem != "bf16":
    fmax = float(ml_dtypes.finfo(dtype).max)
    v = jnp.clip(v, -fmax, fmax)  # NaN passes through clip
  if u is None:
    return v.astype(dtype).astype(jnp.float32)
  return sr_float_bits(v, dtype, u).astype(jnp.float32)


def uniforms(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """U[0, 1) float32 of ``shape`` from :func:`hash_bits` (24 random bits
  each): the noise of the low-precision recipes' stochastic rounding."""
  return _uniform(key, shape, "hash")
