r"""Low-bit states for any optax transform: :func:`quantize_state`.

``quantize_state(tx, bits=8)`` stores the moment-like float leaves of
``tx``'s state block-wise quantized, as jqlm's 8-bit / 4-bit Adam does
(:mod:`jqlm.optim.qstate`: one float32 absmax per block of :math:`B`
elements and one code per element,

.. math:: a_b = \max_{i \in b} |x_i|, \qquad
          \hat x_i = a_b\, Q\big[\arg\min_k |x_i / a_b - Q_k|\big]

with :math:`Q` the dynamic-tree or linear code table), and around every
update:

.. math:: s_f = \mathrm{dequant}(s_q), \qquad
          (u, s_f') = \mathrm{tx.update}(g, s_f, p), \qquad
          s_q' = \mathrm{quant}(s_f')

so the inner transform sees float states and never knows. Its update is
computed from the *dequantized* old state, as bitsandbytes'
``Optimizer8bit`` and torchao's ``AdamW8bit`` do (Dettmers et al., `8-bit
Optimizers via Block-wise Quantization <https://arxiv.org/abs/2110.02861>`_;
Li et al., `Memory Efficient Optimizers with 4-bit States
<https://arxiv.org/abs/2309.01507>`_). This is the core of
``adamw/spam/stable_spam(state_quant=...)`` too: the same
:class:`~jqlm.optim.StateQuant`, code tables, :func:`~jqlm.optim.qstate.encode`
and :func:`~jqlm.optim.qstate.decode`; those transforms quantize inside
their own update (and can chunk it), this wrapper around any other.

Which leaves are quantized: floating leaves of the inner state whose shape
is one of the params' shapes (the moments; counts, scalars, per-row
statistics and the like stay as they are) and that have at least
``min_size`` elements (4096 as bitsandbytes' ``min_8bit_size``, the
threshold of jqlm's 8/4-bit Adam). A leaf an optax state names ``nu``
(optax's second moments), ``nu_hat``, ``v``, ``exp_avg_sq`` or
``sum_of_squares`` is stored with the unsigned table (for 4-bit, torchao's
zero-free linear map, without which small second moments decode to zero
and :math:`m/\sqrt{v}` explodes); every other one with the signed table.
``unsigned=`` overrides the rule.

8-bit Muon (Gupta et al., arXiv 2509.23106; spec optimizers_more.md §6.2:
symmetric linear int8 codes with one absmax per block of 2048, Muon's
momentum only) is::

  quantize_state(optax.contrib.muon(lr), 8, code="linear", block_size=2048)

(:func:`muon_8bit`). The dequantized momentum is refreshed in float and
orthogonalised, and only the stored copy is rounded, as the paper's rule.

Properties (tested): an all-zero moment stays exactly zero; a block holding
a NaN decodes to NaN (the policy of :mod:`jqlm.optim.qstate`); the
dequantized leaves have the inner state's dtypes, so a bf16 transform keeps
bf16 updates; QuantizedMoment leaves are placed like the params on a mesh.

Deviations: 8-bit Muon rounds to the nearest code with ties to the lower
code (:mod:`jqlm.optim.qstate`'s rule), the paper's
:math:`\mathrm{round}(127 x / \|x\|_\infty)` rounds ties away from zero;
they differ only on exact midpoints. The nearest-code search is on the
float32 normalised value (float64 states are quantized through float32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jqlm.optim import _base, qstate

UNSIGNED_FIELDS = frozenset({"nu", "nu_hat", "v", "exp_avg_sq",
                             "sum_of_squares"})
"""State field names that hold non-negative moments (the unsigned table)."""


def _field_name(entry) -> str | None:
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  return None


def default_unsigned(path: tuple, leaf: Any) -> bool:
  """Whether a state leaf is a non-negative moment: some field on its
  ``path`` is named as in :data:`UNSIGNED_FIELDS`."""
  del leaf
  return any(_field_name(e) in UNSIGNED_FIELDS for e in path)


def _as_quant(bits, block_size, code, min_size) -> qstate.StateQuant:
  if isinstance(bits, qstate.StateQuant):
    if block_size is not None or code is not None or min_size is not None:
      raise ValueError(
        "quantize_state: pass either a StateQuant as bits or block_size / "
        "code / min_size, not both (the StateQuant already holds them).")
    return bits
  if isinstance(bits, bool) or bits not in (4, 8):
    raise ValueError(
      f"quantize_state: bits must be 8 or 4 (or a jqlm.optim.StateQuant), "
      f"got {bits!r}.")
  return qstate.StateQuant(
    bits=int(bits), code=qstate.StateCode.DYNAMIC if code is None else code,
    block_size=block_size, min_size=4096 if min_size is None else min_size)


def _is_q(x) -> bool:
  return isinstance(x, qstate.QuantizedMoment)


def quantize_state(
  inner: optax.GradientTransformation,
  bits: int | qstate.StateQuant = 8,
  *,
  block_size: int | None = None,
  code: qstate.StateCode | str | None = None,
  min_size: int | None = None,
  unsigned: Callable[[tuple, Any], bool] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Stores ``inner``'s moment-like state leaves block-quantized.

  See the module docstring for the maths and which leaves are quantized.

  Args:
    inner: any optax transformation (extra ``update`` arguments, such as a
      ``key``, are passed through).
    bits: 8 or 4, or a :class:`jqlm.optim.StateQuant` (then leave
      ``block_size``, ``code`` and ``min_size`` unset).
    block_size: elements per absmax block; default 256 at 8 bits and 128
      at 4 bits (bitsandbytes >= 0.44, torchao).
    code: ``"dynamic"`` (default, bitsandbytes' dynamic tree) or
      ``"linear"`` (symmetric uniform codes; 8-bit Muon).
    min_size: leaves with fewer elements stay float (default 4096).
    unsigned: ``(key_path, leaf) -> bool`` choosing the unsigned code
      table for non-negative moments; default :func:`default_unsigned`
      (fields named ``nu``, ``v``, ...). Leaves it marks unsigned must
      stay non-negative: a negative value is stored as the smallest code.

  Returns:
    A transformation whose state is ``inner``'s with the chosen leaves as
    :class:`jqlm.optim.QuantizedMoment`.

  Raises:
    ValueError: bad ``bits``, ``block_size``, ``code`` or ``min_size``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jqlm.optim import quantize_state, memory_report
    >>> opt = quantize_state(optax.adam(1e-3), bits=8)
    >>> params = {"w": jnp.ones((256, 256))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update(params, state, params)
    >>> memory_report(opt, params).state_total  # 2 x (65536 + 256 x 4) + 4
    133124
  """
  quant = _as_quant(bits, block_size, code, min_size)
  is_unsigned = default_unsigned if unsigned is None else unsigned
  if not callable(is_unsigned):
    raise ValueError(
      f"quantize_state: unsigned must be a callable (key_path, leaf) -> "
      f"bool, got {unsigned!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    state = inner.init(params)
    shapes = {tuple(x.shape) for x in jax.tree.leaves(params)
              if hasattr(x, "shape")}

    def leaf(path, x):
      if (_is_q(x) or not hasattr(x, "dtype")
          or not jnp.issubdtype(x.dtype, jnp.floating)
          or tuple(x.shape) not in shapes
          or not quant.applies(tuple(x.shape))):
        return x
      signed = not is_unsigned(path, x)
      return qstate.encode(x, signed, quant, x.dtype)

    state = jax.tree_util.tree_map_with_path(leaf, state, is_leaf=_is_q)
    return _base.follow_params(state, params)

  def update_fn(updates, state, params=None, **extra_args):
    floats = jax.tree.map(
      lambda x: qstate.decode(x).astype(x.dtype) if _is_q(x) else x,
      state, is_leaf=_is_q)
    updates, new = inner.update(updates, floats, params, **extra_args)

    def store(old, x):
      if not _is_q(old):
        return x
      return qstate.encode(x, old.signed, old.quant, old.value_dtype)

    return updates, jax.tree.map(store, state, new, is_leaf=_is_q)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def muon_dimension_numbers(params, mask):
  """``optax.contrib.muon``'s ``muon_weight_dimension_numbers`` for the
  params ``mask`` marks (a pytree of bools, or a callable ``params ->``
  one): Muon on their last two axes (reduction, output: the Flax ``x @ W``
  convention; leading axes, such as a scanned stack's layer axis, are batch
  axes), ``None`` (optax's AdamW) elsewhere. optax's default puts *every*
  2-D leaf on Muon, embeddings and head included (optimizers_more.md §6.1,
  quirk 5)."""
  flags = mask(params) if callable(mask) else mask
  return jax.tree.map(
    lambda p, m: optax.contrib.MuonDimensionNumbers(
      reduction_axis=len(p.shape) - 2, output_axis=len(p.shape) - 1)
    if m else None, params, flags)


def muon_8bit(
  learning_rate: optax.ScalarOrSchedule,
  *,
  block_size: int = 2048,
  code: qstate.StateCode | str = qstate.StateCode.LINEAR,
  min_size: int = 4096,
  **muon_kwargs,
) -> optax.GradientTransformationExtraArgs:
  r"""8-bit Muon: ``optax.contrib.muon`` with its momentum stored as
  symmetric linear int8 codes, one absmax per block of 2048 (Gupta et al.,
  `Effective Quantization of Muon Optimizer States
  <https://arxiv.org/abs/2509.23106>`_; spec optimizers_more.md §6.2).

  The Muon flavour is optax's (EMA momentum, NAdam-style bias correction,
  :math:`\sqrt{\max(1, \mathrm{fan\_out}/\mathrm{fan\_in})}` scaling, every
  2-D leaf on Muon unless ``muon_weight_dimension_numbers`` says otherwise,
  NAdamW on the rest; spec §6.1). Its NAdamW moments are quantized too
  when they are param-shaped and large (the paper does not say whether
  they are; pass ``min_size`` or wrap ``optax.contrib.muon`` yourself with
  :func:`quantize_state` and ``unsigned`` to choose). ``code="dynamic"``
  is the paper's dynamic variant.

  Args:
    learning_rate: a float or an optax schedule.
    block_size: elements per absmax block (2048, the paper's).
    code: ``"linear"`` (default) or ``"dynamic"``.
    min_size: smaller leaves keep float states.
    **muon_kwargs: passed to ``optax.contrib.muon``.
  """
  return quantize_state(
    optax.contrib.muon(learning_rate, **muon_kwargs), 8,
    block_size=block_size, code=code, min_size=min_size)
