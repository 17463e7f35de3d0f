"""W8A16 / W4A16 Pallas kernels (forward and input gradient, GPU and TPU
drivers) against an independent numpy transcription, in interpret mode on
CPU; the bf16 tile dots in the kernel body's jaxpr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jqlm_kernels import wxa16

from jqlm import quant


def _case(m, k, n, g, bits, zero, dtype, seed=0, m_g=None):
  """Activations, stored weight, scales, zero points and the float64
  weight written out in numpy: ``w[k, n] = (q[k, n] - z[k // g, n]) *
  s[k // g, n]``."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  signed = not zero
  lo, hi = {(8, True): (-128, 127), (8, False): (0, 255),
            (4, True): (-8, 7), (4, False): (0, 15)}[(bits, signed)]
  codes = rng.integers(lo, hi + 1, size=(k, n))
  s = rng.uniform(0.01, 0.05, size=(k // g, n)).astype(np.float32)
  z = rng.integers(0, hi + 1, size=(k // g, n)) if zero else None
  if bits == 8:
    w = jnp.asarray(codes, jnp.int8 if signed else jnp.uint8)
  else:  # segment layout, written out: low nibble row r, high row r + K/2
    c = codes & 0xF
    w = jnp.asarray((c[: k // 2] | (c[k // 2:] << 4)).astype(np.uint8))
  rows = np.arange(k) // g
  w64 = (codes - (0 if z is None else z[rows])) * s.astype(np.float64)[rows]
  zj = None if z is None else jnp.asarray(z, jnp.uint8)
  return x, w, jnp.asarray(s), zj, w64, signed


def _assert_near(got, x, w64, dtype, transpose=False):
  """``got`` is ``x @ w`` (``x @ w.T``) up to float32 summation,
  ``(K + 2) u |x| |w|`` with ``u = 2^-24``, plus one rounding to the output
  dtype (half a bf16 ulp, ``2^-9`` relative) for bf16."""
  x64 = np.asarray(x, np.float64)
  w64 = w64.T if transpose else w64
  want = x64 @ w64
  mag = np.abs(x64) @ np.abs(w64)
  bound = (w64.shape[0] + 2) * 2.0**-24 * mag
  if dtype == jnp.bfloat16:
    bound = bound + 2.0**-8 * np.abs(want)
  err = np.abs(np.asarray(got, np.float64) - want)
  assert np.all(err <= bound + 1e-30), float(np.max(err / (bound + 1e-30)))


CASES = {  # (M, K, N, group), tiles per platform (bm, bn, bk)
  "decode group": ((1, 512, 256, 128), {"gpu": (16, 128, 128),
                                        "tpu": (1, 128, 256)}),
  "prefill channel": ((32, 512, 256, 512), {"gpu": (16, 128, 128),
                                            "tpu": (16, 128, 256)}),
}


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_matches_numpy(platform, case, bits, zero, dtype):
  (m, k, n, g), tiles = CASES[case]
  bm, bn, bk = tiles[platform]
  if platform == "tpu":  # 128 lanes of each nibble plane
    bk = 128 * (2 if bits == 4 else 1)
  x, w, s, z, w64, signed = _case(m, k, n, g, bits, zero, dtype)
  xp = jnp.pad(x, ((0, max(bm - m, 0)), (0, 0))) if platform == "gpu" else x
  got = wxa16.wxa16_matmul(xp, w, s, z, bits=bits, group_size=g,
                           signed=signed, block_m=bm, block_n=bn,
                           block_k=bk, platform=platform, interpret=True)[:m]
  assert got.dtype == dtype and got.shape == (m, n)
  _assert_near(got, x, w64, dtype)
  want = wxa16.reference(x, w, s, z, bits=bits, group_size=g, signed=signed)
  _assert_near(want, x, w64, dtype)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_input_gradient_matches_numpy(platform, bits, zero, dtype):
  m, k, n, g = 16, 512, 256, 128
  x, w, s, z, w64, signed = _case(m, k, n, g, bits, zero, dtype, seed=1)
  gy = jnp.asarray(np.random.default_rng(2).normal(size=(m, n)), dtype)
  bn = 128 if platform == "tpu" else 64
  got = wxa16.wxa16_matmul_t(gy, w, s, z, bits=bits, group_size=g,
                             signed=signed, block_m=16, block_n=bn,
                             block_k=128, platform=platform, interpret=True)
  assert got.dtype == dtype and got.shape == (m, k)
  if dtype == jnp.bfloat16:
    # the tile is dequantized and rounded once to bf16 before the dot
    # (its scale runs along the contraction): 2^-9 relative per weight
    x64, w_ = np.asarray(gy, np.float64), w64.T
    err = np.abs(np.asarray(got, np.float64) - x64 @ w_)
    bound = 2.0**-9 * (np.abs(x64) @ np.abs(w_)) * 1.01 + \
      2.0**-8 * np.abs(x64 @ w_)
    assert np.all(err <= bound)
  else:
    _assert_near(got, gy, w64, dtype, transpose=True)
    want = wxa16.reference_t(gy, w, s, z, bits=bits, group_size=g,
                             signed=signed)
    _assert_near(want, gy, w64, dtype, transpose=True)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("split", [2, 4])
def test_split_k_matches_numpy(bits, split):
  x, w, s, z, w64, signed = _case(16, 1024, 128, 128, bits, True,
                                  jnp.float32, seed=3)
  got = wxa16.wxa16_matmul(x, w, s, z, bits=bits, group_size=128,
                           signed=signed, block_m=16, block_n=64,
                           block_k=128, split_k=split, interpret=True)
  _assert_near(got, x, w64, jnp.float32)


def test_pack_layout_is_jqlm_quant_pack_along_k():
  """One nibble layout: the kernel's pack_int4 is jqlm.quant.pack along K,
  and a prepared PackedQArray's bytes are what the kernel reads."""
  rng = np.random.default_rng(4)
  codes = jnp.asarray(rng.integers(-8, 8, size=(64, 32)), jnp.int4)
  np.testing.assert_array_equal(np.asarray(wxa16.pack_int4(codes)),
                                np.asarray(quant.pack(codes, axis=0)))
  np.testing.assert_array_equal(
    np.asarray(wxa16.unpack_int4(wxa16.pack_int4(codes))),
    np.asarray(codes.astype(jnp.int8)))
  q = quant.quantize(jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                     quant.QuantSpec(format="int4", granularity="group",
                                     group_size=32, axis=0))
  p = q.pack(axis=-2)
  assert p.packed.shape == (32, 32) and p.axis == -2
  np.testing.assert_array_equal(np.asarray(p.packed),
                                np.asarray(wxa16.pack_int4(q.codes)))
  np.testing.assert_array_equal(np.asarray(p.dequantize()),
                                np.asarray(q.dequantize()))


@pytest.mark.parametrize("m, k, n, kw, match", [
  (16, 100, 64, dict(group_size=50, block_k=50), "powers of two"),
  (16, 96, 64, dict(group_size=32, block_k=64), "whole steps"),
  (16, 128, 60, dict(group_size=64, block_k=64), "multiples"),
  (10, 128, 64, dict(group_size=64, block_k=64), "multiples"),
  (16, 256, 64, dict(group_size=64, block_k=128), "one scale group"),
  (16, 128, 64, dict(group_size=64, block_k=8), "at least 16"),
])
def test_gate_says_why(m, k, n, kw, match):
  reason = wxa16.why_not(m, k, n, bits=8, block_m=16, block_n=64, **kw)
  assert reason is not None and match in reason
  s = jnp.ones((max(k // kw["group_size"], 1), n))
  with pytest.raises(NotImplementedError, match=match):
    wxa16.wxa16_matmul(jnp.zeros((m, k)), jnp.zeros((k, n), jnp.int8), s,
                       bits=8, block_m=16, block_n=64, interpret=True, **kw)


def test_tpu_gate_needs_lane_multiples():
  assert "128" in wxa16.why_not(8, 512, 64, bits=8, group_size=512,
                                block_m=8, block_n=64, block_k=128,
                                platform="tpu")
  assert "Mosaic GPU" in wxa16.why_not(8, 512, 128, bits=8, group_size=512,
                                       block_m=8, block_n=128, block_k=128,
                                       platform="mosaic_gpu")


def _pallas_dots(fn, *args):
  """The dot_general equations inside every pallas_call of ``fn``."""
  found = []

  def walk(jaxpr, inside):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general" and inside:
        found.append(eqn)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub, inside or eqn.primitive.name == "pallas_call")

  walk(jax.make_jaxpr(fn)(*args).jaxpr, False)
  return found


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_activations_give_bf16_tile_dots(platform, bits):
  """Tensor cores and the MXU: for bf16 activations the kernel body's dots
  take bf16 operands and accumulate in float32, forward and backward."""
  x, w, s, z, _, signed = _case(16, 512, 256, 128, bits, True,
                                jnp.bfloat16)
  bn = 128

  def fwd(x_):
    return wxa16.wxa16_matmul(x_, w, s, z, bits=bits, group_size=128,
                              signed=signed, block_m=16, block_n=bn,
                              block_k=128 * (2 if bits == 4 else 1),
                              platform=platform, interpret=True)

  def bwd(g_):
    return wxa16.wxa16_matmul_t(g_, w, s, z, bits=bits, group_size=128,
                                signed=signed, block_m=16, block_n=bn,
                                block_k=128, platform=platform,
                                interpret=True)

  for fn, arg in ((fwd, x), (bwd, x[:, :256])):
    dots = _pallas_dots(fn, arg)
    assert dots, "no dot inside the kernel"
    for eqn in dots:
      assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2
      assert eqn.params["preferred_element_type"] == jnp.float32
  # f32 activations still work, with f32 dots
  dots = _pallas_dots(fwd, x.astype(jnp.float32))
  assert all(v.aval.dtype == jnp.float32 for e in dots for v in e.invars)
