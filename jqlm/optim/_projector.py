r"""The low-rank gradient projector shared by GaLore and Q-GaLore.

One implementation, :func:`galore_projector`, serves both optimizers (spec
§4.1-4.3, §5.1-5.2); :mod:`jqlm.optim.galore` and :mod:`jqlm.optim.qgalore`
hold their public APIs and document the maths. Every ``update_proj_gap``
updates a projected kernel's gradient :math:`G` is decomposed by a float32
SVD and its top-:math:`r` singular vectors :math:`P` kept; in between the
inner transform runs on :math:`R = P^\top G` (or :math:`G P`) and its update
is projected back, times ``scale``. Q-GaLore adds quantized projections
(``proj_bits``, :func:`proj_spec`) and the layer-adaptive lazy refresh
(``adaptive``).

Natural GaLore (:mod:`jqlm.optim.natural_galore`) uses the same projector
with ``two_sided=True``: both dimensions are reduced, :math:`R = A^\top G B`
with :math:`A`, :math:`B` the top-:math:`r` left and right singular vectors
of :math:`G`, each column sign-fixed by :func:`svd_sign_flip` (tensorly's
rule), and the update is projected back as :math:`\alpha A\, \mathrm{inner}
(R)\, B^\top`.

This module also holds what both optimizers' helpers share: the projector
state types, the mask resolution (:func:`resolve_mask`) and validation of
the integer hyper-parameters that set array shapes.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jqlm import quant
from jqlm.optim import _base
from jqlm.optim.adam import scale_by_adam


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
      byte) or a :class:`jqlm.quant.QArray` with byte codes. Two-sided
      (Natural GaLore): the pair ``(A, B)``, ``(in, r)`` and ``(out, r)``.
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
  """State of :func:`jqlm.optim.scale_by_galore` and
  :func:`jqlm.optim.scale_by_q_galore` (:func:`galore_projector`).

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


def is_qarray(x) -> bool:
  """Whether a params leaf is a quantized weight (:class:`jqlm.quant.QArray`);
  the ``is_leaf`` of every params-tree map in the GaLore family."""
  return isinstance(x, quant.QArray)


def _param_shape(p) -> tuple[int, ...]:
  return tuple(p.shape)


def check_bits(name: str, bits: Any) -> None:
  """Raises ValueError unless ``bits`` is an int in [2, 8] (the widths
  :func:`jqlm.quant.int_format` supports)."""
  _base.check_int(name, bits, 2, 8)


_MASK_HELP = (
  "For jqlm's LLaMA pass mask=jqlm.models.block_linear_mask (the official "
  "choice: the q, k, v, o, gate, up and down kernels; spec §1); otherwise a "
  "pytree of bools with the params' structure, or a callable params -> "
  "pytree of bools.")


def resolve_mask(mask, params, who: str = "GaLore",
                 what: str = "to project"):
  """The pytree of Python bools choosing the 2-D params ``who`` acts on
  (the kernels GaLore / Q-GaLore project, or those
  :func:`jqlm.optim.quantize_weights` holds in int8).

  Args:
    mask: a pytree of bools with ``params``' structure, or a callable
      ``params -> pytree of bools``. ``None`` is refused: the set of kernels
      is the model's to define (:func:`jqlm.models.block_linear_mask`).
    params: the params (arrays, ``ShapeDtypeStruct`` s or QArray leaves).
    who: the caller's name, for the error messages.
    what: what the masked kernels are for, for the error messages.

  Raises:
    ValueError: no mask, a mask of the wrong structure, or one selecting a
      param that is not 2-D.
  """
  if mask is None:
    raise ValueError(
      f"{who} needs mask=, the kernels {what}; got mask=None. {_MASK_HELP}")
  m = mask(params) if callable(mask) else mask
  leaves_p, treedef = jax.tree.flatten(params, is_leaf=is_qarray)
  try:
    leaves_m = treedef.flatten_up_to(m)
  except (ValueError, TypeError) as e:
    hint = ""
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(m)):
      hint = (" (Under optax.inject_hyperparams a callable mask is taken "
              "for a schedule: list 'mask' in static_args.)")
    raise ValueError(
      f"{who}'s mask must have the params' structure ({treedef}); got "
      f"{m!r}.{hint} {_MASK_HELP}") from e
  for p, b in zip(leaves_p, leaves_m, strict=True):
    if bool(b) and len(_param_shape(p)) != 2:
      raise ValueError(
        f"{who} acts on 2-D kernels only; the mask selects a param of "
        f"shape {_param_shape(p)}. Exclude it from the mask.")
  return treedef.unflatten([bool(b) for b in leaves_m])


