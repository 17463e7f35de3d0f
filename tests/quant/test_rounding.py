"""stochastic_round, pack/unpack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jqlm import quant
from tests.utils import np32

N_KEYS = 4096


def _sr_samples(x, dtype, n=N_KEYS, noise="jax"):
  keys = jax.random.split(jax.random.key(0), n)
  f = jax.jit(jax.vmap(
    lambda k: quant.stochastic_round(x, dtype, key=k, noise=noise)))
  return np.asarray(f(keys).astype(jnp.float32)).astype(np.float64)


def _values(dtype, scale):
  x = jax.random.normal(jax.random.key(1), (256,), jnp.float32) * scale
  return x


def _grid(dtype) -> np.ndarray:
  """Every finite value of ``dtype``, sorted (numpy/ml_dtypes oracle)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float4_e2m1fn:
    m = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    return np.unique(np.concatenate([m, -m]))
  if jnp.issubdtype(dtype, jnp.integer):
    info = jnp.iinfo(dtype)
    return np.arange(int(info.min), int(info.max) + 1, dtype=np.float64)
  uint = {1: np.uint8, 2: np.uint16}[dtype.itemsize]
  vals = np.arange(2 ** (8 * dtype.itemsize), dtype=np.int64).astype(uint)
  with np.errstate(invalid="ignore"):  # NaN patterns
    vals = vals.view(dtype).astype(np.float64)
  return np.unique(vals[np.isfinite(vals)])


@pytest.mark.parametrize(
  "dtype, scale",
  [
    (jnp.bfloat16, 1.0),
    (jnp.bfloat16, 1e-30),  # tiny normals (XLA:CPU flushes f32 subnormals)
    (jnp.float16, 1.0),
    (jnp.float16, 1e-6),  # float16 subnormals
    (jnp.float8_e4m3fn, 10.0),
    (jnp.float8_e4m3fn, 1e-2),  # e4m3 subnormals
    (jnp.float8_e5m2, 10.0),
    (jnp.float4_e2m1fn, 2.0),
    (jnp.int8, 3.0),
    (jnp.int4, 2.0),
  ],
)
@pytest.mark.parametrize("noise", ["jax", "hash"])
def test_stochastic_round_is_unbiased(dtype, scale, noise):
  x = _values(dtype, scale)
  s = _sr_samples(x, dtype, noise=noise)
  x64 = np.asarray(x).astype(np.float64)
  grid = _grid(dtype)
  x64c = np.clip(x64, grid[0], grid[-1])
  lo = grid[np.searchsorted(grid, x64c, side="right") - 1]
  hi = grid[np.searchsorted(grid, x64c, side="left")]
  # Every sample is one of the two grid neighbours of x ...
  assert ((s == lo) | (s == hi)).all()
  # ... and the mean is x (saturated at the ends of the finite range, as
  # documented): |mean - x| <= 5 sigma of a Bernoulli mean.
  bound = 5 * (hi - lo) / (2 * np.sqrt(N_KEYS)) + 1e-12 * np.abs(x64)
  assert (np.abs(s.mean(0) - x64c) <= bound).all()
  assert (hi > lo).mean() > 0.9  # the test exercises real rounding


def test_stochastic_round_dtype_key_and_determinism():
  x = _values(None, 1.0)
  a = quant.stochastic_round(x, jnp.bfloat16, key=jax.random.key(3))
  b = quant.stochastic_round(x, jnp.bfloat16, key=jax.random.key(3))
  c = quant.stochastic_round(x, jnp.bfloat16, key=jax.random.key(4))
  assert a.dtype == jnp.bfloat16 and a.shape == x.shape
  np.testing.assert_array_equal(np32(a), np32(b))
  assert (np32(a) != np32(c)).any()
  out = quant.stochastic_round(x.astype(jnp.bfloat16), jnp.float8_e4m3fn,
                               key=jax.random.key(0))
  assert out.dtype == jnp.float8_e4m3fn
  assert quant.stochastic_round(x, jnp.float32, key=jax.random.key(0)).dtype \
    == jnp.float32


