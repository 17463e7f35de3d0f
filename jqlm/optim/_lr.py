r"""The descent step with decoupled weight decay on the updated params.

:func:`scale_by_learning_rate_pre_decay` is the other order (torch's
``AdamW``, MicroAdam): decay of the pre-update params. Shared by every jqlm
optimizer alias (:func:`jqlm.optim.adamw`,
:func:`jqlm.optim.spam`, :func:`jqlm.optim.galore`,
:func:`jqlm.optim.q_galore`): the official SPAM, GaLore-AdamW and
bitsandbytes 8-bit code decay the params *after* the update (spec §2.2,
§4.2, §5.4),

.. math:: p' = p - \eta u, \qquad p'' = p' - \eta \lambda p',

which optax's ``add_decayed_weights`` (decay of the pre-update params)
cannot express.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlm.optim import _base


def lr_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array):
  """The learning rate at update ``count``: a schedule evaluated there
  (under standard dtype promotion: optax schedules mix Python floats with
  the int32 count, which strict promotion rejects), or the constant."""
  if callable(learning_rate):
    with jax.numpy_dtype_promotion("standard"):
      return learning_rate(count)
  return learning_rate


class PostUpdateDecayState(NamedTuple):
  """State of :func:`scale_by_learning_rate_post_decay`."""

  count: jax.Array


def scale_by_learning_rate_post_decay(
  learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0,
  *, decay_mask=None,
) -> optax.GradientTransformation:
  r"""Descent step then decoupled weight decay on the *updated* params.

  .. math:: p' = p - \eta u, \qquad p'' = p' - \eta \lambda p'

  i.e. the returned update is :math:`-\eta u - \eta \lambda (p - \eta u)`.
  This is the order of SPAM's and GaLore-AdamW's official code (spec §2.2,
  §4.2), which optax's ``add_decayed_weights`` (decay of the pre-update
  params) cannot express. ``learning_rate`` may be an optax schedule,
  evaluated at the update count (0 for the first update, as the official
  ``LambdaLR`` is). ``decay_mask`` (a pytree of bools with the params'
  structure, or a callable ``params -> pytree``) limits the decay to the
  params it marks True; default all.
  """
  _base.check_learning_rate(learning_rate)
  _base.check("weight_decay", weight_decay, lambda v: v >= 0, ">= 0")

  def init_fn(params):
    return _base.follow_params(
      PostUpdateDecayState(count=jnp.zeros((), jnp.int32)), params)

  def update_fn(updates, state, params=None):
    lr = lr_at(learning_rate, state.count)
    decay = _base.concrete(weight_decay)
    if (decay is None or decay > 0) and params is None:
      raise ValueError(
        "weight_decay needs the params: call update(grads, state, params)."
      )

    def leaf(u, p=None, decays=True):
      cdt = _base.compute_dtype(u.dtype)
      step = -_base.hp(lr, cdt) * u.astype(cdt)
      if p is not None and decays and (decay is None or decay > 0):
        new_p = p.astype(cdt) + step
        step = step - _base.hp(lr, cdt) * _base.hp(weight_decay, cdt) * new_p
      return step.astype(u.dtype)

    if params is None or decay == 0:
      out = jax.tree.map(leaf, updates)
    elif decay_mask is None:
      out = jax.tree.map(leaf, updates, params)
    else:
      flags = decay_mask(params) if callable(decay_mask) else decay_mask
      out = jax.tree.map(leaf, updates, params, flags)
    return out, PostUpdateDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


class PreUpdateDecayState(NamedTuple):
  """State of :func:`scale_by_learning_rate_pre_decay`."""

  count: jax.Array


def scale_by_learning_rate_pre_decay(
  learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0
) -> optax.GradientTransformation:
  r"""Decoupled weight decay of the *pre-update* params, then the step.

  The update is :math:`-\eta (u + \lambda p)`, computed in float32 (float64
  for float64 updates): ``optax.add_decayed_weights(wd)`` followed by
  ``optax.scale_by_learning_rate(lr)``, without rounding :math:`u + \lambda
  p` to bf16 in between. Applied, :math:`p - \eta\lambda p - \eta u = p(1 -
  \eta\lambda) - \eta u`: the official MicroAdam's ``p.mul_(1 - lr*wd)``
  before ``p.add_(u, alpha=-lr)`` (torch-AdamW order), exactly in exact
  arithmetic since both terms are linear in :math:`\eta`. A schedule is
  evaluated at the update count (0 for the first update).
  """
  _base.check_learning_rate(learning_rate)
  _base.check("weight_decay", weight_decay, lambda v: v >= 0, ">= 0")

  def init_fn(params):
    return _base.follow_params(
      PreUpdateDecayState(count=jnp.zeros((), jnp.int32)), params)

  def update_fn(updates, state, params=None):
    lr = lr_at(learning_rate, state.count)
    decay = _base.concrete(weight_decay)
    decays = decay is None or decay > 0
    if decays and params is None:
      raise ValueError(
        "weight_decay needs the params: call update(grads, state, params).")

    def leaf(u, p=None):
      cdt = _base.compute_dtype(u.dtype)
      step = u.astype(cdt)
      if p is not None:
        step = step + _base.hp(weight_decay, cdt) * p.astype(cdt)
      return (-_base.hp(lr, cdt) * step).astype(u.dtype)

    if decays:
      out = jax.tree.map(leaf, updates, params)
    else:
      out = jax.tree.map(leaf, updates)
    return out, PreUpdateDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
