r"""Scale formats of the low-precision training recipes: power-of-two
(E8M0) block scales with OCP's FLOOR and NVIDIA's RCEIL rules, E4M3 block
scales with nearest or stochastic rounding, and float32 exponent helpers
(../shared/spec/lowp_training.md §4, §6.2, §8.2).

Every function is pure, takes and returns float32 arrays, and keeps NaN:
a non-finite amax gives a NaN scale (E8M0's NaN code 255), so a poisoned
block dequantizes to NaN as :mod:`jqlm.quant.ops` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jqlm.quant.rounding import check_choice, sr_float_bits

E8M0_RULES = ("floor", "rceil")
"""``"floor"``: OCP MX v1.0, :math:`2^{\\lfloor \\log_2 a \rfloor - e_{max}}`
(clips the top of a block whose amax mantissa exceeds the element max);
``"rceil"``: cuBLAS/NVIDIA, :math:`2^{\\lceil \\log_2 (a / m_{max})\rceil}`
(never clips). Spec §4."""


def _fields(x: jax.Array):
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  exp = ((bits >> 23) & jnp.uint32(0xFF)).astype(jnp.int32)
  mant = bits & jnp.uint32(0x7FFFFF)
  return exp, mant


def exponent_field(x: jax.Array) -> jax.Array:
  """The biased float32 exponent field of ``x`` (int32; 0 for zero and
  subnormals), i.e. :math:`\\lfloor \\log_2 |x| \rfloor + 127` for normals."""
  return _fields(x)[0]


def e8m0_scale(amax: jax.Array, *, rule: str, elem_emax: int,
               elem_max: float) -> jax.Array:
  r"""The E8M0 (power-of-two) scale of blocks with absolute max ``amax``.

  * ``"floor"`` (torchao ``to_mx`` default, ``mx_tensor.py:326-356``):
    :math:`e = \mathrm{expfield}(a) - 127 - e_{max}`, clamped to
    :math:`[-127, 127]` (the exponent field of 0 or an fp32 subnormal gives
    -127).
  * ``"rceil"`` (``mx_tensor.py:111-129,161-225``): :math:`d = a \cdot
    \mathrm{fp32}(1/m_{max})`, biased exponent ``expfield(d) + (mantissa(d)
    != 0)``; an fp32-subnormal ``d`` rounds up only above mantissa
    0x400000; capped at 254 (2^127).

  Returns float32 :math:`2^e`; NaN where ``amax`` is not finite.
  """
  check_choice(rule, E8M0_RULES, "rule")
  amax = amax.astype(jnp.float32)
  if rule == "floor":
    exp, _ = _fields(amax)
    e = jnp.clip(exp - 127 - elem_emax, -127, 127)
  else:
    d = amax * jnp.float32(1.0 / elem_max)
    exp, mant = _fields(d)
    up = jnp.where(exp == 0, mant > 0x400000, mant != 0)
    e = jnp.minimum(exp + up.astype(jnp.int32), 254) - 127
  scale = jnp.exp2(e.astype(jnp.float32))
  return jnp.where(jnp.isfinite(amax), scale, jnp.nan)


def e4m3_scale(s: jax.Array, *, u: jax.Array | None = None) -> jax.Array:
  """Rounds float32 scales onto the E4M3 grid (saturating at 448): nearest
  even, or stochastically between the code neighbours given uniforms ``u``
  (Quartet-II's EDEN scale rounding, ``quartet_2.py:149-175``; a value on
  the grid stays). Returns float32."""
  s = jnp.clip(s.astype(jnp.float32), -448.0, 448.0)
  if u is None:
    return s.astype(jnp.float8_e4m3fn).astype(jnp.float32)
  return sr_float_bits(s, jnp.float8_e4m3fn, u).astype(jnp.float32)


def pow2_floor(s: jax.Array) -> jax.Array:
  """:math:`2^{\\lfloor \\log_2 s \rfloor}` from the float32 exponent field
  (torchao's ``round_scales_to_power_of_2``, ``float8_utils.py:244-246``);
  0 stays 0, inf and NaN pass through."""
  s = s.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
  out = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFF800000),
                                     jnp.float32)
  return jnp.where(jnp.isfinite(s), out, s)
