r"""Composable gradient-spike transforms from SPAM and Stable-SPAM.

Each piece is an ``optax.GradientTransformation`` that chains with any optax
optimizer:

* :func:`clip_spikes`: SPAM's spike-aware clipping against a second-moment
  EMA (arXiv 2501.06842, spec §2.2).
* :func:`reset_momentum`: zero the moments of any inner optax transform
  every ``reset_interval`` updates, optionally followed by SPAM's cosine
  warmup of the update scale.
* :func:`ada_clip`: Stable-SPAM's AdaClip, clipping at an EMA of the
  per-tensor max (arXiv 2502.17055, spec §3.2).
* :func:`ada_gn`: Stable-SPAM's AdaGN, normalising each tensor's gradient
  norm by EMAs of past norms.

For example, SPAM with torch-style epsilon is::

  optax.chain(
      clip_spikes(5000.0, b2=0.999, grace_steps=20, reset_interval=500),
      reset_momentum(optax.scale_by_adam(0.9, 0.999), 500, warmup_steps=150),
      optax.scale_by_learning_rate(lr))

which equals :func:`jqlm.optim.spam` up to the epsilon convention (tested).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlm.optim import _base
from jqlm.optim.spam import (
  clipped_grad_sq,
  spam_schedule,
  spam_warmup_factor,
  spike_clip_from_new,
)
from jqlm.optim.stable_spam import ada_clip_tensor


class ClipSpikesState(NamedTuple):
  """State of :func:`clip_spikes`.

  Attributes:
    count: int32 updates done.
    nu: EMA of the squared *clipped* gradients (``state_dtype``).
    spike_count: per-leaf int32 elements clipped in the last update.
  """

  count: jax.Array
  nu: optax.Updates
  spike_count: optax.Updates


def clip_spikes(
  spike_threshold: float = 5000.0,
  *,
  b2: float = 0.999,
  grace_steps: int = 20,
  reset_interval: int | None = None,
  state_dtype=None,
) -> optax.GradientTransformation:
  r"""Spike-aware clipping against a second-moment estimate (SPAM).

  .. math:: g_i \leftarrow \mathrm{sign}(g_i)\sqrt{\theta v_i}
            \text{ where } g_i^2 > \theta v_i, \qquad
            v \leftarrow \beta_2 v + (1 - \beta_2) g^2

  where :math:`v` is this transform's own EMA of the clipped gradients
  (identical to a following Adam's second moment when the betas and resets
  agree). Clipping is off for the first ``grace_steps`` updates and, with
  ``reset_interval``, :math:`v` is zeroed at every multiple of it and the
  grace period restarts, as in SPAM.

  Args:
    spike_threshold: :math:`\theta > 0`.
    b2: decay of the second-moment EMA.
    grace_steps: clip-free updates at the start and after each reset.
    reset_interval: zero :math:`v` every this many updates; ``None`` never.
    state_dtype: dtype of :math:`v`; default the params' dtype (bf16 in the
      official pure-bf16 runs, as :func:`jqlm.optim.scale_by_spam`'s
      moments). The arithmetic runs in float32 (float64 for float64).
  """
  _base.check("spike_threshold", spike_threshold, lambda v: v > 0, "> 0")
  _base.check_beta("b2", b2)
  _base.check("grace_steps", grace_steps, lambda v: v >= 0 and v == int(v),
              "an int >= 0")
  _base.check_interval("reset_interval", reset_interval)
  _base.check_state_dtype(state_dtype)

  def init_fn(params):
    return _base.follow_params(ClipSpikesState(
      count=jnp.zeros((), jnp.int32),
      nu=jax.tree.map(
        lambda p: jnp.zeros_like(p, state_dtype or p.dtype), params),
      spike_count=_base.count_tree(params),
    ), params)

  def update_fn(updates, state, params=None):
    del params
    reset, on = spam_schedule(state.count, reset_interval, grace_steps)

    def leaf(g_in, v_in):
      cdt = _base.compute_dtype(v_in.dtype)
      keep = jnp.where(reset, 0.0, 1.0).astype(cdt)
      threshold = jnp.where(
        on, _base.hp(spike_threshold, cdt) * keep, jnp.inf).astype(cdt)
      g_sq, v, _ = clipped_grad_sq(g_in, v_in, threshold, cdt)
      b = _base.hp(b2, cdt)
      v = b * v * keep + (1 - b) * g_sq
      # The clipped gradient from the new v, as in scale_by_spam (one reader
      # of the old, donated v).
      g, spikes = spike_clip_from_new(g_in, v, threshold, b, cdt)
      return g.astype(g_in.dtype), v.astype(v_in.dtype), spikes

    g, v, spikes = _base.map_n(leaf, updates, state.nu, n=3)
    return g, ClipSpikesState(optax.safe_increment(state.count), v, spikes)

  return optax.GradientTransformation(init_fn, update_fn)


class ResetMomentumState(NamedTuple):
  """State of :func:`reset_momentum`.

  Attributes:
    count: int32 updates done.
    warmup_factor: float32 post-reset warmup factor applied in the last
      update (1 without warmup).
    inner_state: the wrapped transform's state.
  """

  count: jax.Array
  warmup_factor: jax.Array
  inner_state: optax.OptState


def _zero_moments(tree, reset: jax.Array, reset_counts: bool):
  def leaf(x):
    if not isinstance(x, jax.Array | jnp.ndarray) or x.dtype == bool:
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return x
    if jnp.issubdtype(x.dtype, jnp.integer) and not reset_counts:
      return x
    return jnp.where(reset, jnp.zeros_like(x), x)

  return jax.tree.map(leaf, tree)


def reset_momentum(
  inner: optax.GradientTransformation,
  reset_interval: int,
  *,
  warmup_steps: int = 0,
  reset_counts: bool = False,
) -> optax.GradientTransformation:
  r"""Zero the moments of ``inner`` every ``reset_interval`` updates.

  At update :math:`t` with :math:`t \bmod \Delta T = 0`, every floating
  point leaf of ``inner``'s state (Adam's ``mu`` and ``nu``, momentum
  buffers, ...) is zeroed *before* ``inner`` runs. Integer leaves (step
  counters, hence bias corrections) are kept, as SPAM keeps its Adam step
  counter, unless ``reset_counts=True`` (then the bias correction restarts
  too). PRNG keys are never touched.

  With ``warmup_steps = N > 0`` the update is multiplied by SPAM's post-reset
  cosine warmup :math:`s_t` (see :func:`jqlm.optim.spam_warmup_factor`).

  Args:
    inner: the transform whose state is reset, e.g.
      ``optax.scale_by_adam()``.
    reset_interval: :math:`\Delta T > 0`.
    warmup_steps: N of the post-reset warmup; 0 disables it.
    reset_counts: also zero integer leaves (counters).
  """
  _base.check_interval("reset_interval", reset_interval, allow_none=False)
  _base.check("warmup_steps", warmup_steps, lambda v: v >= 0 and v == int(v),
              "an int >= 0")

  def init_fn(params):
    return ResetMomentumState(
      *_base.follow_params(
        (jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32)), params),
      inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    t = state.count + 1
    reset = t % jnp.asarray(reset_interval).astype(jnp.int32) == 0
    inner_state = _zero_moments(state.inner_state, reset, reset_counts)
    updates, inner_state = optax.with_extra_args_support(inner).update(
      updates, inner_state, params, **extra)
    factor = jnp.ones((), jnp.float32)
    if _base.concrete(warmup_steps) != 0:
      factor = spam_warmup_factor(state.count, reset_interval, warmup_steps)

      def warm(u):
        cdt = _base.compute_dtype(u.dtype)
        f = spam_warmup_factor(state.count, reset_interval, warmup_steps, cdt)
        return (u.astype(cdt) * f).astype(u.dtype)

      updates = jax.tree.map(warm, updates)
    return updates, ResetMomentumState(optax.safe_increment(state.count),
                                       factor, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AdaClipState(NamedTuple):
  """State of :func:`ada_clip`.

  Attributes:
    count: int32 updates done (the bias-correction counter).
    max_ema: per-leaf EMA of ``max|g|`` (float32 scalars).
    spike_count: per-leaf int32 elements clipped in the last update.
  """

  count: jax.Array
  max_ema: optax.Updates
  spike_count: optax.Updates


def ada_clip(gamma: float = 0.999) -> optax.GradientTransformation:
  r"""AdaClip: adaptive spike clipping from the historical max (Stable-SPAM).

  Per tensor: :math:`m \leftarrow \gamma m + (1 - \gamma)\max|g|`,
  :math:`\hat T = m / (1 - \gamma^t)`, and
  :math:`g_i \leftarrow g_i \hat T / \max|g|` where :math:`|g_i| > \hat T`
  (the sign is kept and the largest element becomes :math:`\pm\hat T`).

  Args:
    gamma: EMA decay of the per-tensor max (Stable-SPAM's ``gamma3``).
  """
  _base.check_beta("gamma", gamma)

  def init_fn(params):
    return _base.follow_params(
      AdaClipState(jnp.zeros((), jnp.int32), _base.scalar_tree(params),
                   _base.count_tree(params)), params)

  def update_fn(updates, state, params=None):
    del params
    t = state.count + 1

    def leaf(g_in, mmax):
      cdt = _base.compute_dtype(g_in.dtype)
      g, new_max, _, spikes = ada_clip_tensor(
        g_in, mmax, _base.hp(gamma, cdt), t.astype(cdt), cdt)
      return g.astype(g_in.dtype), new_max.astype(mmax.dtype), spikes

    g, mmax, spikes = _base.map_n(leaf, updates, state.max_ema, n=3)
    return g, AdaClipState(optax.safe_increment(state.count), mmax, spikes)

  return optax.GradientTransformation(init_fn, update_fn)


class AdaGNState(NamedTuple):
  """State of :func:`ada_gn`: count and per-leaf EMAs of norm and norm²."""

  count: jax.Array
  norm_ema: optax.Updates
  norm_sq_ema: optax.Updates


def ada_gn(
  gamma1: float = 0.7, gamma2: float = 0.9, eps: float = 1e-8
) -> optax.GradientTransformation:
  r"""AdaGN: gradient-norm normalisation from norm statistics (Stable-SPAM).

  Per tensor, with :math:`n = \|g\|_2`:

  .. math:: m_n \leftarrow \gamma_1 m_n + (1-\gamma_1) n, \quad
            v_n \leftarrow \gamma_2 v_n + (1-\gamma_2) n^2, \quad
            g \leftarrow \frac{g}{n} \cdot
            \frac{m_n / (1 - \gamma_1^t)}{\sqrt{v_n / (1 - \gamma_2^t)}
            + \epsilon}

  (unchanged when :math:`n = 0`), so each tensor's norm becomes ~1 and
  follows the trend of its history rather than its spikes.
  """
  _base.check_beta("gamma1", gamma1)
  _base.check_beta("gamma2", gamma2)
  _base.check("eps", eps, lambda v: v >= 0, ">= 0")

  def init_fn(params):
    return _base.follow_params(
      AdaGNState(jnp.zeros((), jnp.int32), _base.scalar_tree(params),
                 _base.scalar_tree(params)), params)

  def update_fn(updates, state, params=None):
    del params
    t = state.count + 1

    def leaf(g_in, mn_in, vn_in):
      cdt = _base.compute_dtype(g_in.dtype)
      g = g_in.astype(cdt)
      tf = t.astype(cdt)
      mn, vn = mn_in, vn_in
      g1, g2 = _base.hp(gamma1, cdt), _base.hp(gamma2, cdt)
      n = jnp.sqrt(jnp.sum(g * g))
      mn = g1 * mn.astype(cdt) + (1 - g1) * n
      vn = g2 * vn.astype(cdt) + (1 - g2) * n * n
      c = (mn / (1 - g1**tf)) / (jnp.sqrt(vn / (1 - g2**tf))
                                 + _base.hp(eps, cdt))
      g = jnp.where(n > 0, g / jnp.where(n > 0, n, 1.0) * c, g)
      return g.astype(g_in.dtype), mn.astype(mn_in.dtype), vn.astype(
        vn_in.dtype)

    g, mn, vn = _base.map_n(leaf, updates, state.norm_ema, state.norm_sq_ema,
                            n=3)
    return g, AdaGNState(optax.safe_increment(state.count), mn, vn)

  return optax.GradientTransformation(init_fn, update_fn)
