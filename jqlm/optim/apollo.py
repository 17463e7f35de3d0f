r"""APOLLO and APOLLO-Mini: SGD-like memory, AdamW-level performance.

Zhu et al., MLSys 2025, `arXiv 2412.05270
<https://arxiv.org/abs/2412.05270>`_; official code ``zhuhanqing/APOLLO`` @
``76b3472`` (``apollo_torch/apollo.py``, ``random_projector.py``; the
optimizer files last changed in ``de6a69c``); spec ``optimizers_more.md``
§1. APOLLO runs Adam on a *random* projection of each kernel's gradient only
to estimate a per-channel (or per-tensor) scaling of the raw gradient, then
takes an SGD step with the scaled full-rank gradient.

In torch layout, for a gradient :math:`G_{mn}` (out, in) the smaller
dimension is projected with an i.i.d. Gaussian :math:`P \sim
\mathcal{N}(0, 1/r)` (no QR), redrawn at :math:`t = 1, \text{gap}+1,
2\,\text{gap}+1, \dots` without resetting the moments; :math:`m \ge n`
gives :math:`R_{mr} = G_{mn} P_{rn}^\top`, :math:`m < n` gives
:math:`R_{rn} = P_{mr}^\top G_{mn}`. With :math:`k` the update count,

.. math::
   M_t = \beta_1 M_{t-1} + (1-\beta_1) R_t, \qquad
   V_t = \beta_2 V_{t-1} + (1-\beta_2) R_t^2, \qquad
   N_t = M_t / (\sqrt{V_t} + \epsilon),

   s = \frac{\lVert N_t \rVert}{\lVert R_t \rVert + 10^{-8}}, \qquad
   U_t = \sqrt{\alpha}\; \mathrm{NL}(G_t \odot s), \qquad
   \Delta W = -\eta \frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k} U_t
   \;\; \text{then} \;\; W \leftarrow W (1 - \eta\lambda).

``scale_type="channel"``: the norms run over the rank dimension, one factor
per channel of the *larger* dimension (rows of :math:`G_{mn}` when
:math:`m \ge n`, columns otherwise); ``"tensor"``: Frobenius norms, one
factor. :math:`\alpha` is ``scale`` (applied as :math:`\sqrt{\alpha}`;
APOLLO-Mini's "scale 128" is a factor 11.3). NL is Fira's norm-growth
limiter with its scalar state :math:`z` (the last update's norm):

.. math::
   \ell = \max\!\Big(\frac{\lVert U \rVert_F}{z + 10^{-8}}, 1.01\Big) / 1.01,
   \qquad U \leftarrow U / \ell, \qquad z \leftarrow \lVert U \rVert_F,

with :math:`z = \lVert U \rVert_F` and no limiting on the first update.
``scale_front=True`` multiplies by :math:`\sqrt{\alpha}` before NL (the
limiter sees the scaled gradient), ``False`` (default) after. The limiter
and :math:`s` see the *uncorrected* :math:`N_t`; the bias correction is in
the step size (HF style, :math:`\eta\,0.316` at :math:`k=1`).

Params outside the mask get plain HF-style AdamW (the official "regular"
group: same betas, eps 1e-6, weight decay after the update).

**Flax layout.** A kernel :math:`K_{io} = W^\top` is (in, out). When
``in <= out`` (torch :math:`m \ge n`, a tie included) the in-dimension is
projected: :math:`P_{ir}`, :math:`R_{ro} = P_{ir}^\top G_{io}`, the factor
scales the *columns* of :math:`G_{io}` (torch rows; on a square kernel too).
When ``in > out`` the out-dimension is projected: :math:`P_{or}`,
:math:`R_{ir} = G_{io} P_{or}`, the factor scales the rows.

**Constants** (hard-coded, as officially): :math:`10^{-8}` in the scaling
denominator and in the limiter, :math:`\gamma = 1.01`; defaults ``eps=1e-6``,
betas (0.9, 0.999), gap 200, scale 1 (APOLLO) / 128 (Mini).

**State** (:class:`ApolloState`): per APOLLO kernel the low-rank moments
(:math:`2 r \max(m, n)` elements; APOLLO-Mini: :math:`2\max(m, n)`), the
current :math:`P` (:math:`r \min(m, n)` elements in the param dtype, as the
official ``ortho_matrix``; storing it rather than regenerating it from a
key costs :math:`r\min(m,n)` but makes it inspectable), the limiter scalar;
full-shape moments for the other params; one PRNG key for the whole tree.

Deviations from the official code:

* **Random draws differ.** The official :math:`P` comes from a
  ``torch.Generator`` (mt19937 on CPU, Philox on CUDA) seeded with the
  param's 1-based position over all groups, advanced by ``next_seed`` after
  each draw; no JAX generator reproduces either stream. Here the state holds
  one ``jax.random`` key; at each refresh it is split into the next key and
  one sub-key per APOLLO kernel (tree-flatten order), each drawing a fresh
  :math:`\mathcal{N}(0,1)` in float32, divided by :math:`\sqrt{r}` in
  float32 and cast to the param dtype (the official order). The
  distribution, independence and schedule are the official ones.
* Only ``proj_type="std"`` (project the smaller dimension) and
  ``proj="random"``: the official ``left``/``right``/``reverse_std`` break
  channel scaling (spec §1.6 quirk 2), and ``proj="svd"`` is unused in the
  scripts (use :func:`jqlm.optim.galore` for SVD projections).
* ``rank > min(in, out)`` raises ValueError in ``init`` (the official code
  runs, with a "low-rank" state larger than AdamW's); ``rank == min(in,
  out)`` is allowed (the random projection is not the identity).
* The projection, moments' update and scaling compute in float32 (float64
  for float64 params); the official code computes in the gradient dtype
  (bf16 in training). Moments are stored in ``state_dtype`` (default the
  param dtype, as officially).
* ``correct_bias=False`` (the official BERT switch) is not offered.

Quirks kept: the scaling factor uses the uncorrected ratio (HF-style
epsilon, spec §1.6 quirk 1); the raw full-rank gradient is scaled; the
moments carry over across refreshes of :math:`P`; the limiter state is the
post-limit norm.
"""

