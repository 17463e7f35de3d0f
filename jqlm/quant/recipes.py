r"""Low-precision training recipes as data: which operand of which GEMM of a
linear layer is quantized how (../shared/spec/lowp_training.md).

A linear layer runs three GEMMs (x is [N, K], W is [K, M], dy is [N, M]):

.. math:: y = x W, \qquad dx = dy\,W^\top, \qquad dW = x^\top dy .

A :class:`Recipe` names, for each operand of each GEMM, an
:class:`OperandQuant`: the element format, the scale rule and the block of
elements sharing a scale (always along that GEMM's contraction dim: K for
the forward, M for dgrad, N for wgrad), the rounding (nearest with the
recipe's tie rule, or stochastic in the recipe's variant), an optional
blockwise Hadamard rotation and the forward's clip/trust mask. It also says
where the backward's x and W come from: the saved high-precision tensors
(torchao, TE) or the forward's quantized ones (Quartet, Quartet-II, HALO,
QuEST), and whether the forward runs in a Hadamard-rotated basis that the
gradients leave through (Quartet, QuEST, HALO).

:func:`recipe` builds the named recipes of the spec, with switches (e.g.
``recipe("nvfp4", stochastic_rounding=False)``); :func:`quantize_operand`
is the one quantizer they all run through, and
:func:`jqlm.ops.quantized_dot` runs a recipe's three GEMMs with a custom
VJP.

Every rounding here is emulated in float32: quantize, dequantize, and the
dequantized values are what the GEMMs multiply, so the numerics are the
recipe's exactly up to accumulation order (the spec's oracle runs the
GEMMs in float64 on the dequantized operands).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jqlm.quant import rounding as rnd
from jqlm.quant import scales as sc
from jqlm.quant.hadamard import TE_RHT_SIGNS, block_hadamard, hadamard
from jqlm.quant.spec import Rounding
from jqlm.quant.spec import to_enum as _enum


def _check_bool(value, what: str) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{what} must be True or False, got {value!r} "
                    f"({type(value).__name__}).")


def _check_int(value, what: str, *, low: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{what} must be an integer >= {low}, got {value!r}.")


def _check_pow2(value, what: str, *, low: int = 2) -> None:
  _check_int(value, what, low=low)
  if value & (value - 1):
    raise ValueError(f"{what} must be a power of two (e.g. 32, 64, 128), "
                     f"got {value}.")


def _check_positive(value, what: str) -> None:
  if (isinstance(value, bool) or not isinstance(value, int | float)
      or not 0 < value < float("inf")):
    raise ValueError(f"{what} must be a finite number > 0, got {value!r}.")


class Elem(enum.Enum):
  """Element formats of the recipes (spec §1.1).

  ``e4m3`` (max 448), ``e5m2`` (max 57344), ``e2m1`` (FP4, max 6),
  ``int8`` (HALO: round half to even, no clamp) and ``int`` (QuEST's
  :math:`2^b` mid-rise levels, ``bits`` of :class:`OperandQuant`).
  """

  E4M3 = "e4m3"
  E5M2 = "e5m2"
  E2M1 = "e2m1"
  INT8 = "int8"
  INT = "int"


ELEM_MAX = {Elem.E4M3: 448.0, Elem.E5M2: 57344.0, Elem.E2M1: 6.0,
            Elem.INT8: 127.0}
ELEM_EMAX = {Elem.E4M3: 8, Elem.E5M2: 15, Elem.E2M1: 2}


class Scale(enum.Enum):
  """How a block's scale is computed (and which recipe's arithmetic).

  * ``tensor`` / ``axis``: torchao float8, one fp32 scale per tensor or per
    row along the contraction dim: :math:`s = m / \\max(a, 10^{-12})`,
    optionally floored to a power of two (``pow2``); :math:`q =
    \\mathrm{RNE}(\\mathrm{sat}(t s))`, value :math:`q / s` (§2, §3).
  * ``e8m0_floor`` / ``e8m0_rceil``: OCP MX power-of-two block scales
    (§4, §5; :func:`jqlm.quant.scales.e8m0_scale`).
  * ``nvfp4``: TE's two-level NVFP4 scale: fp32 tensor scale
    :math:`S = 448 \\cdot 6 / A`, E4M3 block scales :math:`s_b =
    \\mathrm{E4M3}(a_b S / 6)`, value :math:`q s_b A / 2688` (§6.2).
  * ``nvfp4_q2``: Quartet-II's NVFP4 arithmetic: :math:`s_{dec} = A /
    g_{max} / v_{max}`, :math:`s_b = \\mathrm{E4M3}(a_b / v_{max} /
    s_{dec})` with 0 replaced by 1, value :math:`q s_b s_{dec}` (§6.5, §8.1).
  * ``eden``: Quartet-II's EDEN: ``nvfp4_q2`` with global max 255.99 and
    :math:`v_{max} = 6 / 0.988125`, then a per-``chunk`` correction
    :math:`c = \\sum x_s^2 / \\sum x_s q` of every block scale, rounded
    stochastically onto E4M3 (§8.2).
  * ``quartet_fwd``: Quartet's forward (QuEST-style MXFP4):
    :math:`s = 2^{\\lfloor \\log_2(0.48707976 \\sigma + 10^{-8}) \rfloor}`
    with :math:`\\sigma` the block's population std (§7.1).
  * ``quartet_bwd``: Quartet's gradient quantizer:
    :math:`s = 2^{\\lfloor \\log_2 a \rfloor - 2} / 0.75`, nothing clips (§7.2).
  * ``quest``: QuEST: per row over the whole contraction dim,
    :math:`s = \alpha_b \\mathrm{rms} + 10^{-8}`, mid-rise levels (§10).
  * ``halo``: HALO per-tensor: :math:`c = \\mathrm{bf16}(a / m)`,
    :math:`q = \\mathrm{round}(t / c)`, value :math:`q c` (§9).
  """

  TENSOR = "tensor"
  AXIS = "axis"
  E8M0_FLOOR = "e8m0_floor"
  E8M0_RCEIL = "e8m0_rceil"
  NVFP4 = "nvfp4"
  NVFP4_Q2 = "nvfp4_q2"
  EDEN = "eden"
  QUARTET_FWD = "quartet_fwd"
  QUARTET_BWD = "quartet_bwd"
  QUEST = "quest"
  HALO = "halo"


_BLOCKED = (Scale.E8M0_FLOOR, Scale.E8M0_RCEIL, Scale.NVFP4, Scale.NVFP4_Q2,
            Scale.EDEN, Scale.QUARTET_FWD, Scale.QUARTET_BWD)
_GLOBAL = (Scale.TENSOR, Scale.HALO, Scale.NVFP4, Scale.NVFP4_Q2, Scale.EDEN)


class Signs(enum.Enum):
  """Sign policy of a Hadamard rotation (spec §1.3).

  ``none``: :math:`H_b`. ``fixed``: TE's hard-coded 16-vector
  (:data:`jqlm.quant.hadamard.TE_RHT_SIGNS`), ``diag(s) H``. ``random``:
  fresh uniform signs per backward call, ``diag(s) H`` (Quartet-II).
  ``random_post``: fresh signs applied after the rotation, ``H diag(s)``:
  the original Quartet's, which cancel in the GEMM (§7.3 quirk 1).
  """

  NONE = "none"
  FIXED = "fixed"
  RANDOM = "random"
  RANDOM_POST = "random_post"


class Mask(enum.Enum):
  """Gradient mask of a forward quantizer, in the rotated domain.

  ``none``: straight-through. ``clip``: Quartet's :math:`|v/s| < 6`
  (§7.1). ``trust``: QuEST's :math:`|\\hat v - v| \\le \tau\\,\\mathrm{rms}`
  (§10)."""

  NONE = "none"
  CLIP = "clip"
  TRUST = "trust"


class Source(enum.Enum):
  """Where a backward GEMM's x or W comes from: ``high`` (the saved
  high-precision tensor, re-quantized: torchao, TE) or ``forward`` (the
  forward's quantized tensor, reused or re-quantized: Quartet, Quartet-II,
  HALO, QuEST)."""

  HIGH = "high"
  FORWARD = "forward"


@dataclasses.dataclass(frozen=True)
class Rotation:
  """A Hadamard rotation applied along one dim before quantizing.

  Attributes:
    block: the block size (a power of two), or ``None`` for one transform
      over the whole dim (HALO; a power-of-two length).
    signs: the :class:`Signs` policy.
    matrix_dtype: ``"float32"`` or ``"bfloat16"`` (the entries of a bf16
      :math:`H_{128}` are ±0.08837890625, so :math:`H H^\top = 0.999786
      I`: QuEST's official matrix).
  """

  block: int | None = 16
  signs: Signs | str = Signs.NONE
  matrix_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "signs", _enum(Signs, self.signs,
                                            "Rotation.signs"))
    b = self.block
    if b is not None and (isinstance(b, bool) or not isinstance(b, int)
                          or b < 1 or b & (b - 1)):
      raise ValueError(f"Rotation.block must be a power of two or None, got "
                       f"{b!r}.")
    if self.signs is Signs.FIXED and b != 16:
      raise ValueError("Rotation.signs='fixed' is TE's 16-vector; it needs "
                       f"block=16, got {b!r}.")
    if self.signs is not Signs.NONE and b is None:
      raise ValueError("A whole-dim rotation (block=None) has no signs "
                       "(HALO's is deterministic).")
    rnd.check_choice(self.matrix_dtype, ("float32", "bfloat16"),
                     "Rotation.matrix_dtype")

  @property
  def random(self) -> bool:
    return self.signs in (Signs.RANDOM, Signs.RANDOM_POST)


QUEST_ALPHA = {1: 0.7978845587140913, 1.585: 1.2240089519030855,
               2: 1.4935346200015913, 3: 2.051068354131873,
               4: 2.513930578568423, 5: 2.9160938834961225,
               6: 3.276597282593217, 7: 3.6010497188221655,
               8: 3.884938678807525}
"""QuEST's MSE-optimal clip in RMS units per bit width, the official
constants (``base_linear.py:38-48``; the 6-8-bit ones stop short of the
exact optimum, kept for parity: spec §10)."""

QUARTET_SIGMA = 0.48707976
"""The FP4 grid's MSE-optimal scale in units of the std: 2.92247856 / 6
(QuEST ``FP4_LEVELS``, Quartet ``gaussian_scale``; spec §7.1, §10)."""

EDEN_OVERRIDE = (17 / 16) * 0.93
"""Quartet-II's backward scale override: :math:`v_{max} = 6 / 0.988125
\approx 6.0721` (``quartet_2.py:254``; spec §8.2)."""


@dataclasses.dataclass(frozen=True)
class OperandQuant:
  """How one GEMM operand is quantized (along that GEMM's contraction dim).

  Attributes:
    elem: the :class:`Elem` format.
    scale: the :class:`Scale` rule.
    block: elements per scale along the contraction dim (blocked scales;
      0 for ``tensor``/``axis``/``quest``/``halo``).
    tile: ``block x block`` 2-D tiles instead of ``1 x block`` (TE's NVFP4
      weights: the transpose reuses the same values).
    rounding: the :class:`jqlm.quant.Rounding`: ``nearest`` (with ``tie``
      for FP4; RNE otherwise) or ``stochastic`` (the ``sr`` variant; needs
      a key).
    tie: FP4 round-to-nearest tie rule (``"even"``, ``"away"``, ``"zero"``).
    sr: FP4 stochastic-rounding variant (``"exact"``, ``"quartet2"``,
      ``"te"``; other formats always round exactly).
    pow2: floor ``tensor``/``axis`` scales to powers of two (torchao
      rowwise).
    val_max: the element value a block's max maps to (two-level scales; the
      "scale override" of Quartet-II is ``6 / val_max``).
    global_max: the E4M3 max of the tensor scale (448, or Quartet-II's
      447.99 / 255.99).
    bits: QuEST's bit width (a key of :data:`QUEST_ALPHA`).
    chunk: EDEN's correction chunk (Quartet-II's Hadamard dim, 128).
    rotation: a :class:`Rotation` applied along the contraction dim first
      (backward GEMMs; both operands of a GEMM share it and its signs).
    mask: the :class:`Mask` the forward's gradient goes through.
    bf16: round the (rotated) operand to bfloat16 before quantizing
      (HALO's bf16 autocast tensors, spec §9).
    eager: HALO's eager-mode double rounding (``bf16(t / c)`` before the
      cast) instead of the compiled code's ``fp32(t) / c`` (spec §9 quirk).
  """

  elem: Elem | str
  scale: Scale | str
  block: int = 0
  tile: bool = False
  rounding: Rounding | str = Rounding.NEAREST
  tie: str = "even"
  sr: str = "exact"
  pow2: bool = False
  val_max: float | None = None
  global_max: float = 448.0
  bits: float = 4
  chunk: int = 128
  rotation: Rotation | None = None
  mask: Mask | str = Mask.NONE
  bf16: bool = False
  eager: bool = False

  def __post_init__(self):
    s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    s("elem", _enum(Elem, self.elem, "OperandQuant.elem"))
    s("scale", _enum(Scale, self.scale, "OperandQuant.scale"))
    s("rounding", _enum(Rounding, self.rounding, "OperandQuant.rounding"))
    s("mask", _enum(Mask, self.mask, "OperandQuant.mask"))
    rnd.check_choice(self.tie, rnd.FP4_TIES, "OperandQuant.tie")
    rnd.check_choice(self.sr, rnd.FP4_SR_VARIANTS, "OperandQuant.sr")
    for f in ("tile", "pow2", "bf16", "eager"):
      _check_bool(getattr(self, f), f"OperandQuant.{f}")
    if self.val_max is not None:
      _check_positive(self.val_max, "OperandQuant.val_max")
    _check_positive(self.global_max, "OperandQuant.global_max")
    _check_int(self.chunk, "OperandQuant.chunk")
    if self.rotation is not None and not isinstance(self.rotation, Rotation):
      raise TypeError(f"OperandQuant.rotation must be a Rotation or None, "
                      f"got {self.rotation!r}.")
    if self.scale in _BLOCKED:
      if (isinstance(self.block, bool) or not isinstance(self.block, int)
          or self.block < 1):
        raise ValueError(f"OperandQuant(scale={self.scale.value!r}) needs a "
                         f"block size >= 1, got block={self.block!r}.")
    elif isinstance(self.block, bool) or not isinstance(self.block, int):
      raise ValueError(f"OperandQuant.block must be an integer, got "
                       f"{self.block!r}.")
    elif self.block:
      raise ValueError(f"scale={self.scale.value!r} has no blocks; drop "
                       f"block={self.block}.")
    if self.tile and self.scale not in (Scale.NVFP4, Scale.NVFP4_Q2):
      raise ValueError("tile=True (16x16 tiles) applies to the NVFP4 scales.")
    if (self.elem is Elem.INT) != (self.scale is Scale.QUEST):
      raise ValueError("elem='int' (QuEST levels) goes with scale='quest' "
                       "and only with it.")
    if self.scale is Scale.QUEST and (isinstance(self.bits, bool)
                                      or self.bits not in QUEST_ALPHA):
      raise ValueError(f"QuEST bits must be one of {sorted(QUEST_ALPHA)}, "
                       f"got {self.bits!r}.")
    fp4_scales = (Scale.NVFP4, Scale.NVFP4_Q2, Scale.EDEN, Scale.QUARTET_FWD,
                  Scale.QUARTET_BWD)
    if self.scale in fp4_scales and self.elem is not Elem.E2M1:
      raise ValueError(f"scale={self.scale.value!r} quantizes to E2M1; got "
                       f"elem={self.elem.value!r}.")
    if (self.scale in (Scale.E8M0_FLOOR, Scale.E8M0_RCEIL)
        and self.elem not in ELEM_EMAX):
      raise ValueError(
        f"scale={self.scale.value!r} (MX E8M0 block scales) serves the "
        f"float elements {', '.join(e.value for e in ELEM_EMAX)}; got "
        f"elem={self.elem.value!r}.")
    if self.scale is Scale.HALO and self.elem not in (Elem.E4M3, Elem.INT8):
      raise ValueError("HALO's per-tensor scale serves e4m3 and int8.")
    if self.mask is Mask.TRUST and self.scale is not Scale.QUEST:
      raise ValueError("mask='trust' is QuEST's trust mask (scale='quest').")
    if self.mask is Mask.CLIP and self.scale is not Scale.QUARTET_FWD:
      raise ValueError("mask='clip' is Quartet's forward clip mask "
                       "(scale='quartet_fwd').")

  @property
  def stochastic(self) -> bool:
    return self.rounding is Rounding.STOCHASTIC or self.scale is Scale.EDEN

  @property
  def needs_key(self) -> bool:
    return self.stochastic or (self.rotation is not None
                               and self.rotation.random)

  def replace(self, **changes) -> OperandQuant:
    return dataclasses.replace(self, **changes)


OPERANDS = ("x", "w", "dgrad_dy", "dgrad_w", "wgrad_x", "wgrad_dy")
"""The six GEMM operands a :class:`Recipe` names: the forward's x and W,
dgrad's dy and W, wgrad's x and dy."""


@dataclasses.dataclass(frozen=True)
class Recipe:
  r"""The quantization of a linear layer's three GEMMs (frozen, hashable:
  a static argument).

  Attributes:
    name: the recipe's name (recorded in the metrics log).
    x, w: the forward's operands, quantized along K (``None``: high
      precision).
    dgrad_dy, dgrad_w: dgrad's operands, quantized along M.
    wgrad_x, wgrad_dy: wgrad's operands, quantized along N.
    dgrad_w_source, wgrad_x_source: the :class:`Source` of dgrad's W and
      wgrad's x. With ``forward`` and no quantizer, the forward's quantized
      values are reused as they are (HALO, QuEST, TE's 16x16 weight tiles).
    rotation: the forward's Hadamard rotation along K of x and W (no
      signs). The forward then runs in the rotated basis, and dx, dW leave
      it through the transposed rotation after the masks (Quartet H32,
      QuEST H128, HALO levels 1-2).
    token_rotation: HALO level 2's dgrad rotation of dy along N (tokens, a
      free dim of dgrad), undone on dx (spec §9).
  """

  name: str = "custom"
  x: OperandQuant | None = None
  w: OperandQuant | None = None
  dgrad_dy: OperandQuant | None = None
  dgrad_w: OperandQuant | None = None
  wgrad_x: OperandQuant | None = None
  wgrad_dy: OperandQuant | None = None
  dgrad_w_source: Source | str = Source.HIGH
  wgrad_x_source: Source | str = Source.HIGH
  rotation: Rotation | None = None
  token_rotation: Rotation | None = None

  def __post_init__(self):
    if not isinstance(self.name, str):
      raise TypeError(f"Recipe.name must be a string, got {self.name!r}.")
    for f in ("rotation", "token_rotation"):
      rot = getattr(self, f)
      if rot is not None and not isinstance(rot, Rotation):
        raise TypeError(f"Recipe.{f} must be a Rotation or None, got "
                        f"{rot!r}.")
    for f in ("dgrad_w_source", "wgrad_x_source"):
      object.__setattr__(self, f, _enum(Source, getattr(self, f),
                                        f"Recipe.{f}"))
    for name in OPERANDS:
      q = getattr(self, name)
      if q is not None and not isinstance(q, OperandQuant):
        raise ValueError(f"Recipe.{name} must be an OperandQuant or None, "
                         f"got {q!r}.")
      if q is not None and q.mask is not Mask.NONE and name not in ("x",
                                                                    "w"):
        raise ValueError(f"Recipe.{name}: masks belong to the forward's "
                         "quantizers (x, w).")
    for rot in (self.rotation, self.token_rotation):
      if rot is not None and rot.random:
        raise ValueError("The forward and token rotations are deterministic "
                         "(signs 'none' or 'fixed').")
    for a, b in (("dgrad_dy", "dgrad_w"), ("wgrad_x", "wgrad_dy")):
      ra = getattr(self, a) and getattr(self, a).rotation
      rb = getattr(self, b) and getattr(self, b).rotation
      if ra != rb:
        raise ValueError(
          f"Recipe {self.name!r}: {a} and {b} are rotated differently "
          f"({ra} vs {rb}); a rotation along the contraction dim cancels "
          "in the GEMM only when both operands share it.")
    for name in ("x", "w"):
      q = getattr(self, name)
      if q is not None and q.rotation is not None:
        raise ValueError(f"Recipe.{name}: the forward's rotation is "
                         "Recipe.rotation (shared by x and W).")

  @property
  def quantized(self) -> bool:
    """Whether any operand is quantized (``bf16`` is not)."""
    return any(getattr(self, n) is not None for n in OPERANDS)

  @property
  def needs_key(self) -> bool:
    """Whether a GEMM draws random numbers (stochastic rounding, random
    signs): :func:`jqlm.ops.quantized_dot` then needs ``key``."""
    return any(getattr(self, n) is not None and getattr(self, n).needs_key
               for n in OPERANDS)

  def replace(self, **changes) -> Recipe:
    return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------
# The quantizer


class Operand(NamedTuple):
  """A quantized GEMM operand: ``values`` (float32, dequantized, in the
  rotated basis if rotated), ``mask`` (bool, or ``None``) and, for the
  native path, ``codes`` (the element values before scaling) and
  ``scale`` (broadcastable to them), where the scale is constant along
  the contraction dim (``None`` otherwise). ``clipped`` (bool) marks the
  elements that the scale put beyond the element format's largest value
  (saturated, or clipped to it: MX FLOOR's block tops, QuEST's clip, a
  rounded-down tensor scale), ``flushed`` (bool) the non-zero elements
  that quantized to zero (underflow); both in the quantized (rotated)
  basis, see :func:`operand_fractions`."""

  values: jax.Array
  mask: jax.Array | None = None
  codes: jax.Array | None = None
  scale: jax.Array | None = None
  clipped: jax.Array | None = None
  flushed: jax.Array | None = None


def rotate(v: jax.Array, axis: int, rot: Rotation, *, signs=None,
           transpose: bool = False) -> jax.Array:
  """Applies :class:`Rotation` ``rot`` along ``axis`` of float32 ``v``
  (``transpose``: its transpose, which undoes it when it is orthogonal).
  A whole-dim rotation uses the fast Walsh-Hadamard transform."""
  if rot.block is None:
    n = v.shape[axis]
    if n & (n - 1):
      raise ValueError(
        f"A whole-dim Hadamard rotation needs a power-of-two length, got "
        f"{n} (shape {tuple(v.shape)}). jqlm does not implement HALO's "
        "H_12 .. H_172 Kronecker factors; keep this layer in high "
        "precision or use a power-of-two width.")
    return hadamard(v, axis=axis)  # symmetric: its own transpose
  if rot.signs is Signs.FIXED:
    signs = jnp.asarray(TE_RHT_SIGNS, jnp.float32)
  return block_hadamard(
    v, axis, rot.block, signs=signs,
    sign_side="post" if rot.signs is Signs.RANDOM_POST else "pre",
    matrix_dtype=jnp.dtype(rot.matrix_dtype), transpose=transpose)


def draw_signs(key, rot: Rotation | None):
  """The random sign vector of ``rot`` (or ``None``)."""
  if rot is None or not rot.random:
    return None
  return jax.random.rademacher(key, (rot.block,), jnp.float32)


def _blocks(v, block, tile):
  """[R, C] -> [R, C / b, b] (or 2-D tiles [R / b, C / b, b * b])."""
  r, c = v.shape
  if tile:
    t = v.reshape(r // block, block, c // block, block)
    return t.transpose(0, 2, 1, 3).reshape(r // block, c // block,
                                           block * block)
  return v.reshape(r, c // block, block)


def _unblocks(g, shape, block, tile):
  r, c = shape
  if tile:
    t = g.reshape(r // block, c // block, block, block).transpose(0, 2, 1, 3)
    return t.reshape(r, c)
  return g.reshape(r, c)


def _check_dims(v, q: OperandQuant, what: str):
  r, c = v.shape
  if q.block and c % q.block:
    raise ValueError(
      f"{what}: the contraction dim has length {c}, not a multiple of the "
      f"{q.scale.value} block of {q.block}. Pad it, or keep this layer in "
      "high precision (models.training_recipe(keep_high_precision=...)).")
  if q.tile and r % q.block:
    raise ValueError(
      f"{what}: {q.block}x{q.block} tiles need the other dim ({r}) to be a "
      f"multiple of {q.block}.")
  if q.scale is Scale.EDEN and c % q.chunk:
    raise ValueError(f"{what}: EDEN's correction chunk {q.chunk} must divide "
                     f"the contraction dim ({c}).")


def _poison(values, v, q: OperandQuant):
  """jqlm.quant's NaN/Inf policy: a scale group holding a NaN or an Inf
  dequantizes to NaN (here: the tensor for tensor-level scales, the row for
  row scales, the block otherwise)."""
  if q.scale in _GLOBAL:
    bad = ~jnp.all(jnp.isfinite(v))
  elif q.scale in (Scale.AXIS, Scale.QUEST):
    bad = ~jnp.all(jnp.isfinite(v), axis=1, keepdims=True)
  else:
    g = _blocks(v, q.block, q.tile)
    badg = ~jnp.all(jnp.isfinite(g), axis=-1, keepdims=True)
    bad = _unblocks(jnp.broadcast_to(badg, g.shape), v.shape, q.block,
                    q.tile)
  return jnp.where(bad, jnp.nan, values)


def _quantize_2d(v, q: OperandQuant, noise: OperandNoise):
  """v: float32 [R, C], contraction along C (already rotated)."""
  elem_u = noise.u
  sc_rule = q.scale
  if sc_rule in (Scale.TENSOR, Scale.AXIS):
    m = ELEM_MAX[q.elem]
    if sc_rule is Scale.TENSOR:
      amax = jnp.max(jnp.abs(v), keepdims=True)
    else:
      amax = jnp.max(jnp.abs(v), axis=1, keepdims=True)
    s = m / jnp.maximum(amax, 1e-12)
    if q.pow2:
      s = sc.pow2_floor(s)
    codes = rnd.round_float(v * s, q.elem.value, u=elem_u)
    return Operand(codes / s, None, codes, 1.0 / s, jnp.abs(v * s) > m)
  if sc_rule is Scale.HALO:
    m = ELEM_MAX[q.elem]
    amax = jnp.max(jnp.abs(v))
    c = (amax / m).astype(jnp.bfloat16).astype(jnp.float32)
    safe = jnp.where(c > 0, c, 1.0)
    y = v / safe
    if q.eager:
      y = y.astype(jnp.bfloat16).astype(jnp.float32)
    codes = rnd.round_float(y, q.elem.value, u=elem_u)
    return Operand(codes * c, None, codes, c.reshape(1, 1), jnp.abs(y) > m)
  if sc_rule is Scale.QUEST:
    b = q.bits
    alpha = QUEST_ALPHA[b]
    levels = 2.0 ** b - 1
    rms = jnp.sqrt(jnp.mean(v * v, axis=1, keepdims=True))
    s = alpha * rms + 1e-8
    step = 2 * s / levels
    vq = jnp.round(jnp.clip(v, -s, s) / step + 0.5) * step - step / 2
    mask = None
    if q.mask is Mask.TRUST:
      mask = jnp.abs(vq - v) <= (alpha / levels) * rms
    return Operand(vq, mask, clipped=jnp.abs(v) > s)
  g = _blocks(v, q.block, q.tile)  # [A, B, blk]
  amax = jnp.max(jnp.abs(g), axis=-1, keepdims=True)
  elem_ug = None if elem_u is None else _blocks(elem_u, q.block, q.tile)
  mask = None
  if sc_rule in (Scale.E8M0_FLOOR, Scale.E8M0_RCEIL):
    rule = "floor" if sc_rule is Scale.E8M0_FLOOR else "rceil"
    s = sc.e8m0_scale(amax, rule=rule, elem_emax=ELEM_EMAX[q.elem],
                      elem_max=ELEM_MAX[q.elem])
    # 2^-127 (an all-zero block) is an fp32 subnormal, which XLA flushes
    # to zero: divide by 1 there (the block's values are below 2^-119 and
    # dequantize to 0 with the flushed scale)
    safe = jnp.where(s > 0, s, 1.0)
    out = rnd.round_float(g / safe, q.elem.value, u=elem_ug, tie=q.tie,
                          sr=q.sr) * s
    clip = jnp.abs(g / safe) > ELEM_MAX[q.elem]
  elif sc_rule is Scale.NVFP4:
    big = jnp.float32(jnp.finfo(jnp.float32).max)
    a_t = jnp.max(amax)
    s_enc = jnp.where(a_t > 0, jnp.minimum(2688.0 / a_t, big), 1.0)
    s_b = sc.e4m3_scale(amax * (s_enc * jnp.float32(1 / 6)))
    enc = jnp.where(s_b > 0, 1.0 / (s_b * (1.0 / s_enc)), 0.0)
    clip = jnp.abs(g * enc) > 6.0
    y = jnp.clip(g * enc, -6.0, 6.0)
    qv = rnd.round_float(y, "e2m1", u=elem_ug, tie=q.tie, sr=q.sr)
    out = qv * s_b * (a_t / 2688.0)
  elif sc_rule in (Scale.NVFP4_Q2, Scale.EDEN):
    val_max = q.val_max if q.val_max is not None else 6.0
    a_t = jnp.max(amax)
    s_dec = jnp.where(a_t == 0, 1.0, a_t / q.global_max / val_max)
    s_b = sc.e4m3_scale((amax / val_max) / s_dec)
    s_b = jnp.where(s_b == 0, 1.0, s_b)
    inv = s_b * s_dec
    y = g / inv
    clip = jnp.abs(y) > 6.0
    if elem_ug is not None:
      qv = rnd.sr_fp4(y, elem_ug, q.sr)
    else:
      qv = rnd.round_fp4(y, q.tie)
    if sc_rule is Scale.NVFP4_Q2:
      out = qv * inv
    else:
      a, bn, blk = g.shape
      per = q.chunk // blk
      ys = y.reshape(a, bn // per, per * blk)
      qs = qv.reshape(a, bn // per, per * blk)
      num = jnp.sum(ys * ys, axis=-1, keepdims=True)
      den = jnp.sum(ys * qs, axis=-1, keepdims=True)
      corr = jnp.where(den == 0, 1.0, num / jnp.where(den == 0, 1.0, den))
      cs = (s_b.reshape(a, bn // per, per) * corr).reshape(a, bn, 1)
      u_b = noise.u_scale.reshape(cs.shape)
      out = qv * sc.e4m3_scale(cs, u=u_b) * s_dec
  elif sc_rule is Scale.QUARTET_FWD:
    mean = jnp.mean(g, axis=-1, keepdims=True)
    var = jnp.mean(g * g, axis=-1, keepdims=True) - mean * mean
    sigma = jnp.sqrt(jnp.maximum(var, 0.0))
    s = sc.pow2_floor(QUARTET_SIGMA * sigma + 1e-8)
    y = g / s
    clip = jnp.abs(y) > 6.0
    out = rnd.round_fp4(y, q.tie) * s
    if q.mask is Mask.CLIP:
      mask = _unblocks(jnp.abs(y) < 6.0, v.shape, q.block, q.tile)
  elif sc_rule is Scale.QUARTET_BWD:
    s = sc.pow2_floor(amax) * 0.25 / 0.75
    safe = jnp.where(amax > 0, s, 1.0)
    y = g / safe
    clip = jnp.abs(y) > 6.0
    qv = rnd.round_float(y, "e2m1", u=elem_ug, tie=q.tie, sr=q.sr)
    out = jnp.where(amax > 0, qv * s, 0.0)
  else:  # pragma: no cover - enum is exhaustive
    raise AssertionError(sc_rule)
  return Operand(_unblocks(out, v.shape, q.block, q.tile), mask,
                 clipped=_unblocks(clip, v.shape, q.block, q.tile))


class OperandNoise(NamedTuple):
  """The random numbers of one operand's quantization, in its
  ``[other, contraction]`` layout (the transpose of a W [K, M] quantized
  along K, say): ``u``, one uniform in [0, 1) per element (stochastic
  rounding), and ``u_scale``, one per block ``[R, C / block]`` (EDEN's
  stochastic E4M3 scale rounding)."""

  u: jax.Array | None = None
  u_scale: jax.Array | None = None


def operand_noise(key: jax.Array | None, q: OperandQuant,
                  shape: tuple[int, int]) -> OperandNoise:
  """Draws the :class:`OperandNoise` of ``q`` for an operand whose
  ``[other, contraction]`` shape is ``shape``: element uniforms from
  ``fold_in(key, 1)`` and EDEN's block uniforms from ``fold_in(key, 2)``
  (:func:`jqlm.quant.rounding.uniforms`). Deterministic ``q`` draws
  nothing and needs no key."""
  u = u_scale = None
  if q.rounding is Rounding.STOCHASTIC:
    u = rnd.uniforms(jax.random.fold_in(key, 1), shape)
  if q.scale is Scale.EDEN:
    u_scale = rnd.uniforms(jax.random.fold_in(key, 2),
                           (shape[0], shape[1] // q.block))
  return OperandNoise(u, u_scale)


def quantize_operand(t: jax.Array, q: OperandQuant, *, axis: int,
                     key: jax.Array | None = None,
                     noise: OperandNoise | None = None,
                     signs: jax.Array | None = None,
                     what: str = "operand") -> Operand:
  """Quantizes a 2-D GEMM operand ``t`` along its contraction ``axis``
  (0 or 1) with :class:`OperandQuant` ``q``: rotation (``q.rotation``,
  with ``signs`` when random), bf16 rounding (``q.bf16``), then the scale
  and element rules. Returns an :class:`Operand` in ``t``'s layout, values
  in float32 (in the rotated basis when rotated).

  The random numbers come from ``noise`` when given, else from ``key``
  (:func:`operand_noise`); a stochastic ``q`` needs one of them. ``what``
  names the operand in error messages.
  """
  if t.ndim != 2 or axis not in (0, 1):
    raise ValueError(f"quantize_operand expects a 2-D operand and axis 0 or "
                     f"1, got shape {tuple(t.shape)}, axis={axis}.")
  v = t.astype(jnp.float32)
  if axis == 0:
    v = v.T
  _check_dims(v, q, what)
  if noise is None:
    if q.stochastic and key is None:
      rnd.require_key(key, f"{what} (stochastic rounding)")
    noise = operand_noise(key, q, v.shape)
  if (q.rounding is Rounding.STOCHASTIC and noise.u is None) or (
      q.scale is Scale.EDEN and noise.u_scale is None):
    raise ValueError(f"{what}: {q.rounding.value} rounding with scale "
                     f"{q.scale.value!r} needs noise.u"
                     + (" and noise.u_scale" if q.scale is Scale.EDEN else "")
                     + " (operand_noise), or a key.")
  if q.rotation is not None:
    if q.rotation.random and signs is None:
      raise ValueError(f"{what}: a random-sign rotation needs its signs "
                       "(draw_signs).")
    v = rotate(v, 1, q.rotation, signs=signs)
  if q.bf16:
    v = v.astype(jnp.bfloat16).astype(jnp.float32)
  op = _quantize_2d(v, q, noise)
  values = _poison(op.values, v, q)
  op = op._replace(values=values, flushed=(v != 0) & (values == 0))
  if axis == 0:
    op = Operand(*(None if a is None else a.T for a in op))
  return op


def operand_fractions(op: Operand) -> jax.Array:
  """``[clipped, flushed]``: the fractions of an :class:`Operand`'s
  elements that its scale put beyond the element format's largest value
  (``clipped``) and of its elements that were non-zero and quantized to
  zero (``flushed``, over all elements), float32 ``[2]``; zeros for an
  operand that was not quantized."""
  if op.clipped is None or op.flushed is None:
    return jnp.zeros((2,), jnp.float32)
  return jnp.stack([jnp.mean(op.clipped.astype(jnp.float32)),
                    jnp.mean(op.flushed.astype(jnp.float32))])


def needs_key_message(r: Recipe) -> str:
  return (f"Recipe {r.name!r} draws random numbers (stochastic rounding or "
          "random Hadamard signs): pass key=jax.random.key(...) (the train "
          "step splits one per step; split it per layer and per call).")



# ---------------------------------------------------------------------------
# The named recipes of the spec


def _fp8_tensorwise(o):
  e4 = OperandQuant("e4m3", "tensor")
  e5 = OperandQuant("e5m2", "tensor")
  return Recipe("fp8_tensorwise", x=e4, w=e4, dgrad_dy=e5, dgrad_w=e4,
                wgrad_x=e4, wgrad_dy=e5)


def _fp8_rowwise(o):
  q = OperandQuant("e4m3", "axis", pow2=o.pop("pow2", True))
  return Recipe("fp8_rowwise", x=q, w=q, dgrad_dy=q, dgrad_w=q, wgrad_x=q,
                wgrad_dy=q)


def _mx_rule(o, default):
  rule = rnd.check_choice(o.pop("scale", default), ("floor", "rceil"),
                          "scale")
  return Scale.E8M0_FLOOR if rule == "floor" else Scale.E8M0_RCEIL


def _mxfp8(o):
  q = OperandQuant("e4m3", _mx_rule(o, "rceil"), block=32)
  hp = o.pop("wgrad_with_hp", False)
  return Recipe("mxfp8", x=q, w=q, dgrad_dy=q, dgrad_w=q,
                wgrad_x=None if hp else q, wgrad_dy=None if hp else q)


def _mxfp4(o):
  q = OperandQuant("e2m1", _mx_rule(o, "floor"), block=32, tie="even")
  return Recipe("mxfp4", x=q, w=q, dgrad_dy=q, dgrad_w=q, wgrad_x=q,
                wgrad_dy=q)


def _nvfp4(o):
  sr = o.pop("stochastic_rounding", True)
  rht = o.pop("hadamard", True)
  w2d = o.pop("weight_2d", True)
  fp4 = OperandQuant("e2m1", "nvfp4", block=16)
  grad = fp4.replace(rounding="stochastic" if sr else "nearest", sr="te")
  rot = Rotation(16, "fixed", "bfloat16") if rht else None
  return Recipe(
    "nvfp4", x=fp4, w=fp4.replace(tile=w2d), dgrad_dy=grad,
    dgrad_w=None if w2d else fp4, dgrad_w_source="forward" if w2d else "high",
    wgrad_x=fp4.replace(rotation=rot), wgrad_dy=grad.replace(rotation=rot),
    wgrad_x_source="high")


def _quartet(o):
  had = o.pop("hadamard", True)
  signs = o.pop("signs", "random_post")
  fwd = OperandQuant("e2m1", "quartet_fwd", block=32, tie="zero",
                     mask="clip")
  rot = Rotation(32, signs) if had else None
  bwd = OperandQuant("e2m1", "quartet_bwd", block=32,
                     rounding="stochastic", sr="exact", rotation=rot)
  return Recipe("quartet", x=fwd, w=fwd, dgrad_dy=bwd, dgrad_w=bwd,
                wgrad_x=bwd, wgrad_dy=bwd, dgrad_w_source="forward",
                wgrad_x_source="forward",
                rotation=Rotation(32) if had else None)


def _quartet2(o):
  dim = o.pop("hadamard_dim", 128)
  had = o.pop("hadamard", True)
  fwd = OperandQuant("e2m1", "nvfp4_q2", block=16, tie="away",
                     global_max=447.99)
  bwd = OperandQuant("e2m1", "eden", block=16, tie="away", chunk=dim,
                     global_max=255.99, val_max=6.0 / EDEN_OVERRIDE,
                     rotation=Rotation(dim, "random") if had else None)
  return Recipe("quartet2", x=fwd, w=fwd, dgrad_dy=bwd, dgrad_w=bwd,
                wgrad_x=bwd, wgrad_dy=bwd, dgrad_w_source="forward",
                wgrad_x_source="forward")


def _halo(level, elem):
  def build(o):
    q = OperandQuant(elem, "halo", bf16=True, eager=o.pop("eager", False))
    whole = Rotation(None)
    return Recipe(
      f"halo{level}_{'fp8' if elem == 'e4m3' else 'int8'}", x=q, w=q,
      dgrad_dy=q, wgrad_dy=q, dgrad_w_source="forward",
      wgrad_x_source="forward", rotation=whole if level >= 1 else None,
      token_rotation=whole if level == 2 else None)
  return build


def _quest(o):
  bits = o.pop("bits", 4)
  had = o.pop("hadamard", True)
  dim = o.pop("hadamard_dim", 128)
  q = OperandQuant("int", "quest", bits=bits,
                   mask="trust" if o.pop("trust", True) else "none")
  return Recipe("quest", x=q, w=q, dgrad_w_source="forward",
                wgrad_x_source="forward",
                rotation=Rotation(dim, matrix_dtype="bfloat16")
                if had else None)


_RECIPES = {
  "bf16": (lambda o: Recipe("bf16"), ()),
  "fp8_tensorwise": (_fp8_tensorwise, ()),
  "fp8_rowwise": (_fp8_rowwise, ("pow2",)),
  "mxfp8": (_mxfp8, ("scale", "wgrad_with_hp")),
  "mxfp4": (_mxfp4, ("scale",)),
  "nvfp4": (_nvfp4, ("stochastic_rounding", "hadamard", "weight_2d")),
  "quartet": (_quartet, ("hadamard", "signs")),
  "quartet2": (_quartet2, ("hadamard", "hadamard_dim")),
  **{f"halo{lv}_{name}": (_halo(lv, elem), ("eager",))
     for lv in (0, 1, 2) for name, elem in (("fp8", "e4m3"),
                                            ("int8", "int8"))},
  "quest": (_quest, ("bits", "trust", "hadamard", "hadamard_dim")),
}


def _choice(*choices):
  return lambda v, what: rnd.check_choice(v, choices, what)


def _quest_bits(v, what):
  if isinstance(v, bool) or v not in QUEST_ALPHA:
    raise ValueError(f"{what} must be one of {sorted(QUEST_ALPHA)} (QuEST's "
                     f"clip constants), got {v!r}.")


_SWITCH_CHECKS = {
  "pow2": _check_bool, "wgrad_with_hp": _check_bool,
  "stochastic_rounding": _check_bool, "hadamard": _check_bool,
  "weight_2d": _check_bool, "trust": _check_bool, "eager": _check_bool,
  "scale": _choice("floor", "rceil"),
  "signs": _choice("none", "random", "random_post"),
  "hadamard_dim": _check_pow2, "bits": _quest_bits,
}
"""Each recipe switch's type check (one table: a switch means the same in
every recipe that has it)."""

RECIPES = tuple(_RECIPES)
"""The names :func:`recipe` builds."""

RECIPE_SWITCHES = {name: switches for name, (_, switches) in _RECIPES.items()}
"""Each named recipe's switches (the keyword arguments of :func:`recipe`
besides the :class:`Recipe` fields)."""


def recipe(name: str, **overrides) -> Recipe:
  r"""A named low-precision training recipe (spec section in brackets).

  * ``bf16``: nothing quantized (the baseline).
  * ``fp8_tensorwise`` (§2): torchao's default: x, W E4M3 and dy E5M2, one
    fp32 scale per tensor, re-quantized from high precision.
  * ``fp8_rowwise`` (§3): torchao ROWWISE: every operand E4M3 with one
    power-of-two scale per row along each GEMM's contraction dim. Switch:
    ``pow2``.
  * ``mxfp8`` (§4): E4M3 in 32-blocks with E8M0 scales along each GEMM's
    contraction dim, RCEIL (torchao's training default). Switches:
    ``scale="floor"`` (OCP v1.0, clips a block's top), ``wgrad_with_hp``.
  * ``mxfp4`` (§5): the same structure with E2M1 and FLOOR scales, RNE
    everywhere (the naive baseline). Switch: ``scale``.
  * ``nvfp4`` (§6): NVIDIA's recipe: 1x16 E2M1 blocks with E4M3 scales and
    an fp32 tensor scale; W in 16x16 tiles reused transposed by dgrad; dy
    stochastically rounded (PTX ``cvt.rs``); wgrad's operands through TE's
    fixed-sign RHT-16. Switches: ``stochastic_rounding``, ``hadamard``,
    ``weight_2d`` (``False``: W 1x16 and dgrad's W re-quantized along M).
  * ``quartet`` (§7): QuEST-style MXFP4 forward in the H32 basis (ties to
    zero, clip mask), backward re-quantizing the forward's tensors with
    the 4/3-scaled SR quantizer behind the original "post" signs (which
    cancel: §7.3). Switches: ``hadamard``, ``signs`` (``"random"`` is
    Quartet-II's sign fix).
  * ``quartet2`` (§8): NVFP4 forward with ties away (global max 447.99),
    EDEN backward behind a fresh random-sign H128 per call. Switches:
    ``hadamard``, ``hadamard_dim`` (the class default is 32).
  * ``halo{0,1,2}_{fp8,int8}`` (§9): HALO's per-tensor bf16 scales over
    bf16 operands, every tensor E4M3 (or INT8); level 1 rotates the
    forward along K by a whole-dim Hadamard, level 2 also dgrad's dy along
    the tokens. The forward's quantized x and W are reused. Switch:
    ``eager`` (the double rounding of eager PyTorch; default: compiled).
  * ``quest`` (§10): the forward only: bf16-matrix H128 along K, per-row
    RMS-scaled ``bits``-bit mid-rise levels, trust mask; the backward runs
    in high precision on the forward's dequantized tensors. Switches:
    ``bits``, ``trust``, ``hadamard``, ``hadamard_dim``.

  Any :class:`Recipe` field may be overridden too (e.g. ``wgrad_x=None``
  keeps that operand in high precision).

  Raises:
    ValueError: an unknown name, an override that is neither a switch
      of the recipe nor a :class:`Recipe` field (the message lists both),
      or a switch value out of range (``hadamard_dim`` not a power of
      two, ``bits`` without a QuEST constant, ``scale``/``signs`` not one
      of the listed choices).
    TypeError: an on/off switch that is not a bool.
  """
  if name not in _RECIPES:
    raise ValueError(f"Unknown recipe {name!r}; choose one of "
                     f"{', '.join(RECIPES)}.")
  build, switches = _RECIPES[name]
  fields = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
  bad = sorted(set(overrides) - set(switches) - fields)
  if bad:
    raise ValueError(
      f"recipe({name!r}) has no option {', '.join(map(repr, bad))}; its "
      f"switches are {', '.join(switches) or 'none'}, and any Recipe field "
      f"({', '.join(sorted(fields))}) may be overridden.")
  opts = {k: v for k, v in overrides.items() if k in switches}
  for k, v in opts.items():
    _SWITCH_CHECKS[k](v, f"recipe({name!r}) switch {k}")
  r = build(opts)
  rest = {k: v for k, v in overrides.items() if k in fields}
  return r.replace(**rest) if rest else r


def _check_rotation(rot: Rotation | None, length: int, what: str) -> None:
  if rot is None:
    return
  if rot.block is None:
    if length & (length - 1):
      raise ValueError(
        f"{what}: a whole-dim Hadamard rotation needs a power-of-two "
        f"length, got {length}. jqlm does not implement HALO's H_12 .. "
        "H_172 Kronecker factors; keep this layer in high precision or use "
        "a power-of-two size.")
  elif length % rot.block:
    raise ValueError(
      f"{what}: the Hadamard block {rot.block} must divide the length "
      f"{length}. Pad it, change the recipe's hadamard_dim, or keep this "
      "layer in high precision.")


def check_shapes(r: Recipe, n: int, k: int, m: int, *,
                 backward: bool = True) -> None:
  """Raises ValueError, naming the operand and GEMM, when the GEMMs of
  ``r`` on x [n, k], W [k, m] cannot run: a block, tile, EDEN chunk or
  Hadamard block that does not divide its dim, or a whole-dim rotation of
  a non-power-of-two length. ``backward=False`` checks the forward GEMM
  only (a forward-only call, such as one decode step of 1 token, need not
  fit wgrad's blocks along N). :func:`jqlm.ops.quantized_dot` checks the
  forward before tracing anything; the backward's operands are checked
  when the gradient is traced.

  Raises:
    TypeError: ``r`` is not a :class:`Recipe`.
    ValueError: a dim that is not a positive integer, or a misfit (above).
  """
  if not isinstance(r, Recipe):
    raise TypeError(f"check_shapes expects a jqlm.quant.Recipe (e.g. "
                    f"quant.recipe('mxfp8')), got {type(r).__name__}.")
  for dim, v in (("n", n), ("k", k), ("m", m)):
    _check_int(v, f"check_shapes: {dim} (x is [n, k], W is [k, m])")
  _check_rotation(r.rotation, k, f"Recipe {r.name!r}, forward rotation "
                  "along K")
  if backward:
    _check_rotation(r.token_rotation, n, f"Recipe {r.name!r}, dgrad's "
                    "token rotation along N")
  # (operand, its [other, contraction] dims, what)
  plan = (("x", (n, k), "x (forward, along K)"),
          ("w", (m, k), "w (forward, along K)"),
          ("dgrad_dy", (n, m), "dy (dgrad, along M)"),
          ("dgrad_w", (k, m), "w (dgrad, along M)"),
          ("wgrad_x", (k, n), "x (wgrad, along N)"),
          ("wgrad_dy", (m, n), "dy (wgrad, along N)"))
  for name, shape, what in plan if backward else plan[:2]:
    q = getattr(r, name)
    if q is None:
      continue
    what = f"Recipe {r.name!r}, {what}"
    _check_dims(jax.ShapeDtypeStruct(shape, jnp.float32), q, what)
    _check_rotation(q.rotation, shape[1], what)
