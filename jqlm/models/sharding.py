"""Logical axis names of the model params and their mapping to a mesh.

Every param of :mod:`jqlm.models` carries logical names in its ``axes``
metadata (``("embed", "mlp")`` for an MLP kernel). They are resolved to mesh
axes here and nowhere else (style.md §3.11); the global
``set_logical_axis_rules`` is never used.

Mesh axes: ``data`` (batch), ``fsdp`` (params sharded, gathered per layer)
and ``tensor`` (Megatron-style tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jqlm.models.layers import is_quantized

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or None: replicated along that dim)
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
  ("batch", "data"),
  ("length", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("norm", None),
  ("layers", None),  # the stacked axis of scan_layers: each device holds
                     # every layer's slice of its shards
)


def to_pspec(names: Sequence[str | None] | None,
             rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES
             ) -> PartitionSpec:
  """Logical names -> ``PartitionSpec`` (a mesh axis is used at most once;
  unknown names raise)."""
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(
        f"Logical axis {name!r} has no rule; known: {sorted(table)}. Add "
        "(name, mesh_axis_or_None) to the rules.")
    axis = table[name]
    if axis is not None and axis in used:
      axis = None  # one mesh axis shards one dim only
    if axis is not None:
      used.add(axis)
    out.append(axis)
  return PartitionSpec(*out)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices=None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh; ``-1`` takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  for name, v in zip(MESH_AXES, sizes, strict=True):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (
        v < 1 and v != -1):
      raise ValueError(f"Mesh axis {name}={v!r} must be an int >= 1, or -1 "
                       "for the remaining devices.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    raise ValueError("At most one mesh axis may be -1.")
  if -1 in sizes:
    if len(devices) % known:
      fixed = " x ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes,
                                                    strict=True) if s != -1)
      raise ValueError(
        f"{len(devices)} devices do not divide into {fixed} = {known} (the "
        "-1 axis takes the rest); use sizes whose product divides "
        f"{len(devices)}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f"Mesh (data, fsdp, tensor) = {tuple(sizes)} needs "
      f"{int(np.prod(sizes))} devices, got {len(devices)}.")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def param_axes(state) -> object:
  """The ``axes`` metadata of every variable of an ``nnx.State`` (a pytree of
  name tuples with the state's structure, ``None`` where absent)."""
  from flax import nnx  # noqa: PLC0415

  def names(v):
    md = v.get_metadata() if hasattr(v, "get_metadata") else {}
    return tuple(md["axes"]) if md.get("axes") is not None else None

  return jax.tree.map(names, state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def key_path(keypath) -> tuple:
  """A jax key path as plain keys: ``("layers", 0, "attn", "q", "kernel")``."""
  out = []
  for k in keypath:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
  return tuple(out)


def param_axis_names(model) -> dict[tuple, tuple | None]:
  """``{param path: logical names}`` of an NNX model (or its
  ``nnx.eval_shape``), with the paths of ``nnx.to_pure_dict``."""
  from flax import nnx  # noqa: PLC0415

  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  return {tuple(p): v.get_metadata().get("axes") for p, v in flat.items()}


def fit_pspec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """``spec`` without the mesh axes that do not divide their dim (those
  dims are replicated)."""
  out = []
  for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)),
                     strict=False):
    kept = []  # a tuple of axes keeps the prefix whose product divides
    for a in (ax if isinstance(ax, tuple) else (ax,)):
      size = int(np.prod([mesh.shape[k] for k in kept])) if kept else 1
      if a is None or a not in mesh.shape or dim % (size * mesh.shape[a]):
        break
      kept.append(a)
    out.append(None if not kept else kept[0] if len(kept) == 1
               else tuple(kept))
  return PartitionSpec(*out)