from __future__ import annotations

import enum
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlm.optim import _base
from jqlm.optim._lr import scale_by_learning_rate_post_decay
from jqlm.optim._projector import follow_param, resolve_mask

LIMITER_GAMMA = 1.01
"""Fira's norm-growth limit per update (hard-coded in the official code)."""

TINY = 1e-8
"""The denominators' guard in the scaling factor and the limiter."""


class ScaleType(enum.Enum):
  """Granularity of APOLLO's gradient scaling factor.

  * ``CHANNEL``: one factor per channel of the larger dimension (APOLLO).
  * ``TENSOR``: one factor per kernel (APOLLO-Mini).
  """

  CHANNEL = "channel"
  TENSOR = "tensor"


class ApolloState(NamedTuple):
  """State of :func:`scale_by_apollo`.

  Attributes:
    count: updates so far (int32).
    rng_key: the PRNG key of the next refresh of the projections.
    proj: per APOLLO kernel its current :math:`P` in kernel coordinates,
      ``(in, r)`` when the in-features are projected (``in <= out``), else
      ``(out, r)``, in the param dtype; ``optax.MaskedNode()`` elsewhere.
    mu: first moments: ``(r, out)`` or ``(in, r)`` for APOLLO kernels, the
      param's shape elsewhere (``state_dtype``).
    nu: second moments, likewise.
    norm: per APOLLO kernel the limiter's scalar :math:`z` (the norm of the
      last limited update; compute dtype); ``optax.MaskedNode()`` elsewhere.
  """

  count: jax.Array
  rng_key: jax.Array
  proj: Any
  mu: Any
  nu: Any
  norm: Any


def _scale_type(value) -> ScaleType:
  try:
    return ScaleType(value)
  except ValueError:
    raise ValueError(
      f"`scale_type` must be one of {[s.value for s in ScaleType]}, got "
      f"{value!r}.") from None


def _as_key(key) -> jax.Array:
  """A typed PRNG key from a typed key, a raw uint32 key or an int seed."""
  if key is None:
    raise ValueError(
      "APOLLO draws random projections and needs an explicit PRNG key: pass "
      "key=jax.random.key(seed) (or an int seed).")
  if isinstance(key, bool):
    raise ValueError(f"`key` must be a PRNG key or an int seed, got {key!r}.")
  if isinstance(key, int):
    return jax.random.key(key)
  try:
    arr = key if isinstance(key, jax.Array) else jnp.asarray(key)
  except TypeError:
    arr = None
  if arr is None:
    raise ValueError(
      f"`key` must be a PRNG key (jax.random.key(seed)) or an int seed, got "
      f"{key!r}.")
  if jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
    if arr.shape:
      raise ValueError(f"`key` must be a single PRNG key, got shape "
                       f"{arr.shape}.")
    return arr
  if arr.dtype == jnp.uint32 and arr.shape == (2,):
    return jax.random.wrap_key_data(arr)
  if jnp.issubdtype(arr.dtype, jnp.integer) and arr.shape == ():
    return jax.random.key(arr)
  raise ValueError(
    f"`key` must be a PRNG key (jax.random.key(seed)) or an int seed, got "
    f"{key!r}.")


