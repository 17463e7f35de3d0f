r"""SPAM: Spike-Aware Adam with Momentum Reset (arXiv 2501.06842).

Faithful to the official code (``TianjinYellow/SPAM-Optimizer``,
``galore_torch/SPAM.py`` @ e8185fb) as specified in
``../shared/spec/optimizers.md`` §2. At update :math:`t = 1, 2, \dots`
(grace period :math:`A`, threshold :math:`\theta`, interval :math:`\Delta T`):

.. math::

  &\text{if } t \bmod \Delta T = 0: \; m, v \leftarrow 0 \\
  &\text{if } \theta \ne 0,\ t \ge A,\ t \bmod \Delta T \ge A: \;
    g_i \leftarrow \mathrm{sign}(g_i) \sqrt{\theta v_i}
    \text{ where } g_i^2 > \theta v_i \\
  &m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
    v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
  &u = s_t \, \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \,
    \frac{m}{\sqrt{v} + \epsilon}

with the post-reset cosine warmup :math:`s_t = 1 - 0.99 (1 + \cos(\pi c /
(N + 1))) / 2` for :math:`c = t \bmod \Delta T < N` (once :math:`t \ge \Delta
T`), else 1 (§2.1). The Adam step counter is *not* reset, so the bias
correction is ~1 right after a reset and the warmup factor (0.01) is what
tames the first post-reset step. Epsilon is HF-style (added to
:math:`\sqrt{v}`, not to :math:`\sqrt{\hat v}`), which equals torch-style Adam
with :math:`\epsilon_t = \epsilon / \sqrt{1 - \beta_2^t}`.

``spam`` applies decoupled weight decay *after* the update, to the
post-update parameters, unscaled by :math:`s_t`:
:math:`p \leftarrow p - \eta u;\ p \leftarrow p - \eta \lambda p` (§2.2).

Deviations from the official code:

* ``warmup_steps`` is the post-reset warmup N and defaults to the paper's 150
  (HEAD ``torchrun_main.py`` passes the LR warmup instead, the bug behind
  SPAM-Optimizer issue #6; §2.4).
* Sparse momentum (``sparse_momentum=density``, optimizers_more.md §4): the
  moments are kept dense-shaped and zero outside the mask (numerically the
  official 1-D masked states, without their memory saving), the masks are
  stored as bool arrays (1 byte per element of a sparse param), and they
  are drawn from ``jax.random`` (the official ``torch.randperm`` /
  ``torch.rand`` draws cannot be reproduced). The official copy of the
  moments onto the new mask's overlap is skipped: it is dead code, the next
  update resets the moments (§4.1).
* Arithmetic runs in float32 (float64 for float64 inputs) and the moments are
  stored in ``state_dtype`` (default: the params' dtype, as the official
  pure-bf16 runs do); torch rounds every bf16 op.
* The second moment is updated first and the clipped gradient is recovered
  from it (:func:`spike_clip_from_new`): algebraically the official rule,
  equal up to float rounding, and it lets XLA update the donated moment
  buffers in place (docs/benchmarks.md).

References:
  Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
  Training <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jqlm.optim import _base, qstate
from jqlm.optim._lr import scale_by_learning_rate_post_decay


class SpamState(NamedTuple):
  """State of :func:`scale_by_spam`.

  Attributes:
    count: int32 number of updates done (``t - 1`` before an update).
    mu: first moments (``state_dtype``).
    nu: second moments (``state_dtype``). With ``track_spikes`` and float
      moments, the sign bit of each element flags whether it was clipped in
      the last update: the moment is ``|nu|`` (read it with
      :func:`spam_second_moment`), and :func:`jqlm.optim.spike_diagnostics`
      counts the flags only when it is called, so the update itself pays
      nothing for the diagnostic.
    spike_count: per-leaf int32 number of elements clipped in the last step,
      for quantized moments (``state_quant``), which cannot carry a flag;
      0 for float moments, whose count is in ``nu``'s sign bits.
    warmup_factor: float32 post-reset warmup factor :math:`s_t` applied in
      the last update (1 before the first).
    masks: with ``sparse_momentum``, per param the bool mask of the elements
      it updates (a scalar ``True`` for the dense params); else ``None``.
    mask_key: the PRNG key the masks are redrawn from (``None`` when
      dense).
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  spike_count: optax.Updates
  warmup_factor: jax.Array
  masks: optax.Updates = None
  mask_key: jax.Array | None = None