_BOTH = "both"
"""The side marker of a two-sided projected param (``two_sided=True``)."""


def svd_sign_flip(x: jax.Array) -> jax.Array:
  """``x`` with each column's sign chosen so that its largest-|.| entry is
  positive (the first one on a tie): tensorly's ``svd_flip`` rule
  (``tenalg/svd.py``), applied to each factor on its own, as tensorly's
  Tucker does mode by mode."""
  idx = jnp.argmax(jnp.abs(x), axis=0)
  return x * jnp.sign(jnp.take_along_axis(x, idx[None, :], axis=0))


def _refresh_two_sided(g, ps: ProjectorState, rank: int) -> ProjectorState:
  """New two-sided factors ``(A, B)`` from the SVD of ``g`` (float32, or
  float64 for float64 grads), sign-fixed, cast to the grad dtype as the
  official code does."""
  u, _, vh = jnp.linalg.svd(g.astype(_base.compute_dtype(g.dtype)),
                            full_matrices=False)
  factors = (svd_sign_flip(u[:, :rank]), svd_sign_flip(vh[:rank].T))
  proj = tuple(f.astype(g.dtype).astype(old.dtype)
               for f, old in zip(factors, ps.proj, strict=True))
  return ps._replace(proj=proj, svd_count=ps.svd_count + 1)


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