def _all_2d(params):
  return jax.tree.map(lambda p: len(p.shape) == 2, params)


def _reduces_in(shape) -> bool:
  """Whether a Flax (in, out) kernel projects its in-dimension (torch
  ``m >= n``, "right"; a square kernel included)."""
  return shape[0] <= shape[1]


def scale_by_apollo(
  rank: int,
  *,
  key: Any,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  update_proj_gap: int = 200,
  scale: float = 1.0,
  scale_type: ScaleType | str = ScaleType.CHANNEL,
  scale_front: bool = False,
  disable_nl: bool = False,
  mask: Any = None,
  state_dtype=None,
) -> optax.GradientTransformation:
  r"""APOLLO's scaled-gradient direction (no learning rate); see the module
  docstring for the maths.

  Returns :math:`\frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k} U_t` for APOLLO
  kernels and the HF-style Adam direction :math:`\frac{\sqrt{1-\beta_2^k}}
  {1-\beta_1^k} m_t / (\sqrt{v_t} + \epsilon)` for the other params.

  Args:
    rank: :math:`r`, the projection rank (at most the smaller dimension of
      every APOLLO kernel; official scripts 128-256, APOLLO-Mini 1).
    key: PRNG key (``jax.random.key(seed)``) or int seed of the random
      projections (required; the state carries it on).
    b1, b2: the moments' decay rates.
    eps: Adam's epsilon, outside the square root (official 1e-6).
    update_proj_gap: :math:`P` is redrawn at updates 1, gap+1, 2 gap+1, ...
    scale: :math:`\alpha`; the update is multiplied by
      :math:`\sqrt{\alpha}`.
    scale_type: ``"channel"`` (APOLLO) or ``"tensor"`` (APOLLO-Mini).
    scale_front: apply :math:`\sqrt{\alpha}` before the norm-growth limiter
      (the 60M/130M APOLLO-Mini scripts) instead of after it (default).
    disable_nl: turn Fira's norm-growth limiter off.
    mask: which 2-D params get APOLLO: a pytree of bools with the params'
      structure or a callable ``params -> pytree of bools``; ``None``
      selects every 2-D param. The official scripts use the attention and
      MLP kernels only: :func:`jqlm.models.block_linear_mask`.
    state_dtype: dtype of the moments; default the param's dtype.

  Returns:
    An ``optax.GradientTransformation`` with :class:`ApolloState`. Updates
    have the gradients' dtype. Shape checks (mask, rank) raise ValueError
    in ``init``.

  Under ``optax.inject_hyperparams`` list ``rank`` (and ``mask`` when it is
  a callable) in ``static_args``: they set array shapes.
  """
  _base.check_int("rank", rank)
  _base.check_beta("b1", b1)
  _base.check_beta("b2", b2)
  _base.check("eps", eps, lambda v: v >= 0, ">= 0")
  _base.check_interval("update_proj_gap", update_proj_gap, allow_none=False)
  _base.check("scale", scale, lambda v: v > 0, "> 0",
              "The update is multiplied by sqrt(scale); APOLLO uses 1, "
              "APOLLO-Mini 128.")
  _base.check_state_dtype(state_dtype)
  stype = _scale_type(scale_type)
  key0 = _as_key(key)

  def layout(params):
    """The per-leaf side (``reduce_in``, or None for regular params)."""
    m = resolve_mask(_all_2d if mask is None else mask, params, "APOLLO",
                     "to train with APOLLO")
    leaves, treedef = jax.tree.flatten(params)
    sides = []
    for p, on in zip(leaves, treedef.flatten_up_to(m), strict=True):
      if not on:
        sides.append(None)
        continue
      shape = tuple(p.shape)
      if rank > min(shape):
        raise ValueError(
          f"APOLLO rank {rank} must be at most the smallest dimension of "
          f"every APOLLO param; got shape {shape}. Lower the rank or exclude "
          "the param from the mask.")
      sides.append(_reduces_in(shape))
    return treedef, sides

  def init_fn(params):
    treedef, sides = layout(params)
    leaves = treedef.flatten_up_to(params)
    mus, nus, projs, norms = [], [], [], []
    for p, side in zip(leaves, sides, strict=True):
      sdt = p.dtype if state_dtype is None else state_dtype
      if side is None:
        mus.append(jnp.zeros_like(p, dtype=sdt))
        nus.append(jnp.zeros_like(p, dtype=sdt))
        projs.append(optax.MaskedNode())
        norms.append(optax.MaskedNode())
        continue
      d_in, d_out = p.shape
      low = (rank, d_out) if side else (d_in, rank)
      # Placed like the param: the rank dim replicated, the kept dim keeps
      # the param's axis (as GaLore's low-rank moments).
      def keep(a, b, s=side):
        return (None, b) if s else (a, None)

      def proj_spec(a, b, s=side):
        return (a if s else b, None)

      mus.append(follow_param(p, jnp.zeros(low, sdt), keep))
      nus.append(follow_param(p, jnp.zeros(low, sdt), keep))
      projs.append(follow_param(p, jnp.zeros((d_in if side else d_out, rank),
                                        p.dtype), proj_spec))
      norms.append(follow_param(p, jnp.zeros((), _base.compute_dtype(p.dtype))))
    return _base.follow_params(ApolloState(
      count=jnp.zeros((), jnp.int32), rng_key=key0,
      proj=treedef.unflatten(projs), mu=treedef.unflatten(mus),
      nu=treedef.unflatten(nus), norm=treedef.unflatten(norms)), params)

  def draw(rng_key, projs):
    """New projections: the next key and one N(0, 1/r) draw per kernel."""
    next_key, sub = jax.random.split(rng_key)
    subs = jax.random.split(sub, len(projs))
    new = []
    for i, p in enumerate(projs):
      z = jax.random.normal(subs[i], p.shape, jnp.float32)
      new.append((z / jnp.float32(math.sqrt(rank))).astype(p.dtype))
    return next_key, new

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    projs = treedef.flatten_up_to(state.proj)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    norms = treedef.flatten_up_to(state.norm)
    on = [not isinstance(p, optax.MaskedNode) for p in projs]
    cur = [p for p, o in zip(projs, on, strict=True) if o]
    rng_key = state.rng_key
    if cur:
      refresh = (state.count % jnp.asarray(update_proj_gap)
                 .astype(jnp.int32)) == 0
      rng_key, cur = jax.lax.cond(refresh, draw, lambda k, p: (k, p),
                                  rng_key, cur)
    it = iter(cur)
    projs = [next(it) if o else p for p, o in zip(projs, on, strict=True)]
    t = optax.safe_increment(state.count)
    first = state.count == 0

    def leaf(g_in, proj, m_in, v_in, z_in):
      cdt = _base.compute_dtype(g_in.dtype)
      b1_, b2_, eps_ = (_base.hp(b1, cdt), _base.hp(b2, cdt),
                        _base.hp(eps, cdt))
      tf = t.astype(cdt)
      step = jnp.sqrt(1 - b2_**tf) / (1 - b1_**tf)
      g = g_in.astype(cdt)
      if isinstance(proj, optax.MaskedNode):  # the regular group: AdamW
        m = b1_ * m_in.astype(cdt) + (1 - b1_) * g
        v = b2_ * v_in.astype(cdt) + (1 - b2_) * g * g
        u = step * m / (jnp.sqrt(v) + eps_)
        return (u.astype(g_in.dtype), m.astype(m_in.dtype),
                v.astype(v_in.dtype), z_in)
      reduce_in = _reduces_in(g.shape)
      p_dr = proj.astype(cdt)
      # R: (r, out) projecting the in-dim, (in, r) projecting the out-dim.
      r_lr = p_dr.T @ g if reduce_in else g @ p_dr
      m = b1_ * m_in.astype(cdt) + (1 - b1_) * r_lr
      v = b2_ * v_in.astype(cdt) + (1 - b2_) * r_lr * r_lr
      n_lr = m / (jnp.sqrt(v) + eps_)
      tiny = _base.hp(TINY, cdt)
      if stype is ScaleType.CHANNEL:
        # Norms over the rank dim: one factor per channel of the kept
        # (larger) dim, (1, out) or (in, 1).
        axis = 0 if reduce_in else 1

        def cnorm(x):
          return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))

        s = cnorm(n_lr) / (cnorm(r_lr) + tiny)
      else:
        s = jnp.linalg.norm(n_lr) / (jnp.linalg.norm(r_lr) + tiny)
      u = g * s
      root = jnp.sqrt(_base.hp(scale, cdt))
      if scale_front:
        u = u * root
      z = z_in
      if not disable_nl:
        gamma = _base.hp(LIMITER_GAMMA, cdt)
        un = jnp.linalg.norm(u)
        lim = jnp.maximum(un / (z_in + tiny), gamma) / gamma
        lim = jnp.where(first, jnp.ones_like(lim), lim)
        u = u / lim
        z = un / lim
      if not scale_front:
        u = u * root
      return ((step * u).astype(g_in.dtype), m.astype(m_in.dtype),
              v.astype(v_in.dtype), z)

    outs = [leaf(*a) for a in zip(leaves, projs, mus, nus, norms,
                                  strict=True)]
    u, m, v, z = (treedef.unflatten([o[i] for o in outs]) for i in range(4))
    return u, ApolloState(count=t, rng_key=rng_key,
                          proj=treedef.unflatten(projs), mu=m, nu=v,
                          norm=z)

  return optax.GradientTransformation(init_fn, update_fn)


