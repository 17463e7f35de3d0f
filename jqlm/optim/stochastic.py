r"""Stochastic-rounding parameter updates for low-precision params.

All official SPAM / Stable-SPAM / GaLore / Q-GaLore runs train in pure bf16
with no float32 master copy (spec §1). Adding an update to a bf16 param with
round-to-nearest loses every update smaller than half a bf16 ulp, a bias
that stalls training; stochastic rounding (SR) is unbiased:

.. math:: p' = \mathrm{SR}_{\mathrm{dtype}(p)}\big(\mathrm{f32}(p) +
          \mathrm{f32}(u)\big), \qquad \mathbb{E}[p'] = p + u

(Gupta et al. 2015, arXiv 1502.02551; Zamirai et al. 2020, arXiv
2010.06192). Two ways to use it, both with explicit keys:

* in a train step: ``params = apply_updates_stochastic(params, updates,
  key=step_key)``;
* in an optax chain: put :func:`stochastic_rounding` last. Its state carries
  a PRNG key that is split every update; it returns float32 updates
  ``SR(p + u) - p`` that :func:`apply_updates` (or ``optax.apply_updates``
  under standard dtype promotion) adds exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlm.optim import _base
from jqlm.quant import stochastic_round
from jqlm.quant.rounding import check_noise


def _needs_sr(p) -> bool:
  dtype = jnp.dtype(p.dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def apply_updates_stochastic(
  params: optax.Params,
  updates: optax.Updates,
  *,
  key: jax.Array,
  noise: str = "hash",
) -> optax.Params:
  """``params + updates`` with stochastic rounding to each param's dtype.

  Leaves of dtype bfloat16, float16 or fp8 are added in float32 and rounded
  stochastically back (unbiased: ``E[result] = params + updates``); float32
  and float64 leaves are added exactly as ``optax.apply_updates`` does.
  ``None`` updates leave the param unchanged.

  Args:
    params: the params pytree.
    updates: updates with the params' structure (any float dtypes).
    key: PRNG key; one sub-key per leaf is split from it.
    noise: the random bits' source, see :func:`jqlm.quant.stochastic_round`.
      The default ``"hash"`` (a counter-based hash seeded by the key) keeps
      the apply memory-bound; ``"jax"`` draws them with ``jax.random``
      (threefry by default), ~15x slower than a round-to-nearest apply on
      CPU (docs/benchmarks.md).
  """
  p_leaves, treedef = jax.tree.flatten(params)
  u_leaves = treedef.flatten_up_to(updates)
  keys = _base.leaf_keys(key, len(p_leaves))

  def leaf(p, u, k):
    if u is None:
      return p
    if not _needs_sr(p):
      return (p + u.astype(p.dtype)).astype(p.dtype)
    total = p.astype(jnp.float32) + u.astype(jnp.float32)
    return stochastic_round(total, p.dtype, key=k, noise=noise)

  return treedef.unflatten(
    [leaf(p, u, k) for p, u, k in zip(p_leaves, u_leaves, keys, strict=True)]
  )


def apply_updates(params: optax.Params, updates: optax.Updates):
  """``optax.apply_updates`` that adds in float32 then casts to the param
  dtype, so it works under strict dtype promotion and adds the float32
  updates of :func:`stochastic_rounding` exactly."""

  def leaf(p, u):
    if u is None:
      return p
    cdt = jnp.float64 if p.dtype == jnp.float64 else jnp.float32
    return (p.astype(cdt) + u.astype(cdt)).astype(p.dtype)

  return jax.tree.map(leaf, params, updates, is_leaf=lambda x: x is None)


class StochasticRoundingState(NamedTuple):
  """State of :func:`stochastic_rounding`: the key for the next update."""

  rng_key: jax.Array


def stochastic_rounding(
  key: jax.Array, *, noise: str = "hash"
) -> optax.GradientTransformation:
  """Makes the chain's updates land on stochastically rounded params.

  Put it last in a chain. For each low-precision param it returns the
  float32 update ``SR(p + u) - p``, computed with a sub-key of the key in its
  state (split every update, so no randomness is hidden and a checkpointed
  state resumes the same stream). Apply with :func:`apply_updates` or
  ``optax.apply_updates``; float32 params get their update unchanged.

  Args:
    key: the initial PRNG key (required).
    noise: the random bits' source (see :func:`apply_updates_stochastic`).
  """
  if key is None:
    raise ValueError(
      "stochastic_rounding needs an explicit PRNG key, e.g. "
      "stochastic_rounding(jax.random.key(0))."
    )
  check_noise(noise)

  def init_fn(params):
    del params
    return StochasticRoundingState(rng_key=key)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        "stochastic_rounding needs the params: call "
        "update(grads, state, params)."
      )
    next_key, step_key = jax.random.split(state.rng_key)
    rounded = apply_updates_stochastic(params, updates, key=step_key,
                                       noise=noise)

    def delta(p, r, u):
      if u is None or not _needs_sr(p):
        return u
      return r.astype(jnp.float32) - p.astype(jnp.float32)

    out = jax.tree.map(delta, params, rounded, updates,
                       is_leaf=lambda x: x is None)
    return out, StochasticRoundingState(rng_key=next_key)

  return optax.GradientTransformation(init_fn, update_fn)
