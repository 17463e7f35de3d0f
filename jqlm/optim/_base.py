"""Shared helpers of the jqlm optimizers (validation, dtypes, tree maps)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jqlm.optim import qstate


def concrete(value: Any) -> float | None:
  """``value`` as a Python float, or ``None`` if it is traced.

  Hyper-parameters may arrive as jnp arrays (``optax.inject_hyperparams``)
  or tracers; they are validated whenever their value is known.
  """
  if value is None or isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(np.asarray(value))
  except (jax.errors.ConcretizationTypeError, TypeError, ValueError):
    return None


def check(name: str, value: Any, ok, expected: str, fix: str = "") -> None:
  """Raises ValueError when a concrete hyper-parameter fails ``ok``, or is
  not a number at all (a string, a container). ``None`` and traced values
  pass (their users check them)."""
  if value is None or isinstance(value, jax.core.Tracer):
    return
  v = None if isinstance(value, (str, bytes)) else concrete(value)
  if v is None:
    raise ValueError(
      f"`{name}` must be a number ({expected}), got {value!r} of type "
      f"{type(value).__name__}." + (f" {fix}" if fix else ""))
  if not math.isfinite(v) or not ok(v):
    raise ValueError(
      f"`{name}` must be {expected}, got {value!r}." + (f" {fix}" if fix else "")
    )


def check_learning_rate(value: Any, name: str = "learning_rate") -> None:
  """Raises ValueError for a negative or non-finite learning rate (a
  schedule, or a traced value, is checked by its user)."""
  if callable(value):
    return
  if value is None:
    raise ValueError(f"`{name}` must be a finite number >= 0 or an optax "
                     "schedule, got None.")
  check(name, value, lambda v: v >= 0, "a finite number >= 0",
        "Learning rates such as 1e-3; pass an optax schedule to vary it.")


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


def check_int(name: str, value: Any, lo: int = 1,
              hi: int | None = None) -> None:
  """Raises ValueError unless ``value`` is a Python int in ``[lo, hi]``.

  Ranks, bit widths, group and queue sizes set array shapes, so they cannot
  be traced: under ``optax.inject_hyperparams`` they must be listed in
  ``static_args`` (the message says so when it receives an array).
  """
  ok = (isinstance(value, int) and not isinstance(value, bool)
        and value >= lo and (hi is None or value <= hi))
  if ok:
    return
  expected = (f"an int in [{lo}, {hi}]" if hi is not None else
              "a positive int" if lo == 1 else f"an int >= {lo}")
  msg = f"`{name}` must be {expected}, got {value!r}."
  if isinstance(value, jax.Array):
    msg += (f" `{name}` sets array shapes, so it cannot be an array or a "
            f"traced hyper-parameter: under optax.inject_hyperparams, list "
            f"it in static_args, e.g. static_args=({name!r},).")
  raise ValueError(msg)


def check_state_dtype(state_dtype) -> None:
  """Raises ValueError unless ``state_dtype`` is None (the params' dtype)
  or a floating dtype: moments are running averages of gradients."""
  if state_dtype is None:
    return
  try:
    dt = jnp.dtype(state_dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(
      f"`state_dtype` must be a floating dtype (float32, bfloat16, ...) or "
      f"None for the params' dtype, got {state_dtype!r}. For 8-bit or "
      "4-bit moments pass state_quant=8 or 4.")


def compute_dtype(dtype) -> jnp.dtype:
  """float32, or float64 for float64 inputs (x64 parity runs)."""
  return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64
                   else jnp.float32)


def hp(value: Any, dtype) -> jax.Array:
  """A hyper-parameter as a scalar of ``dtype`` (strict-promotion safe)."""
  return jnp.asarray(value).astype(dtype)


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


def map_n(fn, tree, *rest, n: int, elementwise: bool = False):
  """``tree_map`` for a ``fn`` returning an ``n``-tuple; returns n trees.

  ``rest`` must have ``tree``'s structure (as optimizer states do).

  ``elementwise=True`` declares that ``fn`` treats elements independently
  (each output element depends on the same element of the inputs, and
  scalar outputs are sums over elements, as spike counts are). Then a leaf
  whose ``rest`` leaves are all block-quantized
  (:class:`jqlm.optim.QuantizedMoment`) is updated in chunks of whole
  blocks by :func:`map_blocks`: its float32 copies and the encoder's
  scratch exist for one chunk at a time, not for the whole tree (on
  LLaMA-350M, 8-bit AdamW's temporaries fall from 11.8 GB to the size of
  one chunk; docs/benchmarks.md). The results are bit-identical.
  """
  leaves, treedef = jax.tree.flatten(tree)
  rest_leaves = [treedef.flatten_up_to(r) for r in rest]
  outs = []
  for args in zip(leaves, *rest_leaves, strict=True):
    if elementwise and _chunkable(args):
      outs.append(map_blocks(fn, *args))
    else:
      outs.append(fn(*args))
  return tuple(
    treedef.unflatten([o[i] for o in outs]) for i in range(n)
  )


CHUNK_ELEMENTS = 1 << 21
"""Elements per chunk of :func:`map_blocks` (8 MB of float32)."""


def _chunkable(args) -> bool:
  g, *states = args
  if not states or not all(isinstance(x, qstate.QuantizedMoment)
                           for x in states):
    return False
  block = states[0].quant.block_size
  size = math.prod(g.shape)
  return (all(x.quant.block_size == block and tuple(x.shape) == tuple(
    g.shape) for x in states) and size % block == 0
          and size > CHUNK_ELEMENTS)


def _chunk_blocks(num_blocks: int, block: int) -> int:
  """The largest divisor of ``num_blocks`` with at most
  :data:`CHUNK_ELEMENTS` elements per chunk (at least one block)."""
  best = 1
  limit = max(CHUNK_ELEMENTS // block, 1)
  for d in range(1, math.isqrt(num_blocks) + 1):
    if num_blocks % d == 0:
      for c in (d, num_blocks // d):
        if best < c <= limit:
          best = c
  return best


def map_blocks(fn, g: jax.Array, *states):
  """``fn(g, *states)`` for an elementwise ``fn`` (see :func:`map_n`),
  computed by ``lax.map`` over chunks of whole quantization blocks.

  A chunk sees a flat slice of ``g`` and the moments of the same blocks
  (as :class:`jqlm.optim.QuantizedMoment` of the slice's shape), so every
  block is decoded, updated and encoded exactly as unchunked. Array
  outputs are reassembled to ``g``'s shape, moments to their stored
  layout, and scalar outputs are summed over chunks.
  """
  q0 = states[0]
  block = q0.quant.block_size
  nb = q0.codes.shape[0]
  cb = _chunk_blocks(nb, block)
  nc = nb // cb
  g_c = g.reshape(nc, cb * block)
  parts = [(x.codes.reshape(nc, cb, -1), x.absmax.reshape(nc, cb))
           for x in states]

  def one(args):
    g_i, st = args
    moments = [qstate.QuantizedMoment(codes=c, absmax=a, shape=(cb * block,),
                                      signed=x.signed, quant=x.quant,
                                      value_dtype=x.value_dtype)
               for (c, a), x in zip(st, states, strict=True)]
    return fn(g_i, *moments)

  outs = jax.lax.map(one, (g_c, parts))
  result = []
  for o in outs:
    if isinstance(o, qstate.QuantizedMoment):
      like = next(x for x in states if x.signed == o.signed)
      result.append(qstate.QuantizedMoment(
        codes=o.codes.reshape(like.codes.shape),
        absmax=o.absmax.reshape(like.absmax.shape), shape=like.shape,
        signed=o.signed, quant=o.quant, value_dtype=o.value_dtype))
    elif o.ndim == 1:  # one value per chunk: a count
      result.append(jnp.sum(o, dtype=o.dtype))
    else:
      result.append(o.reshape(g.shape))
  return tuple(result)


def leaf_keys(key, n: int, what: str = "Stochastic rounding") -> list:
  """``n`` independent sub-keys of ``key``, one per leaf of a pytree.

  Raises:
    ValueError: if ``key`` is None (randomness is never hidden or
      defaulted; style.md §3.2). ``what`` names the caller.
  """
  if key is None:
    raise ValueError(
      f"{what} needs an explicit PRNG key: pass key=jax.random.key(seed) "
      "and split it (or fold in the step) every step."
    )
  return list(jax.random.split(key, max(n, 1)))[:n]


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
  """Places the leaves of a fresh ``state`` that have no mesh like
  ``params``: replicated on the params' mesh.

  Called eagerly on mesh-sharded params, ``zeros_like`` moments already take
  each param's sharding; this also replicates the leaves created without
  one (counts, per-tensor statistics, block-quantized moments) on the same
  mesh, so ``jax.typeof(state)`` and the shardings are the same before and
  after a jitted update and the second step does not recompile. A no-op
  under jit and for unsharded params. (Under ``jax.jit(opt.init)``, give
  ``out_shardings`` instead.)
  """
  sharding = _mesh_sharding(params)
  if sharding is None:
    return state

  def place(x):
    if (not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer)
        or isinstance(x.sharding, jax.sharding.NamedSharding)):
      return x
    return jax.device_put(x, sharding)

  return jax.tree.map(place, state)


def _to_bits(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.floating):
    uint = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(x, uint)
  return x


def _from_bits(b: jax.Array, dtype) -> jax.Array:
  if jnp.issubdtype(dtype, jnp.floating):
    return jax.lax.bitcast_convert_type(b, dtype)
  return b


def fused_sums(fn, arrays, scalars=(), out_dtypes=(jnp.int32,)):
  """``tuple(sum(v) for v in fn(*elements, *scalars))`` in one pass.

  One variadic reduction over the raw ``arrays``: XLA:CPU writes the inputs
  of a reduction to memory unless they are plain operands, so ``sum(f(x))``
  costs a write and a read of ``f(x)`` on top of reading ``x``. Here the
  elementwise ``fn`` runs inside the combiner instead: an int32 flag operand
  is -1 for a raw element and 0 for a partial sum, and the combiner applies
  ``fn`` to raw elements only (10x faster than ``count_nonzero(mask)`` for a
  spike count on CPU). Variadic reductions need one float width, so floats
  (scalars, float sums) travel as their bit patterns.

  Args:
    fn: elementwise function of ``(*elements, *scalars)`` returning a tuple
      of values to sum, with dtypes ``out_dtypes``.
    arrays: same-shape arrays (the raw operands).
    scalars: scalars ``fn`` needs (a reduction may not close over tracers).
    out_dtypes: dtypes of the sums.
  """
  arrays = tuple(arrays)
  shape = arrays[0].shape
  scalars = tuple(jnp.asarray(s_) for s_ in scalars)
  out_dtypes = tuple(jnp.dtype(d) for d in out_dtypes)
  float_widths = {a.dtype for a in arrays if jnp.issubdtype(a.dtype,
                                                            jnp.floating)}
  if not shape or arrays[0].size == 0 or len(float_widths) > 1:
    vals = fn(*arrays, *scalars)
    return tuple(jnp.sum(v.astype(d)).astype(d)
                 for v, d in zip(vals, out_dtypes, strict=True))
  n, k = len(arrays), len(scalars)
  operands = (
    *arrays,
    *(jnp.broadcast_to(_to_bits(s_), shape) for s_ in scalars),
    *(jnp.zeros(shape, _to_bits(jnp.zeros((), d)).dtype) for d in out_dtypes),
    jnp.full(shape, -1, jnp.int32),
  )

  def tally(x):
    sums = [_from_bits(b, d)
            for b, d in zip(x[n + k:-1], out_dtypes, strict=True)]
    restored = [_from_bits(b, s_.dtype)
                for b, s_ in zip(x[n:n + k], scalars, strict=True)]
    vals = fn(*x[:n], *restored)
    return [jnp.where(x[-1] < 0, v.astype(d), s_)
            for v, s_, d in zip(vals, sums, out_dtypes, strict=True)]

  def combine(a, b):
    total = [ta + tb for ta, tb in zip(tally(a), tally(b), strict=True)]
    return (*(jnp.zeros_like(e) for e in a[:n + k]),
            *(_to_bits(t) for t in total), jnp.zeros_like(a[-1]))

  init = tuple(jnp.zeros((), o.dtype) for o in operands)
  # Reduce each row first (XLA:CPU splits a reduction with many outputs
  # across cores, a full reduction runs on one), then the row sums.
  rows = shape[0] if len(shape) > 1 else 1
  operands = tuple(o.reshape(rows, -1) for o in operands)
  out = jax.lax.reduce(operands, init, combine, (1,))
  return tuple(jnp.sum(_from_bits(b, d), dtype=d)
               for b, d in zip(out[n + k:-1], out_dtypes, strict=True))


def max_abs(x: jax.Array) -> jax.Array:
  """``max|x|`` (0 for an empty array) as one (max, min) reduction of ``x``.

  Reducing ``x`` itself, rather than ``abs(x)``, keeps XLA:CPU from writing
  ``abs(x)`` to memory before reducing it (it does inside Stable-SPAM's
  update, where ``abs(x)`` has other users).
  """
  if x.size == 0:
    return jnp.zeros((), x.dtype)
  x2 = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1)  # rows first
  hi, lo = jax.lax.reduce(
    (x2, x2),
    (jnp.array(-jnp.inf, x.dtype), jnp.array(jnp.inf, x.dtype)),
    lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])),
    (1,),
  )
  return jnp.maximum(jnp.max(hi), -jnp.min(lo))
