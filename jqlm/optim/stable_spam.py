r"""Stable-SPAM (arXiv 2502.17055): AdaClip + AdaGN + momentum reset.

Faithful to the official code (``TianjinYellow/StableSPAM``,
``galore_torch/stablespam.py`` @ 6a66da1) as specified in
``../shared/spec/optimizers.md`` §3. At update :math:`t` (with a counter
:math:`k` that restarts at each reset), for every tensor separately:

.. math::

  &s_t = \eta_{min} + (1 - \eta_{min}) (1 + \cos(\pi t / (T + 1))) / 2
    \quad (1 \text{ without } T) \\
  &\textbf{AdaClip: } m_{max} \leftarrow \gamma_3 m_{max}
    + (1 - \gamma_3) \max|g|, \quad \hat T = m_{max} / (1 - \gamma_3^k),
    \quad g_i \leftarrow g_i \hat T / \max|g| \text{ where } |g_i| > \hat T \\
  &\textbf{AdaGN: } n = \|g\|_2, \; \gamma_1' = \gamma_1 s_t, \;
    m_n \leftarrow \gamma_1' m_n + (1 - \gamma_1') n, \;
    v_n \leftarrow \gamma_2 v_n + (1 - \gamma_2) n^2 \\
  &\qquad c = \frac{m_n / (1 - \gamma_1'^k)}{\sqrt{v_n / (1 - \gamma_2^k)}
    + \epsilon}, \quad g \leftarrow g \, c / n \;\; (n > 0) \\
  &\textbf{Adam: } \beta_1' = \beta_1 s_t, \;
    m \leftarrow \beta_1' m + (1 - \beta_1') g, \;
    v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \;
    u = \frac{m / (1 - \beta_1'^k)}{\sqrt{v} / \sqrt{1 - \beta_2^k}
    + \epsilon}

Every ``reset_interval`` updates (:math:`t \bmod \Delta T = 0`) the moments
are reset *with the official code's aliasing* (quirk 1, §3.2): the update of
the reset step uses the old moments continued by one EMA step but bias
corrected with :math:`k = 1`; the stored moments become zeros and the next
update runs with :math:`k = 2`. The AdaClip/AdaGN bias corrections use the
same restarting :math:`k` while their EMAs are never reset (quirk 2), so
clipping is nearly off for a while after a reset. Epsilon is torch-style (as
``optax.scale_by_adam``). ``stable_spam`` applies torch-AdamW weight decay
*before* the update (:math:`p \leftarrow p (1 - \eta\lambda)`), i.e.
``optax.add_decayed_weights`` then ``scale_by_learning_rate``.

Deviations from the official code:

* One counter :math:`k` serves all tensors. The official code keeps one per
  tensor, but all tensors are stepped and reset together, so they are
  always equal.
* After an aliased reset step the stored moments are zeroed lazily, at the
  start of the next update (``StableSpamState.reset_pending``): every update
  is the official one, but a state saved right after a reset step holds the
  pre-reset moments plus the flag instead of zeros.
* ``reset_on_step="before"`` offers the non-aliased variant (reset, then
  update with :math:`k = 1` on zero moments); the default ``"aliased"`` is
  the official behaviour.
* Arithmetic runs in float32 (float64 for float64 inputs); the moments are
  stored in ``state_dtype`` (default the params' dtype) and the per-tensor
  statistics in float32 (float64 for float64 params; the official pure-bf16
  runs keep them in bf16).

Stable-SPAM cannot be written as a chain of :func:`jqlm.optim.ada_clip`,
:func:`jqlm.optim.ada_gn` and :func:`jqlm.optim.reset_momentum` around
``optax.scale_by_adam``: the reset aliasing needs the moments before and
after the reset in one update, and the statistics' counter restarts with the
moments. Until the first reset (and without ``total_steps``) the chain is
exact (tested).

References:
  Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
  Adam <https://arxiv.org/abs/2502.17055>`_, 2025.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlm.optim import _base, qstate


class ResetMode(enum.Enum):
  """How Stable-SPAM's momentum reset interacts with the reset step's update.

  * ``ALIASED``: the official behaviour (spec §3.2 quirk 1).
  * ``BEFORE``: reset first, then update the zeroed moments with k = 1.
  """

  ALIASED = "aliased"
  BEFORE = "before"


class StableSpamState(NamedTuple):
  """State of :func:`scale_by_stable_spam`.

  Attributes:
    count: int32 number of updates done (``t - 1``).
    k: int32 bias-correction counter; restarts at 1 on a reset step.
    mu: first moments (``state_dtype``).
    nu: second moments (``state_dtype``).
    max_ema: per-leaf AdaClip EMA of ``max|g|`` (float32 scalars).
    norm_ema: per-leaf AdaGN EMA of ``||g||`` (float32 scalars).
    norm_sq_ema: per-leaf AdaGN EMA of ``||g||^2`` (float32 scalars).
      (The scalars are float64 for float64 params.)
    spike_count: per-leaf int32 number of elements above the AdaClip
      threshold in the last update.
    reset_pending: bool; the last update was an aliased reset step, so the
      moments are zeroed at the start of the next update. (Right after a
      reset step the official optimizer holds zeros already; the next
      update's result is the same.)
  """

  count: jax.Array
  k: jax.Array
  reset_pending: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  max_ema: optax.Updates
  norm_ema: optax.Updates
  norm_sq_ema: optax.Updates
  spike_count: optax.Updates


def stable_spam_scale(
  count: jax.Array,
  total_steps: int | None,
  eta_min: float = 0.5,
  dtype=jnp.float32,
) -> jax.Array:
  r"""The :math:`\beta_1, \gamma_1` scale :math:`s_t` at update ``count+1``.

  :math:`s_t = \eta_{min} + (1 - \eta_{min})(1 + \cos(\pi t/(T+1)))/2`, not
  clamped past :math:`T` (spec §3.1); 1 when ``total_steps`` is None.
  """
  if total_steps is None:
    return jnp.ones((), dtype)
  t = jnp.asarray(count).astype(dtype) + 1.0
  tt = jnp.asarray(total_steps).astype(dtype)
  e = jnp.asarray(eta_min).astype(dtype)
  return e + (1.0 - e) * (1.0 + jnp.cos(math.pi * t / (tt + 1.0))) / 2.0


def ada_clip_tensor(g_in, max_ema, gamma, k, cdt):
  r"""Stable-SPAM's AdaClip of one tensor (spec §3.2).

  :math:`m \leftarrow \gamma m + (1-\gamma)\max|g|`,
  :math:`\hat T = m / (1 - \gamma^k)`, and :math:`g_i \leftarrow g_i \hat T
  / \max|g|` where :math:`|g_i| > \hat T`.

  Returns:
    ``(g_clipped, new_max_ema, ||g_clipped||^2, spikes)`` in ``cdt`` (spikes
    int32). The squared norm (AdaGN needs it next) and the spike count take
    one pass over the raw gradient: a plain sum of squares when
    ``max|g| <= T`` (nothing is clipped), else one fused reduction.
  """
  gmax = _base.max_abs(g_in).astype(cdt)
  max_ema = gamma * max_ema.astype(cdt) + (1 - gamma) * gmax
  thr = max_ema / (1 - gamma**k)
  ratio = thr / jnp.where(gmax > 0, gmax, 1.0)

  def clip(x, thr, ratio):
    x = x.astype(cdt)
    spike = jnp.abs(x) > thr
    return jnp.where(spike, x * ratio, x), spike

  def norm_terms(x, thr, ratio):
    xc, spike = clip(x, thr, ratio)
    return xc * xc, spike

  def with_spikes(x, thr, ratio):
    return _base.fused_sums(norm_terms, (x,), (thr, ratio),
                            out_dtypes=(cdt, jnp.int32))

  def without_spikes(x, thr, ratio):
    del thr, ratio  # |x| <= max|x| <= thr: nothing is clipped
    x = x.astype(cdt)
    return jnp.sum(x * x), jnp.zeros((), jnp.int32)

  # Only a step whose max exceeds the threshold clips anything; the others
  # need a plain sum of squares, which XLA fuses into one fast reduction.
  n_sq, spikes = jax.lax.cond(gmax > thr, with_spikes, without_spikes,
                              g_in, thr, ratio)
  g, _ = clip(g_in, thr, ratio)
  return g, max_ema, n_sq, spikes


def scale_by_stable_spam(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  *,
  gamma1: float = 0.7,
  gamma2: float = 0.9,
  gamma3: float = 0.999,
  reset_interval: int | None = 1000,
  total_steps: int | None = None,
  eta_min: float = 0.5,
  reset_on_step: ResetMode | str = ResetMode.ALIASED,
  state_dtype=None,
  state_quant: qstate.StateQuant | int | None = None,
) -> optax.GradientTransformation:
  """Stable-SPAM preconditioning (spec §3.2); math in the module docstring.

  Args:
    b1: first-moment decay (scaled by :math:`s_t` when ``total_steps`` is
      set).
    b2: second-moment decay.
    eps: torch-style epsilon (also used by AdaGN).
    gamma1: AdaGN norm-EMA decay (scaled by :math:`s_t`). The official
      ``gamma1 == -1`` sentinel for "use b1" is not supported: pass b1.
    gamma2: AdaGN squared-norm EMA decay.
    gamma3: AdaClip max EMA decay (``theta`` in older official code).
    reset_interval: :math:`\\Delta T` (the official ``update_proj_gap``);
      ``None`` never resets.
    total_steps: T of the cosine scale on b1 and gamma1 (the official
      ``total_T``); ``None`` disables the scale.
    eta_min: the scale's floor (the official ``eta``).
    reset_on_step: ``"aliased"`` (official, default) or ``"before"``.
    state_dtype: dtype of the moments; default the params' dtype.
    state_quant: store both moments block-wise quantized
      (:class:`jqlm.optim.StateQuant`, or ``8`` / ``4``); ``None`` keeps
      them in ``state_dtype``. A deviation from the official bf16 states.
  """
  squant = qstate.as_state_quant(state_quant)
  for name, value in (("b1", b1), ("b2", b2), ("gamma1", gamma1),
                      ("gamma2", gamma2), ("gamma3", gamma3)):
    _base.check_beta(name, value)
  _base.check("eps", eps, lambda v: v >= 0, ">= 0")
  _base.check_interval("reset_interval", reset_interval)
  _base.check_interval("total_steps", total_steps)
  _base.check("eta_min", eta_min, lambda v: 0 <= v <= 1, "in [0, 1]")
  _base.check_state_dtype(state_dtype)
  try:
    mode = ResetMode(reset_on_step)
  except ValueError:
    raise ValueError(
      f"`reset_on_step` must be one of {[m.value for m in ResetMode]}, got "
      f"{reset_on_step!r}."
    ) from None

  def init_fn(params):
    return _base.follow_params(StableSpamState(
      count=jnp.zeros((), jnp.int32),
      k=jnp.zeros((), jnp.int32),
      reset_pending=jnp.zeros((), bool),
      mu=qstate.init_moments(params, squant, True, state_dtype),
      nu=qstate.init_moments(params, squant, False, state_dtype),
      max_ema=_base.scalar_tree(params),
      norm_ema=_base.scalar_tree(params),
      norm_sq_ema=_base.scalar_tree(params),
      spike_count=_base.count_tree(params),
    ), params)

  def update_fn(updates, state, params=None):
    del params
    t = state.count + 1
    k_stat = state.k + 1
    if reset_interval is None:
      reset = jnp.zeros((), bool)
    else:
      reset = t % jnp.asarray(reset_interval).astype(jnp.int32) == 0
    k_adam = jnp.where(reset, 1, k_stat)

    def leaf(g_in, m_in, v_in, mmax, mn, vn):
      cdt = _base.compute_dtype(g_in.dtype)
      sdt = mmax.dtype
      sc = stable_spam_scale(state.count, total_steps, eta_min, cdt)
      ks, ka = k_stat.astype(cdt), k_adam.astype(cdt)
      g, mmax, n_sq, n_spikes = ada_clip_tensor(
        g_in, mmax, _base.hp(gamma3, cdt), ks, cdt)
      n = jnp.sqrt(n_sq)
      g1 = _base.hp(gamma1, cdt) * sc
      g2 = _base.hp(gamma2, cdt)
      mn = g1 * mn.astype(cdt) + (1 - g1) * n
      vn = g2 * vn.astype(cdt) + (1 - g2) * n * n
      e = _base.hp(eps, cdt)
      c = (mn / (1 - g1**ks)) / (jnp.sqrt(vn / (1 - g2**ks)) + e)
      g = g * jnp.where(n > 0, c / jnp.where(n > 0, n, 1.0), 1.0)
      # Adam with the momentum reset. ALIASED (official): the reset step's
      # update continues the old moments with k = 1 and the moments are
      # zeroed after it. jqlm zeroes them lazily, at the start of the next
      # update (``reset_pending``): the trajectory is identical, and the
      # stored moments are then exactly the ones the update used, so XLA
      # fuses the update like Adam's, without copying donated buffers.
      if mode is ResetMode.BEFORE:
        keep = jnp.where(reset, 0.0, 1.0).astype(cdt)
      else:
        keep = jnp.where(state.reset_pending, 0.0, 1.0).astype(cdt)
      m = qstate.load(m_in, cdt) * keep
      v = qstate.load(v_in, cdt) * keep
      b1_ = _base.hp(b1, cdt) * sc
      b2_ = _base.hp(b2, cdt)
      m = b1_ * m + (1 - b1_) * g
      v = b2_ * v + (1 - b2_) * g * g
      bc1, bc2 = 1 - b1_**ka, 1 - b2_**ka
      u = (m / bc1) / (jnp.sqrt(v) / jnp.sqrt(bc2) + e)
      return (u.astype(g_in.dtype), qstate.store(m, m_in), qstate.store(v, v_in),
              mmax.astype(sdt), mn.astype(sdt), vn.astype(sdt), n_spikes)

    u, m, v, mmax, mn, vn, spikes = _base.map_n(
      leaf, updates, state.mu, state.nu, state.max_ema, state.norm_ema,
      state.norm_sq_ema, n=7,
    )
    return u, StableSpamState(
      count=optax.safe_increment(state.count),
      k=jnp.where(reset, 1, k_stat).astype(jnp.int32),
      mu=m, nu=v, max_ema=mmax, norm_ema=mn, norm_sq_ema=vn,
      spike_count=spikes,
      reset_pending=reset & (mode is ResetMode.ALIASED),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def stable_spam(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  *,
  gamma1: float = 0.7,
  gamma2: float = 0.9,
  gamma3: float = 0.999,
  reset_interval: int | None = 1000,
  total_steps: int | None = None,
  eta_min: float = 0.5,
  reset_on_step: ResetMode | str = ResetMode.ALIASED,
  state_dtype=None,
  state_quant: qstate.StateQuant | int | None = None,
) -> optax.GradientTransformation:
  r"""The Stable-SPAM optimizer, equal step for step to the official one.

  ``chain(scale_by_stable_spam(...), add_decayed_weights(wd),
  scale_by_learning_rate(lr))``: torch-AdamW decay
  :math:`p \leftarrow p(1 - \eta\lambda)` before the update (spec §3.2).

  The official settings (spec §3.3): INT4/FP4 350M: ``lr=4e-4, gamma1=0.7,
  gamma2=0.9, gamma3=0.999, reset_interval=500, total_steps=20000``; BF16
  130M: ``lr=8e-4, gamma1=0.85, gamma2=0.99999, reset_interval=1000,
  total_steps=20000``. Other arguments: see :func:`scale_by_stable_spam`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jqlm.optim import stable_spam
    >>> opt = stable_spam(4e-4, reset_interval=500, total_steps=20_000)
    >>> params = {"w": jnp.ones((4, 4))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((4, 4))}, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Huang et al., `Stable-SPAM <https://arxiv.org/abs/2502.17055>`_, 2025.
  """
  _base.check_learning_rate(learning_rate)
  _base.check("weight_decay", weight_decay, lambda v: v >= 0, ">= 0")
  return optax.chain(
    scale_by_stable_spam(
      b1, b2, eps, gamma1=gamma1, gamma2=gamma2, gamma3=gamma3,
      reset_interval=reset_interval, total_steps=total_steps,
      eta_min=eta_min, reset_on_step=reset_on_step, state_dtype=state_dtype,
      state_quant=state_quant,
    ),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