class ParamShardings:
  """The ``NamedSharding`` of every param of a pure params pytree, from the
  params' logical names, and of any pytree whose leaves follow the params
  (optimizer states).

  Args:
    params: the (abstract) params: arrays, ``ShapeDtypeStruct`` s or
      quantized (QArray) leaves.
    axes: ``{param path: logical names}`` (:func:`param_axis_names`).
    mesh: the mesh.
    rules: logical name -> mesh axis.

  Quantized params shard their codes (a prepared 4-bit weight its packed
  bytes) like the float kernel and replicate their scales; a dim that a mesh axis does not divide is replicated
  (:func:`fit_pspec`).
  """

  def __init__(self, params, axes: dict[tuple, tuple | None], mesh: Mesh,
               rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.specs: dict[tuple, tuple[PartitionSpec, tuple]] = {}

    def one(kp, leaf):
      path = key_path(kp)
      spec = to_pspec(axes.get(path), rules)
      if is_quantized(leaf):
        # the codes, or a prepared 4-bit weight's packed bytes (K/2, N):
        # sharded like the float kernel, its dims permitting
        codes = getattr(leaf, "codes", None)
        shape = tuple((leaf.packed if codes is None else codes).shape)
        spec = fit_pspec(spec, shape, mesh)
        self.specs[path] = (spec, shape)
        return jax.tree.map(
          lambda x: NamedSharding(mesh, spec) if tuple(x.shape) == shape
          else self.replicated, leaf)
      spec = fit_pspec(spec, leaf.shape, mesh)
      self.specs[path] = (spec, tuple(leaf.shape))
      return NamedSharding(mesh, spec)

    self.params = jax.tree_util.tree_map_with_path(one, params,
                                                   is_leaf=is_quantized)

  def _param_of(self, path: tuple):
    """``(spec, shape)`` of the param a state leaf at ``path`` belongs to:
    its path ends with the param's path, or does after dropping up to two
    trailing field names (``...kernel.proj``, ``...kernel.proj.codes``)."""
    for drop in range(3):
      p = path[:len(path) - drop]
      for n in range(len(p), 0, -1):
        hit = self.specs.get(p[-n:])
        if hit is not None:
          return hit
    return None

  def _leaf_spec(self, shape, pspec: PartitionSpec, pshape) -> PartitionSpec:
    """A state array's spec from its param's: each dim takes the mesh axis
    of a param dim of the same size (the same position first), so moments
    shaped like the param shard like it, and low-rank moments ``(r, n)`` /
    ``(m, r)`` and projections ``(d, r)`` shard their full-size dim."""
    entries = tuple(pspec) + (None,) * (len(pshape) - len(pspec))
    free = [i for i, d in enumerate(pshape) if d > 1]
    out = []
    for i, d in enumerate(shape):
      j = i if i in free and pshape[i] == d else next(
        (k for k in free if pshape[k] == d), None)
      if j is None or d <= 1:
        out.append(None)
        continue
      free.remove(j)
      out.append(entries[j])
    # a mesh axis of a dim the state does not have (GaLore's reduced dim)
    # moves to the state's largest matched dim, so the state still spreads
    # over every device that holds a slice of the param
    used = {a for e in out if e is not None
            for a in (e if isinstance(e, tuple) else (e,))}
    spare = [a for e in entries if e is not None
             for a in (e if isinstance(e, tuple) else (e,)) if a not in used]
    matched = [i for i, e in enumerate(out) if e is not None]
    if spare and len(shape) == len(pshape) and matched:
      i = max(matched, key=lambda k: shape[k])
      have = out[i] if isinstance(out[i], tuple) else (out[i],)
      out[i] = have + tuple(spare)
    return fit_pspec(PartitionSpec(*out), shape, self.mesh)

  def _moment_shardings(self, leaf, pspec, pshape):
    """A block-quantized moment (``codes (blocks, width)``, ``absmax
    (blocks,)``, blocks in row-major order of its logical shape; with a
    leading layer axis in a scanned stack's state): the
    blocks shard over every mesh axis that shards the moment's logical
    tensor (:meth:`_leaf_spec`). When its sharded dim is the first, each
    device's blocks are exactly its rows' (no data moves in the update)."""
    # a scanned stack's moments are stacked: codes (layers, blocks, width)
    # and a per-layer logical shape, matched against the param's per-layer
    # dims
    lead = leaf.codes.ndim - 2
    if lead:
      entries = tuple(pspec) + (None,) * (len(pshape) - len(pspec))
      pspec, pshape = PartitionSpec(*entries[lead:]), pshape[lead:]
    logical = self._leaf_spec(tuple(leaf.shape), pspec, pshape)
    axes = []
    for a in logical:
      if a is not None:
        axes.extend(a if isinstance(a, tuple) else (a,))
    size = int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1
    nb = int(leaf.codes.shape[lead])
    if not axes or nb % size:
      return jax.tree.map(lambda _: self.replicated, leaf)
    blocks = tuple(axes) if len(axes) > 1 else axes[0]
    return jax.tree.map(
      lambda x: NamedSharding(self.mesh, PartitionSpec(*(None,) * lead,
                                                       blocks)), leaf)

  def follow(self, tree, *, is_blocked=lambda x: False):
    """Shardings for a pytree whose leaves follow the params (an optimizer
    state). A leaf belongs to the param whose path its path ends with
    (after up to two trailing field names); it shards along the mesh axes
    of that param's dims of the same size (:meth:`_leaf_spec`):

    * moments shaped like the param shard like it;
    * GaLore's low-rank moments and projections shard their full-size dim
      (the rank dim is replicated);
    * block-quantized moments, the nodes ``is_blocked`` accepts (``codes
      (blocks, width)``, ``absmax (blocks,)`` and a logical ``shape``; the
      train state passes :class:`jqlm.optim.QuantizedMoment`, which models
      do not import), shard their blocks over the same mesh axes;
    * everything else (counts, scalars, unmatched leaves) is replicated.
    """

    def one(kp, leaf):
      hit = self._param_of(key_path(kp))
      if hit is None:
        return jax.tree.map(lambda _: self.replicated, leaf)
      pspec, pshape = hit
      if is_blocked(leaf):
        return self._moment_shardings(leaf, pspec, pshape)
      return NamedSharding(self.mesh, self._leaf_spec(tuple(leaf.shape),
                                                      pspec, pshape))

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_blocked)
