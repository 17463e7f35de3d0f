r"""MicroAdam: Adam over a window of sparse gradients (arXiv 2405.15593).

Faithful to the official code as specified in
``../shared/spec/optimizers_more.md`` §2: the driver
``ista_daslab_optimizers/micro_adam/micro_adam.py`` of
``IST-DASLab/ISTA-DASLab-Optimizers`` @ ``4c98e6e`` and its CUDA kernels
(``kernels/micro_adam/micro_adam_{asymm_block_quant,asymm_block_quant_inv,
update}.cu``, ``kernels/tools/tools_kernel.cu``) @ ``42e1394``.

Every parameter (1-D ones included, as in the official optimizer) is
flattened to :math:`d` elements. At update :math:`t = 1, 2, \dots` with window
:math:`m`, error feedback :math:`e` and ring buffer :math:`(I, V)` of
:math:`m` rows:

.. math::

  &a = g + Q^{-1}(e) \\
  &I_r = \mathrm{TopK}_b(|a|) \text{ per block } b
    \text{ of } B \text{ elements}, \quad V_r = a[I_r],
    \quad r = (t - 1) \bmod m \\
  &a[I_r] \leftarrow 0, \quad e \leftarrow Q(a) \\
  &\hat m = \sum_{j < \min(t, m)} \beta_1^{a_j} V_j, \quad
   \hat v = \sum_{j < \min(t, m)} \beta_2^{a_j} V_j^2
   \quad \text{(scattered to } I_j\text{)}, \quad
   a_j = (t - 1 - j) \bmod m \\
  &u = \frac{c_1 \hat m}{\sqrt{c_2 \hat v} + \epsilon}, \quad
   c_1 = \frac{1 - \beta_1}{1 - \beta_1^t}, \quad
   c_2 = \frac{1 - \beta_2}{1 - \beta_2^t}

and, with ``alpha`` :math:`= \alpha > 0`, :math:`u \leftarrow u + \alpha
Q^{-1}(e)` then :math:`e \leftarrow Q((1 - \alpha) Q^{-1}(e))`. The top-k
block :math:`B` (``block_size``) holds :math:`\lceil B k_{init} \rceil`
entries, the tail block :math:`\lceil (d \bmod B)\, k_{init} \rceil`; a
tensor with :math:`d < B` is one block. :func:`micro_adam` then applies
:math:`p \leftarrow p (1 - \eta \lambda) - \eta u` (decay *before* the step,
torch-AdamW order).

The 4-bit asymmetric quantizer :math:`Q` works on blocks of
``quant_block_size`` elements (the partial last block included) with fresh
per-block min/max :math:`(n, M)` at every quantization (they include the
zeros just written at the top-k positions):

.. math::

  s = (M - n) / 15, \quad q = \mathrm{clip}(\lfloor (x - n)/s + 1/2
  \rfloor, 0, 15), \quad Q^{-1}(q) = q s + n

(round half up; a block with :math:`M = n` decodes to :math:`n`).

State per parameter (:class:`MicroAdamState`): ``indices`` :math:`I`
(:math:`m \times k`, int16 block-relative as the official, int32 when a
block exceeds 32768 elements), ``values`` :math:`V` (:math:`m \times k`,
``state_dtype``, bf16 by default as the official), ``error`` (the 4-bit codes,
two per uint8 in the official layout: byte :math:`i` holds element
:math:`2i` in the high nibble and :math:`2i+1` in the low one,
:math:`\lceil d/2 \rceil` bytes), ``min_vals`` / ``max_vals``
(:math:`\lceil d / \text{quant\_block\_size} \rceil` each, ``state_dtype``).
One int32 step count and one ring-buffer write index are shared by all
parameters. Memory: :math:`4 m k / d + 1/2 + 4 / \text{quant\_block\_size}`
bytes per parameter, i.e. **0.9 B/param** for :math:`m = 10`,
:math:`k_{init} = 1\%` (plus 0.06 for quant blocks of 64, 4e-5 for 100000),
against 8 for float32 Adam or 2 for 8-bit Adam.

Constants (spec §2.1, §2.4): the official top-k block is GPU dependent,
``(shared memory per SM in KiB - 1) * 1024 / 4 // 2`` floats
(:func:`top_k_block_size`): :data:`A100_BLOCK_SIZE` = 20864 and
:data:`H100_BLOCK_SIZE` = 29056 (H100/H200). It changes which coordinates are
selected, hence the results, so ``block_size`` is a *required* argument:
pass the value of the GPU whose runs you want to reproduce (the paper's runs
used A100s). ``quant_block_size`` has no official default either: the
Llama-2-7B GSM8k script uses 64, the GLUE script 100000, the CIFAR example
32. The official optimizer's defaults, kept here: :math:`m = 10`,
:math:`k_{init} = 0.01`, :math:`\beta = (0.9, 0.999)`, :math:`\epsilon =
10^{-8}`, :math:`\alpha = 0`, weight decay 0.

Quirks of the official code kept on purpose (spec §2.5, §7 quirk 2):

* No renormalisation to the window length: for :math:`t \ge m` the window
  weights sum to :math:`(1 - \beta^m)/(1 - \beta^t) < 1`, so a coordinate
  selected in all :math:`m` rows gets :math:`|u| \approx 6.5`, one seen once
  at age :math:`a` gets :math:`\approx 3.16 \cdot 0.9^a`, and a coordinate in
  no window row gets :math:`u = 0` (the update has at most :math:`m k`
  non-zeros without ``alpha``). LRs do not transfer from Adam.
* The bias correction uses the global step :math:`t`, and the weights the
  row's age :math:`(t - 1 - j) \bmod m` in storage order.
* Weight decay multiplies every element, including those with :math:`u = 0`.

Deviations from the official code:

* Arithmetic runs in float32 (float64 for float64 gradients): the kernels'
  ``my_pow`` repeated squaring, FMA contraction and float32 shared-memory
  accumulation order are not reproduced bit for bit. The official
  bf16 buffers are emulated by rounding to the *gradient's* dtype where the
  official code writes its bf16 ``p.grad``: :math:`a` (with
  :math:`Q^{-1}(e)` rounded before the add, as the kernel's bf16 ``+=``), the
  update :math:`u`, the ``alpha`` terms. With bf16 gradients this is the
  official arithmetic; with float32 gradients (which the official kernels
  refuse) :math:`a` is float32 while min/max are stored in bf16, so a value
  can fall just outside a block's rounded range: :math:`q` is clamped to
  ``[0, 15]`` (spec §2.2).
* ``jax.lax.top_k`` breaks ties (equal :math:`|a|`, e.g. all-zero gradient
  blocks) in index order, ``torch.topk(sorted=False)`` in an unspecified
  order; without ties the selected sets are the same.
* The update is returned in the gradient dtype and applied by
  ``optax.apply_updates``: with bf16 params, :math:`-\eta u` is rounded to
  bf16 before the add (torch's ``p.add_(u, alpha=-lr)`` rounds once), and
  decay and step are one update (:func:`scale_by_learning_rate_pre_decay`,
  equal to the official two in-place ops in exact arithmetic).
* ``min_vals`` / ``max_vals`` hold :math:`\lceil d/\text{qbs} \rceil` entries,
  not the official ``d // qbs + 1`` (whose last entry is unused when
  ``quant_block_size`` divides :math:`d`).
* ``alpha = -2`` ("densify with the quantization error", unused in the
  official scripts and not restated by the spec) raises ``ValueError``.
* One step count and one write index for all parameters (the official keeps
  a per-parameter ``index``; they are always equal since every parameter
  steps every time). ``step()`` logging (norms, wandb) is not reproduced.

References:
  Modoranu et al., `MicroAdam: Accurate Adaptive Optimization with Low Space
  Overhead and Provable Convergence <https://arxiv.org/abs/2405.15593>`_,
  NeurIPS 2024. Code: https://github.com/IST-DASLab/ISTA-DASLab-Optimizers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlm import quant as quant_lib
from jqlm.optim import _base
from jqlm.optim._lr import scale_by_learning_rate_pre_decay

A100_BLOCK_SIZE = 20864
"""Official top-k block on A100 (164 KiB of shared memory per SM)."""

H100_BLOCK_SIZE = 29056
"""Official top-k block on H100 / H200 (228 KiB of shared memory per SM)."""

_MAX_INT16_BLOCK = 32768  # relative indices 0..32767 fit int16


def top_k_block_size(shared_memory_kib: int) -> int:
  """The official ``d_block_size`` of a GPU with ``shared_memory_kib`` KiB
  of shared memory per SM: ``(kib - 1) * 1024 / 4 // 2``
  (``tools_kernel.cu:5-18``, ``micro_adam.py:43-44``).

  Examples:
    >>> from jqlm.optim.micro_adam import top_k_block_size
    >>> top_k_block_size(164), top_k_block_size(228)  # A100, H100
    (20864, 29056)
  """
  _base.check_int("shared_memory_kib", shared_memory_kib, lo=2)
  return (shared_memory_kib - 1) * 1024 // 4 // 2


class MicroAdamState(NamedTuple):
  """State of :func:`scale_by_micro_adam` (layout in the module docstring).

  Attributes:
    count: int32 number of updates done (the official ``self.steps`` before
      an update).
    index: int32 ring-buffer row the next update writes (``count % m``).
    indices: per param, ``(m, k)`` int16 (int32 for blocks above 32768
      elements) top-k indices relative to their block.
    values: per param, ``(m, k)`` selected values (``state_dtype``).
    error: per param, ``(ceil(d / 2),)`` uint8 4-bit error-feedback codes,
      element ``2i`` in the high nibble of byte ``i``.
    min_vals: per param, ``(ceil(d / quant_block_size),)`` block minima.
    max_vals: per param, block maxima, likewise.
  """

  count: jax.Array
  index: jax.Array
  indices: optax.Updates
  values: optax.Updates
  error: optax.Updates
  min_vals: optax.Updates
  max_vals: optax.Updates


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static layout of one flattened parameter (``micro_adam.py:61-94``).

  Attributes:
    d: number of elements.
    block: top-k block, ``min(block_size, d)``.
    full_blocks: number of full top-k blocks.
    k_many: entries per full block, ``ceil(block * k_init)``.
    k_few: entries of the tail block, ``ceil((d mod block) * k_init)``.
    quant_blocks: ``ceil(d / quant_block_size)``.
  """

  d: int
  block: int
  full_blocks: int
  k_many: int
  k_few: int
  quant_blocks: int

  @property
  def k(self) -> int:
    """Entries per ring-buffer row."""
    return self.k_many * self.full_blocks + self.k_few

  @property
  def index_dtype(self):
    return jnp.int16 if self.block <= _MAX_INT16_BLOCK else jnp.int32

  def offsets(self) -> jax.Array:
    """``(k,)`` int32 start of each entry's block (relative -> absolute):
    ``(j // k_many) * block`` as the kernels' ``Bid * d_block_size`` (the
    tail's ``k_few <= k_many`` entries get block ``full_blocks``)."""
    j = jnp.arange(self.k, dtype=jnp.int32)
    return j // max(self.k_many, 1) * self.block


