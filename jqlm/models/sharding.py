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
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    raise ValueError("At most one mesh axis may be -1.")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f"{len(devices)} devices do not divide into fsdp x tensor = {known}.")
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


def state_shardings(state, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES):
  """``NamedSharding`` per leaf of an ``nnx.State`` (or its ``eval_shape``),
  from the params' logical names. Leaves without names are replicated;
  quantized params (QArray) shard their codes like the float kernel and
  replicate their scales."""
  from flax import nnx  # noqa: PLC0415

  def one(v):
    md = v.get_metadata() if hasattr(v, "get_metadata") else {}
    spec = to_pspec(md.get("axes"), rules)
    value = v.get_value() if hasattr(v, "get_value") else v

    def leaf(x):
      ok = hasattr(x, "ndim") and x.ndim == len(spec)
      return NamedSharding(mesh, spec if ok else PartitionSpec())

    return jax.tree.map(leaf, value)

  return jax.tree.map(one, state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