def spam_warmup_factor(
  count: jax.Array,
  reset_interval: int | None,
  warmup_steps: int,
  dtype=jnp.float32,
) -> jax.Array:
  r"""SPAM's post-reset factor :math:`s_t` for the update after ``count``.

  :math:`s = 1 - 0.99 (1 + \cos(\pi c / (N + 1))) / 2` for
  :math:`c = t \bmod \Delta T < N` once :math:`t \ge \Delta T`, else 1
  (spec §2.1; :math:`t` = ``count + 1``).
  """
  t = jnp.asarray(count).astype(jnp.int32) + 1
  if reset_interval is None:
    return jnp.ones((), dtype)
  dt = jnp.asarray(reset_interval).astype(jnp.int32)
  n = jnp.asarray(warmup_steps).astype(dtype)
  cur = jnp.where(t >= dt, t % dt, 0).astype(dtype)
  active = (t >= dt) & (cur < n)
  decay = 0.99 * (1.0 + jnp.cos(math.pi * cur / (n + 1.0))) / 2.0
  return jnp.where(active, 1.0 - decay, 1.0)


def spam_schedule(count, reset_interval, grace_steps):
  """SPAM's per-update flags at update ``t = count + 1`` (spec §2.2).

  Returns:
    ``(reset, clip_window)``: whether the moments are zeroed before this
    update (``t % reset_interval == 0``), and whether clipping may act
    (``t >= A`` and ``t % reset_interval >= A`` for the grace period A).
  """
  t = jnp.asarray(count).astype(jnp.int32) + 1
  grace = jnp.asarray(grace_steps).astype(jnp.int32)
  if reset_interval is None:
    return jnp.zeros((), bool), t >= grace
  dt = jnp.asarray(reset_interval).astype(jnp.int32)
  return t % dt == 0, (t >= grace) & (t % dt >= grace)


def spam_second_moment(state: SpamState) -> optax.Updates:
  """SPAM's second moments ``v`` from ``state``, without the spike flags.

  Float moments carry the last update's spike flags in their sign bits
  (:class:`SpamState`); this returns ``|nu|`` for them, and the decoded
  moments (float32) for quantized ones.
  """
  def leaf(v):
    return (qstate.load(v, jnp.float32) if isinstance(v, qstate.QuantizedMoment)
            else jnp.abs(v))
  return jax.tree.map(leaf, state.nu,
                      is_leaf=lambda x: isinstance(x, qstate.QuantizedMoment))


def flagged_spikes(nu) -> jax.Array:
  """Number of spike flags (set sign bits) in float SPAM moments ``nu``.

  One pass reading ``nu``; quantized leaves count 0 (their count is in
  ``SpamState.spike_count``).
  """
  total = jnp.zeros((), jnp.int32)
  for v in jax.tree.leaves(
      nu, is_leaf=lambda x: isinstance(x, qstate.QuantizedMoment)):
    if isinstance(v, qstate.QuantizedMoment):
      continue
    (n,) = _base.fused_sums(lambda x: (jnp.signbit(x),), (v,))
    total = total + n
  return total


