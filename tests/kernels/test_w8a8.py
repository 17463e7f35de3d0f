"""W8A8 Pallas kernel against its reference in interpret mode."""

import jax.numpy as jnp
import numpy as np
import pytest
from jqlm_kernels import w8a8

from jqlm import quant


@pytest.mark.parametrize("m, k, n, bm, bn, bk, platform", [
  (16, 128, 64, 16, 64, 64, "gpu"),
  (32, 256, 128, 16, 64, 128, "gpu"),
  (16, 64, 64, 16, 32, 32, "gpu"),
  (8, 256, 128, 8, 128, 128, "tpu"),
  (32, 512, 256, 16, 128, 256, "tpu"),
])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose_w", [False, True])
def test_kernel_matches_reference(m, k, n, bm, bn, bk, platform, out_dtype,
                                  transpose_w):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  xq, xs = w8a8.quantize_rows(x)
  q = quant.quantize(w, quant.QuantSpec(format="int8", granularity="channel"))
  ws = q.scale.reshape(1, n)
  # transpose_w reads the (N, K) codes as stored (the dgrad GEMM's layout)
  wq = q.codes.T if transpose_w else q.codes
  got = w8a8.w8a8_matmul(xq, xs, wq, ws, out_dtype=out_dtype, block_m=bm,
                         block_n=bn, block_k=bk, transpose_w=transpose_w,
                         platform=platform, interpret=True)
  want = w8a8.reference(xq, xs, q.codes, ws, out_dtype)
  # int32 accumulation is exact: equal up to the final rounding to out_dtype
  tol = dict(rtol=1e-6, atol=1e-6) if out_dtype == jnp.float32 else \
    dict(rtol=2**-8, atol=2**-8)
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), **tol)
  # and close to the float product: per-row / per-channel int8 rounding of
  # both operands gives ~1% relative (Frobenius) error on Gaussian data
  exact = np.asarray(x @ w)
  rel = np.linalg.norm(np.asarray(want, np.float32) - exact) / \
    np.linalg.norm(exact)
  assert rel < 0.02


def test_unsupported_shapes_raise():
  assert not w8a8.can_use(10, 64, 64, block_m=16, block_n=64, block_k=32)
  with pytest.raises(NotImplementedError, match="must divide"):
    w8a8.w8a8_matmul(jnp.zeros((16, 96), jnp.int8), jnp.ones((16, 1)),
                     jnp.zeros((96, 64), jnp.int8), jnp.ones((1, 64)),
                     block_k=64, interpret=True)
