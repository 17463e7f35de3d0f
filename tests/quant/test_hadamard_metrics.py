"""hadamard and quantization_error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlm import quant
from tests.utils import np32, tolerance


def _sylvester(n):
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_matches_sylvester_matrix(n):
  x = jax.random.normal(jax.random.key(0), (3, n), jnp.float32)
  np.testing.assert_allclose(
    np32(quant.hadamard(x)), np32(x) @ _sylvester(n).T, **tolerance(jnp.float32)
  )


def test_randomized_hadamard_is_orthonormal_and_invertible():
  x = jax.random.normal(jax.random.key(1), (16, 4, 32), jnp.float32)
  k = jax.random.key(2)
  y = quant.hadamard(x, axis=0, key=k)
  np.testing.assert_allclose(
    np.linalg.norm(np32(y), axis=0), np.linalg.norm(np32(x), axis=0),
    rtol=1e-5,
  )
  back = quant.hadamard(y, axis=0, key=k, inverse=True)
  np.testing.assert_allclose(np32(back), np32(x), **tolerance(jnp.float32))
  # Random signs differ from the plain transform, and the same key repeats.
  assert not np.allclose(np32(y), np32(quant.hadamard(x, axis=0)))
  np.testing.assert_array_equal(np32(y), np32(quant.hadamard(x, axis=0, key=k)))
  # The plain transform is its own inverse.
  z = quant.hadamard(quant.hadamard(x, axis=-1), axis=-1)
  np.testing.assert_allclose(np32(z), np32(x), **tolerance(jnp.float32))


def test_hadamard_spreads_outliers_and_helps_int4():
  x = jax.random.normal(jax.random.key(3), (64, 128), jnp.float32)
  x = x.at[:, 5].multiply(30.0)  # an outlier channel
  spec = quant.QuantSpec(format="int4", granularity="channel", axis=0)
  k = jax.random.key(4)
  plain = quant.quantization_error(x, quant.fake_quant(x, spec))
  xr = quant.hadamard(x, key=k)
  rot = quant.hadamard(quant.fake_quant(xr, spec), key=k, inverse=True)
  rotated = quant.quantization_error(x, rot)
  assert float(rotated.sqnr_db) > float(plain.sqnr_db) + 3.0


def test_hadamard_dtype_and_jit():
  x = jax.random.normal(jax.random.key(5), (4, 16), jnp.bfloat16)
  y = jax.jit(quant.hadamard)(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np32(y), np32(quant.hadamard(x)),
                             **tolerance(jnp.bfloat16))


def test_hadamard_errors():
  with pytest.raises(ValueError, match="power-of-two"):
    quant.hadamard(jnp.ones((4, 12), jnp.float32))
  with pytest.raises(ValueError, match="floating-point"):
    quant.hadamard(jnp.ones((4, 8), jnp.int32))
  with pytest.raises(ValueError, match="out of range"):
    quant.hadamard(jnp.ones((4, 8), jnp.float32), axis=3)


def test_quantization_error_values():
  x = jnp.asarray([1.0, -2.0, 3.0, 0.0], jnp.float32)
  x_hat = jnp.asarray([1.0, -1.5, 3.0, 0.5], jnp.float32)
  err = quant.quantization_error(x, x_hat)
  assert float(err.mse) == pytest.approx((0.25 + 0.25) / 4)
  assert float(err.max_error) == pytest.approx(0.5)
  assert float(err.sqnr_db) == pytest.approx(10 * np.log10(14 / 0.5))
  exact = quant.quantization_error(x, x)
  assert float(exact.sqnr_db) == np.inf and float(exact.mse) == 0.0
  with pytest.raises(ValueError, match="shapes differ"):
    quant.quantization_error(x, x[:2])


def test_qmatmul_reference():
  x = jax.random.normal(jax.random.key(6), (3, 64), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(7), (64, 32), jnp.float32)
  q = quant.quantize(w, quant.QuantSpec(format="int8", granularity="group",
                                        axis=0, group_size=32))
  y = quant.qmatmul_reference(x, q)
  assert y.dtype == jnp.bfloat16 and y.shape == (3, 32)
  expect = np32(x).astype(np.float64) @ np32(q.dequantize()).astype(np.float64)
  np.testing.assert_allclose(np32(y), expect, **tolerance(jnp.bfloat16))
  with pytest.raises(ValueError, match="do not match"):
    quant.qmatmul_reference(x[:, :10], q)