def _store_proj(q: quant.QArray):
  """4-bit and 2-bit projection codes packed into bytes (real sub-byte
  storage that orbax checkpoints); wider ones as they are."""
  if q.spec.bits < 8 and 8 % q.spec.bits == 0 and q.shape[-1] % (
      8 // q.spec.bits) == 0:
    return q.pack()
  return q.with_byte_codes()


def follow_param(param, tree, spec_fn=None):
  """``tree`` placed on the mesh of ``param`` when ``param`` is an array (or
  a QArray of arrays) with a ``NamedSharding``: each leaf partitioned as
  ``spec_fn(*param_spec)`` (the param's 2-D PartitionSpec entries), or
  replicated when ``spec_fn`` is None. Unchanged otherwise (under jit, or
  unsharded params), as :func:`jqlm.optim._base.follow_params`.

  Eager placement makes the state's shardings those the jitted update
  returns, so the second update does not recompile (style.md §3.11).
  """
  arr = param.codes if is_qarray(param) else param
  if isinstance(arr, jax.core.Tracer) or not isinstance(arr, jax.Array):
    return tree
  sharding = arr.sharding
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return tree
  spec = P()
  if spec_fn is not None and not is_qarray(param):
    entries = tuple(sharding.spec) + (None,) * (
      arr.ndim - len(sharding.spec))
    new = list(spec_fn(*entries))
    while new and new[-1] is None:  # P('x', None) != P('x') as shardings
      new.pop()
    spec = P(*new)
  return jax.device_put(tree,
                        jax.sharding.NamedSharding(sharding.mesh, spec))


def galore_projector(
  rank: int,
  *,
  update_proj_gap: int,
  scale: float,
  proj_type: ProjType | str,
  inner: optax.GradientTransformation | None,
  mask: Any,
  proj_bits: int | None = None,
  proj_group_size: int = 256,
  adaptive: bool = False,
  cos_threshold: float = 0.4,
  gamma_proj: float = 2.0,
  queue_size: int = 5,
  who: str = "GaLore",
  two_sided: bool = False,
) -> optax.GradientTransformation:
  r"""GaLore's projection around ``inner`` (spec §4.1-4.3), with Q-GaLore's
  quantized projections and lazy refresh as options (spec §5.1-5.2).

  At updates :math:`t` with :math:`(t - 1) \bmod \text{gap} = 0` a masked
  kernel's :math:`P` is refreshed from the float32 SVD of its gradient
  :math:`G` (top-:math:`r` left singular vectors when the in-features are
  reduced, else right ones); then

  .. math:: \Delta W = \alpha\, P\, \mathrm{inner}(P^\top G)
            \;\text{or}\; \alpha\, \mathrm{inner}(G P)\, P^\top.

  Unmasked params go through ``inner`` unprojected.

  Args:
    rank: :math:`r`.
    update_proj_gap: the (initial) refresh interval.
    scale: :math:`\alpha`.
    proj_type: which side is reduced (:class:`ProjType`).
    inner: the transform on the low-rank gradients (default HF-style Adam,
      as ``GaLoreAdamW``); called with ``params=None``.
    mask: the kernels to project (see :func:`resolve_mask`).
    proj_bits: store :math:`P` quantized to this many bits
      (:func:`proj_spec`); ``None`` keeps it in the param dtype.
    proj_group_size: elements per projection quantization group.
    adaptive: Q-GaLore's layer-adaptive lazy refresh: each SVD pushes the
      cosine of the new and previous top singular vectors into a queue of
      ``queue_size``; when it is full and its mean is >= ``cos_threshold``
      the layer's gap is multiplied by ``gamma_proj`` (spec §5.1).
    who: the optimizer's name, for the error messages.
    two_sided: reduce both dimensions (Natural GaLore's projector, the
      official ``GaLoreProjectorTensor``): :math:`R = A^\top G B`, an
      :math:`r \times r` matrix, with :math:`A` (in, r) and :math:`B`
      (out, r) the top-:math:`r` left and right singular vectors of the
      kernel gradient, refreshed on the same schedule (SVD in float32, or
      float64 for float64 grads) and sign-fixed by :func:`svd_sign_flip`;
      the update is :math:`\alpha A\, \mathrm{inner}(R)\, B^\top`.
      ``ProjectorState.proj`` is then the pair ``(A, B)``, ``proj_type`` is
      ignored, ``proj_bits`` and ``adaptive`` are refused, and the rank may
      equal (not exceed) the smallest dimension.

  Returns:
    An ``optax.GradientTransformation`` with :class:`GaLoreState`.
    Shape-dependent checks (mask, rank, group size) raise ValueError in
    ``init``.
  """
  _base.check_int("rank", rank)
  _base.check_interval("update_proj_gap", update_proj_gap, allow_none=False)
  _base.check("scale", scale, lambda v: v > 0, "> 0")
  try:
    ptype = ProjType(proj_type)
  except ValueError:
    raise ValueError(
      f"`proj_type` must be one of {[p.value for p in ProjType]}, got "
      f"{proj_type!r} (the official 'full' is not supported).") from None
  if proj_bits is not None:
    check_bits("proj_bits", proj_bits)
    _base.check_int("proj_group_size", proj_group_size)
  if adaptive:
    _base.check("cos_threshold", cos_threshold, lambda v: -1 <= v <= 1,
                "in [-1, 1]")
    _base.check("gamma_proj", gamma_proj, lambda v: v >= 1, ">= 1")
    _base.check_int("queue_size", queue_size)
  if two_sided and (proj_bits is not None or adaptive):
    raise ValueError(
      f"{who}: the two-sided projector supports neither proj_bits nor "
      f"adaptive; got proj_bits={proj_bits!r}, adaptive={adaptive!r}.")
  qsize = queue_size if adaptive else 0
  if inner is None:
    inner = scale_by_adam(0.9, 0.999, 1e-6, eps_style="hf")

  def layout(params):
    """(mask, per-leaf reduce_in or None) with shape validation."""
    m = resolve_mask(mask, params, who)
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_qarray)
    sides = []
    for p, on in zip(leaves, treedef.flatten_up_to(m), strict=True):
      if not on:
        sides.append(None)
        continue
      shape = _param_shape(p)
      if two_sided:
        if rank > min(shape):
          raise ValueError(
            f"{who} rank {rank} must not exceed the smallest dimension of "
            f"every projected param; got shape {shape}. Lower the rank or "
            "exclude the param from the mask.")
        sides.append(_BOTH)
        continue
      if rank >= min(shape):
        raise ValueError(
          f"{who} rank {rank} must be smaller than the smallest dimension "
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
    return jnp.float32 if is_qarray(p) else p.dtype

  def init_fn(params):
    treedef, sides = layout(params)
    leaves = treedef.flatten_up_to(params)
    lowrank, projs = [], []
    for p, side in zip(leaves, sides, strict=True):
      if side is None:
        lowrank.append(p.dequantize() if is_qarray(p) else p)
        projs.append(optax.MaskedNode())
        continue
      shape, dt = _param_shape(p), float_dtype(p)
      if side is _BOTH:
        # (r, r) low-rank state replicated; A (in, r) and B (out, r) keep
        # the param's in and out axes.
        lowrank.append(follow_param(p, jnp.zeros((rank, rank), dt)))
        projs.append(ProjectorState(
          proj=(follow_param(p, jnp.zeros((shape[0], rank), dt),
                        lambda a, b: (a, None)),
                follow_param(p, jnp.zeros((shape[1], rank), dt),
                        lambda a, b: (b, None))),
          **follow_param(p, dict(
            gap=jnp.asarray(update_proj_gap, jnp.int32),
            svd_count=jnp.zeros((), jnp.int32),
            queue=jnp.zeros((1,), jnp.float32),
            queue_len=jnp.zeros((), jnp.int32),
            past=jnp.zeros((1,), jnp.float32),
          ))))
        continue
      # Placed like the param (eagerly on mesh-sharded params): the rank
      # dim is replicated, the kept dim keeps the param's axis.
      lowrank.append(follow_param(p, jnp.zeros(_lowrank_shape(shape, rank, side),
                                          dt),
                             lambda a, b, s=side: (None, b) if s else (a, None)))
      d = shape[0] if side else shape[1]
      proj = jnp.zeros((d, rank), dt)
      if proj_bits is None:
        proj = follow_param(p, proj, lambda a, b, s=side: (a if s else b, None))
      else:
        proj = follow_param(p, _store_proj(quant.quantize(proj, proj_spec(
          proj_bits, proj_group_size, side))))
      projs.append(ProjectorState(
        proj=proj,
        **follow_param(p, dict(
          gap=jnp.asarray(update_proj_gap, jnp.int32),
          svd_count=jnp.zeros((), jnp.int32),
          # GaLore keeps one unused zero: orbax cannot save empty arrays
          queue=jnp.zeros((max(qsize, 1),), jnp.float32),
          queue_len=jnp.zeros((), jnp.int32),
          past=jnp.zeros((d if adaptive else 1,), jnp.float32),
        ))))
    return _base.follow_params(GaLoreState(
      count=jnp.zeros((), jnp.int32),
      projector=treedef.unflatten(projs),
      inner=inner.init(treedef.unflatten(lowrank)),
    ), params)

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
             _BOTH if two_sided else
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
      if side is _BOTH:
        ps = jax.lax.cond(do, lambda g_, ps_: _refresh_two_sided(g_, ps_, rank),
                          lambda g_, ps_: ps_, g, ps)
        cdt = _base.compute_dtype(g.dtype)
        a, b = (f.astype(cdt) for f in ps.proj)
        lowrank.append((a.T @ g.astype(cdt)) @ b)
        new_ps.append(ps)
        mats.append((a, b))
        continue
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
      if side is _BOTH:
        a, b = proj
        alpha = _base.hp(scale, a.dtype)
        back = (a @ u.astype(a.dtype)) @ b.T
        out.append((alpha * back).astype(g.dtype))
        continue
      cdt = proj.dtype
      alpha = _base.hp(scale, cdt)
      back = proj @ u.astype(cdt) if side else u.astype(cdt) @ proj.T
      out.append((alpha * back).astype(g.dtype))
    return treedef.unflatten(out), GaLoreState(
      count=optax.safe_increment(state.count),
      projector=treedef.unflatten(new_ps), inner=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


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
