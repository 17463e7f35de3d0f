r"""Adam / AdamW with both epsilon conventions and optional low-bit states.

.. math::
   m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
   v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

* ``eps_style="torch"`` (torch ``AdamW``, bitsandbytes, optax
  ``scale_by_adam``): :math:`u_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon)`
  with :math:`\hat m_t = m_t / (1-\beta_1^t)`, :math:`\hat v_t = v_t /
  (1-\beta_2^t)`.
* ``eps_style="hf"`` (HF ``AdamW``, GaLore-AdamW, SPAM; spec §1, §4.2):
  :math:`u_t = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, m_t / (\sqrt{v_t} +
  \epsilon)`, i.e. torch style with a time-varying
  :math:`\epsilon_t = \epsilon / \sqrt{1-\beta_2^t}`.

With ``state_quant`` both moments are stored block-wise quantized (8-bit
dynamic-tree codes in blocks of 256, or 4-bit in blocks of 128; see
:mod:`jqlm.optim.qstate`): they are dequantized, updated and re-quantized
inside the jitted update, as bitsandbytes' ``AdamW8bit`` and torchao's
``AdamW4bit`` do (Dettmers et al., arXiv 2110.02861; Li et al., arXiv
2309.01507). optax offers only ``mu_dtype``.

References:
  Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_;
  Loshchilov & Hutter, `AdamW <https://arxiv.org/abs/1711.05101>`_.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlm.optim import _base, qstate
from jqlm.optim._lr import scale_by_learning_rate_post_decay


class EpsStyle(enum.Enum):
  """Where Adam's epsilon goes (see the module docstring)."""

  TORCH = "torch"
  HF = "hf"


class ScaleByAdamState(NamedTuple):
  """State of :func:`scale_by_adam`.

  Attributes:
    count: number of updates so far (int32).
    mu: first moments: arrays (``state_dtype``) or
      :class:`jqlm.optim.QuantizedMoment`.
    nu: second moments, likewise.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def _eps_style(value) -> EpsStyle:
  try:
    return EpsStyle(value)
  except ValueError:
    raise ValueError(
      f"eps_style must be one of {[e.value for e in EpsStyle]}, got "
      f"{value!r}.") from None


def scale_by_adam(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  *,
  eps_style: EpsStyle | str = EpsStyle.TORCH,
  state_dtype=None,
  state_quant: qstate.StateQuant | int | None = None,
) -> optax.GradientTransformation:
  """Adam preconditioning (no learning rate); math in the module docstring.

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: epsilon, placed according to ``eps_style``.
    eps_style: ``"torch"`` (optax, torch, bitsandbytes) or ``"hf"``
      (GaLore-AdamW, SPAM).
    state_dtype: dtype of float moments; default the params' dtype (float32
      for the small tensors that ``state_quant`` leaves unquantized).
    state_quant: :class:`jqlm.optim.StateQuant`, ``8`` or ``4`` for
      block-wise quantized moments; ``None`` for float moments.

  Returns:
    An ``optax.GradientTransformation`` with :class:`ScaleByAdamState`.
    Updates have the gradients' dtype; the math runs in float32 (float64 for
    float64 inputs).
  """
  _base.check_beta("b1", b1)
  _base.check_beta("b2", b2)
  _base.check("eps", eps, lambda v: v >= 0, ">= 0")
  _base.check_state_dtype(state_dtype)
  style = _eps_style(eps_style)
  squant = qstate.as_state_quant(state_quant)

  def init_fn(params):
    return _base.follow_params(ScaleByAdamState(
      count=jnp.zeros((), jnp.int32),
      mu=qstate.init_moments(params, squant, True, state_dtype),
      nu=qstate.init_moments(params, squant, False, state_dtype),
    ), params)

  def update_fn(updates, state, params=None):
    del params
    t = optax.safe_increment(state.count)

    def leaf(g_in, m_in, v_in):
      cdt = _base.compute_dtype(g_in.dtype)
      b1_, b2_ = _base.hp(b1, cdt), _base.hp(b2, cdt)
      eps_ = _base.hp(eps, cdt)
      g = g_in.astype(cdt)
      m = b1_ * qstate.load(m_in, cdt) + (1 - b1_) * g
      v = b2_ * qstate.load(v_in, cdt) + (1 - b2_) * g * g
      tf = t.astype(cdt)
      bc1, bc2 = 1 - b1_**tf, 1 - b2_**tf
      if style is EpsStyle.HF:
        u = (jnp.sqrt(bc2) / bc1) * m / (jnp.sqrt(v) + eps_)
      else:
        u = (m / bc1) / (jnp.sqrt(v / bc2) + eps_)
      return u.astype(g_in.dtype), qstate.store(m, m_in), qstate.store(v, v_in)

    u, m, v = _base.map_n(leaf, updates, state.mu, state.nu, n=3,
                          elementwise=True)
    return u, ScaleByAdamState(count=t, mu=m, nu=v)

  return optax.GradientTransformation(init_fn, update_fn)


def adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  *,
  eps_style: EpsStyle | str = EpsStyle.TORCH,
  state_dtype=None,
  state_quant: qstate.StateQuant | int | None = None,
) -> optax.GradientTransformation:
  r"""AdamW with optional 8-bit / 4-bit states.

  ``chain(scale_by_adam(...), scale_by_learning_rate_post_decay(lr, wd))``:
  :math:`p \leftarrow p - \eta u`, then :math:`p \leftarrow p(1 - \eta
  \lambda)`, the order of bitsandbytes' 8-bit kernels and GaLore-AdamW (spec
  §4.2, §5.4). (torch's ``AdamW`` and optax's ``adamw`` decay the
  pre-update params; the two differ by :math:`\eta^2\lambda u`.)

  ``adamw(lr, b2=0.95, state_quant=8)`` is Q-GaLore's optimizer for its
  non-projected params (bitsandbytes ``AdamW8bit``, spec §5.4; blocks of 256
  as in bitsandbytes >= 0.44, not 0.43's 2048).

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, eps_style, state_dtype, state_quant: see
      :func:`scale_by_adam`.
    weight_decay: decoupled weight decay, applied after the update.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jqlm.optim import adamw
    >>> opt = adamw(1e-3, state_quant=8)  # 8-bit states
    >>> params = {"w": jnp.ones((64, 128))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones((64, 128))}, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return optax.chain(
    scale_by_adam(b1, b2, eps, eps_style=eps_style, state_dtype=state_dtype,
                  state_quant=state_quant),
    scale_by_learning_rate_post_decay(learning_rate, weight_decay),
  )
