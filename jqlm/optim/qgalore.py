r"""Q-GaLore (Zhang et al. 2024, `arXiv 2407.08296
<https://arxiv.org/abs/2407.08296>`_; spec §5): GaLore (:mod:`jqlm.optim.galore`)
with INT4 projections, the layer-adaptive lazy refresh, 8-bit Adam states and
INT8 weights updated by stochastic rounding, with no float master copy.

The projector machinery (quantized projections, per-layer gaps and cosine
queues under ``lax.cond``) lives in :mod:`jqlm.optim.galore`; this module
holds the Q-GaLore optimizer and the helpers a train step needs for int8
weight params: :func:`quantize_weights`, :func:`dequantize_params`,
:func:`apply_quantized_updates` and :func:`rounding_key`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlm import quant
from jqlm.optim import qstate
from jqlm.optim.adam import scale_by_adam
from jqlm.optim.galore import (
  ProjType,
  _check_bits,
  _galore,
  _is_qarray,
  _resolve_mask,
  weight_spec,
)
from jqlm.optim.spam import scale_by_learning_rate_post_decay
from jqlm.optim.stochastic import _leaf_keys


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
  Args as :func:`q_galore`.
  """
  if inner is None:
    inner = scale_by_adam(0.9, 0.95, 1e-8, eps_style="torch", state_quant=8)
  return _galore(rank, update_proj_gap, scale, ProjType.STD, inner, mask,
                 proj_bits=proj_bits, proj_group_size=proj_group_size,
                 adaptive=True, cos_threshold=cos_threshold,
                 gamma_proj=gamma_proj, queue_size=queue_size)


class WeightRoundingState(NamedTuple):
  """Carries the PRNG key of Q-GaLore's weight re-quantization.

  Attributes:
    key: the carry, split every update.
    step_key: the key of the latest update's re-quantization; read it with
      :func:`rounding_key`.
  """

  key: jax.Array
  step_key: jax.Array


def _weight_rounding(
  key: jax.Array | None, sim_spec: quant.QuantSpec | None, mask
) -> optax.GradientTransformation:
  """Carries the SR key (split each update; none for round-to-nearest). In
  simulation mode (``sim_spec``) it also turns the updates of the masked
  float weights into ``fq(p + u) - p`` (spec §5.3)."""

  def init_fn(params):
    del params
    if key is None:
      return optax.EmptyState()
    return WeightRoundingState(key=key, step_key=key)

  def simulate(updates, params, step):
    if params is None:
      raise ValueError("q_galore(simulation=True) needs the params: call "
                       "update(grads, state, params).")
    spec = sim_spec if step is None else sim_spec.replace(
      rounding="stochastic")
    m = _resolve_mask(mask, params)
    leaves, treedef = jax.tree.flatten(updates)
    ps, ms = treedef.flatten_up_to(params), treedef.flatten_up_to(m)
    keys = _leaf_keys(step, len(leaves)) if step is not None \
      else [None] * len(leaves)
    out = []
    for u, p, on, k in zip(leaves, ps, ms, keys, strict=True):
      if not on:
        out.append(u)
        continue
      p32 = p.astype(jnp.float32)
      fq = quant.quantize(p32 + u.astype(jnp.float32), spec, key=k)
      out.append((fq.dequantize(p.dtype).astype(jnp.float32) - p32)
                 .astype(u.dtype))
    return treedef.unflatten(out)

  def update_fn(updates, state, params=None):
    step = None
    if key is not None:
      carry, step = jax.random.split(state.key)
      state = WeightRoundingState(key=carry, step_key=step)
    if sim_spec is not None:
      updates = simulate(updates, params, step)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


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
  key: jax.Array | None = None,
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
) -> optax.GradientTransformation:
  r"""Q-GaLore (spec §5): GaLore with INT4 projections, lazy layer-adaptive
  refresh, 8-bit Adam states and INT8 weights updated by stochastic rounding.

  **Real mode** (default): the projected kernels live in the params pytree
  as int8 :class:`jqlm.quant.QArray` (:func:`quantize_weights`, RTN at
  init). A train step differentiates the loss at
  ``dequantize_params(params)``, calls ``update(grads, state, params)`` (float
  updates) and then::

      params = apply_quantized_updates(params, updates,
                                       key=rounding_key(state))

  which adds in float and re-quantizes with stochastic rounding and fresh
  scales (spec §5.3); the key is carried in the state and split each update.

  **Simulation mode** (``simulation=True``, the official ``--simulation``):
  the projected kernels stay float (bf16); the update of each one is
  ``fq(p + u) - p`` with ``fq`` the 8-bit SR fake-quantizer, so
  ``optax.apply_updates`` yields fake-quantized weights. (The official
  simulation also fake-quantizes in the forward pass: that is the model's
  QAT policy.)

  Args:
    learning_rate: a float or an optax schedule (official: 0.015 for
      60M/130M, 0.01 for 350M/1B, 0.004 for 7B; spec §5.5).
    rank: the subspace rank.
    b1, b2, eps: the inner torch-style Adam (official ``beta2`` 0.95).
    weight_decay: decoupled, after the update (spec §5.4).
    mask: the projected params (see :func:`scale_by_galore`); they are also
      the ones held in int8.
    key: PRNG key for the stochastic rounding; required when
      ``stochastic_round`` (``jax.random.key(seed)``).
    update_proj_gap, scale: as GaLore (the gap is each layer's initial gap).
    proj_bits: bits of the stored projections (``None``: unquantized).
    proj_group_size: elements per projection quantization group.
    cos_threshold, gamma_proj, queue_size: the lazy refresh (spec §5.1).
    weight_bits, weight_group_size: the weight quantizer (spec §5.3); give
      the same to :func:`quantize_weights`.
    stochastic_round: SR (official ``--stochastic_round``) or RTN weight
      updates.
    simulation: see above.
    state_quant: the inner Adam's states (default 8-bit, as bitsandbytes'
      ``AdamW8bit``; blocks of 256, not bnb 0.43's 2048).
    inner: replaces the inner Adam.

  References:
    Zhang et al., `Q-GaLore <https://arxiv.org/abs/2407.08296>`_, 2024.
  """
  _check_bits("weight_bits", weight_bits)
  if not isinstance(weight_group_size, int) or weight_group_size < 1:
    raise ValueError(
      f"`weight_group_size` must be a positive int, got {weight_group_size!r}.")
  if stochastic_round and key is None:
    raise ValueError(
      "q_galore with stochastic_round=True needs key=jax.random.key(seed): "
      "the weight re-quantization draws its noise from a key carried in the "
      "optimizer state.")
  if inner is None:
    inner = scale_by_adam(b1, b2, eps, eps_style="torch",
                          state_quant=state_quant)
  sim_spec = weight_spec(weight_bits, weight_group_size) if simulation \
    else None
  parts = [
    scale_by_q_galore(
      rank, update_proj_gap=update_proj_gap, scale=scale, inner=inner,
      mask=mask, proj_bits=proj_bits, proj_group_size=proj_group_size,
      cos_threshold=cos_threshold, gamma_proj=gamma_proj,
      queue_size=queue_size),
    _float_params(scale_by_learning_rate_post_decay(learning_rate,
                                                    weight_decay)),
  ]
  if stochastic_round or simulation:
    parts.append(_weight_rounding(key if stochastic_round else None,
                                  sim_spec, mask))
  return optax.chain(*parts)


