"""W8A16 / W4A16 Pallas kernel against its reference, in interpret mode on
CPU (the compiled GPU/TPU paths run where a device exists)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jqlm_kernels import wxa16

from jqlm import quant


def _case(m, k, n, g, bits, zero, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  lo, hi = (-128, 127) if bits == 8 else (-8, 7)
  codes = jnp.asarray(rng.integers(lo, hi + 1, size=(k, n)), jnp.int8)
  s = jnp.asarray(rng.uniform(0.01, 0.05, size=(k // g, n)), jnp.float32)
  z = jnp.asarray(rng.integers(-3, 4, size=(k // g, n)), jnp.float32) \
    if zero else None
  return x, codes, s, z


# f32: the kernel and the oracle differ only in summation order over K
# (<= 256 terms): 1e-5 relative. bf16 outputs: one bf16 ulp (2^-8).
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4),
       jnp.bfloat16: dict(rtol=2**-7, atol=2**-7)}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, k, n, g, bk", [
  (1, 128, 64, 64, 64),      # decode, M = 1
  (16, 256, 128, 128, 64),   # group spans two K-blocks
  (32, 256, 64, 256, 128),   # per-channel (G = K)
])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_reference(bits, m, k, n, g, bk, zero, dtype):
  x, codes, s, z = _case(m, k, n, g, bits, zero, dtype)
  w = codes if bits == 8 else wxa16.pack_int4(codes, bk)
  bm = min(m, 16)
  got = wxa16.wxa16_matmul(x, w, s, z, bits=bits, group_size=g, block_m=bm,
                           block_n=64, block_k=bk, interpret=True)
  want = wxa16.reference(x, w, s, z, bits=bits, group_size=g, block_k=bk)
  assert got.dtype == dtype and got.shape == (m, n)
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), **TOL[dtype])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m, k, g, split", [
  (1, 512, 64, 4),     # decode: groups inside each slice
  (4, 256, 256, 2),    # per-channel scales across slices
  (16, 512, 128, 8),   # one K block per slice
])
def test_split_k_matches_reference(bits, m, k, g, split):
  x, codes, s, z = _case(m, k, 64, g, bits, True, jnp.float32, seed=3)
  w = codes if bits == 8 else wxa16.pack_int4(codes, 64)
  got = wxa16.wxa16_matmul(x, w, s, z, bits=bits, group_size=g,
                           block_m=min(m, 16), block_n=64, block_k=64,
                           split_k=split, interpret=True)
  want = wxa16.reference(x, w, s, z, bits=bits, group_size=g, block_k=64)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                             **TOL[jnp.float32])


def test_split_k_must_divide_the_k_blocks():
  assert not wxa16.can_use(1, 256, 64, bits=8, group_size=64, block_m=1,
                           block_n=64, block_k=64, split_k=3)
  with pytest.raises(NotImplementedError, match="split_k=3"):
    wxa16.wxa16_matmul(jnp.zeros((1, 256)), jnp.zeros((256, 64), jnp.int8),
                       jnp.ones((4, 64)), bits=8, group_size=64, block_m=1,
                       block_k=64, split_k=3, interpret=True)


def test_reference_matches_jqlm_quant_dequantize():
  """The kernel's oracle agrees with jqlm.quant on a grouped int4 weight."""
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(128, 64)), jnp.float32)
  q = quant.quantize(w, quant.QuantSpec(format="int4", granularity="group",
                                        group_size=32, axis=0))
  x = jnp.asarray(rng.normal(size=(4, 128)), jnp.float32)
  packed = wxa16.pack_int4(q.codes, 64)
  np.testing.assert_array_equal(np.asarray(wxa16.unpack_int4(packed, 64)),
                                np.asarray(q.codes.astype(jnp.int8)))
  got = wxa16.reference(x, packed, q.scale, bits=4, group_size=32,
                        block_k=64)
  want = x @ q.dequantize()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("shape, kw", [
  ((16, 100, 64), dict(group_size=50, block_k=50)),   # non-power-of-2 tile
  ((16, 96, 64), dict(group_size=32, block_k=64)),    # K not a block multiple
  ((16, 128, 60), dict(group_size=64, block_k=64)),   # N ragged
  ((10, 128, 64), dict(group_size=64, block_k=64)),   # M ragged
  ((16, 128, 64), dict(group_size=48, block_k=64)),   # group vs block
])
def test_unsupported_shapes_raise_not_implemented(shape, kw):
  m, k, n = shape
  assert not wxa16.can_use(m, k, n, bits=8, block_m=16, block_n=64, **kw)
  x = jnp.zeros((m, k))
  w = jnp.zeros((k, n), jnp.int8)
  s = jnp.ones((max(k // kw["group_size"], 1), n))
  with pytest.raises(NotImplementedError):
    wxa16.wxa16_matmul(x, w, s, bits=8, block_m=16, block_n=64,
                       interpret=True, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_compiled_gpu_kernel_matches_reference():
  x, codes, s, _ = _case(16, 4096, 4096, 128, 4, False, jnp.bfloat16)
  w = wxa16.pack_int4(codes, 128)
  got = wxa16.wxa16_matmul(x, w, s, bits=4, group_size=128, block_k=128)
  want = wxa16.reference(x, w, s, bits=4, group_size=128, block_k=128)
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=2e-2,
                             atol=2e-2)
