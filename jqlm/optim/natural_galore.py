r"""Natural GaLore: GaLore's low-rank gradients preconditioned by the inverse
empirical Fisher, through Woodbury's identity.

Das, `arXiv 2410.16029 <https://arxiv.org/abs/2410.16029>`_; spec §3.
Official code: ``selfsupervised-ai/Natural-GaLore @ e23336d``
(``code/natural_galore/subspace_adamw.py`` ``SubSpaceAdamW`` and
``galore_projector_tensor.py`` ``GaLoreProjectorTensor``,
``proj_type="natural_galore"``).

For a masked kernel with gradient :math:`G` at update :math:`t`:

.. math::
   R_t &= A^\top G_t B \in \mathbb{R}^{r \times r}, \qquad
   \mathbf{G} = [\,\mathrm{vec}(R_{t-s'+1}), \dots, \mathrm{vec}(R_t)\,],
   \quad s' = \min(t, s), \\
   \tilde r_t &= (\lambda I + \mathbf{G}\mathbf{G}^\top)^{-1}
     \mathrm{vec}(R_t)
   = \frac{\mathrm{vec}(R_t)}{\lambda}
     - \frac{\mathbf{G} z}{\lambda^2}, \qquad
   z = \Big(I + \frac{\mathbf{G}^\top \mathbf{G}}{\lambda}\Big)^{-1}
     \mathbf{G}^\top \mathrm{vec}(R_t), \\
   m_t &= \beta_1 m_{t-1} + (1-\beta_1) \tilde R_t, \qquad
   v_t = \beta_2 v_{t-1} + (1-\beta_2) \tilde R_t^2, \\
   W &\leftarrow W - \eta\, \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
     \alpha\, A \frac{m_t}{\sqrt{v_t} + \epsilon} B^\top, \qquad
   W \leftarrow W - \eta \lambda_{wd} W.

* **Projector: two-sided** (the official Tucker, spec §3.1), not GaLore's
  one-sided :math:`P`: :math:`A` and :math:`B` are the top-:math:`r` left
  and right singular vectors of :math:`G`, each column sign-flipped so its
  largest-|.| entry is positive (tensorly's ``svd_flip``), refreshed at
  :math:`t = 1 + j\cdot\text{gap}`; the moments are :math:`r \times r` and
  are not reset at refreshes. This is the shared GaLore projector
  (:func:`jqlm.optim._projector.galore_projector`) with ``two_sided=True``.
  In Flax kernel coordinates :math:`K = W^\top` (in, out), :math:`A` (in, r)
  is torch's :math:`V_r` and :math:`B` (out, r) torch's :math:`U_r`, so the
  low-rank gradient is the transpose of the official one; the Woodbury
  solve is invariant to that permutation of :math:`\mathrm{vec}(R)`.
* **History**: the pre-transform :math:`\mathrm{vec}(R)` of the last
  :math:`s` updates *including the current one*, a fixed ``(s, r*r)`` ring
  buffer per masked param (:class:`NaturalGradientState`). Unused rows are
  zero, which leaves :math:`\tilde r` unchanged (they add identity rows to
  :math:`I + \mathbf{G}^\top\mathbf{G}/\lambda`); the ring order is a
  column permutation of the official oldest-first :math:`\mathbf{G}`, to
  which the result is also invariant.
* **Unmasked params**: the same HF-style AdamW, unprojected and
  untransformed (the official "regular" group).

Constants (official defaults; spec §3.3): :math:`\beta = (0.9, 0.999)`,
:math:`\epsilon = 10^{-6}` (HF placement, ``correct_bias=True``),
:math:`s` = ``history`` = 20 (``natural_history``), :math:`\lambda` =
``damping`` = 1e-3 (hard-coded officially), ``update_proj_gap`` = 200,
:math:`\alpha` = ``scale`` = 0.25 (the scripts' ``galore_scale``; the
official class default is 1.0); weight decay after the update. The scripts
use lr 0.01, rank 128 (60M, wd 0.01) or 256 (130M, 350M).

Quirks of the official code kept (spec §3.4, §7 quirk 3): no :math:`1/s` in
the Fisher (the paper's :math:`\hat F` has one); :math:`s` columns with the
current gradient among them (the paper's :math:`\mathbf{G}` has
:math:`s + 1`); the history is never cleared, neither at factor refreshes
(up to :math:`s - 1` old-basis vectors stay) nor ever; the current direction
is strongly damped (for :math:`s = 1`, :math:`\tilde r = r / (\lambda +
\|r\|^2)`), which Adam's normalisation mostly undoes; and the official
order of operations, :math:`r/\lambda - \mathbf{G}z/\lambda^2`, which
cancels (:math:`r` is a column of :math:`\mathbf{G}`): its relative rounding
error grows like :math:`\|\mathbf{G}\|^2 / \lambda` times the unit
roundoff, so float32 results depend on summation order (7e-5 relative
between a sharded and an unsharded run of an 8x6 parabola; a larger
``damping`` shrinks it).

Deviations from the official code:

* The factors come from one SVD (XLA's) plus tensorly's sign rule, not
  tensorly's HOOI started from an SVD; for a matrix HOOI's fixed point is
  that SVD, and the two agree to ~1e-5 in float32 (8.4e-6 measured; spec,
  "Verified against the official code"). The sign rule is kept. The SVD
  runs in float32, or float64 for float64 grads (officially always
  float32); the factors are cast to the grad dtype as officially.
* The projections, the Woodbury solve and Adam compute in float32 (float64
  for float64 inputs), the official code in the grad dtype. The history is
  stored in the param's dtype, like the moments (officially the grad dtype;
  both float32 under the scripts' ``bf16-mixed``), and the current
  :math:`r` enters the solve as stored, so that it cancels exactly against
  its own history row.
* ``rank`` may equal but not exceed the smallest dimension of a masked
  kernel: ``init`` raises ValueError. (Officially tensorly warns and pads
  the factors with *random* columns, ``_complete_factor``, which is not
  reproducible.)
* ``history=0`` turns the natural-gradient transform off: the official
  ``proj_type="galore"`` of ``GaLoreProjectorTensor`` (two-sided GaLore).
  (Officially ``natural_history=0`` with ``"natural_galore"`` fails.)
* Rank > 2 tensors (officially a full Tucker) are refused by the mask.
* The ``online_*`` projector types are not implemented.

The reference transcription and parity tests are
``tests/optim/reference_natural_galore.py`` and
``tests/optim/test_natural_galore.py``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlm.optim import _base
from jqlm.optim._lr import scale_by_learning_rate_post_decay
from jqlm.optim._projector import (
  GaLoreState,
  ProjectorState,
  ProjType,
  galore_projector,
  resolve_mask,
)
from jqlm.optim.adam import scale_by_adam

_WHO = "Natural GaLore"


class NaturalGradientState(NamedTuple):
  """State of the natural-gradient transform (inside
  :class:`GaLoreState`'s ``inner`` chain, before the Adam state).

  Attributes:
    count: gradients pushed so far, folded into ``[0, 2s)`` so that it
      never overflows: ``min(count, s)`` rows of each history are filled
      and the next one goes to row ``count % s`` (int32).
    history: per masked param, the ``(s, r*r)`` ring buffer of the last
      ``s`` pre-transform low-rank gradients :math:`\\mathrm{vec}(R)`
      (unused rows zero) in the param's dtype;
      ``optax.MaskedNode()`` elsewhere.
  """

  count: jax.Array
  history: Any


def natural_gradient(r: jax.Array, history: jax.Array,
                     damping: Any = 1e-3) -> jax.Array:
  r"""Woodbury's :math:`(\lambda I + \mathbf{G}\mathbf{G}^\top)^{-1} r`.

  .. math:: \tilde r = r / \lambda - \mathbf{G} z / \lambda^2, \qquad
            z = \mathrm{cho\_solve}\big(\mathrm{chol}(I +
            \mathbf{G}^\top\mathbf{G}/\lambda), \mathbf{G}^\top r\big)

  in the official order of operations (``_natural_gradient_transform``).

  Args:
    r: the vector, shape ``(k,)``.
    history: :math:`\mathbf{G}^\top`, shape ``(s, k)``: one row per stored
      gradient (a zero row changes nothing), in ``r``'s dtype.
    damping: :math:`\lambda > 0`.

  Returns:
    :math:`\tilde r`, shape ``(k,)``, in ``r``'s dtype.
  """
  dt = r.dtype
  lam_inv = 1 / _base.hp(damping, dt)
  s = lam_inv * (history @ history.T) + jnp.eye(history.shape[0], dtype=dt)
  z = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(s, lower=True),
                                 history @ r)
  return lam_inv * r - (lam_inv * lam_inv) * (history.T @ z)


def _scale_by_natural_gradient(history: int, damping: Any,
                               mask: Any) -> optax.GradientTransformation:
  """The natural-gradient transform on the low-rank gradients of the
  masked params (:class:`NaturalGradientState`); the other leaves pass
  through. ``mask`` is resolved in ``init`` only: ``update`` follows the
  state's ``MaskedNode`` s."""

  def init_fn(params):
    m = resolve_mask(mask, params, _WHO)
    hist = jax.tree.map(
      lambda p, on: jnp.zeros((history, p.size), p.dtype) if on else
      optax.MaskedNode(), params, m)
    return _base.follow_params(NaturalGradientState(
      count=jnp.zeros((), jnp.int32), history=hist), params)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    row = state.count % history
    out, hists = [], []
    for g, h in zip(leaves, treedef.flatten_up_to(state.history),
                    strict=True):
      if isinstance(h, optax.MaskedNode):
        out.append(g)
        hists.append(h)
        continue
      vec = g.reshape(-1).astype(h.dtype)
      h = h.at[row].set(vec)  # the history includes the current gradient
      # r as stored: it cancels against its own history row exactly
      cdt = _base.compute_dtype(h.dtype)
      out.append(natural_gradient(vec.astype(cdt), h.astype(cdt),
                                  damping).reshape(g.shape).astype(g.dtype))
      hists.append(h)
    count = state.count + 1
    count = jnp.where(count >= 2 * history, count - history, count)
    return treedef.unflatten(out), NaturalGradientState(
      count=count, history=treedef.unflatten(hists))

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_natural_galore(
  rank: int,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  history: int = 20,
  damping: float = 1e-3,
  mask: Any = None,
) -> optax.GradientTransformation:
  r"""Natural GaLore's preconditioning (no learning rate); math in the
  module docstring.

  Args:
    rank: :math:`r`: masked kernels get :math:`r \times r` moments and
      history rows of :math:`r^2`. At most the smallest dimension of every
      masked kernel (``init`` raises ValueError otherwise).
    b1, b2, eps: the HF-style Adam (epsilon outside the square root, bias
      correction folded into the step), for every param.
    update_proj_gap: SVD refresh interval; refreshes at updates 1, gap+1, ...
    scale: :math:`\alpha`, multiplies the back-projected update.
    history: :math:`s`, the low-rank gradients kept (the official
      ``natural_history``; the current one included). ``0`` turns the
      natural-gradient transform off (the official ``proj_type="galore"``:
      Adam on the two-sided projection).
    damping: :math:`\lambda` (officially hard-coded 1e-3).
    mask: which 2-D params are projected (required): a pytree of bools with
      the params' structure, or a callable ``params -> pytree of bools``,
      e.g. :func:`jqlm.models.block_linear_mask` for jqlm's LLaMA (the
      official attn / mlp linears). ``init`` raises ValueError when it is
      ``None``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`jqlm.optim.GaLoreState`: ``projector`` holds each masked
    kernel's :class:`jqlm.optim.ProjectorState` with ``proj = (A, B)``,
    ``(in, r)`` and ``(out, r)``; ``inner`` is ``(NaturalGradientState,
    ScaleByAdamState)`` (the Adam state alone when ``history=0``).

  References:
    Das, `Natural GaLore <https://arxiv.org/abs/2410.16029>`_, 2024.
  """
  _base.check_int("rank", rank)
  _base.check_int("history", history, lo=0)
  _base.check("damping", damping, lambda v: v > 0, "> 0",
              "The official value is 1e-3.")

  def build(m):
    inner = scale_by_adam(b1, b2, eps, eps_style="hf")
    if history:
      inner = optax.chain(_scale_by_natural_gradient(history, damping, m),
                          inner)
    return galore_projector(rank, update_proj_gap=update_proj_gap,
                            scale=scale, proj_type=ProjType.STD, inner=inner,
                            mask=m, who=_WHO, two_sided=True)

  # update() reads the projected params from the state, not from the mask.
  update_fn = build(None).update

  def init_fn(params):
    return build(resolve_mask(mask, params, _WHO)).init(params)

  return optax.GradientTransformation(init_fn, update_fn)


def natural_galore(
  learning_rate: optax.ScalarOrSchedule,
  rank: int,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  weight_decay: float = 0.0,
  mask: Any = None,
  *,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  history: int = 20,
  damping: float = 1e-3,
) -> optax.GradientTransformation:
  r"""Natural GaLore, equal step for step to the official ``SubSpaceAdamW``
  with ``proj_type="natural_galore"`` (spec §3).

  ``chain(scale_by_natural_galore(...),
  scale_by_learning_rate_post_decay(learning_rate, weight_decay))``:
  :math:`p \leftarrow p - \eta u`, then :math:`p \leftarrow p - \eta
  \lambda_{wd} p`, for every param, as the official code.

  Args:
    learning_rate: a float or an optax schedule (official scripts: 0.01).
    rank: the subspace rank (official scripts: 128 for 60M, 256 for
      130M/350M, 1024 for 1B).
    b1, b2, eps: the HF-style Adam.
    weight_decay: decoupled, after the update (official scripts: 0.01 for
      60M, else 0).
    mask: the kernels to project (required; see
      :func:`scale_by_natural_galore`).
    update_proj_gap, scale, history, damping: see
      :func:`scale_by_natural_galore`.

  Under ``optax.inject_hyperparams`` list ``rank`` and ``history`` (and
  ``mask`` when it is a callable) in ``static_args``: they set array shapes.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jqlm.optim.natural_galore import natural_galore
    >>> params = {"attn": {"q": jnp.ones((32, 32))}, "norm": jnp.ones(32)}
    >>> opt = natural_galore(1e-2, rank=8,
    ...                      mask={"attn": {"q": True}, "norm": False})
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return optax.chain(
    scale_by_natural_galore(rank, b1=b1, b2=b2, eps=eps,
                            update_proj_gap=update_proj_gap, scale=scale,
                            history=history, damping=damping, mask=mask),
    scale_by_learning_rate_post_decay(learning_rate, weight_decay),
  )


__all__ = [
  "GaLoreState", "NaturalGradientState", "ProjectorState", "natural_galore",
  "natural_gradient", "scale_by_natural_galore",
]