def test_stochastic_round_edge_values():
  x = jnp.asarray([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e6, -1e6], jnp.float32)
  k = jax.random.key(0)
  bf = np32(quant.stochastic_round(x, jnp.bfloat16, key=k))
  assert np.isnan(bf[0]) and bf[1] == np.inf and bf[2] == -np.inf
  assert bf[3] == 0.0
  e4 = np32(quant.stochastic_round(x, jnp.float8_e4m3fn, key=k))
  assert np.isnan(e4[0])
  np.testing.assert_array_equal(e4[1:], [448, -448, 0, 0, 448, -448])
  e5 = np32(quant.stochastic_round(x, jnp.float8_e5m2, key=k))
  assert e5[1] == np.inf and e5[5] == np.inf  # 1e6 > e5m2 max: RNE -> inf
  i8 = np32(quant.stochastic_round(x, jnp.int8, key=k))
  np.testing.assert_array_equal(i8, [0, 127, -128, 0, 0, 127, -128])


def test_hash_bits_are_uniform_and_keyed():
  bits = np.asarray(quant.hash_bits(jax.random.key(0), (256, 256)))
  again = np.asarray(quant.hash_bits(jax.random.key(0), (256, 256)))
  other = np.asarray(quant.hash_bits(jax.random.key(1), (256, 256)))
  np.testing.assert_array_equal(bits, again)
  assert (bits != other).mean() > 0.99
  # Chi-square over 256 buckets of the low and the high byte: 65536 draws,
  # 255 degrees of freedom; 400 is beyond the 0.9999 quantile (~350).
  for byte in (bits & 0xFF, bits >> 24):
    counts = np.bincount(byte.reshape(-1), minlength=256)
    chi2 = ((counts - 256.0) ** 2 / 256.0).sum()
    assert chi2 < 400, chi2
  # Neighbouring elements are uncorrelated.
  u = (bits >> 8).astype(np.float64) / 2**24
  r = np.corrcoef(u.reshape(-1)[:-1], u.reshape(-1)[1:])[0, 1]
  assert abs(r) < 0.02


def test_stochastic_round_errors():
  x = jnp.ones(4, jnp.float32)
  with pytest.raises(ValueError, match="PRNG key"):
    quant.stochastic_round(x, jnp.bfloat16, key=None)
  with pytest.raises(ValueError, match="floating-point"):
    quant.stochastic_round(jnp.ones(4, jnp.int32), jnp.bfloat16,
                           key=jax.random.key(0))
  with pytest.raises(ValueError, match="cannot target"):
    quant.stochastic_round(x, jnp.bool_, key=jax.random.key(0))
  with pytest.raises(ValueError, match="noise must be"):
    quant.stochastic_round(x, jnp.bfloat16, key=jax.random.key(0),
                           noise="philox")


def test_bf16_sr_matches_ml_dtypes_neighbours():
  # The two neighbours of x in bf16, computed independently with numpy.
  x = np.asarray(_values(None, 1.0))
  bits = x.view(np.uint32)
  down = (bits & np.uint32(0xFFFF0000)).view(np.float32)  # toward zero
  up_bits = (bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)
  up = up_bits.view(np.float32)  # away from zero
  s = _sr_samples(jnp.asarray(x), jnp.bfloat16, n=256)
  ok = (s == down.astype(np.float64)) | (s == up.astype(np.float64))
  assert ok.all()


# --------------------------------------------------------------------------
# pack / unpack