def layout(shape, *, block_size: int, k_init: float,
           quant_block_size: int) -> Layout:
  """The :class:`Layout` of a parameter of ``shape``."""
  d = math.prod(shape)
  block = max(min(block_size, d), 1)
  full = d // block
  tail = d - full * block
  return Layout(d=d, block=block, full_blocks=full,
                k_many=math.ceil(block * k_init) if d else 0,
                k_few=math.ceil(tail * k_init),
                quant_blocks=-(-d // quant_block_size))


# --------------------------------------------------------------------------
# The 4-bit asymmetric error-feedback quantizer
# (micro_adam_asymm_block_quant{,_inv}.cu; spec §2.2).


def _blocks(x: jax.Array, quant_block_size: int, nq: int,
            mode: str) -> jax.Array:
  """``x`` (flat) as ``(nq, quant_block_size)``, the tail padded."""
  pad = nq * quant_block_size - x.shape[0]
  if pad:
    x = jnp.pad(x, (0, pad), mode=mode)
  return x.reshape(nq, quant_block_size)


def _true_divide(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a / b`` rounded once, as the kernels' IEEE division: XLA rewrites a
  division by a constant or a broadcast into a multiplication by the
  reciprocal (two roundings), which moves values that sit exactly on a
  rounding boundary of the quantizer, common with bf16 inputs. The
  optimization barrier hides the broadcast (costing one materialised
  broadcast of ``b``)."""
  b = jax.lax.optimization_barrier(jnp.broadcast_to(b, a.shape))
  return a / b


def _step(min_vals: jax.Array, max_vals: jax.Array, dtype) -> jax.Array:
  """The quantization step ``(M - n) / 15`` per block, in ``dtype``."""
  mn, mx = min_vals.astype(dtype), max_vals.astype(dtype)
  return _true_divide(mx - mn, jnp.asarray(15, dtype))


def block_min_max(x: jax.Array, quant_block_size: int):
  """Per-block min and max of the flat ``x`` (the partial last block over
  its own elements), in ``x``'s dtype."""
  nq = -(-x.shape[0] // quant_block_size)
  xb = _blocks(x, quant_block_size, nq, "edge")
  return jnp.min(xb, axis=1), jnp.max(xb, axis=1)


def pack_codes(codes: jax.Array) -> jax.Array:
  """4-bit codes ``(d,)`` -> ``(ceil(d/2),)`` uint8 in the official layout:
  element ``2i`` in the high nibble, ``2i+1`` in the low one (0 for odd
  ``d``). Built on :func:`jqlm.quant.pack` along pairs (whose own layout
  puts the first element of a pair in the low nibble), with the pair
  swapped."""
  d = codes.shape[0]
  if d % 2:
    codes = jnp.pad(codes, (0, 1))
  pairs = codes.reshape(-1, 2)[:, ::-1]
  return quant_lib.pack(pairs, 4, axis=-1).reshape(-1)


def unpack_codes(packed: jax.Array, d: int) -> jax.Array:
  """Inverse of :func:`pack_codes`: ``(d,)`` uint8 codes in ``[0, 15]``."""
  pairs = quant_lib.unpack(packed.reshape(-1, 1), jnp.uint4, axis=-1)
  return pairs[:, ::-1].reshape(-1)[:d].astype(jnp.uint8)


def quantize(x: jax.Array, min_vals: jax.Array, max_vals: jax.Array,
             quant_block_size: int) -> jax.Array:
  """:math:`Q(x)`: packed codes ``floor((x - n)/s + 1/2)`` clamped to
  ``[0, 15]``, with ``s = (M - n) / 15`` per block, computed in ``x``'s
  dtype from the stored min/max (code 0 where ``M == n``)."""
  d = x.shape[0]
  nq = min_vals.shape[0]
  mn = min_vals.astype(x.dtype)[:, None]
  s = _step(min_vals, max_vals, x.dtype)[:, None]
  xb = _blocks(x, quant_block_size, nq, "constant")
  q = jnp.floor(_true_divide(xb - mn, jnp.where(s > 0, s, 1)) + 0.5)
  q = jnp.clip(jnp.where(s > 0, q, 0), 0, 15)
  return pack_codes(q.astype(jnp.uint8).reshape(-1)[:d])


def dequantize(packed: jax.Array, min_vals: jax.Array, max_vals: jax.Array,
               d: int, quant_block_size: int, dtype) -> jax.Array:
  """:math:`Q^{-1}`: ``q * s + n`` per block, ``(d,)`` in ``dtype``."""
  nq = min_vals.shape[0]
  mn = min_vals.astype(dtype)[:, None]
  s = _step(min_vals, max_vals, dtype)[:, None]
  q = _blocks(unpack_codes(packed, d).astype(dtype), quant_block_size, nq,
              "constant")
  return (q * s + mn).reshape(-1)[:d]


def _requantize(x: jax.Array, quant_block_size: int, stats_dtype):
  """Fresh min/max of ``x`` (stored in ``stats_dtype``), then :math:`Q`."""
  mn, mx = block_min_max(x, quant_block_size)
  mn, mx = mn.astype(stats_dtype), mx.astype(stats_dtype)
  return quantize(x, mn, mx, quant_block_size), mn, mx


# --------------------------------------------------------------------------
# Validation


def _static_number(name: str, value: Any, ok, expected: str) -> float:
  """A hyper-parameter that selects code paths or shapes: a Python number."""
  if isinstance(value, (jax.Array, jax.core.Tracer)) and not isinstance(
      value, bool):
    raise ValueError(
      f"`{name}` must be a Python number ({expected}), got an array. It sets "
      f"shapes or code paths, so it cannot be an array or a traced "
      f"hyper-parameter: under optax.inject_hyperparams, list it in "
      f"static_args, e.g. static_args=({name!r},).")
  _base.check(name, value, ok, expected)
  if value is None:
    raise ValueError(f"`{name}` must be {expected}, got None.")
  return float(value)


def _check_alpha(alpha: Any) -> float:
  if (not isinstance(alpha, (jax.Array, jax.core.Tracer, str, bytes))
      and alpha is not None and _base.concrete(alpha) == -2):
    raise ValueError(
      "alpha=-2 (the official 'densify the update with the quantization "
      "error' variant) is not implemented: it is unused in the official "
      "scripts and not part of the spec. Use alpha=0 (the paper's "
      "MicroAdam) or 0 < alpha < 1 (add alpha * Q^-1(e) to the update).")
  return _static_number("alpha", alpha, lambda v: 0.0 <= v < 1.0,
                        "in [0, 1) (or -2, which is not implemented)")


# --------------------------------------------------------------------------
# The transforms


def scale_by_micro_adam(
  *,
  block_size: int,
  quant_block_size: int,
  window: int = 10,
  k_init: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  alpha: float = 0.0,
  state_dtype=jnp.bfloat16,
) -> optax.GradientTransformation:
  r"""MicroAdam preconditioning (no learning rate); see the module docstring.

  Args:
    block_size: the top-k block ``d_block_size`` (required: it is GPU
      dependent in the official code and changes the results; use
      :data:`A100_BLOCK_SIZE` = 20864 or :data:`H100_BLOCK_SIZE` = 29056 to
      reproduce runs on those GPUs). Blocks above 32768 elements store int32
      indices (the official int16 caps them at 32767).
    quant_block_size: elements per error-feedback quantization block, even
      (two codes per byte); 64 in the official Llama-2 script, 100000 for
      GLUE.
    window: :math:`m`, the number of gradients kept (official ``m``).
    k_init: fraction of each top-k block kept per step, in (0, 1].
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to :math:`\sqrt{c_2 \hat v}` (torch style).
    alpha: 0 (the paper), or in (0, 1) to add ``alpha * Q^-1(e)`` to the
      update and keep ``(1 - alpha)`` of the error feedback.
    state_dtype: dtype of ``values`` and ``min_vals`` / ``max_vals``:
      bfloat16 as the official code; ``None`` for the params' dtype (e.g.
      float64 in x64 parity tests).

  Returns:
    An ``optax.GradientTransformation`` with :class:`MicroAdamState`.
    Updates have the gradients' dtype.
  """
  _base.check_int("block_size", block_size)
  _base.check_int("quant_block_size", quant_block_size, lo=2)
  if quant_block_size % 2:
    raise ValueError(
      f"`quant_block_size` must be even (two 4-bit codes per byte, as the "
      f"official kernels require), got {quant_block_size}.")
  _base.check_int("window", window)
  k_init = _static_number("k_init", k_init, lambda v: 0.0 < v <= 1.0,
                          "in (0, 1]")
  alpha = _check_alpha(alpha)
  _base.check_beta("b1", b1)
  _base.check_beta("b2", b2)
  _base.check("eps", eps, lambda v: v >= 0, ">= 0")
  _base.check_state_dtype(state_dtype)
  m = window

  def leaf_layout(shape) -> Layout:
    return layout(shape, block_size=block_size, k_init=k_init,
                  quant_block_size=quant_block_size)

  def init_fn(params):
    def one(p):
      lay = leaf_layout(p.shape)
      sdt = jnp.dtype(state_dtype or p.dtype)
      return (jnp.zeros((m, lay.k), lay.index_dtype),
              jnp.zeros((m, lay.k), sdt),
              jnp.zeros((-(-lay.d // 2),), jnp.uint8),
              jnp.zeros((lay.quant_blocks,), sdt),
              jnp.zeros((lay.quant_blocks,), sdt))

    leaves, treedef = jax.tree.flatten(params)
    outs = [one(p) for p in leaves]
    trees = [treedef.unflatten([o[i] for o in outs]) for i in range(5)]
    return _base.follow_params(MicroAdamState(
      jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), *trees), params)

  def update_fn(updates, state, params=None):
    del params
    t = optax.safe_increment(state.count)
    row = state.index

    def leaf(g_in, idx_in, val_in, err_in, mn_in, mx_in):
      lay = leaf_layout(g_in.shape)
      gdt = g_in.dtype
      if lay.d == 0:
        return (g_in, idx_in, val_in, err_in, mn_in, mx_in)
      cdt = _base.compute_dtype(gdt)
      sdt = mn_in.dtype

      def buf(x):  # a write to the official bf16 p.grad buffer
        return x.astype(gdt).astype(cdt)

      # a = g + Q^-1(e) (the kernel adds Q^-1 rounded to the buffer dtype)
      a = buf(g_in.reshape(-1).astype(cdt) + buf(dequantize(
        err_in, mn_in, mx_in, lay.d, quant_block_size, cdt)))
      # block-wise top-k of |a|, indices relative to their block
      nb = lay.full_blocks * lay.block
      rel = [jax.lax.top_k(jnp.abs(a[:nb]).reshape(lay.full_blocks,
                                                   lay.block),
                           lay.k_many)[1].reshape(-1)]
      if lay.k_few:
        rel.append(jax.lax.top_k(jnp.abs(a[nb:]), lay.k_few)[1])
      rel = jnp.concatenate(rel) if len(rel) > 1 else rel[0]
      offsets = lay.offsets()
      pos = rel + offsets
      idx = jax.lax.dynamic_update_slice(
        idx_in, rel.astype(idx_in.dtype)[None], (row, jnp.int32(0)))
      val = jax.lax.dynamic_update_slice(
        val_in, a[pos].astype(val_in.dtype)[None], (row, jnp.int32(0)))
      # e = Q(a) with a[I] = 0 and fresh min/max
      err, mn, mx = _requantize(a.at[pos].set(0), quant_block_size, sdt)

      # window statistics, rows in storage order, ages (t - 1 - j) mod m
      rows = jnp.arange(m, dtype=jnp.int32)
      age = jnp.mod(t - 1 - rows, m).astype(cdt)
      live = rows < t
      b1_, b2_ = _base.hp(b1, cdt), _base.hp(b2, cdt)
      w1 = jnp.where(live, b1_**age, 0)[:, None]
      w2 = jnp.where(live, b2_**age, 0)[:, None]
      v = val.astype(cdt)
      where = idx.astype(jnp.int32) + offsets[None, :]
      mm = jnp.zeros((lay.d,), cdt).at[where].add(w1 * v)
      vv = jnp.zeros((lay.d,), cdt).at[where].add(w2 * v * v)
      tf = t.astype(cdt)
      c1 = (1 - b1_) / (1 - b1_**tf)
      c2 = (1 - b2_) / (1 - b2_**tf)
      u = buf(c1 * mm / (jnp.sqrt(c2 * vv) + _base.hp(eps, cdt)))
      if alpha > 0:
        dq = dequantize(err, mn, mx, lay.d, quant_block_size, cdt)
        u = buf(u + buf(dq * _base.hp(alpha, cdt)))
        err, mn, mx = _requantize(buf(dq * _base.hp(1.0 - alpha, cdt)),
                                  quant_block_size, sdt)
      return (u.astype(gdt).reshape(g_in.shape), idx, val, err, mn, mx)

    u, idx, val, err, mn, mx = _base.map_n(
      leaf, updates, state.indices, state.values, state.error,
      state.min_vals, state.max_vals, n=6)
    return u, MicroAdamState(count=t, index=jnp.mod(row + 1, m).astype(
      jnp.int32), indices=idx, values=val, error=err, min_vals=mn,
      max_vals=mx)

  return optax.GradientTransformation(init_fn, update_fn)


def micro_adam(
  learning_rate: optax.ScalarOrSchedule,
  *,
  block_size: int,
  quant_block_size: int,
  window: int = 10,
  k_init: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  alpha: float = 0.0,
  weight_decay: float = 0.0,
  state_dtype=jnp.bfloat16,
) -> optax.GradientTransformation:
  r"""MicroAdam (Modoranu et al., NeurIPS 2024) with decoupled weight decay.

  ``chain(scale_by_micro_adam(...), scale_by_learning_rate_pre_decay(lr,
  wd))``: :math:`p \leftarrow p (1 - \eta\lambda) - \eta u`, the official
  order (decay before the step, on every element). Applies to every
  parameter, as the official optimizer; use ``optax.partition`` to exclude
  some.

  Args:
    learning_rate: a float or an optax schedule (the official scripts use
      4e-5; MicroAdam's steps are larger than Adam's, see the module
      docstring).
    block_size, quant_block_size, window, k_init, b1, b2, eps, alpha,
      state_dtype: see :func:`scale_by_micro_adam` (``block_size`` and
      ``quant_block_size`` are required).
    weight_decay: decoupled weight decay :math:`\lambda`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jqlm.optim.micro_adam import A100_BLOCK_SIZE, micro_adam
    >>> opt = micro_adam(4e-5, block_size=A100_BLOCK_SIZE,
    ...                  quant_block_size=64)
    >>> params = {"w": jnp.ones((64, 128))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((64, 128))}, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return optax.chain(
    scale_by_micro_adam(block_size=block_size,
                        quant_block_size=quant_block_size, window=window,
                        k_init=k_init, b1=b1, b2=b2, eps=eps, alpha=alpha,
                        state_dtype=state_dtype),
    scale_by_learning_rate_pre_decay(learning_rate, weight_decay),
  )