def clipped_grad_sq(g_in, v_in, threshold, cdt, flagged=False):
  r"""SPAM's clipped squared gradient :math:`\min(g^2, \theta v)`.

  Where :math:`g^2 > \theta v` (a spike) SPAM replaces :math:`g` by
  :math:`\mathrm{sign}(g)\sqrt{\theta v}`, whose square is
  :math:`\theta v`: the second moment needs no square root. ``threshold``
  is :math:`\theta` (``inf`` disables clipping). ``flagged``: ``v_in``
  carries spike flags in its sign bits (:class:`SpamState`), read ``|v|``.

  Returns:
    ``(min(g^2, theta v), v, is_spike)``, the first two in ``cdt``.
  """
  g = g_in.astype(cdt)
  v = qstate.load(v_in, cdt)
  if flagged:
    v = jnp.abs(v)
  bound_sq = threshold * v
  g_sq = g * g
  spike = g_sq > bound_sq
  return jnp.where(spike, bound_sq, g_sq), v, spike


def spike_clip_from_new(g_in, v_new, threshold, b2, cdt, count=True):
  r"""SPAM's clipped gradient recovered from the *updated* second moment.

  With :math:`v' = \beta_2 v + (1-\beta_2)\min(g^2, \theta v)`, an
  element is a spike (:math:`g^2 > \theta v`) exactly when
  :math:`g^2 (\beta_2 + (1-\beta_2)\theta) > \theta v'`, and then
  :math:`\theta v = \theta v' / (\beta_2 + (1-\beta_2)\theta)`. The
  clip equals the direct one up to float rounding (the parity tests
  hold to 1e-10 in float64).

  Returns:
    ``(g_clipped, spikes)``; ``spikes`` (int32) from one fused pass over the
    raw inputs, or 0 if not ``count``.
  """
  denom = b2 + (1 - b2) * threshold

  def is_spike(g_, v_, th, dn):
    g_ = g_.astype(cdt)
    return g_ * g_ * dn > th * v_.astype(cdt)

  g = g_in.astype(cdt)
  spike = is_spike(g, v_new, threshold, denom)
  g = jnp.where(spike, jnp.sign(g) * jnp.sqrt(threshold * v_new / denom), g)
  if count:
    (spikes,) = _base.fused_sums(lambda *a: (is_spike(*a),), (g_in, v_new),
                                 (threshold, denom))
  else:
    spikes = jnp.zeros((), jnp.int32)
  return g, spikes


def _sparse_selection(params, sparse_mask):
  """The pytree of Python bools choosing SPAM's sparse params."""
  if sparse_mask is None:
    return jax.tree.map(lambda p: len(p.shape) == 2, params)
  sel = sparse_mask(params) if callable(sparse_mask) else sparse_mask
  leaves, treedef = jax.tree.flatten(params)
  try:
    flags = treedef.flatten_up_to(sel)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"SPAM's sparse_mask must have the params' structure ({treedef}) or "
      f"be a callable params -> such a pytree of bools; got {sel!r}. (Under "
      "optax.inject_hyperparams list 'sparse_mask' in static_args.)") from e
  for p, f in zip(leaves, flags, strict=True):
    if not isinstance(f, (bool, np.bool_)):
      raise ValueError(
        f"SPAM's sparse_mask leaves must be Python bools, got {f!r} for a "
        f"param of shape {tuple(p.shape)}.")
  return treedef.unflatten([bool(f) for f in flags])