@given(
  dtype=st.sampled_from(
    [jnp.int4, jnp.uint4, jnp.int2, jnp.uint2, jnp.float4_e2m1fn]
  ),
  rows=st.integers(1, 5),
  cols_per=st.integers(1, 6),
  axis=st.sampled_from([0, 1, -1]),
  seed=st.integers(0, 1000),
)
@settings(max_examples=10)  # each example compiles new shapes
def test_pack_unpack_round_trip(dtype, rows, cols_per, axis, seed):
  bits = 2 if jnp.dtype(dtype).name.endswith("int2") else 4
  per = 8 // bits
  shape = [rows * per, cols_per * per]
  rng = np.random.default_rng(seed)
  if dtype == jnp.float4_e2m1fn:
    vals = rng.choice([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -6], size=shape)
    codes = jnp.asarray(vals.astype(np.float32)).astype(dtype)
  else:
    info = jnp.iinfo(dtype)
    codes = jnp.asarray(
      rng.integers(int(info.min), int(info.max) + 1, size=shape)
    ).astype(dtype)
  packed = quant.pack(codes, axis=axis)
  assert packed.dtype == jnp.uint8
  expect = list(shape)
  expect[axis] //= per
  assert list(packed.shape) == expect
  back = quant.unpack(packed, dtype, axis=axis)
  assert back.dtype == codes.dtype and back.shape == codes.shape
  np.testing.assert_array_equal(np32(back), np32(codes))


def test_pack_layout_segments():
  """Byte j holds code j of each contiguous segment (first segment in the
  low bits): a run of bytes unpacks into contiguous runs of codes."""
  codes = jnp.asarray([1, 2, -1, 7], jnp.int32).astype(jnp.int4)
  # low nibbles: codes 0, 1; high nibbles: codes 2, 3
  np.testing.assert_array_equal(np.asarray(quant.pack(codes)), [0xF1, 0x72])
  two = jnp.asarray([1, 0, -1, -2], jnp.int32).astype(jnp.int2)
  # one byte, one code per segment: 01, 00, 11, 10 -> 0b10_11_00_01
  np.testing.assert_array_equal(np.asarray(quant.pack(two)), [0b10110001])
  wide = jnp.asarray([3, 12], jnp.uint8)
  np.testing.assert_array_equal(np.asarray(quant.pack(wide, 4)), [0xC3])
  # an independent numpy transcription on a longer axis
  rng = np.random.default_rng(0)
  c = rng.integers(0, 16, size=(3, 10)).astype(np.uint8)
  want = c[:, :5] | (c[:, 5:] << 4)
  np.testing.assert_array_equal(
    np.asarray(quant.pack(jnp.asarray(c).astype(jnp.uint4))), want)


def test_pack_quantized_codes():
  x = jax.random.normal(jax.random.key(0), (8, 64), jnp.float32)
  q = quant.quantize(x, quant.QuantSpec(format="int4", granularity="group",
                                        group_size=32))
  p = quant.pack(q.codes, axis=0)
  assert p.shape == (4, 64) and p.nbytes == x.size // 2
  np.testing.assert_array_equal(np32(quant.unpack(p, jnp.int4, axis=0)),
                                np32(q.codes))


def test_pack_errors():
  with pytest.raises(ValueError, match="not divisible by 2"):
    quant.pack(jnp.zeros((3,), jnp.int4))
  with pytest.raises(ValueError, match="bits=2 contradicts"):
    quant.pack(jnp.zeros((4,), jnp.int4), 2)
  with pytest.raises(ValueError, match="2-bit and 4-bit"):
    quant.pack(jnp.zeros((4,), jnp.int8))
  with pytest.raises(ValueError, match="integer or float4"):
    quant.pack(jnp.zeros((4,), jnp.float32), 4)
  with pytest.raises(ValueError, match="axis=2 is out of range"):
    quant.pack(jnp.zeros((4,), jnp.int4), axis=2)
  with pytest.raises(ValueError, match="uint8"):
    quant.unpack(jnp.zeros((4,), jnp.int8), jnp.int4)
  with pytest.raises(ValueError, match="dtype must be one of"):
    quant.unpack(jnp.zeros((4,), jnp.uint8), jnp.int8)
