"""Quantization specs: formats, granularities, rounding modes.

A :class:`QuantSpec` is a frozen, hashable dataclass, so it can be passed as a
static argument to ``jax.jit``. Its fields accept the enums below or their
string values (``QuantSpec(format="int4", granularity="group",
group_size=128)``); a typo raises ``ValueError`` listing the valid values.

Formats (``Format``):

* ``int2`` .. ``int8``: signed integers. Symmetric specs use the restricted
  range scale ``absmax / (2^(b-1) - 1)``; asymmetric specs use min-max with an
  integer zero point, codes in ``[-2^(b-1), 2^(b-1) - 1]``.
* ``uint2`` .. ``uint8``: unsigned integers with a zero point (always
  asymmetric). This is the Q-GaLore / Stable-SPAM INT4 weight quantizer
  (``../shared/spec/optimizers.md`` §3.4, §5.2).
* ``fp8_e4m3`` (e4m3fn, max 448), ``fp8_e5m2`` (max 57344): absmax scaling
  onto the fp8 grid; codes are ``jnp.float8_*`` arrays.
* ``fp4_e2m1``: OCP MX FP4 (values 0, 0.5, 1, 1.5, 2, 3, 4, 6).
* ``fp4_e1m2``: the 4-bit E1M2 float (bias 1) of Stable-SPAM's FP4 runs
  (§3.4): magnitudes 0, 0.25, ..., 1.75. Codes are the 4-bit pattern
  ``sign<<3 | magnitude_index`` in ``uint4``.
* ``nf4``: the 16-value NormalFloat codebook of QLoRA (arXiv 2305.14314);
  codes are indices in ``uint4``.
* ``ternary``: {-1, 0, 1} with absmean scale (BitNet b1.58, arXiv 2402.17764).
* ``binary``: sign with mean-|x| scale (XNOR-Net, arXiv 1603.05279).
* ``mxfp8``, ``mxfp4``, ``mxint8``: OCP Microscaling (MX v1.0): one shared
  power-of-two (E8M0) scale per block of 32, elements e4m3 / e2m1 / int8
  (int8 with the implied 2^-6 fixed point of the MX spec).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import jax.numpy as jnp
import numpy as np


class Format(enum.Enum):
  """Element format of a quantized array."""

  INT2 = "int2"
  INT3 = "int3"
  INT4 = "int4"
  INT5 = "int5"
  INT6 = "int6"
  INT7 = "int7"
  INT8 = "int8"
  UINT2 = "uint2"
  UINT3 = "uint3"
  UINT4 = "uint4"
  UINT5 = "uint5"
  UINT6 = "uint6"
  UINT7 = "uint7"
  UINT8 = "uint8"
  FP8_E4M3 = "fp8_e4m3"
  FP8_E5M2 = "fp8_e5m2"
  FP4_E2M1 = "fp4_e2m1"
  FP4_E1M2 = "fp4_e1m2"
  NF4 = "nf4"
  TERNARY = "ternary"
  BINARY = "binary"
  MXFP8 = "mxfp8"
  MXFP4 = "mxfp4"
  MXINT8 = "mxint8"


class Granularity(enum.Enum):
  """Which elements share one scale (and zero point).

  * ``TENSOR``: one scale for the whole array.
  * ``CHANNEL``: one scale per index along ``axis`` (reduced over all other
    axes). For a Flax ``Dense`` kernel ``(in, out)``, ``axis=-1`` gives one
    scale per output channel.
  * ``GROUP``: groups of ``group_size`` consecutive elements along ``axis``.
  * ``FLAT_GROUP``: groups of ``group_size`` consecutive elements of the
    array flattened with ``axis`` varying fastest (row-major for the default
    ``axis=-1``). This is how the PyTorch reference code groups an
    ``(out, in)`` weight (``w.reshape(-1, G)``); a group may straddle rows.
    For a Flax kernel ``(in, out) = W^T``, ``axis=0`` gives exactly the
    torch groups of ``W``.
  """

  TENSOR = "tensor"
  CHANNEL = "channel"
  GROUP = "group"
  FLAT_GROUP = "flat_group"


class Rounding(enum.Enum):
  """Rounding onto the code grid.

  * ``NEAREST``: round to nearest, ties to even (``torch.round`` and the
    IEEE/ml_dtypes casts do the same).
  * ``STOCHASTIC``: round up with probability equal to the fractional
    distance to the lower grid point, so ``E[dequantize(quantize(x))] == x``
    inside the representable range. Needs an explicit PRNG key.
  """

  NEAREST = "nearest"
  STOCHASTIC = "stochastic"


class Kind(enum.Enum):
  """How a format maps scaled values to codes (internal)."""

  INT = "int"
  FLOAT = "float"  # a jnp float dtype holds the codes
  CODEBOOK = "codebook"  # codes index a fixed table of values
  TERNARY = "ternary"
  BINARY = "binary"


@dataclasses.dataclass(frozen=True)
class FormatInfo:
  """Static facts about a :class:`Format`.

  Attributes:
    kind: how scaled values are mapped to codes.
    bits: nominal bits per element (what a packed layout uses).
    code_dtype: the narrowest jnp dtype that holds the codes.
    qmin: smallest code (integer kinds) or smallest value (others).
    qmax: largest code (integer kinds) or largest finite value (others).
    mx: whether the format uses an OCP MX shared E8M0 block scale.
    mx_emax: exponent of the largest normal element value (MX only).
    mx_element_scale: implied element scale of MXINT8 (2^-6), else 1.
  """

  kind: Kind
  bits: int
  code_dtype: Any
  qmin: float
  qmax: float
  mx: bool = False
  mx_emax: int = 0
  mx_element_scale: float = 1.0

  @property
  def signed(self) -> bool:
    return self.qmin < 0


# QLoRA NF4 codebook (bitsandbytes `create_normal_map`), in code order.
NF4_VALUES = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  dtype=np.float32,
)

# E1M2 with bias 1: exponent field 0 is subnormal (m/4), field 1 is 1 + m/4.
# Code = sign << 3 | (e << 2 | m); the magnitude is monotone in (e, m).
_E1M2_MAGNITUDES = np.array(
  [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75], np.float32
)
E1M2_VALUES = np.concatenate([_E1M2_MAGNITUDES, -_E1M2_MAGNITUDES])


def _int_info(bits: int, signed: bool) -> FormatInfo:
  if bits <= 2:
    dtype = jnp.int2 if signed else jnp.uint2
  elif bits <= 4:
    dtype = jnp.int4 if signed else jnp.uint4
  else:
    dtype = jnp.int8 if signed else jnp.uint8
  if signed:
    return FormatInfo(
      Kind.INT, bits, dtype, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    )
  return FormatInfo(Kind.INT, bits, dtype, 0, 2**bits - 1)


def _build_format_table() -> dict[Format, FormatInfo]:
  table = {}
  for b in range(2, 9):
    table[Format(f"int{b}")] = _int_info(b, True)
    table[Format(f"uint{b}")] = _int_info(b, False)
  table[Format.FP8_E4M3] = FormatInfo(
    Kind.FLOAT, 8, jnp.float8_e4m3fn, -448.0, 448.0
  )
  table[Format.FP8_E5M2] = FormatInfo(
    Kind.FLOAT, 8, jnp.float8_e5m2, -57344.0, 57344.0
  )
  table[Format.FP4_E2M1] = FormatInfo(
    Kind.FLOAT, 4, jnp.float4_e2m1fn, -6.0, 6.0
  )
  table[Format.FP4_E1M2] = FormatInfo(Kind.CODEBOOK, 4, jnp.uint4, -1.75, 1.75)
  table[Format.NF4] = FormatInfo(Kind.CODEBOOK, 4, jnp.uint4, -1.0, 1.0)
  table[Format.TERNARY] = FormatInfo(Kind.TERNARY, 2, jnp.int2, -1, 1)
  table[Format.BINARY] = FormatInfo(Kind.BINARY, 1, jnp.int2, -1, 1)
  table[Format.MXFP8] = FormatInfo(
    Kind.FLOAT, 8, jnp.float8_e4m3fn, -448.0, 448.0, mx=True, mx_emax=8
  )
  table[Format.MXFP4] = FormatInfo(
    Kind.FLOAT, 4, jnp.float4_e2m1fn, -6.0, 6.0, mx=True, mx_emax=2
  )
  # MXINT8: two's complement int8 with an implied scale of 2^-6, i.e. element
  # values in [-2, 127/64]; emax = 0.
  table[Format.MXINT8] = FormatInfo(
    Kind.INT, 8, jnp.int8, -128, 127, mx=True, mx_emax=0,
    mx_element_scale=2.0**-6,
  )
  return table


_FORMATS = _build_format_table()

MX_BLOCK_SIZE = 32


def format_info(fmt: Format | str) -> FormatInfo:
  """Returns the static :class:`FormatInfo` of a format."""
  return _FORMATS[to_enum(Format, fmt, "format")]


def int_format(bits: int, *, signed: bool = True) -> Format:
  """The integer :class:`Format` of ``bits`` bits, e.g. ``int_format(4)``.

  Raises:
    ValueError: if ``bits`` is not in [2, 8].
  """
  if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
    raise ValueError(
      f"Integer bit width must be an int in [2, 8], got {bits!r}. Use 2..8 "
      "bits, or a float format ('fp8_e4m3', 'fp4_e2m1', 'nf4', ...)."
    )
  return Format(f"{'' if signed else 'u'}int{int(bits)}")


def to_enum(cls: type[enum.Enum], value: Any, field: str) -> Any:
  if isinstance(value, cls):
    return value
  try:
    return cls(value)
  except ValueError:
    valid = ", ".join(repr(m.value) for m in cls)
    hint = ""
    if cls is Format and isinstance(value, str):
      digits = "".join(c for c in value if c.isdigit())
      if value.lstrip("u").startswith("int") and digits:
        hint = (
          f" Integer formats have 2 to 8 bits; {value!r} asks for {digits}."
        )
    raise ValueError(
      f"Invalid {field} {value!r}.{hint} Expected one of: {valid}."
    ) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  r"""How to quantize an array. Frozen and hashable (a valid static arg).

  Attributes:
    format: element format (:class:`Format` or its string value).
    granularity: which elements share a scale (:class:`Granularity`). Default
      ``tensor``, or ``group`` (blocks of 32 along ``axis``) for MX formats.
    group_size: elements per group, for ``group`` and ``flat_group`` only
      (MX formats default to 32).
    axis: the channel axis (``channel``) or the axis along which groups run
      (``group``), or the fastest-varying axis of the flattening
      (``flat_group``). Ignored by ``tensor``.
    symmetric: ``True`` for a zero-free scale (``x ~ q * s``), ``False`` for
      min-max with an integer zero point (``x ~ (q - z) * s``). Default: by
      format (unsigned integers are asymmetric, all others symmetric). Only
      integer formats can be asymmetric.
    rounding: ``nearest`` (ties to even) or ``stochastic`` (needs a key).
    keep_outliers: the number ``k`` of largest-|x| elements per group that are
      kept exactly (outside the codes) and excluded from the scale, as in
      Stable-SPAM's activation quantizer (spec §3.4). 0 disables it.
    code_max: the code-space magnitude the group's absmax maps to, for
      symmetric specs. Default: the format's largest value (``2^(b-1)-1`` for
      ints, 448 for e4m3, ...). Stable-SPAM's FP4 code maps the absmax to 1.0
      of its E1M2 grid (spec §3.4), i.e. ``code_max=1.0``.
    eps: floor on the calibrated range (``max - min`` when asymmetric,
      ``absmax`` or ``absmean`` when symmetric) before it is turned into a
      scale. The reference codes use 1e-5 (Q-GaLore, Stable-SPAM weights) and
      1e-6 (Stable-SPAM activations). With the default 0, an all-zero group
      gets scale 0 and dequantizes to exact zeros (never NaN), and a constant
      asymmetric group is represented exactly.

  The scale is stored with a shape that mirrors the granularity: ``tensor``:
  ``(1,) * x.ndim``; ``channel``: ``x.shape`` with every axis but ``axis`` set
  to 1; ``group``: ``x.shape`` with ``axis`` divided by ``group_size``;
  ``flat_group``: ``(x.size // group_size,)``.
  """

  format: Format | str = Format.INT8
  granularity: Granularity | str | None = None
  group_size: int | None = None
  axis: int = -1
  symmetric: bool | None = None
  rounding: Rounding | str = Rounding.NEAREST
  keep_outliers: int = 0
  code_max: float | None = None
  eps: float = 0.0

  def __post_init__(self):
    fmt = to_enum(Format, self.format, "format")
    info = _FORMATS[fmt]
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    set_("format", fmt)
    if self.granularity is None:
      gran = Granularity.GROUP if info.mx else Granularity.TENSOR
    else:
      gran = to_enum(Granularity, self.granularity, "granularity")
    set_("granularity", gran)
    set_("rounding", to_enum(Rounding, self.rounding, "rounding"))

    group_size = self.group_size
    grouped = gran in (Granularity.GROUP, Granularity.FLAT_GROUP)
    if grouped and group_size is None:
      if info.mx:
        group_size = MX_BLOCK_SIZE
      else:
        raise ValueError(
          f"granularity={gran.value!r} needs a group_size (elements per "
          "group), e.g. QuantSpec(format=..., granularity="
          f"'{gran.value}', group_size=128)."
        )
    if not grouped and group_size is not None:
      raise ValueError(
        f"group_size={group_size} contradicts granularity={gran.value!r}, "
        "which has no groups. Use granularity='group' or 'flat_group', or "
        "drop group_size."
      )
    if group_size is not None:
      if not isinstance(group_size, (int, np.integer)) or group_size <= 0:
        raise ValueError(
          f"group_size must be a positive int, got {group_size!r}."
        )
      group_size = int(group_size)
    set_("group_size", group_size)

    if info.mx and not grouped:
      raise ValueError(
        f"MX format {fmt.value!r} shares one power-of-two scale per block; "
        f"granularity={gran.value!r} has no blocks. Use granularity='group' "
        "(the default, blocks of 32 along axis) or 'flat_group'."
      )
    if not isinstance(self.axis, (int, np.integer)):
      raise ValueError(f"axis must be an int, got {self.axis!r}.")
    set_("axis", int(self.axis))

    symmetric = self.symmetric
    if symmetric is None:
      symmetric = not (info.kind is Kind.INT and not info.signed)
    if not isinstance(symmetric, (bool, np.bool_)):
      raise ValueError(f"symmetric must be a bool, got {symmetric!r}.")
    symmetric = bool(symmetric)
    if symmetric and info.kind is Kind.INT and not info.signed:
      raise ValueError(
        f"Unsigned format {fmt.value!r} cannot be symmetric: its codes are "
        f"non-negative and need a zero point. Use symmetric=False, or the "
        f"signed format 'int{info.bits}'."
      )
    if not symmetric and (info.kind is not Kind.INT or info.mx):
      raise ValueError(
        f"Format {fmt.value!r} has no zero point, so symmetric=False "
        "contradicts it. Asymmetric (min-max) quantization needs an integer "
        "format such as 'uint4' or 'int8'."
      )
    set_("symmetric", symmetric)

    k = self.keep_outliers
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
      raise ValueError(
        f"keep_outliers must be an int >= 0 (0 disables it), got {k!r}."
      )
    set_("keep_outliers", int(k))

    if self.code_max is not None:
      fmax = info.qmax
      if info.kind is Kind.INT and info.mx:
        fmax = info.qmax * info.mx_element_scale
      if not symmetric or info.mx or info.kind in (Kind.TERNARY, Kind.BINARY):
        raise ValueError(
          f"code_max applies to symmetric absmax scaling; it contradicts "
          f"format={fmt.value!r}, symmetric={symmetric}. Drop code_max."
        )
      if not (0 < float(self.code_max) <= fmax):
        raise ValueError(
          f"code_max={self.code_max!r} is out of range for {fmt.value!r}: "
          f"expected 0 < code_max <= {fmax}."
        )
      set_("code_max", float(self.code_max))
    if not (isinstance(self.eps, (int, float)) and self.eps >= 0):
      raise ValueError(f"eps must be a float >= 0, got {self.eps!r}.")
    if not math.isfinite(self.eps):
      raise ValueError(f"eps must be finite, got {self.eps!r}.")
    set_("eps", float(self.eps))

  @property
  def info(self) -> FormatInfo:
    """Static facts about this spec's format."""
    return _FORMATS[self.format]

  @property
  def bits(self) -> int:
    """Nominal bits per element code."""
    return self.info.bits

  def replace(self, **changes: Any) -> QuantSpec:
    """Returns a copy with ``changes`` applied (and validated)."""
    return dataclasses.replace(self, **changes)