# ---------------------------------------------------------------------------
# INT8 weight params


def quantize_weights(params, mask: Any = None, *, bits: int = 8,
                     group_size: int = 256):
  """Turns the masked Flax kernels into int8 :class:`jqlm.quant.QArray`
  (round-to-nearest, as Q-GaLore at init; spec §5.3).

  Args:
    params: a params pytree (arrays or ``jax.ShapeDtypeStruct``).
    mask: as :func:`scale_by_galore` (default :func:`default_mask`).
    bits, group_size: the weight quantizer (:func:`weight_spec`).
  """
  _check_bits("bits", bits)
  spec = weight_spec(bits, group_size)
  m = _resolve_mask(mask, params)

  def conv(p, on):
    if not on or _is_qarray(p):
      return p
    if math.prod(p.shape) % group_size:
      raise ValueError(
        f"weight group_size={group_size} must divide the size of the kernel "
        f"of shape {tuple(p.shape)}.")
    return quant.quantize(p, spec)

  return jax.tree.map(conv, params, m, is_leaf=_is_qarray)


def dequantize_params(params, dtype=jnp.float32):
  """Params with every :class:`jqlm.quant.QArray` dequantized to
  ``dtype`` (for the forward pass); other leaves unchanged."""
  return jax.tree.map(
    lambda p: p.dequantize(dtype) if _is_qarray(p) else p, params,
    is_leaf=_is_qarray)


def apply_quantized_updates(params, updates, *, key: jax.Array | None):
  r"""``params + updates`` for params holding QArray weights.

  A QArray leaf :math:`W_q` becomes :math:`\mathrm{Q}(\mathrm{deq}(W_q) +
  u)` with fresh scales and zero points, by stochastic rounding when ``key``
  is given (unbiased: :math:`\mathbb{E}[\mathrm{deq}] = \mathrm{deq}(W_q) +
  u` inside the group's range) and round-to-nearest when ``key`` is
  ``None`` (spec §5.3). Float leaves are added as ``optax.apply_updates``
  does.
  """
  leaves, treedef = jax.tree.flatten(params, is_leaf=_is_qarray)
  ups = treedef.flatten_up_to(updates)
  nq = sum(_is_qarray(p) for p in leaves)
  keys = iter(_leaf_keys(key, nq) if key is not None else [None] * nq)
  out = []
  for p, u in zip(leaves, ups, strict=True):
    if u is None:
      out.append(p)
    elif _is_qarray(p):
      w = p.dequantize(jnp.float32) + u.astype(jnp.float32)
      k = next(keys)
      rounding = "nearest" if k is None else "stochastic"
      q = quant.quantize(w, p.spec.replace(rounding=rounding), key=k)
      # The rounding is how this update was quantized, not a property of
      # the param: keep the param's spec so the pytree structure (and the
      # jit signature) is unchanged from step to step.
      out.append(dataclasses.replace(q, spec=p.spec))
    else:
      out.append((p.astype(jnp.result_type(p.dtype, jnp.float32))
                  + u).astype(p.dtype))
  return treedef.unflatten(out)


def rounding_key(opt_state) -> jax.Array | None:
  """The re-quantization key of the latest update of a :func:`q_galore`
  state (``None`` if it rounds to nearest)."""
  found = [s for s in jax.tree.leaves(
    opt_state, is_leaf=lambda x: isinstance(x, WeightRoundingState))
    if isinstance(s, WeightRoundingState)]
  if not found:
    return None
  return found[0].step_key


__all__ = [
  "WeightRoundingState", "apply_quantized_updates", "dequantize_params",
  "q_galore", "quantize_weights", "rounding_key", "scale_by_q_galore",
]
