"""Shared helpers of the jqlm optimizers (validation, dtypes, tree maps)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def concrete(value: Any) -> float | None:
  """``value`` as a Python float, or ``None`` if it is traced.

  Hyper-parameters may arrive as jnp arrays (``optax.inject_hyperparams``)
  or tracers; they are validated whenever their value is known.
  """
  if value is None:
    return None
  try:
    return float(np.asarray(value))
  except (jax.errors.ConcretizationTypeError, TypeError):
    return None


def check(name: str, value: Any, ok, expected: str, fix: str = "") -> None:
  """Raises ValueError when a concrete hyper-parameter fails ``ok``."""
  v = concrete(value)
  if v is None:
    return
  if not math.isfinite(v) or not ok(v):
    raise ValueError(
      f"`{name}` must be {expected}, got {value!r}." + (f" {fix}" if fix else "")
    )


def check_beta(name: str, value: Any) -> None:
  check(name, value, lambda v: 0.0 <= v < 1.0, "in [0, 1)",
        "Betas are EMA decay rates, e.g. 0.9 or 0.999.")


def check_interval(name: str, value: Any, allow_none: bool = True) -> None:
  if value is None:
    if allow_none:
      return
    raise ValueError(f"`{name}` must be a positive int, got None.")
  check(name, value, lambda v: v > 0 and v == int(v), "a positive int",
        "Pass None to disable it." if allow_none else "")


def compute_dtype(dtype) -> jnp.dtype:
  """float32, or float64 for float64 inputs (x64 parity runs)."""
  return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64
                   else jnp.float32)


def hp(value: Any, dtype) -> jax.Array:
  """A hyper-parameter as a scalar of ``dtype`` (strict-promotion safe)."""
  return jnp.asarray(value).astype(dtype)


def zeros_like_tree(params, dtype=None):
  return optax.tree.zeros_like(params, dtype=dtype)


def scalar_tree(params, value: float = 0.0):
  """One scalar per leaf of ``params`` (per-tensor statistics), in the
  leaf's compute dtype (float32, or float64 for float64 params)."""
  return jax.tree.map(
    lambda p: jnp.full((), value, compute_dtype(p.dtype)), params)


def count_tree(params):
  return jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params)


def tree_sum(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.int32)
  return sum(leaves[1:], leaves[0])


def map_n(fn, tree, *rest, n: int):
  """``tree_map`` for a ``fn`` returning an ``n``-tuple; returns n trees.

  ``rest`` must have ``tree``'s structure (as optimizer states do).
  """
  leaves, treedef = jax.tree.flatten(tree)
  rest_leaves = [treedef.flatten_up_to(r) for r in rest]
  outs = [fn(*args) for args in zip(leaves, *rest_leaves, strict=True)]
  return tuple(
    treedef.unflatten([o[i] for o in outs]) for i in range(n)
  )


def _mesh_sharding(params):
  """A replicated NamedSharding on the mesh of the first sharded param."""
  for leaf in jax.tree.leaves(params):
    if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, jax.Array):
      continue
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh,
                                        jax.sharding.PartitionSpec())
  return None


def follow_params(state, params):
  """Places the scalar leaves of a fresh ``state`` like ``params``.

  Called eagerly on mesh-sharded params, ``zeros_like`` moments already take
  each param's sharding; this also replicates the scalar leaves (counts,
  per-tensor statistics) on the same mesh, so ``jax.typeof(state)`` is the
  same before and after a jitted update and the second step does not
  recompile. A no-op under jit and for unsharded params. (Under
  ``jax.jit(opt.init)``, give ``out_shardings`` instead.)
  """
  sharding = _mesh_sharding(params)
  if sharding is None:
    return state
  return jax.tree.map(
    lambda x: jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and x.ndim == 0 else x, state)
