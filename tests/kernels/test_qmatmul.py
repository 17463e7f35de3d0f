"""jqlm.ops.qmatmul: dispatch, interpret-mode kernels and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlm import ops, quant

SPECS = {
  "int8 channel": quant.QuantSpec(format="int8", granularity="channel"),
  "int4 group64": quant.QuantSpec(format="int4", granularity="group",
                                  group_size=64, axis=0),
  "uint4 group32 zp": quant.QuantSpec(format="uint4", granularity="group",
                                      group_size=32, axis=0),
  "uint8 channel zp": quant.QuantSpec(format="uint8", granularity="channel"),
}


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(128, 64)) * 0.05, jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 8, 128)), jnp.float32)
  return x, w


# Integer code ranges of the formats above.
CODE_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7),
              "uint4": (0, 15)}


def _np_dequantize(q) -> np.ndarray:
  """The float64 weight of a ``(K, N)`` QArray, from its raw fields and
  written out in numpy (independently of jqlm.quant's dequantize):
  ``w[k, n] = (code[k, n] - zero[g(k), n]) * scale[g(k), n]``, with one
  scale row per output channel (``g(k) = 0``) or per group of ``G`` rows
  along K (``g(k) = k // G``). NF4 codes index the QLoRA codebook
  (``quant.NF4_VALUES``, the format's data) and have no zero point."""
  codes = np.asarray(q.codes.astype(jnp.int32)).astype(np.int64)
  k, n = codes.shape
  fmt, gran = q.spec.format.value, q.spec.granularity.value
  group = q.spec.group_size if gran == "group" else k
  assert gran in ("channel", "group") and k % group == 0
  scale = np.asarray(q.scale, np.float64)
  assert scale.shape == (k // group, n)
  rows = np.arange(k) // group  # the scale row of each weight row
  if fmt == "nf4":
    assert q.zero_point is None and codes.min() >= 0 and codes.max() <= 15
    values = np.asarray(quant.NF4_VALUES, np.float64)[codes]
  else:
    lo, hi = CODE_RANGE[fmt]
    assert codes.min() >= lo and codes.max() <= hi
    zero = np.zeros_like(scale) if q.zero_point is None else \
      np.asarray(q.zero_point.astype(jnp.int32)).astype(np.float64)
    values = codes - zero[rows]
  return values * scale[rows]


def _assert_near_f32_matmul(got, x, w64):
  """``got`` is a float32 ``x @ w`` up to float32 rounding. The float32
  paths round each dequantized weight once, accumulate K products (any
  order) and round the output: by the standard error analysis,
  ``|got - x w| <= (K + 2) u (|x| @ |w|)`` elementwise with
  ``u = 2^-24`` (float32's unit roundoff; the first-order bound, whose
  second-order term is below 1e-3 of it at K = 128)."""
  x64 = np.asarray(x, np.float64).reshape(-1, w64.shape[0])
  want = x64 @ w64
  k = w64.shape[0]
  bound = (k + 2) * 2.0**-24 * (np.abs(x64) @ np.abs(w64))
  err = np.abs(np.asarray(got, np.float64).reshape(want.shape) - want)
  worst = float(np.max(err / np.maximum(bound, 1e-300)))
  assert np.all(err <= bound), f"error up to {worst:.2f}x the f32 bound"


@pytest.mark.parametrize("name", list(SPECS))
def test_xla_and_pallas_interpret_equal_a_numpy_reference(data, name):
  x, w = data
  q = quant.quantize(w, SPECS[name])
  w64 = _np_dequantize(q)
  # the weight is a quantization of w (half a step per element, at most)
  half_step = 0.5 * np.repeat(np.asarray(q.scale, np.float64),
                              w64.shape[0] // q.scale.shape[0], axis=0)
  assert np.all(np.abs(w64 - np.asarray(w, np.float64))
                <= half_step * (1 + 1e-6))
  ref = ops.qmatmul(x, q, impl="xla")
  assert ref.shape == (2, 8, 64) and ref.dtype == jnp.float32
  _assert_near_f32_matmul(ref, x, w64)
  got = ops.qmatmul(x, q, impl="pallas", interpret=True)
  assert got.shape == (2, 8, 64)
  _assert_near_f32_matmul(got, x, w64)
  packed = q.pack() if q.spec.bits == 4 else q
  _assert_near_f32_matmul(ops.qmatmul(x, packed), x, w64)


def test_grad_through_qmatmul_matches_reference(data):
  x, w = data
  q = quant.quantize(w, SPECS["int4 group64"])

  def loss(x_, impl):
    return jnp.sum(jnp.sin(ops.qmatmul(x_, q, impl=impl, interpret=True)))

  g_kernel = jax.grad(loss)(x, "pallas")
  g_ref = jax.grad(lambda x_: jnp.sum(jnp.sin(x_ @ q.dequantize())))(x)
  np.testing.assert_allclose(np.asarray(g_kernel), np.asarray(g_ref),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_tapped_weight_gradient_is_the_dequantized_weight_gradient(data, impl):
  # Q-GaLore's int8 forward: the tap's cotangent is dL/dW at W = deq(q).
  x, w = data
  q = quant.quantize(w, SPECS["int8 channel"])

  def loss(x_, tap):
    y = ops.qmatmul(x_, ops.TappedWeight(q, tap), impl=impl, interpret=True)
    return jnp.sum(jnp.sin(y))

  gx, gw = jax.grad(loss, argnums=(0, 1))(x, jnp.zeros(w.shape))
  rx, rw = jax.grad(lambda x_, w_: jnp.sum(jnp.sin(x_ @ w_)),
                    argnums=(0, 1))(x, q.dequantize())
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5,
                             atol=1e-5)
  # the float fallback (TappedWeight.dequantize) gives the same gradient
  gw2 = jax.grad(lambda t: jnp.sum(jnp.sin(
    x @ ops.TappedWeight(q, t).dequantize())))(jnp.zeros(w.shape))
  np.testing.assert_allclose(np.asarray(gw2), np.asarray(rw), rtol=1e-5,
                             atol=1e-5)


def test_split_taps_round_trip():
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  params = {"q": quant.quantize(w, SPECS["int8 channel"]), "norm": jnp.ones(3)}
  diff, join = ops.split_taps(params)
  assert diff["q"].shape == (64, 32) and diff["q"].dtype == jnp.float32
  assert diff["norm"] is params["norm"]
  joined = join(diff)
  assert isinstance(joined["q"], ops.TappedWeight)
  assert joined["q"].qweight is params["q"] and joined["norm"] is diff["norm"]


def test_auto_dispatch_and_fallbacks(data):
  x, w = data
  q = quant.quantize(w, quant.QuantSpec(format="nf4", granularity="group",
                                        group_size=64, axis=0))
  # NF4 has no kernel: auto falls back to XLA, forcing pallas raises
  _assert_near_f32_matmul(ops.qmatmul(x, q), x, _np_dequantize(q))
  with pytest.raises(NotImplementedError, match="impl='xla'"):
    ops.qmatmul(x, q, impl="pallas", interpret=True)
  with pytest.raises(ValueError, match="QArray"):
    ops.qmatmul(x, w)
  if jax.default_backend() != "gpu":  # jax_triton imports only with a GPU
    q4 = quant.quantize(w, SPECS["int4 group64"])
    with pytest.raises(NotImplementedError, match="triton"):
      ops.qmatmul(x, q4, impl="triton")


def test_w8a8_dispatch_kernel_equals_xla(data):
  x, w = data
  q = quant.quantize(w, SPECS["int8 channel"])
  ref = ops.qmatmul_w8a8(x, q, impl="xla")
  got = ops.qmatmul_w8a8(x, q, impl="pallas", interpret=True)
  # both accumulate exactly in int32: equal up to float32 scaling order
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6,
                             atol=1e-6)
  exact = np.asarray(x @ w)
  rel = np.linalg.norm(np.asarray(ref) - exact) / np.linalg.norm(exact)
  assert rel < 0.02  # int8 rounding of activations and weights
  with pytest.raises(ValueError, match="per output"):
    ops.qmatmul_w8a8(x, quant.quantize(w, SPECS["int4 group64"]))


# --------------------------------------------------------------------------
# prepared weights: the kernel reads them as stored

_FREE = {"reshape", "squeeze", "expand_dims", "bitcast_convert_type"}


def _paths_to_kernel(closed, var_ids):
  """For each input variable index in ``var_ids``, the primitives on every
  path from it to a use; a prepared weight's arrays may only meet free
  reshapes before the ``pallas_call`` (nested jits are followed)."""
  bad, reached = [], []

  def follow(jaxpr, v, reached):
    for eqn in jaxpr.eqns:
      if not any(x is v for x in eqn.invars):
        continue
      name = eqn.primitive.name
      if name == "pallas_call":
        reached.append(name)
      elif name in ("pjit", "jit", "closed_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr"):
        sub = [j for j in jax.extend.core.jaxprs_in_params(eqn.params)][0]
        for i, x in enumerate(eqn.invars):
          if x is v:
            follow(sub, sub.invars[i], reached)
      elif name in _FREE:
        for o in eqn.outvars:
          follow(jaxpr, o, reached)
      else:
        bad.append(name)

  for i in var_ids:
    hits = []
    follow(closed.jaxpr, closed.jaxpr.invars[i], hits)
    reached.append(len(hits))
  return bad, reached


@pytest.mark.parametrize("name", ["int8 channel", "int4 group64",
                                  "uint4 group32 zp", "uint8 channel zp"])
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_prepared_weight_feeds_the_kernel_untouched(name, platform):
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=(512, 256)) * 0.05, jnp.float32)
  spec = SPECS[name]
  if platform == "tpu" and spec.granularity.value == "group":
    spec = spec.replace(group_size=128)  # TPU K-steps are 128 lanes
  q = ops.prepare(quant.quantize(w, spec))
  assert ops.is_prepared(q)
  x = jnp.asarray(rng.normal(size=(16, 512)), jnp.bfloat16)
  leaves, treedef = jax.tree.flatten(q)

  def f(x_, *leaves_):
    return ops.qmatmul(x_, treedef.unflatten(leaves_), impl="pallas",
                       platform=platform, interpret=True)

  closed = jax.make_jaxpr(f)(x, *leaves)
  bad, reached = _paths_to_kernel(closed, range(1, 1 + len(leaves)))
  assert not bad, f"ops touching the weight before the kernel: {bad}"
  assert all(r >= 1 for r in reached), reached  # every array reaches it
  # and the result is the numpy one (bf16 activations, f32 accumulation)
  got = np.asarray(f(x, *leaves), np.float64)
  want = np.asarray(x, np.float64) @ _np_dequantize(
    q.unpack() if isinstance(q, quant.PackedQArray) else q)
  np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7 * np.abs(
    want).max())


def test_unprepared_int4_is_repacked_per_call():
  """A 4-bit weight packed along N (or not packed) still runs, through a
  repack the jaxpr shows; prepare() removes it."""
  rng = np.random.default_rng(6)
  w = jnp.asarray(rng.normal(size=(128, 64)), jnp.float32)
  q = quant.quantize(w, SPECS["int4 group64"])
  x = jnp.asarray(rng.normal(size=(16, 128)), jnp.float32)
  for weight in (q, q.pack()):  # codes unpacked; packed along N
    assert not ops.is_prepared(weight)
    _assert_near_f32_matmul(
      ops.qmatmul(x, weight, impl="pallas", interpret=True), x,
      _np_dequantize(q))
  assert ops.is_prepared(ops.prepare(q.pack()))
  assert ops.prepare(q.pack()).axis == -2


def test_quantize_model_and_quantize_weights_store_prepared_weights():
  from flax import nnx  # noqa: PLC0415

  from jqlm import models, optim  # noqa: PLC0415
  cfg = models.llama_tiny()
  model = models.Llama(cfg, rngs=nnx.Rngs(0))
  for spec in (quant.QuantSpec(format="int4", granularity="group",
                               group_size=32, axis=0),
               quant.QuantSpec(format="int8", granularity="channel")):
    qm = models.quantize_model(model, spec)
    ws = [m.kernel.get_value() for _, m in nnx.iter_modules(qm)
          if isinstance(m, models.QLinear)
          and isinstance(m.kernel.get_value(),
                         (quant.QArray, quant.PackedQArray))]
    assert ws and all(ops.is_prepared(w) for w in ws)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  qp = optim.quantize_weights(params, models.block_linear_mask,
                              group_size=64)
  qs = [x for x in jax.tree.leaves(qp, is_leaf=lambda a: isinstance(
    a, quant.QArray)) if isinstance(x, quant.QArray)]
  assert qs and all(ops.is_prepared(q) for q in qs)
  # Q-GaLore's flat groups of the torch (out, in) weight are groups along
  # K of the (in, out) kernel: the same codes and scales, stored (K/G, N)
  w = jnp.asarray(np.random.default_rng(8).normal(size=(128, 32)),
                  jnp.float32)
  flat = quant.quantize(w, optim.qgalore.weight_spec(8, 64))
  grouped = quant.quantize(w, optim.qgalore.weight_spec(8, 64, w.shape))
  assert flat.spec.granularity.value == "flat_group"
  assert grouped.spec.granularity.value == "group"
  np.testing.assert_array_equal(np.asarray(flat.codes),
                                np.asarray(grouped.codes))
  np.testing.assert_array_equal(np.asarray(flat.scale).reshape(32, 2).T,
                                np.asarray(grouped.scale))


@pytest.mark.parametrize("kind", ["w8a8", "fp8"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_scaled_linear_gradient_is_the_low_precision_dgrad(data, kind, impl):
  """dx of W8A8 / FP8: the straight-through gradient, with g diag(s_w)
  quantized per row and multiplied by the codes: checked against a numpy
  transcription of that rule."""
  x, w = data
  fmt = "int8" if kind == "w8a8" else "fp8_e4m3"
  q = quant.quantize(w, quant.QuantSpec(format=fmt, granularity="channel"))
  fn = ops.qmatmul_w8a8 if kind == "w8a8" else ops.qmatmul_fp8
  gy = jnp.asarray(np.random.default_rng(7).normal(size=(2, 8, 64)),
                   jnp.float32)
  _, vjp = jax.vjp(lambda x_: fn(x_, q, impl=impl, interpret=True), x)
  (dx,) = vjp(gy)
  g64 = np.asarray(gy, np.float64).reshape(16, 64) * np.asarray(
    q.scale, np.float64).reshape(1, 64)
  amax = np.abs(g64).max(axis=1, keepdims=True)
  if kind == "w8a8":
    s = amax / 127.0
    gq = np.clip(np.round(g64 / s), -127, 127)
  else:
    s = amax / 448.0
    gq = np.asarray(jnp.asarray(g64 / s, jnp.float32).astype(
      jnp.float8_e4m3fn).astype(jnp.float32), np.float64)
  codes = np.asarray(q.codes.astype(jnp.float32), np.float64)
  want = (s * (gq @ codes.T)).reshape(2, 8, 128)
  np.testing.assert_allclose(np.asarray(dx, np.float64), want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  # and it is near the float gradient g W^T (int8: ~1%, e4m3: ~8%)
  exact = np.asarray(gy).reshape(16, 64) @ np.asarray(w).T
  rel = np.linalg.norm(np.asarray(dx).reshape(16, 128) - exact) / \
    np.linalg.norm(exact)
  assert rel < (0.03 if kind == "w8a8" else 0.1)


def test_scaled_matmul_errors():
  a = jnp.zeros((16, 64), jnp.int8)
  with pytest.raises(ValueError, match="the same"):
    ops.scaled_matmul(a, jnp.ones((16, 1)), a.astype(jnp.float8_e4m3fn).T,
                      jnp.ones((1, 16)))
  with pytest.raises(ValueError, match="contract"):
    ops.scaled_matmul(a, jnp.ones((16, 1)), jnp.zeros((32, 8), jnp.int8),
                      jnp.ones((1, 8)))
  with pytest.raises(ValueError, match="scales"):
    ops.scaled_matmul(a, jnp.ones((8, 1)), jnp.zeros((64, 8), jnp.int8),
                      jnp.ones((1, 8)))