def apollo(
  learning_rate: optax.ScalarOrSchedule,
  rank: int,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  weight_decay: float = 0.0,
  mask: Any = None,
  *,
  key: Any,
  update_proj_gap: int = 200,
  scale: float = 1.0,
  scale_type: ScaleType | str = ScaleType.CHANNEL,
  scale_front: bool = False,
  disable_nl: bool = False,
  state_dtype=None,
) -> optax.GradientTransformation:
  r"""APOLLO, equal step for step to the official ``APOLLOAdamW`` (up to
  the random draws; module docstring).

  ``chain(scale_by_apollo(...), scale_by_learning_rate_post_decay(lr,
  wd))``: :math:`W \leftarrow W - \eta\,\Delta`, then :math:`W \leftarrow
  W(1 - \eta\lambda)` (weight decay after the update, on every param, as
  officially).

  Args:
    learning_rate: a float or an optax schedule (official scripts: 0.01,
      cosine with 10% warmup, min ratio 0.1).
    rank: the projection rank (official scripts: 128 for 60M, 192 for
      130M, 256 for 350M-7B; HF Trainer default 128).
    b1, b2, eps: see :func:`scale_by_apollo`.
    weight_decay: decoupled, after the update.
    mask: the APOLLO kernels (default every 2-D param; officially the
      attention and MLP kernels, :func:`jqlm.models.block_linear_mask`).
    key: PRNG key or int seed of the projections (required).
    update_proj_gap, scale, scale_type, scale_front, disable_nl,
      state_dtype: see :func:`scale_by_apollo`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jqlm.optim.apollo import apollo
    >>> params = {"attn": {"q": jnp.ones((32, 64))}, "norm": jnp.ones(32)}
    >>> opt = apollo(1e-2, rank=8, key=jax.random.key(0))
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, MLSys 2025.
  """
  return optax.chain(
    scale_by_apollo(rank, key=key, b1=b1, b2=b2, eps=eps,
                    update_proj_gap=update_proj_gap, scale=scale,
                    scale_type=scale_type, scale_front=scale_front,
                    disable_nl=disable_nl, mask=mask,
                    state_dtype=state_dtype),
    scale_by_learning_rate_post_decay(learning_rate, weight_decay),
  )


