r"""Block-wise 8-bit and 4-bit optimizer states (bitsandbytes / torchao style).

A moment tensor :math:`x` is flattened, cut into blocks of :math:`B`
elements (the last one zero-padded) and stored as one float32 absmax per
block plus one code per element:

.. math:: a_b = \max_{i \in b} |x_i|, \qquad
          c_i = \arg\min_k |x_i / a_b - Q_k|, \qquad \hat x_i = a_b Q_{c_i}

with :math:`Q` a sorted code table (Dettmers et al. 2022, "8-bit Optimizers
via Block-wise Quantization", arXiv 2110.02861; Li et al. 2023, "Memory
Efficient Optimizers with 4-bit States", arXiv 2309.01507). The nearest code
is found on the midpoints of :math:`Q`, a value on a midpoint going to the
lower code (as bitsandbytes' kernel and its ``bucketize`` fallback do).

Code tables (:class:`StateCode`):

* ``dynamic``: bitsandbytes' dynamic tree map ``create_dynamic_map``: signed
  (first moment) with 7 exponent bits at 8 bits, 3 at 4 bits; unsigned
  (second moment) at 8 bits. At 4 bits the second moment uses torchao's
  zero-free linear map :math:`\{1/16, \dots, 1\}` (``linspace(0, 1, 17)[1:]``),
  as torchao's ``AdamW4bit`` and lpmm do: a zero code would turn small
  second moments into zero and the update :math:`m/\sqrt{v}` into a spike.
* ``linear``: uniform codes, signed :math:`\{-1, \dots, 1\}` (symmetric, with
  0) and unsigned zero-free :math:`\{1/2^b, \dots, 1\}`. (With a zero code,
  every second moment below half a step of its block's max decodes to 0 and
  :math:`m / (\sqrt{v} + \epsilon)` explodes: 8-bit linear Adam diverges on
  a plain quadratic.)

Defaults follow bitsandbytes >= 0.44 and torchao: blocks of 256 at 8 bits
and 128 at 4 bits, and tensors with fewer than 4096 elements keep float32
states. (Q-GaLore pins bitsandbytes 0.43.1, whose blocks were 2048 elements;
spec §5.4. Pass ``block_size=2048`` to match it.)

NaN policy: a block holding a NaN gets a NaN absmax, so all its elements
decode to NaN (loud, never silently finite).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqlm import quant as quant_lib


class StateCode(enum.Enum):
  """Code table of a quantized optimizer state (see the module docstring)."""

  DYNAMIC = "dynamic"
  LINEAR = "linear"


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                total_bits: int = 8) -> np.ndarray:
  """bitsandbytes' ``create_dynamic_map`` (sorted float32 table).

  For each exponent :math:`i < E`, the midpoints of ``linspace(0.1, 1,
  2^(i + b - 1 - E) + 1)`` (twice as many when unsigned) scaled by
  :math:`10^{i - E + 1}`, mirrored when signed, plus 0 and 1. 8-bit tables
  are padded with zeros to 256 entries as in bitsandbytes; torchao's 4-bit
  table (``create_dynamic_map(True, 3, 4)``) has exactly 16.
  """
  non_sign_bits = total_bits - 1
  extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
  data: list[float] = []

  def add(scale: float, k: int):
    bounds = np.linspace(0.1, 1.0, k, dtype=np.float32)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    data.extend((np.float32(scale) * means).tolist())
    if signed:
      data.extend((-np.float32(scale) * means).tolist())

  i = 0
  for i in range(max_exponent_bits):
    k = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1))
    add(10.0 ** (-(max_exponent_bits - 1) + i), k + 1)
  if extra > 0:
    add(10.0 ** (-(max_exponent_bits - 1) + i), extra + 1)
  data += [0.0, 1.0]
  if len(data) != 2**total_bits:
    raise ValueError(
      f"dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, "
      f"total_bits={total_bits}) gives {len(data)} codes, not "
      f"{2**total_bits}.")
  return np.sort(np.asarray(data, np.float32))


@functools.cache
def code_table(code: StateCode, bits: int, signed: bool) -> np.ndarray:
  """The sorted float32 code table of a state (see the module docstring)."""
  n = 2**bits
  if code is StateCode.DYNAMIC:
    if signed:
      return dynamic_map(True, 7 if bits == 8 else 3, bits)
    if bits == 8:
      return dynamic_map(False, 7, 8)
    return np.linspace(0, 1, n + 1, dtype=np.float32)[1:]
  if signed:  # symmetric, with an exact zero; the lowest code is unused
    return np.concatenate([[-1.0], np.linspace(-1, 1, n - 1)]).astype(
      np.float32)
  return np.linspace(0, 1, n + 1, dtype=np.float32)[1:]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateQuant:
  """How jqlm's Adam-family transforms store their moments.

  Attributes:
    bits: 8 or 4.
    code: :class:`StateCode` (``"dynamic"`` or ``"linear"``).
    block_size: elements per absmax block; default 256 at 8 bits and 128 at
      4 bits (bitsandbytes >= 0.44, torchao).
    min_size: tensors with fewer elements keep float32 states (4096, as
      bitsandbytes' ``min_8bit_size``).

  Examples:
    >>> from jqlm.optim import StateQuant, adamw
    >>> opt = adamw(1e-3, state_quant=StateQuant(bits=8))
  """

  bits: int = 8
  code: StateCode | str = StateCode.DYNAMIC
  block_size: int | None = None
  min_size: int = 4096

  def __post_init__(self):
    if self.bits not in (4, 8):
      raise ValueError(
        f"StateQuant.bits must be 8 or 4, got {self.bits!r}.")
    try:
      code = StateCode(self.code)
    except ValueError:
      valid = ", ".join(repr(c.value) for c in StateCode)
      raise ValueError(
        f"StateQuant.code must be one of {valid}, got {self.code!r}."
      ) from None
    object.__setattr__(self, "code", code)
    block = self.block_size
    if block is None:
      block = 256 if self.bits == 8 else 128
    if not isinstance(block, (int, np.integer)) or block < 2 or (
        self.bits == 4 and block % 2):
      raise ValueError(
        f"StateQuant.block_size must be an int >= 2 (even at 4 bits), got "
        f"{self.block_size!r}.")
    object.__setattr__(self, "block_size", int(block))
    if not isinstance(self.min_size, (int, np.integer)) or self.min_size < 0:
      raise ValueError(
        f"StateQuant.min_size must be an int >= 0, got {self.min_size!r}.")

  def applies(self, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` is stored quantized."""
    return math.prod(shape) >= max(self.min_size, 1)


def as_state_quant(value: Any) -> StateQuant | None:
  """``None``, a :class:`StateQuant`, or ``8`` / ``4`` (the defaults)."""
  if value is None or isinstance(value, StateQuant):
    return value
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    if int(value) not in (8, 4):
      raise ValueError(
        f"state_quant={int(value)}: the moments are stored in 8 or 4 bits "
        "(or None for float); pass state_quant=8, 4 or a "
        "jqlm.optim.StateQuant.")
    return StateQuant(bits=int(value))
  hint = ""
  if isinstance(value, jax.Array):
    hint = (" It sets the state's layout, so it cannot be an array or a "
            "traced hyper-parameter: under optax.inject_hyperparams, list "
            "it in static_args, e.g. static_args=('state_quant',).")
  raise ValueError(
    f"state_quant must be None, 8, 4 or a jqlm.optim.StateQuant, got "
    f"{value!r}.{hint}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedMoment:
  """A block-quantized optimizer state tensor (a pytree).

  Attributes:
    codes: ``uint8`` of shape ``(num_blocks, block_size)`` at 8 bits, or
      ``(num_blocks, block_size // 2)`` with two 4-bit codes per byte in
      :func:`jqlm.quant.pack`'s segment layout (the block's first half in
      the low nibbles).
    absmax: float32 ``(num_blocks,)``.
    shape: the logical shape (static).
    signed: signed (first moment) or unsigned (second moment) table.
    quant: the :class:`StateQuant` (static).
    value_dtype: the dtype the moment stood in before it was quantized
      (static; :func:`jqlm.optim.quantize_state` gives it back to the
      transform it wraps). jqlm's own transforms compute in float32.
  """

  codes: jax.Array
  absmax: jax.Array
  shape: tuple[int, ...]
  signed: bool
  quant: StateQuant
  value_dtype: str = "float32"

  @property
  def dtype(self):
    return jnp.dtype(self.value_dtype)

  @property
  def nbytes(self) -> int:
    return int(self.codes.size) * self.codes.dtype.itemsize + int(
      self.absmax.size) * 4

  def dequantize(self) -> jax.Array:
    return decode(self)


jax.tree_util.register_dataclass(
  QuantizedMoment, data_fields=["codes", "absmax"],
  meta_fields=["shape", "signed", "quant", "value_dtype"])


def _blocks(shape, block: int) -> tuple[int, int]:
  n = math.prod(shape)
  return n, -(-n // block)


def encode(x: jax.Array, signed: bool, quant: StateQuant,
           value_dtype=jnp.float32) -> QuantizedMoment:
  """Block-quantizes a state tensor (any float dtype) into a moment that
  decodes to ``value_dtype`` (:meth:`QuantizedMoment.dtype`)."""
  shape = tuple(x.shape)
  n, nb = _blocks(shape, quant.block_size)
  flat = x.astype(jnp.float32).reshape(-1)
  if nb * quant.block_size != n:
    flat = jnp.pad(flat, (0, nb * quant.block_size - n))
  xb = flat.reshape(nb, quant.block_size)
  absmax = jnp.max(jnp.abs(xb), axis=1)
  xn = xb / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  table = code_table(quant.code, quant.bits, signed)
  idx = _count_below(xn, (table[:-1] + table[1:]) / 2)
  codes = idx.astype(jnp.uint8)
  if quant.bits == 4:
    codes = quant_lib.pack(codes, 4)  # jqlm.quant's segment layout
  return QuantizedMoment(codes=codes, absmax=absmax, shape=shape,
                         signed=signed, quant=quant,
                         value_dtype=jnp.dtype(value_dtype).name)


def _count_below(x: jax.Array, mids: np.ndarray) -> jax.Array:
  """``searchsorted(mids, x, side="left")`` (the number of midpoints
  strictly below each element: its nearest code, a tie going to the lower
  one) as an unrolled binary search on a ``uint8`` index: each of the
  ``bits`` steps is elementwise, so XLA fuses the search into one pass with
  no int32 or per-midpoint scratch (``jnp.searchsorted`` kept two int32
  copies of the tensor alive)."""
  n = len(mids) + 1  # codes
  steps = max(int(n - 1).bit_length(), 1)
  padded = np.full((2**steps,), np.inf, np.float32)
  padded[: len(mids)] = mids
  table = jnp.asarray(padded)
  top = 1 << (steps - 1)  # the first step compares with one midpoint
  idx = jnp.where(jnp.float32(padded[top - 1]) < x, top, 0).astype(jnp.int32)
  for b in reversed(range(steps - 1)):
    cand = idx + (1 << b)
    idx = jnp.where(table[cand - 1] < x, cand, idx)
  return idx


def decode(q: QuantizedMoment) -> jax.Array:
  """The float32 tensor a :class:`QuantizedMoment` stands for."""
  codes = q.codes
  if q.quant.bits == 4:
    codes = quant_lib.unpack(codes, jnp.uint4)
  table = jnp.asarray(code_table(q.quant.code, q.quant.bits, q.signed))
  vals = table[codes.astype(jnp.int32)] * q.absmax[:, None]
  n = math.prod(q.shape)
  return vals.reshape(-1)[:n].reshape(q.shape)


def zeros(shape, signed: bool, quant: StateQuant) -> QuantizedMoment:
  """The quantized all-zero moment of ``shape`` (no encoding pass)."""
  shape = tuple(int(d) for d in shape)
  _, nb = _blocks(shape, quant.block_size)
  table = code_table(quant.code, quant.bits, signed)
  zero = int(np.argmin(np.abs(table)))
  if quant.bits == 4:
    zero, width = zero | (zero << 4), quant.block_size // 2
  else:
    width = quant.block_size
  return QuantizedMoment(
    codes=jnp.full((nb, width), zero, jnp.uint8),
    absmax=jnp.zeros((nb,), jnp.float32), shape=shape, signed=signed,
    quant=quant)


def init_moment(param, quant: StateQuant | None, signed: bool,
                dtype=None):
  """Zeros for one moment: quantized if ``quant`` applies to the shape,
  else float (``dtype``, default the param's; float32 when quantizing) with
  the param's sharding."""
  if quant is not None and quant.applies(tuple(param.shape)):
    return zeros(param.shape, signed, quant)
  if quant is not None and dtype is None:
    dtype = jnp.float32
  return jnp.zeros_like(param, dtype=dtype or param.dtype)


def init_moments(params, quant: StateQuant | None, signed: bool,
                 dtype=None):
  """:func:`init_moment` over a params tree."""
  return jax.tree.map(lambda p: init_moment(p, quant, signed, dtype), params)


def load(x, dtype) -> jax.Array:
  """A stored moment (float array or :class:`QuantizedMoment`) in
  ``dtype``."""
  if isinstance(x, QuantizedMoment):
    return decode(x).astype(dtype)
  return x.astype(dtype)


def store(value: jax.Array, like):
  """``value`` stored the way ``like`` is (re-quantized, or cast)."""
  if isinstance(like, QuantizedMoment):
    return encode(value, like.signed, like.quant, like.value_dtype)
  return value.astype(like.dtype)
