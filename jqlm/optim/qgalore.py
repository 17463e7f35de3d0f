r"""Q-GaLore: GaLore with INT4 projections, a layer-adaptive lazy refresh,
8-bit Adam states and INT8 weights updated by stochastic rounding.

Zhang et al. 2024, `arXiv 2407.08296 <https://arxiv.org/abs/2407.08296>`_;
spec §5. On top of GaLore (:mod:`jqlm.optim.galore`, whose projector it
shares) Q-GaLore adds

* INT4 projections: :math:`P` is stored as a :class:`jqlm.quant.QArray`,
  asymmetric min-max uint4 in groups of 256 of the torch-layout :math:`P`
  (spec §5.2), dequantized on use, and packed two codes per byte
  (:class:`jqlm.quant.PackedQArray`);
* layer-adaptive lazy refresh: at each SVD the signed cosine similarity of
  the new and previous top singular vectors enters a per-layer queue of
  ``queue_size``; when the queue is full and its mean is
  :math:`\geq` ``cos_threshold`` the layer's gap is multiplied by
  ``gamma_proj`` (the queue is not cleared; spec §5.1). A layer refreshes
  when ``(t - 1) % gap == 0`` with its own gap, under ``lax.cond``;
* INT8 weights with no float master copy (spec §5.3): the projected kernels
  live in the params as int8 :class:`jqlm.quant.QArray`
  (:func:`quantize_weights`); the optimizer returns float updates and the
  caller re-quantizes, :math:`W_q \leftarrow \mathrm{Q}(\mathrm{deq}(W_q) +
  u)`, by stochastic rounding with a key it passes
  (:func:`apply_quantized_updates`). Randomness comes from the caller, never
  from the optimizer state (style.md §3.2);
* 8-bit block-wise Adam states with :math:`\beta_2 = 0.95` (bitsandbytes
  ``AdamW8bit``, torch-style epsilon; spec §5.4).

Deviations from the official code, all numerical-precision only: the
projections and the inner optimizer compute in float32 (the official code in
the gradient dtype, bf16 in training), and the projection quantizer computes
its scales in float32. SVD signs are those of XLA's SVD (spec §4.3).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jqlm import quant
from jqlm.optim import _base, qstate
from jqlm.optim._lr import scale_by_learning_rate_post_decay
from jqlm.optim._projector import (
  ProjType,
  check_bits,
  galore_projector,
  is_qarray,
  resolve_mask,
)
from jqlm.optim.adam import scale_by_adam


def weight_spec(bits: int = 8, group_size: int = 256,
                shape: tuple[int, ...] | None = None) -> quant.QuantSpec:
  """Q-GaLore's weight quantizer for a Flax kernel ``(in, out)`` (spec
  §5.3): asymmetric min-max ``uint{bits}`` in flat groups of the torch
  ``(out, in)`` weight (``axis=0``), scale floor 1e-5, round-to-nearest.

  Given the kernel's ``shape`` with ``in`` a multiple of ``group_size``,
  each flat group is ``group_size`` consecutive ``in`` rows of one output
  column, i.e. a group along K: the spec is then
  ``granularity="group", axis=0``, the same groups, codes, scales and
  stochastic-rounding bits, with the scales stored ``(in // group_size,
  out)``, the layout the W8A16 kernel reads as stored
  (:func:`jqlm.ops.is_prepared`). Otherwise (groups that cross rows) the
  flat groups stay and the weight runs through XLA.
  """
  flat = quant.QuantSpec(
    format=quant.int_format(bits, signed=False), granularity="flat_group",
    group_size=group_size, axis=0, eps=1e-5)
  if shape is not None and len(shape) == 2 and shape[0] % group_size == 0:
    return flat.replace(granularity="group")
  return flat


def scale_by_q_galore(
  rank: int,
  *,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  inner: optax.GradientTransformation | None = None,
  mask: Any = None,
  proj_bits: int | None = 4,
  proj_group_size: int = 256,
  cos_threshold: float = 0.4,
  gamma_proj: float = 2.0,
  queue_size: int = 5,
) -> optax.GradientTransformation:
  """Q-GaLore's projector (spec §5.1-5.2) around an inner transform.

  GaLore with ``proj_type="std"`` (the only one Q-GaLore supports) plus
  quantized projections (``proj_bits``; ``None`` keeps them in the param
  dtype) and the layer-adaptive lazy refresh. The inner default is
  Q-GaLore's 8-bit AdamW (:math:`\\beta_2 = 0.95`, torch-style epsilon).
  Args as :func:`q_galore`; ``mask`` is required (``init`` raises
  ValueError when it is ``None``).
  """
  if inner is None:
    inner = scale_by_adam(0.9, 0.95, 1e-8, eps_style="torch", state_quant=8)
  return galore_projector(
    rank, update_proj_gap=update_proj_gap, scale=scale,
    proj_type=ProjType.STD, inner=inner, mask=mask, proj_bits=proj_bits,
    proj_group_size=proj_group_size, adaptive=True,
    cos_threshold=cos_threshold, gamma_proj=gamma_proj,
    queue_size=queue_size, who="Q-GaLore")


def _simulated_weight_quant(
  spec: quant.QuantSpec, mask, stochastic: bool
) -> optax.GradientTransformationExtraArgs:
  r"""Simulation mode's last step (spec §5.3): the update of each masked
  float weight becomes :math:`\mathrm{fq}(p + u) - p`, with ``fq`` the
  weight fake-quantizer (stochastic rounding with the ``key`` passed to
  ``update``, or round-to-nearest). Stateless."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, key=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("q_galore(simulation=True) needs the params: call "
                       "update(grads, state, params).")
    if stochastic and key is None:
      raise ValueError(
        "q_galore(simulation=True, stochastic_round=True) rounds the "
        "fake-quantized weights stochastically with a key the caller "
        "passes: call update(grads, state, params, key=key) with a fresh "
        "key each step (e.g. jax.random.fold_in(key, step)), or build it "
        "with stochastic_round=False for round-to-nearest.")
    rnd = spec.replace(rounding="stochastic") if stochastic else spec
    m = resolve_mask(mask, params, "Q-GaLore")
    leaves, treedef = jax.tree.flatten(updates)
    ps, ms = treedef.flatten_up_to(params), treedef.flatten_up_to(m)
    keys = (_base.leaf_keys(key, len(leaves)) if stochastic
            else [None] * len(leaves))
    out = []
    for u, p, on, k in zip(leaves, ps, ms, keys, strict=True):
      if not on:
        out.append(u)
        continue
      p32 = p.astype(jnp.float32)
      fq = quant.quantize(p32 + u.astype(jnp.float32), rnd, key=k)
      out.append((fq.dequantize(p.dtype).astype(jnp.float32) - p32)
                 .astype(u.dtype))
    return treedef.unflatten(out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _float_params(tx: optax.GradientTransformation):
  """``tx`` seeing dequantized (float32) values for QArray params."""

  def deq(params):
    if params is None:
      return None
    return dequantize_params(params)

  return optax.GradientTransformation(
    lambda params: tx.init(deq(params)),
    lambda u, s, params=None: tx.update(u, s, deq(params)))


def q_galore(
  learning_rate: optax.ScalarOrSchedule,
  rank: int,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: Any = None,
  *,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  proj_bits: int | None = 4,
  proj_group_size: int = 256,
  cos_threshold: float = 0.4,
  gamma_proj: float = 2.0,
  queue_size: int = 5,
  weight_bits: int = 8,
  weight_group_size: int = 256,
  stochastic_round: bool = True,
  simulation: bool = False,
  state_quant: qstate.StateQuant | int | None = 8,
  inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Q-GaLore (spec §5): GaLore with INT4 projections, lazy layer-adaptive
  refresh, 8-bit Adam states and INT8 weights updated by stochastic rounding.

  **Real mode** (default): the projected kernels live in the params pytree
  as int8 :class:`jqlm.quant.QArray` (:func:`quantize_weights`, RTN at
  init). A train step differentiates the loss at
  ``dequantize_params(params)``, calls ``update(grads, state, params)`` (it
  returns float updates) and applies them with::

      params = apply_quantized_updates(params, updates, key=step_key)

  which adds in float and re-quantizes with fresh scales (spec §5.3): by
  stochastic rounding when ``key`` is a PRNG key (split a fresh one each
  step from the train state's key), by round-to-nearest when it is
  ``None``. The caller chooses; ``stochastic_round`` plays no part in real
  mode and the optimizer state holds no key.

  **Simulation mode** (``simulation=True``, the official ``--simulation``):
  the projected kernels stay float (bf16); the update of each one is
  ``fq(p + u) - p`` with ``fq`` the ``weight_bits`` fake-quantizer, so
  ``optax.apply_updates`` yields fake-quantized weights. With
  ``stochastic_round=True`` ``fq`` rounds stochastically with a key passed
  to each update, ``update(grads, state, params, key=step_key)`` (the
  returned transform is an ``optax.GradientTransformationExtraArgs``;
  ``optax.chain``, ``MultiSteps``, ``inject_hyperparams``,
  ``apply_if_finite`` and ``partition`` forward the key); an update without
  it raises ValueError. With ``stochastic_round=False`` it rounds to
  nearest and needs no key. (The official simulation also fake-quantizes
  in the forward pass: that is the model's QAT policy.)

  Args:
    learning_rate: a float or an optax schedule (official: 0.015 for
      60M/130M, 0.01 for 350M/1B, 0.004 for 7B; spec §5.5).
    rank: the subspace rank.
    b1, b2, eps: the inner torch-style Adam (official ``beta2`` 0.95).
    weight_decay: decoupled, after the update (spec §5.4).
    mask: the projected kernels, also the ones held in int8 (required; see
      :func:`jqlm.optim.scale_by_galore`): ``jqlm.models.block_linear_mask``
      for jqlm's LLaMA. ``init`` raises ValueError when it is ``None``.
    update_proj_gap, scale: as GaLore (the gap is each layer's initial gap).
    proj_bits: bits of the stored projections (``None``: unquantized).
    proj_group_size: elements per projection quantization group.
    cos_threshold, gamma_proj, queue_size: the lazy refresh (spec §5.1).
    weight_bits, weight_group_size: the weight quantizer of simulation mode
      (spec §5.3); in real mode give them to :func:`quantize_weights`.
    stochastic_round: simulation mode only: SR (official
      ``--stochastic_round``; ``update`` then needs ``key=``) or RTN
      fake-quantization. In real mode pass a key or ``None`` to
      :func:`apply_quantized_updates` instead.
    simulation: see above.
    state_quant: the inner Adam's states (default 8-bit, as bitsandbytes'
      ``AdamW8bit``; blocks of 256, not bnb 0.43's 2048).
    inner: replaces the inner Adam.

  Under ``optax.inject_hyperparams`` list the ints that set shapes
  (``rank``, ``proj_bits``, ``proj_group_size``, ``queue_size``,
  ``weight_bits``, ``weight_group_size``, ``state_quant``) and a callable
  ``mask`` in ``static_args``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jqlm import optim
    >>> params = {"attn": {"q": jnp.ones((64, 64))}, "norm": jnp.ones(64)}
    >>> mask = {"attn": {"q": True}, "norm": False}
    >>> params = optim.quantize_weights(params, mask)  # q -> int8 QArray
    >>> opt = optim.q_galore(1e-2, rank=8, mask=mask, proj_group_size=64)
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, optim.dequantize_params(params))
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optim.apply_quantized_updates(params, updates,
    ...                                        key=jax.random.key(0))

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  check_bits("weight_bits", weight_bits)
  _base.check_int("weight_group_size", weight_group_size)
  if inner is None:
    inner = scale_by_adam(b1, b2, eps, eps_style="torch",
                          state_quant=state_quant)
  parts = [
    scale_by_q_galore(
      rank, update_proj_gap=update_proj_gap, scale=scale, inner=inner,
      mask=mask, proj_bits=proj_bits, proj_group_size=proj_group_size,
      cos_threshold=cos_threshold, gamma_proj=gamma_proj,
      queue_size=queue_size),
    _float_params(scale_by_learning_rate_post_decay(learning_rate,
                                                    weight_decay)),
  ]
  if simulation:
    parts.append(_simulated_weight_quant(
      weight_spec(weight_bits, weight_group_size), mask, stochastic_round))
  return optax.chain(*parts)


# ---------------------------------------------------------------------------
# INT8 weight params


def quantize_weights(params, mask: Any = None, *, bits: int = 8,
                     group_size: int = 256):
  """Turns the masked Flax kernels into int8 :class:`jqlm.quant.QArray`
  (round-to-nearest, as Q-GaLore at init; spec §5.3), stored as the W8A16
  kernel reads them (groups along K, :func:`weight_spec`).

  Args:
    params: a params pytree (arrays or ``jax.ShapeDtypeStruct``).
    mask: the kernels to quantize (required), as :func:`q_galore`'s:
      ``jqlm.models.block_linear_mask`` for jqlm's LLaMA, a pytree of
      bools, or a callable ``params -> pytree of bools``.
    bits, group_size: the weight quantizer (:func:`weight_spec`).

  Raises:
    ValueError: ``mask`` is None or selects a non-2-D param, or
      ``group_size`` does not divide a selected kernel's size.
  """
  check_bits("bits", bits)
  _base.check_int("group_size", group_size)
  m = resolve_mask(mask, params, "quantize_weights", "to hold in int8")

  def conv(p, on):
    if not on or is_qarray(p):
      return p
    if math.prod(p.shape) % group_size:
      raise ValueError(
        f"weight group_size={group_size} must divide the size of the kernel "
        f"of shape {tuple(p.shape)}. Use a divisor of "
        f"{math.prod(p.shape)}.")
    return quant.quantize(p, weight_spec(bits, group_size, tuple(p.shape)))

  return jax.tree.map(conv, params, m, is_leaf=is_qarray)


def dequantize_params(params, dtype=jnp.float32):
  """Params with every :class:`jqlm.quant.QArray` dequantized to
  ``dtype`` (for the forward pass); other leaves unchanged."""
  return jax.tree.map(
    lambda p: p.dequantize(dtype) if is_qarray(p) else p, params,
    is_leaf=is_qarray)


def apply_quantized_updates(params, updates, *, key: jax.Array | None):
  r"""``params + updates`` for params holding QArray weights.

  A QArray leaf :math:`W_q` becomes :math:`\mathrm{Q}(\mathrm{deq}(W_q) +
  u)` with fresh scales and zero points, by stochastic rounding when ``key``
  is given (unbiased: :math:`\mathbb{E}[\mathrm{deq}] = \mathrm{deq}(W_q) +
  u` inside the group's range) and round-to-nearest when ``key`` is
  ``None`` (spec §5.3). Float leaves are added as ``optax.apply_updates``
  does.

  Args:
    params: params with QArray leaves (:func:`quantize_weights`).
    updates: float updates with the params' structure (QArray leaves
      matched by arrays of their logical shape), e.g. from
      :func:`q_galore`.
    key: a PRNG key for stochastic rounding (one sub-key per QArray leaf is
      split from it; pass a fresh one each step), or ``None`` for
      round-to-nearest. Required keyword: the choice is explicit.
  """
  leaves, treedef = jax.tree.flatten(params, is_leaf=is_qarray)
  ups = treedef.flatten_up_to(updates)
  nq = sum(is_qarray(p) for p in leaves)
  keys = iter(_base.leaf_keys(key, nq) if key is not None else [None] * nq)
  out = []
  for p, u in zip(leaves, ups, strict=True):
    if u is None:
      out.append(p)
    elif is_qarray(p):
      w = p.dequantize(jnp.float32) + u.astype(jnp.float32)
      k = next(keys)
      rounding = "nearest" if k is None else "stochastic"
      q = quant.quantize(w, p.spec.replace(rounding=rounding), key=k)
      # The rounding is how this update was quantized, not a property of
      # the param: keep the param's spec so the pytree structure (and the
      # jit signature) is unchanged from step to step.
      out.append(dataclasses.replace(q, spec=p.spec))
    else:
      cdt = _base.compute_dtype(p.dtype)
      out.append((p.astype(cdt) + u.astype(cdt)).astype(p.dtype))
  return treedef.unflatten(out)


__all__ = [
  "apply_quantized_updates", "dequantize_params", "q_galore",
  "quantize_weights", "scale_by_q_galore", "weight_spec",
]