def _apply_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``x`` zeroed outside a sparse param's mask; a dense param's scalar
  ``True`` leaves ``x`` as it is (no multiply in the update)."""
  return x if mask.ndim == 0 else x * mask.astype(x.dtype)


def init_sparse_masks(params, density: float, sparse_mask=None,
                      key: jax.Array | int = 0):
  """SPAM's first masks (optimizers_more.md §4.1): for each sparse param
  exactly ``int(density * numel)`` True elements, the first ones of a
  random permutation (row-major); a scalar ``True`` for the dense params.

  Returns:
    ``(masks, key)``: the masks and the key later redraws use.
  """
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  sel = _sparse_selection(params, sparse_mask)
  leaves, treedef = jax.tree.flatten(params)
  flags = treedef.flatten_up_to(sel)
  init_key, redraw_key = jax.random.split(key)
  keys = jax.random.split(init_key, len(leaves))
  out = []
  for p, f, k in zip(leaves, flags, keys, strict=True):
    if not f:
      out.append(jnp.ones((), bool))
      continue
    n = math.prod(p.shape)
    count = int(density * n)
    first = jax.random.permutation(k, n)[:count]
    mask = jnp.zeros((n,), bool).at[first].set(True).reshape(p.shape)
    if (isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer)
        and isinstance(p.sharding, jax.sharding.NamedSharding)):
      mask = jax.device_put(mask, p.sharding)  # placed like its param
    out.append(mask)
  return treedef.unflatten(out), redraw_key


def redraw_sparse_masks(masks, key: jax.Array, t: jax.Array,
                        density: float):
  """SPAM's mask redraw after update ``t`` (optimizers_more.md §4.1):
  independent Bernoulli(density) elements for each sparse param (the
  scalar ``True`` of a dense param is kept)."""
  leaves, treedef = jax.tree.flatten(masks)
  step_key = jax.random.fold_in(key, t)
  keys = jax.random.split(step_key, len(leaves))
  out = [m if m.ndim == 0 else jax.random.bernoulli(k, density, m.shape)
         for m, k in zip(leaves, keys, strict=True)]
  return treedef.unflatten(out)


def scale_by_spam(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  *,
  spike_threshold: float = 5000.0,
  reset_interval: int | None = 500,
  warmup_steps: int = 150,
  grace_steps: int = 20,
  state_dtype=None,
  track_spikes: bool = True,
  state_quant: qstate.StateQuant | int | None = None,
  sparse_momentum: float | None = None,
  sparse_mask: Any = None,
  sparse_key: jax.Array | int = 0,
) -> optax.GradientTransformation:
  r"""SPAM preconditioning (spec §2.2); see the module docstring for the math.

  Sparse momentum (the SPAM paper's ``density`` mode; official
  ``SPAM.py`` @ e8185fb, ../shared/spec/optimizers_more.md §4): each param
  of ``sparse_mask`` keeps moments on, and is updated on, a random subset of
  its elements only:

  .. math::
     u_t = s_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
       \frac{m_t}{\sqrt{v_t} + \epsilon} \odot M, \qquad
     m_t, v_t \text{ from } g_t \odot M

  The first mask :math:`M` has exactly ``int(density * numel)`` elements (a
  random permutation's first ones); after every update :math:`t` with
  :math:`(t + 1) \bmod \Delta T = 0` each mask is redrawn as independent
  Bernoulli(density) draws, one update before the moments reset and the
  warmup restarts. The elements outside the mask are frozen for the whole
  window, and :func:`spam` applies no weight decay to the sparse params
  (the official decay of them writes to a temporary: a no-op).

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: HF-style epsilon, added to ``sqrt(v)``.
    spike_threshold: :math:`\\theta`; an element is a spike when
      ``g^2 > theta * v``. 0 disables clipping.
    reset_interval: :math:`\\Delta T`, zero the moments every this many
      updates (the official ``DeltaT``); ``None`` never resets.
    warmup_steps: N, the length of the cosine warmup after each reset.
    grace_steps: A, no clipping during the first A updates and the first A
      updates after each reset (the official ``grad_accu_steps``).
    state_dtype: dtype of the moments; default the params' dtype.
    track_spikes: record which elements were clipped, for
      :func:`jqlm.optim.spike_diagnostics`. Float moments record them in the
      sign bits of ``nu`` at no cost to the update (the count is taken when
      the diagnostics are read: one pass over ``nu``); quantized moments
      count them into ``spike_count`` during the update, one more fused
      pass over the gradient and ``v``. With ``False`` the count stays 0;
      the update is unchanged.
    state_quant: store both moments block-wise quantized
      (:class:`jqlm.optim.StateQuant`, or ``8`` / ``4`` for its defaults);
      ``None`` keeps them in ``state_dtype``. A deviation from the official
      code, whose states are bf16 (spec §1).
    sparse_momentum: the density in (0, 1] of the sparse params' masks;
      ``None`` (default) is dense SPAM. 1.0 is dense SPAM too (every
      official script), with all-True masks.
    sparse_mask: which params are sparse: a pytree of bools with the
      params' structure or a callable ``params -> pytree``; default every
      2-D param. (The official choice is the attention and MLP linears:
      ``jqlm.models.block_linear_mask``.)
    sparse_key: a PRNG key (or an int seed) for the masks.

  Returns:
    An ``optax.GradientTransformation`` with :class:`SpamState`.
  """
  _base.check_beta("b1", b1)
  _base.check_beta("b2", b2)
  _base.check("eps", eps, lambda v: v >= 0, ">= 0")
  _base.check("spike_threshold", spike_threshold, lambda v: v >= 0, ">= 0",
              "Use 0 to disable spike clipping.")
  _base.check_interval("reset_interval", reset_interval)
  _base.check("warmup_steps", warmup_steps, lambda v: v >= 0 and v == int(v),
              "an int >= 0")
  _base.check("grace_steps", grace_steps, lambda v: v >= 0 and v == int(v),
              "an int >= 0")
  _base.check_state_dtype(state_dtype)
  squant = qstate.as_state_quant(state_quant)
  if sparse_momentum is not None:
    _base.check("sparse_momentum", sparse_momentum,
                lambda v: 0 < v <= 1, "a density in (0, 1]",
                "Use None for dense SPAM.")

  def init_fn(params):
    masks, key = None, None
    if sparse_momentum is not None:
      masks, key = init_sparse_masks(params, sparse_momentum, sparse_mask,
                                     sparse_key)
    return _base.follow_params(SpamState(
      count=jnp.zeros((), jnp.int32),
      mu=qstate.init_moments(params, squant, True, state_dtype),
      nu=qstate.init_moments(params, squant, False, state_dtype),
      spike_count=_base.count_tree(params),
      warmup_factor=jnp.ones((), jnp.float32),
      masks=masks, mask_key=key,
    ), params)

  def update_fn(updates, state, params=None):
    del params
    t = state.count + 1
    if state.masks is not None:
      updates = jax.tree.map(_apply_mask, updates, state.masks)
    reset, in_window = spam_schedule(state.count, reset_interval, grace_steps)
    clip_on = (jnp.asarray(spike_threshold) != 0) & in_window
    factor = spam_warmup_factor(state.count, reset_interval, warmup_steps)

    def leaf(g_in, m_in, v_in):
      cdt = _base.compute_dtype(g_in.dtype)
      b1_, b2_ = _base.hp(b1, cdt), _base.hp(b2, cdt)
      keep = jnp.where(reset, 0.0, 1.0).astype(cdt)  # momentum reset
      threshold = jnp.where(
        clip_on, _base.hp(spike_threshold, cdt) * keep, jnp.inf).astype(cdt)
      # The second moment first: v' = b2 v + (1 - b2) min(g^2, theta v).
      # Float moments carry the spike flags in v's sign bits (SpamState);
      # quantized ones count the spikes in this update instead.
      flag = track_spikes and not isinstance(v_in, qstate.QuantizedMoment)
      g_sq, v_old, spike = clipped_grad_sq(g_in, v_in, threshold, cdt, flag)
      v = b2_ * v_old * keep + (1 - b2_) * g_sq
      if flag:  # -0.0 flags a clipped zero moment
        v_out = qstate.store(jnp.where(spike, -v, v), v_in)
        # Everything after reads the stored moment (one materialised
        # buffer, updated in place) rather than recomputing v from v_in.
        v = jnp.abs(v_out).astype(cdt)
      else:
        v_out = qstate.store(v, v_in)
      # Then the clipped gradient from v' instead of v (spike_clip_from_new):
      # the same values up to rounding, but the old v is read by one loop
      # only, so XLA updates the donated buffer in place (no copy of v).
      g, n_spikes = spike_clip_from_new(
        g_in, v, threshold, b2_, cdt, track_spikes and not flag)
      m = b1_ * qstate.load(m_in, cdt) * keep + (1 - b1_) * g
      tf = t.astype(cdt)
      step = jnp.sqrt(1 - b2_**tf) / (1 - b1_**tf)
      f = spam_warmup_factor(state.count, reset_interval, warmup_steps, cdt)
      u = (f * step) * m / (jnp.sqrt(v) + _base.hp(eps, cdt))
      return (u.astype(g_in.dtype), qstate.store(m, m_in), v_out, n_spikes)

    u, m, v, spikes = _base.map_n(leaf, updates, state.mu, state.nu, n=4,
                                  elementwise=True)
    masks, key = state.masks, state.mask_key
    if masks is not None:
      u = jax.tree.map(_apply_mask, u, masks)
      if reset_interval is not None:
        masks = jax.lax.cond(
          (t + 1) % jnp.asarray(reset_interval, jnp.int32) == 0,
          lambda: redraw_sparse_masks(masks, key, t, sparse_momentum),
          lambda: masks)
    return u, SpamState(count=optax.safe_increment(state.count), mu=m, nu=v,
                        spike_count=spikes, warmup_factor=factor,
                        masks=masks, mask_key=key)

  return optax.GradientTransformation(init_fn, update_fn)


def spam(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  weight_decay: float = 0.0,
  *,
  spike_threshold: float = 5000.0,
  reset_interval: int | None = 500,
  warmup_steps: int = 150,
  grace_steps: int = 20,
  state_dtype=None,
  track_spikes: bool = True,
  state_quant: qstate.StateQuant | int | None = None,
  sparse_momentum: float | None = None,
  sparse_mask: Any = None,
  sparse_key: jax.Array | int = 0,
) -> optax.GradientTransformation:
  r"""The SPAM optimizer, equal step for step to the official ``SPAM``.

  ``chain(scale_by_spam(...), scale_by_learning_rate_post_decay(lr, wd))``:
  :math:`p \leftarrow p - \eta u`, then :math:`p \leftarrow p - \eta\lambda
  p` (spec §2.2). Use with ``optax.apply_updates``.

  SPAM cannot be written as a chain of jqlm's composable pieces
  (:func:`jqlm.optim.clip_spikes`, :func:`jqlm.optim.reset_momentum`) around
  ``optax.scale_by_adam`` exactly: optax's epsilon is torch-style while SPAM's
  is HF-style, and the weight decay acts on the post-update params. With
  ``eps -> 0`` and no weight decay the chain does reproduce it (tested).

  Args:
    learning_rate: a float or an optax schedule (the official runs use
      linear warmup then cosine to 0.1x; spec §1).
    b1, b2, eps, spike_threshold, reset_interval, warmup_steps, grace_steps,
      state_dtype, track_spikes, state_quant, sparse_momentum, sparse_mask,
      sparse_key: see :func:`scale_by_spam`.
    weight_decay: decoupled weight decay, applied after the update (not to
      the sparse params with ``sparse_momentum``, as the official code).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jqlm.optim import spam
    >>> opt = spam(1e-3, reset_interval=500, warmup_steps=150)
    >>> params = {"w": jnp.ones((4, 4))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((4, 4))}, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Huang et al., `SPAM <https://arxiv.org/abs/2501.06842>`_, ICLR 2025.
  """
  return optax.chain(
    scale_by_spam(
      b1, b2, eps, spike_threshold=spike_threshold,
      reset_interval=reset_interval, warmup_steps=warmup_steps,
      grace_steps=grace_steps, state_dtype=state_dtype,
      track_spikes=track_spikes, state_quant=state_quant,
      sparse_momentum=sparse_momentum, sparse_mask=sparse_mask,
      sparse_key=sparse_key,
    ),
    scale_by_learning_rate_post_decay(
      learning_rate, weight_decay,
      decay_mask=None if sparse_momentum is None else (
        lambda params: jax.tree.map(
          lambda f: not f, _sparse_selection(params, sparse_mask)))),
  )
