r"""GaLore: an optimizer that runs in a low-rank gradient subspace.

Zhao et al., ICML 2024, `arXiv 2403.03507
<https://arxiv.org/abs/2403.03507>`_; spec §4. Every ``update_proj_gap``
updates (at :math:`t = 1, \text{gap}+1, \dots`), a projected kernel's
gradient :math:`G` is decomposed by a float32 SVD and its top-:math:`r`
singular vectors :math:`P` kept. Between refreshes the inner optimizer (Adam
with HF-style epsilon by default, as ``GaLoreAdamW``) runs on the projected
gradient and its update is projected back, times ``scale``:

.. math:: R = P^\top G \;\text{(or } G P\text{)}, \qquad
          \Delta W = \alpha\, P\, \mathrm{inner}(R) \;\text{(or }
          \alpha\,\mathrm{inner}(R)\, P^\top\text{)}.

The **smaller** dimension is reduced (``proj_type="std"``), as in the official
code. In Flax kernel coordinates :math:`K = W^\top \in \mathbb{R}^{in \times
out}`: when ``in <= out`` (a tie reduces the in-features, like torch's
``m >= n``) :math:`P = U_{:, :r}` of :math:`\nabla K` (in, r) and the moments
are (r, out); otherwise :math:`P = V_{:, :r}` (out, r) and the moments are
(in, r). ``optax.contrib.galore`` reduces the *larger* dimension instead
(spec §4.3). Moments carry over across refreshes (official behaviour; the
old-basis moments meet the new basis).

Which kernels are projected is the caller's choice, given as ``mask=``: for
jqlm's LLaMA, :func:`jqlm.models.block_linear_mask` (the official q, k, v,
o, gate, up and down kernels; spec §1). There is no default: the model
defines its block linears once.

The projector (shared with Q-GaLore, :mod:`jqlm.optim.qgalore`) lives in
the private ``jqlm.optim._projector``; its state types
(:class:`GaLoreState`, :class:`ProjectorState`, :class:`ProjType`) and
:func:`projector_gaps` are re-exported here and from :mod:`jqlm.optim`.

Deviations from the official code, all numerical-precision only: the
projections and the inner optimizer compute in float32 (the official code in
the gradient dtype, bf16 in training). SVD signs are those of XLA's SVD,
which can differ from torch's; they matter across refreshes (spec §4.3).
"""

from __future__ import annotations

from typing import Any

import optax

from jqlm.optim import qstate
from jqlm.optim._lr import scale_by_learning_rate_post_decay
from jqlm.optim._projector import (
  GaLoreState,
  ProjectorState,
  ProjType,
  galore_projector,
  projector_gaps,
)
from jqlm.optim.adam import scale_by_adam


def scale_by_galore(
  rank: int,
  *,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  proj_type: ProjType | str = ProjType.STD,
  inner: optax.GradientTransformation | None = None,
  mask: Any = None,
) -> optax.GradientTransformation:
  """GaLore projection around an inner transform (spec §4.1-4.3).

  Args:
    rank: :math:`r`, the subspace rank (must be smaller than the smallest
      dimension of every projected param).
    update_proj_gap: SVD refresh interval; refreshes at updates 1, gap+1, ...
    scale: :math:`\\alpha`, multiplies the back-projected update (the
      official ``galore_scale``; the official scripts use 0.25).
    proj_type: :class:`ProjType` (default ``"std"``: reduce the smaller
      dimension).
    inner: the transform run on the low-rank gradients (and, unprojected, on
      the other params); default Adam with HF-style epsilon 1e-6, as
      ``GaLoreAdamW``. Any moment-based transform works: optax's Adam
      family, :func:`jqlm.optim.scale_by_spam`,
      :func:`jqlm.optim.scale_by_stable_spam`,
      :func:`jqlm.optim.scale_by_adam` with ``state_quant``. It is called
      with ``params=None``: put weight decay outside (see :func:`galore`).
    mask: which 2-D params are projected (required): a pytree of bools with
      the params' structure, or a callable ``params -> pytree of bools``,
      e.g. :func:`jqlm.models.block_linear_mask` for jqlm's LLaMA. ``init``
      raises ValueError when it is ``None``.

  Returns:
    An ``optax.GradientTransformation`` with :class:`GaLoreState`.
    Shape-dependent checks (mask, rank) raise ValueError in ``init``.

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, ICML 2024.
  """
  return galore_projector(rank, update_proj_gap=update_proj_gap, scale=scale,
                          proj_type=proj_type, inner=inner, mask=mask)


def galore(
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
  proj_type: ProjType | str = ProjType.STD,
  inner: optax.GradientTransformation | None = None,
  state_quant: qstate.StateQuant | int | None = None,
) -> optax.GradientTransformation:
  r"""GaLore-AdamW, equal step for step to the official ``GaLoreAdamW``.

  Projected params follow spec §4.2; the others get the same Adam
  unprojected, as the official scripts' "regular" group. Weight decay is
  applied after the update, :math:`p \leftarrow p - \eta\lambda p` (spec
  §4.2).

  Args:
    learning_rate: a float or an optax schedule.
    rank: the subspace rank (official scripts: 128 for 60M, 256 for
      130M/350M, 1024 for 1B and 7B; spec §4.4).
    b1, b2, eps: the inner HF-style Adam (ignored when ``inner`` is given).
    weight_decay: decoupled, after the update.
    mask: the kernels to project (required; see :func:`scale_by_galore`):
      ``jqlm.models.block_linear_mask`` for jqlm's LLaMA.
    update_proj_gap, scale, proj_type, inner: see :func:`scale_by_galore`.
    state_quant: 8-bit / 4-bit inner Adam states (``None``: float).

  Under ``optax.inject_hyperparams`` list ``rank`` (and ``mask`` when it is
  a callable, ``state_quant`` when it is an int) in ``static_args``: they
  set array shapes.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jqlm.optim import galore
    >>> params = {"attn": {"q": jnp.ones((32, 32))}, "norm": jnp.ones(32)}
    >>> opt = galore(1e-2, rank=8, mask={"attn": {"q": True}, "norm": False})
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  if inner is None:
    inner = scale_by_adam(b1, b2, eps, eps_style="hf",
                          state_quant=state_quant)
  return optax.chain(
    scale_by_galore(rank, update_proj_gap=update_proj_gap, scale=scale,
                    proj_type=proj_type, inner=inner, mask=mask),
    scale_by_learning_rate_post_decay(learning_rate, weight_decay),
  )


__all__ = [
  "GaLoreState", "ProjType", "ProjectorState", "galore", "projector_gaps",
  "scale_by_galore",
]
