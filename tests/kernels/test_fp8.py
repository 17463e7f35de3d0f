"""FP8 Pallas kernel against its reference in interpret mode, and
jqlm.ops.qmatmul_fp8."""

import jax.numpy as jnp
import numpy as np
import pytest
from jqlm_kernels import fp8

from jqlm import ops, quant


def _data(m, k, n, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(m, k)), jnp.float32),
          jnp.asarray(rng.normal(size=(k, n)), jnp.float32))


@pytest.mark.parametrize("m, k, n, bm, bn, bk, platform", [
  (16, 128, 64, 16, 64, 64, "gpu"),
  (32, 256, 128, 16, 64, 128, "gpu"),
  (8, 256, 128, 8, 128, 128, "tpu"),
  (32, 512, 256, 16, 128, 256, "tpu"),
])
@pytest.mark.parametrize("rowwise", [True, False])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_kernel_matches_reference(m, k, n, bm, bn, bk, platform, rowwise,
                                  out_dtype, transpose_w):
  x, w = _data(m, k, n)
  xq, xs = fp8.quantize_fp8(x, rowwise=rowwise)
  wq_t, ws = fp8.quantize_fp8(w.T, rowwise=rowwise)  # per output channel
  wq, ws = wq_t.T, ws.T
  got = fp8.fp8_matmul(xq, xs, wq_t if transpose_w else wq, ws,
                       out_dtype=out_dtype, block_m=bm, block_n=bn,
                       block_k=bk, transpose_w=transpose_w,
                       platform=platform, interpret=True)
  want = fp8.reference(xq, xs, wq, ws, out_dtype)
  # products of e4m3 values are exact in f32; the kernel and the oracle
  # differ in summation order (<= 256 terms): 1e-5 relative in f32, and one
  # bf16 ulp (2^-8) after the final rounding.
  tol = dict(rtol=1e-5, atol=1e-4) if out_dtype == jnp.float32 else \
    dict(rtol=2**-7, atol=2**-7)
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), **tol)
  # e4m3 keeps 3 mantissa bits (half-ulp 2^-4 relative): on Gaussian data
  # the product is within 8% (Frobenius) of the float one.
  exact = np.asarray(x @ w)
  rel = np.linalg.norm(np.asarray(want, np.float32) - exact) / \
    np.linalg.norm(exact)
  assert rel < 0.08


def test_quantize_fp8_error_bound():
  x, _ = _data(16, 256, 1, seed=4)
  q, s = fp8.quantize_fp8(x)
  back = np.asarray(q.astype(jnp.float32) * s)
  xv = np.asarray(x)
  normal = np.abs(xv) / np.asarray(s) >= 2.0**-6  # above e4m3 subnormals
  assert np.all(np.abs(back - xv)[normal] <= 2.0**-4 * np.abs(xv)[normal])
  assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == fp8.E4M3_MAX


def test_invalid_inputs_raise():
  xq = jnp.zeros((16, 64), jnp.float8_e4m3fn)
  wq = jnp.zeros((64, 64), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="float8_e4m3fn"):
    fp8.fp8_matmul(xq.astype(jnp.float32), jnp.ones((16, 1)), wq,
                   jnp.ones((1, 64)), interpret=True)
  with pytest.raises(ValueError, match="scales"):
    fp8.fp8_matmul(xq, jnp.ones((8, 1)), wq, jnp.ones((1, 64)),
                   interpret=True)
  assert not fp8.can_use(10, 64, 64, block_m=16, block_n=64, block_k=32)
  assert "at least 16" in fp8.why_not(8, 64, 64, block_m=8, block_n=64,
                                      block_k=32)
  assert "128" in fp8.why_not(8, 64, 64, block_m=8, block_n=64,
                              block_k=32, platform="tpu")
  with pytest.raises(NotImplementedError):
    fp8.fp8_matmul(xq, jnp.ones((16, 1)), wq, jnp.ones((1, 64)), block_m=32,
                   interpret=True)


@pytest.mark.parametrize("gran", ["channel", "tensor"])
def test_qmatmul_fp8_pallas_equals_xla(gran):
  x, w = _data(16, 128, 64, seed=1)
  q = quant.quantize(w, quant.QuantSpec(format="fp8_e4m3", granularity=gran))
  x3 = x.reshape(2, 8, 128)
  ref = ops.qmatmul_fp8(x3, q)
  got = ops.qmatmul_fp8(x3, q, impl="pallas", interpret=True)
  assert got.shape == (2, 8, 64)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5,
                             atol=1e-4)
  exact = np.asarray(x3 @ w)
  assert np.linalg.norm(np.asarray(ref) - exact) < 0.08 * np.linalg.norm(exact)
  with pytest.raises(ValueError, match="'xla', 'pallas' or None"):
    ops.qmatmul_fp8(x3, q, impl="triton")
  with pytest.raises(ValueError, match="fp8_e4m3"):
    ops.qmatmul_fp8(x, quant.quantize(w, quant.QuantSpec(
      format="int8", granularity="channel")))
