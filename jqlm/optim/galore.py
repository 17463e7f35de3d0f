r"""GaLore and Q-GaLore: optimizers that run in a low-rank gradient subspace.

**GaLore** (Zhao et al., ICML 2024, `arXiv 2403.03507
<https://arxiv.org/abs/2403.03507>`_; spec §4). Every ``update_proj_gap``
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

**Q-GaLore** (Zhang et al. 2024, `arXiv 2407.08296
<https://arxiv.org/abs/2407.08296>`_; spec §5) adds

* INT4 projections: :math:`P` is stored as a :class:`jqlm.quant.QArray`,
  asymmetric min-max uint4 in groups of 256 of the torch-layout :math:`P`
  (spec §5.2), dequantized on use;
* layer-adaptive lazy refresh: at each SVD the signed cosine similarity of
  the new and previous top singular vectors enters a per-layer queue of
  ``queue_size``; when the queue is full and its mean is
  :math:`\geq` ``cos_threshold`` the layer's gap is multiplied by
  ``gamma_proj`` (the queue is not cleared; spec §5.1). A layer refreshes
  when ``(t - 1) % gap == 0`` with its own gap, under ``lax.cond``;
* INT8 weights updated by stochastic rounding with no float master copy
  (spec §5.3): see :mod:`jqlm.optim.qgalore`: :func:`quantize_weights`,
  :func:`dequantize_params`,
  :func:`apply_quantized_updates` and :func:`rounding_key`;
* 8-bit block-wise Adam states with :math:`\beta_2 = 0.95` (bitsandbytes
  ``AdamW8bit``, torch-style epsilon; spec §5.4).

Deviations from the official code, all numerical-precision only: the
projections and the inner optimizer compute in float32 (the official code in
the gradient dtype, bf16 in training), and the projection quantizer computes
its scales in float32. SVD signs are those of XLA's SVD, which can differ
from torch's; they matter across refreshes (spec §4.3).
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlm import quant
from jqlm.optim import _base, qstate
from jqlm.optim.adam import scale_by_adam
from jqlm.optim.spam import scale_by_learning_rate_post_decay


class ProjType(enum.Enum):
  """Which side is reduced, in the official (torch ``(out, in)``) names.

  * ``STD``: the smaller dimension (a tie reduces in-features).
  * ``REVERSE_STD``: the larger dimension.
  * ``RIGHT``: always the in-features (torch ``Vh``).
  * ``LEFT``: always the out-features (torch ``U``).

  The official ``full`` (both sides) is not supported.
  """

  STD = "std"
  REVERSE_STD = "reverse_std"
  RIGHT = "right"
  LEFT = "left"


class ProjectorState(NamedTuple):
  """Per-kernel projector state.

  Attributes:
    proj: :math:`P` in kernel coordinates, ``(in, r)`` when the in-features
      are reduced, else ``(out, r)``: an array in the param's dtype, or for
      Q-GaLore a :class:`jqlm.quant.PackedQArray` (4-bit codes, two per
      byte) or a :class:`jqlm.quant.QArray` with byte codes.
    gap: this layer's refresh interval (int32; grows under Q-GaLore).
    svd_count: SVDs run so far (int32).
    queue: the last ``queue_size`` cosine similarities, newest last
      (float32; one unused zero for GaLore, as orbax cannot save an empty
      array).
    queue_len: how many entries of ``queue`` are filled.
    past: the previous top singular vector (float32; one unused zero for
      GaLore).
  """

  proj: Any
  gap: jax.Array
  svd_count: jax.Array
  queue: jax.Array
  queue_len: jax.Array
  past: jax.Array


class GaLoreState(NamedTuple):
  """State of :func:`scale_by_galore` / :func:`scale_by_q_galore`.

  Attributes:
    count: updates so far (int32).
    projector: a :class:`ProjectorState` per projected param,
      ``optax.MaskedNode()`` elsewhere.
    inner: the inner transform's state (low-rank shapes for projected
      params).
  """

  count: jax.Array
  projector: Any
  inner: Any


def _is_qarray(x) -> bool:
  return isinstance(x, quant.QArray)


def _param_shape(p) -> tuple[int, ...]:
  return tuple(p.shape)


def default_mask(params) -> Any:
  """The official choice: 2-D params whose path contains ``attn`` or
  ``mlp`` (the q, k, v, o, gate, up and down kernels of jqlm's LLaMA;
  spec §1). Embeddings, the LM head and norms are not projected.

  Raises:
    ValueError: if no such param exists (pass ``mask=`` for other models).
  """
  def pick(path, p):
    name = jax.tree_util.keystr(path).lower()
    return len(_param_shape(p)) == 2 and ("attn" in name or "mlp" in name)

  mask = jax.tree_util.tree_map_with_path(pick, params, is_leaf=_is_qarray)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(
      "GaLore's default mask projects 2-D params whose path contains 'attn' "
      "or 'mlp' (jqlm's LLaMA naming), and found none. Pass mask= a pytree "
      "of bools or a callable params -> bools choosing the kernels to "
      "project.")
  return mask


def _resolve_mask(mask, params):
  if mask is None:
    return default_mask(params)
  m = mask(params) if callable(mask) else mask
  leaves_p, treedef = jax.tree.flatten(params, is_leaf=_is_qarray)
  try:
    leaves_m = treedef.flatten_up_to(m)
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"GaLore mask must have the params' structure ({treedef}); got {m!r}."
    ) from e
  for p, b in zip(leaves_p, leaves_m, strict=True):
    if bool(b) and len(_param_shape(p)) != 2:
      raise ValueError(
        f"GaLore can only project 2-D params; the mask selects a param of "
        f"shape {_param_shape(p)}. Exclude it from the mask.")
  return treedef.unflatten([bool(b) for b in leaves_m])


def _reduces_in(shape, proj_type: ProjType) -> bool:
  d_in, d_out = shape
  if proj_type is ProjType.STD:
    return d_in <= d_out
  if proj_type is ProjType.REVERSE_STD:
    return d_in > d_out
  return proj_type is ProjType.RIGHT


def _lowrank_shape(shape, rank: int, reduce_in: bool) -> tuple[int, int]:
  return (rank, shape[1]) if reduce_in else (shape[0], rank)


def proj_spec(bits: int, group_size: int, reduce_in: bool) -> quant.QuantSpec:
  """Q-GaLore's projection quantizer (spec §5.2) for a kernel-coordinate
  :math:`P`: asymmetric min-max ``uint{bits}``, flat groups of the
  torch-layout :math:`P` (``P^T`` when the in-features are reduced, hence
  ``axis=0``), scale floor 1e-5."""
  return quant.QuantSpec(
    format=quant.int_format(bits, signed=False), granularity="flat_group",
    group_size=group_size, axis=0 if reduce_in else -1, eps=1e-5)


def weight_spec(bits: int = 8, group_size: int = 256) -> quant.QuantSpec:
  """Q-GaLore's weight quantizer for a Flax kernel ``(in, out)`` (spec
  §5.3): asymmetric min-max ``uint{bits}`` in flat groups of the torch
  ``(out, in)`` weight (``axis=0``), scale floor 1e-5, round-to-nearest."""
  return quant.QuantSpec(
    format=quant.int_format(bits, signed=False), granularity="flat_group",
    group_size=group_size, axis=0, eps=1e-5)


def _store_proj(q: quant.QArray):
  """4-bit and 2-bit projection codes packed into bytes (real sub-byte
  storage that orbax checkpoints); wider ones as they are."""
  if q.spec.bits < 8 and 8 % q.spec.bits == 0 and q.shape[-1] % (
      8 // q.spec.bits) == 0:
    return q.pack()
  return q.with_byte_codes()


def _check_bits(name: str, bits: int) -> None:
  if not isinstance(bits, int) or not 2 <= bits <= 8:
    raise ValueError(f"`{name}` must be an int in [2, 8], got {bits!r}.")


def _galore(
  rank: int,
  update_proj_gap: int,
  scale: float,
  proj_type: ProjType | str,
  inner: optax.GradientTransformation | None,
  mask,
  proj_bits: int | None = None,
  proj_group_size: int = 256,
  adaptive: bool = False,
  cos_threshold: float = 0.4,
  gamma_proj: float = 2.0,
  queue_size: int = 5,
) -> optax.GradientTransformation:
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"`rank` must be a positive int, got {rank!r}.")
  _base.check_interval("update_proj_gap", update_proj_gap, allow_none=False)
  _base.check("scale", scale, lambda v: v > 0, "> 0")
  try:
    ptype = ProjType(proj_type)
  except ValueError:
    raise ValueError(
      f"`proj_type` must be one of {[p.value for p in ProjType]}, got "
      f"{proj_type!r} (the official 'full' is not supported).") from None
  if proj_bits is not None:
    _check_bits("proj_bits", proj_bits)
    if not isinstance(proj_group_size, int) or proj_group_size < 1:
      raise ValueError(
        f"`proj_group_size` must be a positive int, got {proj_group_size!r}.")
  if adaptive:
    _base.check("cos_threshold", cos_threshold, lambda v: -1 <= v <= 1,
                "in [-1, 1]")
    _base.check("gamma_proj", gamma_proj, lambda v: v >= 1, ">= 1")
    if not isinstance(queue_size, int) or queue_size < 1:
      raise ValueError(
        f"`queue_size` must be a positive int, got {queue_size!r}.")
  qsize = queue_size if adaptive else 0
  if inner is None:
    inner = scale_by_adam(0.9, 0.999, 1e-6, eps_style="hf")

  def layout(params):
    """(mask, per-leaf reduce_in or None) with shape validation."""
    m = _resolve_mask(mask, params)
    leaves, treedef = jax.tree.flatten(params, is_leaf=_is_qarray)
    sides = []
    for p, on in zip(leaves, treedef.flatten_up_to(m), strict=True):
      if not on:
        sides.append(None)
        continue
      shape = _param_shape(p)
      if rank >= min(shape):
        raise ValueError(
          f"GaLore rank {rank} must be smaller than the smallest dimension "
          f"of every projected param; got shape {shape}. Lower the rank or "
          "exclude the param from the mask.")
      reduce_in = _reduces_in(shape, ptype)
      if proj_bits is not None:
        n = (shape[0] if reduce_in else shape[1]) * rank
        if n % proj_group_size:
          raise ValueError(
            f"proj_group_size={proj_group_size} must divide the projection "
            f"size {n} (rank {rank} x {n // rank}) of the param of shape "
            f"{shape}. Use a divisor of {n}.")
      sides.append(reduce_in)
    return treedef, sides

  def float_dtype(p):
    return jnp.float32 if _is_qarray(p) else p.dtype

  def init_fn(params):
    treedef, sides = layout(params)
    leaves = treedef.flatten_up_to(params)
    lowrank, projs = [], []
    for p, side in zip(leaves, sides, strict=True):
      if side is None:
        lowrank.append(p.dequantize() if _is_qarray(p) else p)
        projs.append(optax.MaskedNode())
        continue
      shape, dt = _param_shape(p), float_dtype(p)
      lowrank.append(jnp.zeros(_lowrank_shape(shape, rank, side), dt))
      d = shape[0] if side else shape[1]
      proj = jnp.zeros((d, rank), dt)
      if proj_bits is not None:
        proj = _store_proj(quant.quantize(proj, proj_spec(
          proj_bits, proj_group_size, side)))
      projs.append(ProjectorState(
        proj=proj,
        gap=jnp.asarray(update_proj_gap, jnp.int32),
        svd_count=jnp.zeros((), jnp.int32),
        # GaLore keeps one unused zero: orbax cannot save empty arrays
        queue=jnp.zeros((max(qsize, 1),), jnp.float32),
        queue_len=jnp.zeros((), jnp.int32),
        past=jnp.zeros((d if adaptive else 1,), jnp.float32),
      ))
    return GaLoreState(
      count=jnp.zeros((), jnp.int32),
      projector=treedef.unflatten(projs),
      inner=inner.init(treedef.unflatten(lowrank)),
    )

  def refresh(g, ps: ProjectorState, reduce_in: bool) -> ProjectorState:
    u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    if reduce_in:
      p_f, vec = u[:, :rank], u[:, 0]
    else:
      p_f, vec = vh[:rank].T, vh[0]
    p_f = p_f.astype(g.dtype)  # the official code casts P to the grad dtype
    vec = vec.astype(g.dtype).astype(jnp.float32)
    gap, queue, qlen, past = ps.gap, ps.queue, ps.queue_len, ps.past
    if adaptive:
      has_past = ps.svd_count > 0
      cos = jnp.dot(past, vec) / jnp.maximum(
        jnp.linalg.norm(past) * jnp.linalg.norm(vec), 1e-8)
      queue = jnp.where(has_past, jnp.append(queue[1:], cos), queue)
      qlen = jnp.where(has_past, jnp.minimum(qlen + 1, qsize), qlen)
      filled = jnp.arange(qsize) >= qsize - qlen
      mean = jnp.sum(jnp.where(filled, queue, 0.0)) / jnp.maximum(
        qlen, 1).astype(jnp.float32)
      grow = has_past & (qlen == qsize) & (mean >= cos_threshold)
      grown = jnp.floor(gap.astype(jnp.float32) * gamma_proj).astype(
        jnp.int32)
      gap = jnp.where(grow, grown, gap)
      past = vec
    proj = p_f
    if proj_bits is not None:
      proj = _store_proj(quant.quantize(p_f, proj_spec(
        proj_bits, proj_group_size, reduce_in)))
    return ProjectorState(proj=proj, gap=gap, svd_count=ps.svd_count + 1,
                          queue=queue, queue_len=qlen, past=past)

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    pstates = treedef.flatten_up_to(state.projector)
    sides = [None if isinstance(ps, optax.MaskedNode) else
             _reduces_in(g.shape, ptype) for g, ps in
             zip(leaves, pstates, strict=True)]
    lowrank, new_ps, mats = [], [], []
    for g, ps, side in zip(leaves, pstates, sides, strict=True):
      if side is None:
        lowrank.append(g)
        new_ps.append(ps)
        mats.append(None)
        continue
      do = (state.count % ps.gap) == 0
      ps = jax.lax.cond(do, lambda g_, ps_, s=side: refresh(g_, ps_, s),
                        lambda g_, ps_: ps_, g, ps)
      cdt = _base.compute_dtype(g.dtype)
      proj = ps.proj
      if isinstance(proj, (quant.QArray, quant.PackedQArray)):
        proj = proj.dequantize(g.dtype)
      proj = proj.astype(cdt)
      g32 = g.astype(cdt)
      lowrank.append(proj.T @ g32 if side else g32 @ proj)
      new_ps.append(ps)
      mats.append(proj)
    inner_u, inner_state = inner.update(treedef.unflatten(lowrank),
                                        state.inner, None)
    out = []
    for g, u, proj, side in zip(leaves, treedef.flatten_up_to(inner_u), mats,
                                sides, strict=True):
      if side is None:
        out.append(u)
        continue
      cdt = proj.dtype
      alpha = _base.hp(scale, cdt)
      back = proj @ u.astype(cdt) if side else u.astype(cdt) @ proj.T
      out.append((alpha * back).astype(g.dtype))
    return treedef.unflatten(out), GaLoreState(
      count=optax.safe_increment(state.count),
      projector=treedef.unflatten(new_ps), inner=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


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
    mask: which 2-D params are projected: a pytree of bools, a callable
      ``params -> pytree of bools``, or ``None`` for :func:`default_mask`.

  Returns:
    An ``optax.GradientTransformation`` with :class:`GaLoreState`.
    Shape-dependent checks (rank, mask) raise ValueError in ``init``.

  References:
    Zhao et al., `GaLore <https://arxiv.org/abs/2403.03507>`_, ICML 2024.
  """
  return _galore(rank, update_proj_gap, scale, proj_type, inner, mask)


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
    mask, update_proj_gap, scale, proj_type, inner: see
      :func:`scale_by_galore`.
    state_quant: 8-bit / 4-bit inner Adam states (``None``: float).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jqlm.optim import galore
    >>> params = {"attn": {"q": jnp.ones((32, 32))}, "norm": jnp.ones(32)}
    >>> opt = galore(1e-2, rank=8)
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


def projector_gaps(opt_state) -> Any:
  """The per-layer refresh gaps of a GaLore / Q-GaLore state (a pytree of
  int32 scalars, ``MaskedNode`` for unprojected params)."""
  for s in jax.tree.leaves(opt_state,
                           is_leaf=lambda x: isinstance(x, GaLoreState)):
    if isinstance(s, GaLoreState):
      return jax.tree.map(
        lambda ps: ps.gap if isinstance(ps, ProjectorState) else ps,
        s.projector,
        is_leaf=lambda x: isinstance(x, (ProjectorState, optax.MaskedNode)))
  raise ValueError("No GaLoreState found in the optimizer state.")


__all__ = [
  "GaLoreState", "ProjType", "ProjectorState", "default_mask", "galore",
  "proj_spec", "projector_gaps", "scale_by_galore", "weight_spec",
]