def apollo_mini(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  weight_decay: float = 0.0,
  mask: Any = None,
  *,
  key: Any,
  update_proj_gap: int = 200,
  scale: float = 128.0,
  scale_front: bool = False,
  disable_nl: bool = False,
  state_dtype=None,
) -> optax.GradientTransformation:
  r"""APOLLO-Mini: :func:`apollo` with rank 1 and one scaling factor per
  tensor (``scale_type="tensor"``); its moments are :math:`2\max(m, n)`
  floats per kernel.

  ``scale`` defaults to 128 (the README's and the 350M-7B scripts'; the
  130M script uses 192), i.e. a factor :math:`\sqrt{128}`. The 60M and
  130M scripts also set ``scale_front=True``; the constructor default, kept
  here, is ``False``.

  Args: as :func:`apollo`, without ``rank`` and ``scale_type``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jqlm.optim.apollo import apollo_mini
    >>> params = {"mlp": {"up": jnp.ones((32, 64))}}
    >>> state = apollo_mini(1e-2, key=jax.random.key(0)).init(params)
    >>> state[0].mu["mlp"]["up"].shape
    (1, 64)
  """
  return apollo(learning_rate, 1, b1, b2, eps, weight_decay, mask, key=key,
                update_proj_gap=update_proj_gap, scale=scale,
                scale_type=ScaleType.TENSOR, scale_front=scale_front,
                disable_nl=disable_nl, state_dtype=state_dtype)


__all__ = ["ApolloState", "ScaleType", "apollo", "apollo_mini",
           "scale_by_apollo"]
