"""quantize / dequantize / fake_quant: properties and reference parity."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jqlm import quant
from jqlm.quant import QArray, QuantSpec
from tests.quant import references as ref
from tests.utils import np32, tolerance

INT_FORMATS = [f"int{b}" for b in range(2, 9)] + [f"uint{b}" for b in (2, 4, 8)]
ALL_FORMATS = [f.value for f in quant.Format]


def _data(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(
    dtype
  )


def _gran(granularity, axis=-1, group_size=None):
  return dict(granularity=granularity, axis=axis, group_size=group_size)


GRANULARITIES = [
  _gran("tensor"),
  _gran("channel", axis=0),
  _gran("channel", axis=-1),
  _gran("group", axis=-1, group_size=16),
  _gran("group", axis=0, group_size=4),
  _gran("flat_group", group_size=32),
]


def _spec(fmt, gran, **kw):
  kw = {**gran, **kw}
  if kw["granularity"] in ("tensor", "flat_group"):
    kw.pop("axis")
  if kw.get("group_size") is None:
    kw.pop("group_size")
  if fmt.startswith("mx") and kw["granularity"] not in ("group", "flat_group"):
    kw = dict(granularity="group", group_size=16)
  return QuantSpec(format=fmt, **kw)


# --------------------------------------------------------------------------
# Round-to-nearest error bound: |x - x_hat| <= scale / 2 per element.


@given(
  fmt=st.sampled_from(INT_FORMATS),
  gran=st.sampled_from(GRANULARITIES),
  seed=st.integers(0, 2**16),
)
def test_rtn_error_at_most_half_a_step(fmt, gran, seed):
  x = _data((8, 64), seed)
  spec = _spec(fmt, gran)
  q = quant.quantize(x, spec)
  x_hat = np32(q.dequantize())
  axis, _, _, _ = quant.group_layout(spec, x.shape)
  scale = np32(q.scale)
  if spec.granularity.value == "group":
    scale = np.repeat(scale, spec.group_size, axis=axis)
  elif spec.granularity.value == "flat_group":
    scale = np.repeat(scale, spec.group_size).reshape(x.shape)
  else:
    scale = np.broadcast_to(scale, x.shape)
  err = np.abs(np32(x) - x_hat)
  ok = err <= scale / 2 * (1 + 1e-6) + 1e-7
  if not spec.symmetric:
    # The asymmetric zero point covers only groups whose [min, max] holds 0;
    # a one-signed group saturates, as in the reference (tested below).
    v = _group_view(np32(x), spec)
    straddle = (v.min(axis=1) <= 0) & (v.max(axis=1) >= 0)
    mask = _ungroup(np.broadcast_to(straddle[:, None], v.shape), spec, x.shape)
    ok = ok | ~mask
  assert ok.all(), float((err - scale / 2).max())


def _group_view(x, spec):
  axis, _, _, _ = quant.group_layout(spec, x.shape)
  g = spec.granularity.value
  if g == "tensor":
    return x.reshape(1, -1)
  if g == "channel":
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
  if g == "group":
    return np.moveaxis(x, axis, -1).reshape(-1, spec.group_size)
  return x.reshape(-1, spec.group_size)


def _ungroup(v, spec, shape):
  axis, _, _, _ = quant.group_layout(spec, shape)
  g = spec.granularity.value
  if g == "channel":
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return np.moveaxis(v.reshape(moved), 0, axis)
  if g == "group":
    moved = tuple(d for i, d in enumerate(shape) if i != axis) + (shape[axis],)
    return np.moveaxis(v.reshape(moved), -1, axis)
  return v.reshape(shape)


def test_asymmetric_one_signed_group_saturates_like_reference():
  # Spec §5.2 quirk: all-positive group -> zero point clamps to 0.
  x = jnp.asarray(np.linspace(1.0, 2.0, 16, dtype=np.float32))
  q = quant.quantize(x, QuantSpec(format="uint4"))
  assert int(q.zero_point.reshape(())) == 0
  x_hat = np32(q.dequantize())
  assert x_hat.max() == pytest.approx(15 * (1.0 / 15))  # saturates at 1.0
  _, _, _, ref_hat = ref.uint_minmax_flat(np32(x), 4, 16)
  np.testing.assert_array_equal(x_hat, ref_hat.reshape(-1))


# --------------------------------------------------------------------------
# Parity with the reference quantizers of the PyTorch code (spec §3.4, §5.2).


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(64, 256), (48, 96)])
def test_uint_minmax_flat_matches_qgalore_reference(bits, shape):
  x = _data(shape, 3) * 0.02
  spec = QuantSpec(format=f"uint{bits}", granularity="flat_group",
                   group_size=256, eps=1e-5)
  q = quant.quantize(x, spec)
  rq, rscale, rzero, rdeq = ref.uint_minmax_flat(np32(x), bits, 256)
  np.testing.assert_array_equal(np32(q.codes).reshape(-1, 256), rq)
  # XLA may turn `/ 15` into `* (1/15)`: allow one float32 ulp (2^-23).
  one_ulp = dict(rtol=2.0**-23, atol=0)
  np.testing.assert_allclose(np32(q.scale), rscale.reshape(-1), **one_ulp)
  np.testing.assert_array_equal(np32(q.zero_point), rzero.reshape(-1))
  np.testing.assert_allclose(
    np32(q.dequantize()).reshape(-1, 256), rdeq, rtol=2.0**-22, atol=0
  )


@pytest.mark.parametrize("shape", [(1376, 512), (96, 48)])
def test_flat_group_axis0_groups_a_flax_kernel_like_torch(shape):
  """``axis=0`` on a Flax kernel (in, out) = W^T groups like torch's
  row-major (out, in) W, groups straddling rows when in % 256 != 0
  (the 60M down_proj, spec §5.3)."""
  w_torch = _data(shape[::-1], 5) * 0.02  # (out, in)
  kernel = w_torch.T
  spec = QuantSpec(format="uint8", granularity="flat_group", group_size=256,
                   eps=1e-5)
  q_k = quant.quantize(kernel, spec.replace(axis=0))
  q_t = quant.quantize(w_torch, spec)
  assert q_k.codes.shape == kernel.shape
  np.testing.assert_array_equal(np32(q_k.codes), np32(q_t.codes).T)
  np.testing.assert_array_equal(np32(q_k.scale), np32(q_t.scale))
  np.testing.assert_array_equal(np32(q_k.dequantize()),
                                np32(q_t.dequantize()).T)


def test_int4_activation_top2_matches_stable_spam_reference():
  x = _data((16, 512), 4)
  spec = QuantSpec(format="int4", granularity="flat_group", group_size=256,
                   keep_outliers=2, eps=1e-6)
  out = np32(quant.fake_quant(x, spec))
  expect = ref.int_act_topk(np32(x), 4, 256, 2).reshape(x.shape)
  np.testing.assert_allclose(out, expect, **tolerance(jnp.float32))


def test_fp4_e1m2_matches_stable_spam_reference():
  x = _data((8, 512), 5)
  spec = QuantSpec(format="fp4_e1m2", granularity="flat_group",
                   group_size=256, keep_outliers=2, code_max=1.0, eps=1e-6)
  out = np32(quant.fake_quant(x, spec))
  expect = ref.fp4_e1m2_stable_spam(np32(x)).reshape(x.shape)
  np.testing.assert_allclose(out, expect, **tolerance(jnp.float32))


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "mxint8"])
def test_mx_matches_ocp_reference(fmt):
  x = _data((8, 128), 6) * 3.0
  q = quant.quantize(x, QuantSpec(format=fmt))
  s = np32(q.scale)
  assert q.scale.dtype == jnp.float8_e8m0fnu
  np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)
  np.testing.assert_array_equal(
    np32(q.dequantize()), ref.mx_quantize(np32(x), fmt).reshape(x.shape)
  )


# --------------------------------------------------------------------------
# Float codes equal the ml_dtypes casts.


@pytest.mark.parametrize(
  "fmt, dt, fmax",
  [
    ("fp8_e4m3", ml_dtypes.float8_e4m3fn, 448.0),
    ("fp8_e5m2", ml_dtypes.float8_e5m2, 57344.0),
    ("fp4_e2m1", ml_dtypes.float4_e2m1fn, 6.0),
  ],
)
@pytest.mark.parametrize("gran", GRANULARITIES[:4])
def test_float_codes_equal_ml_dtypes_casts(fmt, dt, fmax, gran):
  x = _data((8, 64), 7) * 10.0
  spec = _spec(fmt, gran)
  q = quant.quantize(x, spec)
  xs = np32(x)
  v = _group_view(xs, spec)
  scale = (np.abs(v).max(axis=1, keepdims=True) / np.float32(fmax)).astype(
    np.float32
  )
  y = _ungroup(np.broadcast_to(v / scale, v.shape), spec, x.shape)
  expect = y.astype(dt)
  assert q.codes.dtype == jnp.dtype(dt)
  np.testing.assert_array_equal(
    np.asarray(q.codes).view(np.uint8), expect.view(np.uint8)
  )


# --------------------------------------------------------------------------
# Codebooks round-trip.


@pytest.mark.parametrize("mult", [1.0, 0.5, 4.0])
def test_nf4_codebook_values_round_trip_exactly(mult):
  x = jnp.asarray(quant.NF4_VALUES * np.float32(mult))
  q = quant.quantize(x, QuantSpec(format="nf4"))
  np.testing.assert_array_equal(np32(q.codes), np.arange(16))
  np.testing.assert_array_equal(np32(q.dequantize()), np32(x))


def test_e1m2_and_e2m1_grids_round_trip_exactly():
  mags = quant.E1M2_VALUES[:8]
  x = jnp.asarray(np.concatenate([mags, -mags[1:]]))
  q = quant.quantize(x, QuantSpec(format="fp4_e1m2"))
  np.testing.assert_array_equal(np32(q.dequantize()), np32(x))
  e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
  x = jnp.asarray(np.concatenate([e2m1, -e2m1[1:]]))
  q = quant.quantize(x, QuantSpec(format="fp4_e2m1"))
  np.testing.assert_array_equal(np32(q.dequantize()), np32(x))


def test_ternary_and_binary():
  x = jnp.asarray(np.array([[-2.0, -0.1, 0.0, 0.2, 3.0, 1.0]], np.float32))
  q = quant.quantize(x, QuantSpec(format="ternary"))
  s = float(np.mean(np.abs(np32(x))))
  np.testing.assert_allclose(float(q.scale.reshape(())), s, rtol=1e-6)
  np.testing.assert_array_equal(np32(q.codes), [[-1, 0, 0, 0, 1, 1]])
  b = quant.quantize(x, QuantSpec(format="binary"))
  np.testing.assert_array_equal(np32(b.codes), [[-1, -1, 1, 1, 1, 1]])
  assert b.codes.dtype == jnp.int2 and q.codes.dtype == jnp.int2


# --------------------------------------------------------------------------
# Layout: scale shapes follow the granularity; codes keep x's shape.


@pytest.mark.parametrize(
  "gran, sshape",
  [
    (_gran("tensor"), (1, 1, 1)),
    (_gran("channel", axis=1), (1, 8, 1)),
    (_gran("group", axis=-1, group_size=8), (4, 8, 2)),
    (_gran("group", axis=0, group_size=2), (2, 8, 16)),
    (_gran("flat_group", group_size=64), (8,)),
  ],
)
def test_scale_shape(gran, sshape):
  x = _data((4, 8, 16))
  q = quant.quantize(x, _spec("int8", gran))
  assert q.codes.shape == x.shape and q.scale.shape == sshape


def test_code_dtypes_are_narrowest():
  x = _data((4, 32))
  for fmt in ALL_FORMATS:
    q = quant.quantize(x, _spec(fmt, _gran("tensor")))
    assert q.codes.dtype == jnp.dtype(quant.format_info(fmt).code_dtype), fmt
    assert q.codes.dtype.itemsize == 1


# --------------------------------------------------------------------------
# Stochastic rounding inside quantize: unbiased, keyed.


@pytest.mark.parametrize(
  "fmt", ["int4", "uint4", "int8", "fp8_e4m3", "fp4_e2m1", "fp4_e1m2",
          "nf4", "ternary", "binary", "mxfp4"]
)
def test_stochastic_quantize_is_unbiased(fmt):
  n = 2048
  x = _data((2, 32), 8)
  spec = _spec(fmt, _gran("group", axis=-1, group_size=16),
               rounding="stochastic")
  keys = jax.random.split(jax.random.key(1), n)
  deq = jax.jit(jax.vmap(lambda k: quant.quantize(x, spec, key=k).dequantize()))
  samples = np.asarray(deq(keys)).astype(np.float64)
  q0 = quant.quantize(x, spec, key=keys[0])
  rtn = np32(quant.fake_quant(x, spec.replace(rounding="nearest")))
  # An element strictly between two grid points gets two distinct samples
  # one grid step apart; a Bernoulli mean then has std <= step / (2 sqrt n):
  # allow 5 sigma. An element on the grid, or beyond its ends (saturated by
  # the clamp, where SR cannot be unbiased, e.g. ternary |x| > mean|x|), gets
  # one value, which must equal round-to-nearest.
  step = samples.max(0) - samples.min(0)
  between = step > 0
  assert between.mean() > 0.4, between.mean()
  bound = 5 * step / (2 * np.sqrt(n)) + 1e-6 * np.abs(np32(x))
  err = np.abs(samples.mean(0) - np32(x))
  assert (err[between] <= bound[between]).all(), (err - bound).max()
  np.testing.assert_allclose(  # 1 ulp: jit+vmap fuses differently
    samples[0][~between], rtn[~between], rtol=2.0**-22, atol=0
  )
  assert q0.codes.dtype == jnp.dtype(quant.format_info(fmt).code_dtype)


def test_stochastic_same_key_same_result_and_keys_differ():
  x = _data((4, 64), 9)
  spec = QuantSpec(format="int4", rounding="stochastic")
  a = quant.quantize(x, spec, key=jax.random.key(0))
  b = quant.quantize(x, spec, key=jax.random.key(0))
  c = quant.quantize(x, spec, key=jax.random.key(1))
  np.testing.assert_array_equal(np32(a.codes), np32(b.codes))
  assert (np32(a.codes) != np32(c.codes)).any()


# --------------------------------------------------------------------------
# Transformations: jit == eager, vmap, grad = STE, dtype preserved.


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_jit_equals_eager(fmt):
  x = _data((4, 64), 10)
  spec = _spec(fmt, _gran("group", axis=-1, group_size=32))
  eager = quant.quantize(x, spec)
  jitted = jax.jit(quant.quantize, static_argnums=1)(x, spec)
  chex.assert_trees_all_equal_dtypes(eager, jitted)
  chex.assert_trees_all_equal_shapes(eager, jitted)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted),
                  strict=True):
    np.testing.assert_array_equal(np32(a), np32(b))
  np.testing.assert_array_equal(
    np32(eager.dequantize()), np32(jax.jit(quant.dequantize)(jitted))
  )


def test_vmap_equals_loop():
  x = _data((3, 4, 32), 11)
  spec = QuantSpec(format="int4", granularity="channel", axis=0)
  batched = jax.vmap(lambda a: quant.fake_quant(a, spec))(x)
  looped = jnp.stack([quant.fake_quant(x[i], spec) for i in range(3)])
  np.testing.assert_array_equal(np32(batched), np32(looped))


@pytest.mark.parametrize("fmt", ["int4", "uint4", "fp8_e4m3", "nf4", "mxfp4"])
def test_fake_quant_gradient_is_straight_through(fmt):
  x = _data((4, 64), 12)
  spec = _spec(fmt, _gran("group", axis=-1, group_size=32))
  w = _data((4, 64), 13)
  g = jax.grad(lambda a: jnp.sum(quant.fake_quant(a, spec) * w))(x)
  np.testing.assert_array_equal(np32(g), np32(w))
  # The forward value is exactly the dequantized value.
  np.testing.assert_array_equal(
    np32(quant.fake_quant(x, spec)),
    np32(quant.quantize(x, spec).dequantize()),
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_preserved(dtype):
  x = _data((4, 64), 14, dtype)
  spec = QuantSpec(format="int4", granularity="group", group_size=32)
  chex.assert_type(quant.fake_quant(x, spec), dtype)
  q = quant.quantize(x, spec)
  chex.assert_type([q.codes, q.scale], [jnp.int4, jnp.float32])
  chex.assert_shape([q.codes, q.scale], [(4, 64), (4, 2)])
  chex.assert_type(q.dequantize(), jnp.float32)
  chex.assert_type(q.dequantize(dtype), dtype)
  np.testing.assert_allclose(
    np32(quant.fake_quant(x, spec)), np32(q.dequantize()), **tolerance(dtype)
  )


def test_qarray_is_a_pytree():
  q = quant.quantize(_data((4, 32)), QuantSpec(format="uint4"))
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 3  # codes, scale, zero_point
  q2 = jax.tree.unflatten(treedef, leaves)
  assert isinstance(q2, QArray) and q2.spec == q.spec
  doubled = jax.tree.map(lambda a: a, q)
  np.testing.assert_array_equal(np32(doubled.codes), np32(q.codes))


def test_bits_per_element():
  q = quant.quantize(_data((4, 256)), QuantSpec(
    format="int4", granularity="group", group_size=128))
  assert q.bits_per_element == pytest.approx(4 + 32 / 128)
  assert q.nbytes == 4 * 256 // 2 + 8 * 4


# --------------------------------------------------------------------------
# Zeros, NaN/Inf policy.


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_all_zero_group_gives_zeros(fmt):
  x = _data((2, 32), 15).at[0].set(0.0)
  spec = _spec(fmt, _gran("channel", axis=0))
  if fmt.startswith("mx"):
    spec = QuantSpec(format=fmt, granularity="group", group_size=32)
  out = np32(quant.fake_quant(x, spec))
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[0], np.zeros(32))


def test_constant_asymmetric_group_is_exact():
  x = jnp.full((2, 16), 0.37, jnp.float32).at[1].set(-1.5)
  q = quant.quantize(x, QuantSpec(format="uint8", granularity="channel",
                                   axis=0))
  np.testing.assert_allclose(np32(q.dequantize()), np32(x), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fmt", ["int4", "uint4", "fp8_e4m3", "nf4", "mxfp8"])
def test_non_finite_poisons_only_its_group(bad, fmt):
  x = _data((2, 32), 16).at[0, 3].set(bad)
  spec = (QuantSpec(format=fmt) if fmt.startswith("mx")
          else QuantSpec(format=fmt, granularity="channel", axis=0))
  q = quant.quantize(x, spec)
  out = np32(q.dequantize())
  assert np.isnan(out[0]).all()
  assert np.isfinite(out[1]).all()
  np.testing.assert_allclose(  # 1 ulp: another shape fuses differently
    out[1], np32(quant.fake_quant(x[1:], spec))[0], rtol=2.0**-22, atol=0
  )


def test_non_finite_poisons_outliers_too():
  x = _data((2, 64), 17).at[0, 5].set(np.inf)
  spec = QuantSpec(format="int4", granularity="flat_group", group_size=64,
                   keep_outliers=2)
  out = np32(quant.fake_quant(x, spec))
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_outliers_are_exact():
  x = _data((4, 64), 18).at[1, 7].set(50.0).at[2, 9].set(-80.0)
  spec = QuantSpec(format="int4", granularity="group", group_size=64,
                   keep_outliers=2)
  q = quant.quantize(x, spec)
  out = np32(q.dequantize())
  assert out[1, 7] == 50.0 and out[2, 9] == -80.0
  assert q.outlier_values.shape == (4, 2)
  # With the outliers excluded the remaining scale is small.
  assert float(np32(q.scale).max()) < 1.0


# --------------------------------------------------------------------------
# Errors.


def test_errors():
  x = _data((6, 10))
  with pytest.raises(ValueError, match="floating-point"):
    quant.quantize(jnp.arange(6), QuantSpec())
  with pytest.raises(ValueError, match="floating-point"):
    quant.fake_quant(jnp.ones(4, bool), QuantSpec())
  with pytest.raises(ValueError, match="must divide the length 10"):
    quant.quantize(x, QuantSpec(granularity="group", group_size=4))
  with pytest.raises(ValueError, match="must divide the number of elements"):
    quant.quantize(x, QuantSpec(granularity="flat_group", group_size=7))
  with pytest.raises(ValueError, match="axis=2 is out of range"):
    quant.quantize(x, QuantSpec(granularity="channel", axis=2))
  with pytest.raises(ValueError, match="scalar"):
    quant.quantize(jnp.float32(1.0), QuantSpec(granularity="channel"))
  with pytest.raises(ValueError, match="PRNG key"):
    quant.quantize(x, QuantSpec(rounding="stochastic"))
  with pytest.raises(ValueError, match="PRNG key"):
    quant.fake_quant(x, QuantSpec(rounding="stochastic"))
  with pytest.raises(ValueError, match="keep_outliers=10"):
    quant.quantize(x, QuantSpec(granularity="channel", axis=0,
                                keep_outliers=10))
  with pytest.raises(ValueError, match="QuantSpec"):
    quant.quantize(x, "int8")
  with pytest.raises(ValueError, match="QArray"):
    quant.dequantize(x)
  with pytest.raises(ValueError, match="floating"):
    quant.dequantize(quant.quantize(x, QuantSpec()), jnp.int32)


class FakeQuantVariantsTest(chex.TestCase):
  """fake_quant and its STE gradient agree with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_fake_quant_and_grad(self):
    spec = QuantSpec(format="uint4", granularity="group", group_size=32)
    x = _data((4, 64), 20)

    @self.variant
    def f(a):
      return quant.fake_quant(a, spec), jax.grad(
        lambda b: jnp.sum(quant.fake_quant(b, spec) ** 2))(a)

    y, g = f(x)
    expect = quant.quantize(x, spec).dequantize()
    chex.assert_trees_all_close(y, expect, atol=0, rtol=2.0**-22)
    chex.assert_trees_all_close(g, 2 * expect, atol=0, rtol=2.0**-21)
