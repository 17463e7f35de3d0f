r"""A linear layer's three GEMMs under a low-precision training recipe.

:func:`quantized_dot` computes :math:`y = x W` with a ``custom_vjp`` whose
backward runs dgrad :math:`dx = dy\,W^\top` and wgrad :math:`dW = x^\top
dy` as the :class:`jqlm.quant.Recipe` says: each operand quantized
along its GEMM's contraction dim, rotated, stochastically rounded, masked
and taken from the saved high-precision tensors or the forward's quantized
ones (../shared/spec/lowp_training.md §11).

Two executions:

* ``"emulate"`` (every backend, every recipe): quantize, dequantize to
  float32, then a float32 dot at ``Precision.HIGHEST``, cast to the
  inputs' dtype. The operands a GEMM multiplies are then exactly the
  recipe's; only the accumulation order differs from the hardware's. The
  dot runs in float32 rather than in the compute dtype because the
  dequantized values of the two-level and EDEN scales are not bf16 values
  (a bf16 dot would round them a second time).
* ``"native"``: the GEMMs whose two operands have scales constant along
  the contraction dim (per tensor, per row: ``fp8_tensorwise``,
  ``fp8_rowwise``, the HALO recipes) multiply the element codes in their
  own dtype (XLA's fp8 dot; int8 with int32 accumulation) and scale the
  product by the outer product of the scales. Blocked formats (MX, NVFP4)
  need ``jax.nn.scaled_dot_general`` on Blackwell, which this backend
  cannot test; they are refused with the list of native recipes.

Deviations from the official code (each named in the spec):

* HALO's INT8 has no clamp, so a code may reach 128; the native int8 path
  clamps codes to ±127 (the emulated path keeps 128, as HALO does).
* Quartet's matrix-dtype drift under autocast (§7.3 quirk 4) and the
  bf16 outputs of the official kernels are not emulated; the forward H32
  is float32, QuEST's H128 is the official bf16 matrix.
* Quartet-II's sign vector is shared by all layers and advanced by every
  backward call; here each call draws its own from its ``key`` (one
  vector per call, shared by dgrad and wgrad, as in Q2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jqlm.quant import recipes as qr

IMPLS = ("emulate", "native")

_HIGHEST = jax.lax.Precision.HIGHEST
_NATIVE_SCALES = (qr.Scale.TENSOR, qr.Scale.AXIS, qr.Scale.HALO)
_CODE_DTYPES = {qr.Elem.E4M3: jnp.float8_e4m3fn, qr.Elem.E5M2:
                jnp.float8_e5m2, qr.Elem.INT8: jnp.int8}


def _native_operand(q: qr.OperandQuant | None) -> bool:
  return q is not None and q.scale in _NATIVE_SCALES and (
    q.elem in _CODE_DTYPES)


def native_supported(recipe: qr.Recipe) -> bool:
  """Whether every GEMM of ``recipe`` multiplies element codes whose scales
  are constant along the contraction dim (so it runs natively): both
  forward operands and, for each backward GEMM, both operands quantized
  (or reused from the forward) with per-tensor or per-row scales."""
  if not recipe.quantized:
    return False
  fwd = _native_operand(recipe.x) and _native_operand(recipe.w)
  dgrad_w = recipe.dgrad_w or (recipe.w if recipe.dgrad_w_source is
                               qr.Source.FORWARD else None)
  wgrad_x = recipe.wgrad_x or (recipe.x if recipe.wgrad_x_source is
                               qr.Source.FORWARD else None)
  # a reused forward operand keeps its scales only when they are per tensor
  reuse_ok = all(
    q is None or getattr(recipe, name) is not None or q.scale in (
      qr.Scale.TENSOR, qr.Scale.HALO)
    for name, q in (("dgrad_w", dgrad_w), ("wgrad_x", wgrad_x)))
  return fwd and reuse_ok and all(
    _native_operand(q) for q in (recipe.dgrad_dy, dgrad_w, recipe.wgrad_dy,
                                 wgrad_x))


def native_recipes() -> tuple[str, ...]:
  """The named recipes that run natively."""
  return tuple(n for n in qr.RECIPES if native_supported(qr.recipe(n)))


def _as_recipe(recipe) -> qr.Recipe:
  if isinstance(recipe, str):
    return qr.recipe(recipe)
  if not isinstance(recipe, qr.Recipe):
    raise ValueError(f"quantized_dot: recipe must be a jqlm.quant.Recipe or "
                     f"a recipe name ({', '.join(qr.RECIPES)}), got "
                     f"{recipe!r}.")
  return recipe


def _key_parts(key):
  """(raw uint32 key data, impl name) of a typed or raw PRNG key."""
  if key is None:
    return jnp.zeros((2,), jnp.uint32), None
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape:
      raise ValueError(f"quantized_dot: key must be a single PRNG key, got "
                       f"shape {key.shape}.")
    return jax.random.key_data(key), str(jax.random.key_impl(key))
  if key.dtype != jnp.uint32 or key.ndim != 1:
    raise ValueError(f"quantized_dot: key must be a PRNG key "
                     f"(jax.random.key(seed)), got dtype {key.dtype}, shape "
                     f"{key.shape}.")
  return key, "raw"


def _wrap(kd, impl):
  if impl is None:
    return None
  if impl == "raw":
    return kd
  return jax.random.wrap_key_data(kd, impl=impl)


def quantized_dot(x: jax.Array, w: jax.Array, recipe, *,
                  key: jax.Array | None = None,
                  impl: str | None = None,
                  stats: jax.Array | None = None) -> jax.Array:
  r"""``x @ w`` under a low-precision training ``recipe``, forward and
  backward.

  Args:
    x: activations ``[..., K]`` (leading dims are flattened to N tokens).
    w: the weight ``[K, M]``.
    recipe: a :class:`jqlm.quant.Recipe` or a recipe name
      (:func:`jqlm.quant.recipe`).
    key: a PRNG key, required when the recipe draws random numbers
      (stochastic rounding, random Hadamard signs): by the forward when
      its operands do, else only by the gradient (a forward-only call,
      such as evaluation, may omit it; differentiating such a call raises).
      Each operand folds in its own index, and the backward folds in 2:
      the same key gives the same rounding. Split it per layer and per
      step.
    impl: ``None`` (native where the recipe and backend allow it, else
      emulated), ``"emulate"`` or ``"native"`` (see the module docstring).
    stats: a probe: float32 zeros of shape ``[6, 2]`` (:data:`STATS_SHAPE`).
      It does not change ``y``; its *gradient* is, per operand of
      :data:`jqlm.quant.recipes.OPERANDS` (x, w, dgrad's dy and W,
      wgrad's x and dy), :func:`jqlm.quant.recipes.operand_fractions` of
      this call: the fractions of elements clipped and flushed to zero
      (rows of operands the recipe does not quantize, or reuses from the
      forward, are zero). The forward's rows are computed in the forward
      and carried to the backward; ``jax.grad`` of a loss w.r.t. the
      probes of a model's linears thus reads every GEMM operand's
      statistics in one pass (:func:`jqlm.models.recipe_probes`).

  Returns:
    ``y`` of shape ``[..., M]`` in ``result_type(x, w)``; its gradient
    w.r.t. ``x`` and ``w`` follows the recipe's dgrad and wgrad.

  Raises:
    ValueError: mismatched or non-floating shapes, a missing key for a
      random recipe, ``impl="native"`` for a recipe without a native
      path, or dims the recipe's blocks do not divide.
  """
  recipe = _as_recipe(recipe)
  if impl is not None and impl not in IMPLS:
    raise ValueError(f"quantized_dot: impl must be None, 'emulate' or "
                     f"'native', got {impl!r}.")
  x, w = jnp.asarray(x), jnp.asarray(w)
  for name, t in (("x", x), ("w", w)):
    if not jnp.issubdtype(t.dtype, jnp.floating):
      raise ValueError(f"quantized_dot: {name} must be floating point, got "
                       f"dtype {t.dtype}.")
  if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(
      f"quantized_dot: x of shape {tuple(x.shape)} cannot multiply w of "
      f"shape {tuple(w.shape)}: w must be [K, M] with K = x.shape[-1].")
  n = int(np.prod(x.shape[:-1]))
  qr.check_shapes(recipe, n, w.shape[0], w.shape[1], backward=False)
  native = native_supported(recipe)
  if impl == "native" and not native:
    raise ValueError(
      f"quantized_dot: recipe {recipe.name!r} has no native path (its "
      "scales vary along a contraction dim or its elements are FP4/levels); "
      f"the native recipes are {', '.join(native_recipes())}. Use "
      "impl='emulate'.")
  if impl is None:
    impl = "native" if native and jax.default_backend() == "gpu" else \
      "emulate"
  if key is None and any(q is not None and q.needs_key
                         for q in (recipe.x, recipe.w)):
    raise ValueError(f"quantized_dot: {qr.needs_key_message(recipe)}")
  kd, kimpl = _key_parts(key)
  lead = x.shape[:-1]
  dtypes = (jnp.result_type(x.dtype, w.dtype), x.dtype, w.dtype)
  want = stats is not None
  if want:
    stats = jnp.asarray(stats)
    if stats.shape != STATS_SHAPE or stats.dtype != jnp.float32:
      raise ValueError(f"quantized_dot: stats must be float32 zeros of "
                       f"shape {STATS_SHAPE}, got {stats.dtype} "
                       f"{tuple(stats.shape)}.")
  else:
    stats = jnp.zeros(STATS_SHAPE, jnp.float32)
  y = _qdot(recipe, impl, kimpl, dtypes, want, x.reshape(-1, x.shape[-1]),
            w, kd, stats)
  return y.reshape(*lead, w.shape[1])


STATS_SHAPE = (len(qr.OPERANDS), 2)
"""The shape of :func:`quantized_dot`'s ``stats`` probe: one row per
operand, ``[clipped, flushed]`` fractions."""


# ---------------------------------------------------------------------------


# the key schedule: forward operands fold in 0 (x) and 1 (w); the backward
# folds in 2, then 0-3 for its operands and 10/11 for the sign vectors
_FOLDS = {"x": (0,), "w": (1,), "dgrad_dy": (2, 0), "dgrad_w": (2, 1),
          "wgrad_x": (2, 2), "wgrad_dy": (2, 3)}


def _layouts(n, k, m):
  """Each operand's [other, contraction] shape."""
  return {"x": (n, k), "w": (m, k), "dgrad_dy": (n, m), "dgrad_w": (k, m),
          "wgrad_x": (k, n), "wgrad_dy": (m, n)}


def _noise(recipe, key, name, shape):
  q = getattr(recipe, name)
  if q is None or key is None:
    return None
  for i in _FOLDS[name]:
    key = jax.random.fold_in(key, i)
  return qr.operand_noise(key, q, shape)


def _signs(recipe, key):
  """The backward's sign vectors (dgrad, wgrad): one per call, shared by
  the two GEMMs when their rotations are the same."""
  if key is None:
    return None, None
  kb = jax.random.fold_in(key, 2)
  rot_d = recipe.dgrad_dy or recipe.dgrad_w
  rot_d = rot_d.rotation if rot_d is not None else None
  rot_w = recipe.wgrad_x or recipe.wgrad_dy
  rot_w = rot_w.rotation if rot_w is not None else None
  signs_d = qr.draw_signs(jax.random.fold_in(kb, 10), rot_d)
  signs_w = signs_d if rot_w == rot_d else qr.draw_signs(
    jax.random.fold_in(kb, 11), rot_w)
  return signs_d, signs_w


def quantized_dot_noise(recipe, key: jax.Array, n: int, k: int,
                        m: int) -> dict:
  """The random numbers :func:`quantized_dot` draws from ``key`` for x
  ``[n, k]`` and w ``[k, m]``: for each operand of :data:`jqlm.quant.
  recipes.OPERANDS` its :class:`jqlm.quant.recipes.OperandNoise` (or
  ``None``) in the operand's ``[other, contraction]`` layout, and the
  backward's sign vectors ``"signs_dgrad"``, ``"signs_wgrad"`` (``None``
  without random signs). For oracles and for reproducing one call."""
  recipe = _as_recipe(recipe)
  out = {name: _noise(recipe, key, name, shape)
         for name, shape in _layouts(n, k, m).items()}
  out["signs_dgrad"], out["signs_wgrad"] = _signs(recipe, key)
  return out


def _quant(t, q, axis, noise, signs=None, what="operand"):
  if q is None:
    return qr.Operand(t)
  return qr.quantize_operand(t, q, axis=axis, noise=noise, signs=signs,
                             what=what)


def _gemm(a: qr.Operand, b: qr.Operand, dims, impl: str, qa, qb):
  """``dot_general(a, b, dims)`` of two operands: the codes' native dot
  times the scales' outer product, or the float32 dot of the values."""
  if impl == "native" and a.codes is not None and b.codes is not None:
    ea, eb = qa.elem, qb.elem
    if ea is qr.Elem.INT8 or eb is qr.Elem.INT8:
      ca = jnp.clip(a.codes, -127, 127).astype(jnp.int8)
      cb = jnp.clip(b.codes, -127, 127).astype(jnp.int8)
      acc = jax.lax.dot_general(ca, cb, dims,
                                preferred_element_type=jnp.int32)
      acc = acc.astype(jnp.float32)
    else:
      acc = jax.lax.dot_general(
        a.codes.astype(_CODE_DTYPES[ea]), b.codes.astype(_CODE_DTYPES[eb]),
        dims, preferred_element_type=jnp.float32)
    # the scales have length 1 along the contraction dim: these dots are
    # their broadcasts onto the output, whose product is the outer product
    sa = jax.lax.dot_general(a.scale, jnp.ones_like(b.scale), dims)
    sb = jax.lax.dot_general(jnp.ones_like(a.scale), b.scale, dims)
    return acc * (sa * sb)
  return jax.lax.dot_general(a.values, b.values, dims, precision=_HIGHEST,
                             preferred_element_type=jnp.float32)


_NN = (((1,), (0,)), ((), ()))  # [N, K] x [K, M]
_NT = (((1,), (1,)), ((), ()))  # [N, M] x [K, M] -> [N, K]
_TN = (((0,), (0,)), ((), ()))  # [N, K] x [N, M] -> [K, M]


def _forward(recipe, impl, kimpl, x2, w, kd):
  key = _wrap(kd, kimpl)
  xr, wr = x2.astype(jnp.float32), w.astype(jnp.float32)
  if recipe.rotation is not None:
    xr = qr.rotate(xr, 1, recipe.rotation)
    wr = qr.rotate(wr, 0, recipe.rotation)
  n, k = x2.shape
  m = w.shape[1]
  xo = _quant(xr, recipe.x, 1, _noise(recipe, key, "x", (n, k)),
              what="x (forward, along K)")
  wo = _quant(wr, recipe.w, 0, _noise(recipe, key, "w", (m, k)),
              what="w (forward, along K)")
  y = _gemm(xo, wo, _NN, impl, recipe.x, recipe.w)
  return y, (xr, wr, xo, wo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _qdot(recipe, impl, kimpl, dtypes, want, x2, w, kd, stats):
  del want, stats  # read by the backward only
  y, _ = _forward(recipe, impl, kimpl, x2, w, kd)
  return y.astype(dtypes[0])


def _qdot_fwd(recipe, impl, kimpl, dtypes, want, x2, w, kd, stats):
  del stats
  # differentiated: the backward's blocks must fit too (named errors)
  qr.check_shapes(recipe, x2.shape[0], w.shape[0], w.shape[1])
  y, (xr, wr, xo, wo) = _forward(recipe, impl, kimpl, x2, w, kd)
  # keep only what the backward reads: the forward's quantized operands
  # when a backward GEMM reuses them, else the (rotated) high-precision ones
  x_src = xo if recipe.wgrad_x_source is qr.Source.FORWARD else \
    qr.Operand(xr)
  w_src = wo if recipe.dgrad_w_source is qr.Source.FORWARD else \
    qr.Operand(wr)
  fwd_stats = (jnp.stack([qr.operand_fractions(xo),
                          qr.operand_fractions(wo)]) if want else None)
  # the residuals drop the forward's clip/flush masks
  x_src = x_src._replace(clipped=None, flushed=None)
  w_src = w_src._replace(clipped=None, flushed=None)
  res = (x_src, w_src, xo.mask, wo.mask, kd, fwd_stats)
  return y.astype(dtypes[0]), res


def _qdot_bwd(recipe, impl, kimpl, dtypes, want, res, g):
  x_src, w_src, mask_x, mask_w, kd, fwd_stats = res
  _, x_dtype, w_dtype = dtypes
  if kimpl is None and recipe.needs_key:
    # a forward without a key (evaluation, generation) is fine; its
    # gradient is not
    raise ValueError(f"quantized_dot (backward): "
                     f"{qr.needs_key_message(recipe)}")
  key = _wrap(kd, kimpl)
  dy = g.astype(jnp.float32)
  r = recipe
  (n, m), k = dy.shape, w_src.values.shape[0]
  lay = _layouts(n, k, m)
  nz = {name: _noise(r, key, name, lay[name]) for name in lay}
  signs_d, signs_w = _signs(r, key)
  # dgrad: dx = dy W^T, contraction over M
  dyd = dy
  if r.token_rotation is not None:
    dyd = qr.rotate(dyd, 0, r.token_rotation)
  a = _quant(dyd, r.dgrad_dy, 1, nz["dgrad_dy"], signs_d,
             "dy (dgrad, along M)")
  b = w_src if r.dgrad_w is None and r.dgrad_w_source is qr.Source.FORWARD \
    else _quant(w_src.values, r.dgrad_w, 1, nz["dgrad_w"], signs_d,
                "w (dgrad, along M)")
  qb = r.dgrad_w or (r.w if r.dgrad_w_source is qr.Source.FORWARD else None)
  dx = _gemm(a, b, _NT, impl, r.dgrad_dy, qb)
  if r.token_rotation is not None:
    dx = qr.rotate(dx, 0, r.token_rotation, transpose=True)
  # wgrad: dW = x^T dy, contraction over N
  c = x_src if r.wgrad_x is None and r.wgrad_x_source is qr.Source.FORWARD \
    else _quant(x_src.values, r.wgrad_x, 0, nz["wgrad_x"], signs_w,
                "x (wgrad, along N)")
  qc = r.wgrad_x or (r.x if r.wgrad_x_source is qr.Source.FORWARD else None)
  d = _quant(dy, r.wgrad_dy, 0, nz["wgrad_dy"], signs_w,
             "dy (wgrad, along N)")
  dw = _gemm(c, d, _TN, impl, qc, r.wgrad_dy)
  if mask_x is not None:
    dx = jnp.where(mask_x, dx, 0.0)
  if mask_w is not None:
    dw = jnp.where(mask_w, dw, 0.0)
  if r.rotation is not None:
    dx = qr.rotate(dx, 1, r.rotation, transpose=True)
    dw = qr.rotate(dw, 0, r.rotation, transpose=True)
  zero_key = np.zeros(kd.shape, jax.dtypes.float0)
  if want:  # the probe's "gradient": every operand's fractions
    reused = qr.Operand(jnp.zeros(()))
    stats = jnp.concatenate([fwd_stats, jnp.stack([
      qr.operand_fractions(o) for o in (
        a, reused if b is w_src else b, reused if c is x_src else c, d)])])
  else:
    stats = jnp.zeros(STATS_SHAPE, jnp.float32)
  return dx.astype(x_dtype), dw.astype(w_dtype), zero_key, stats


_qdot.defvjp(_qdot_fwd, _qdot_bwd)
