"""The recipes' operand statistics: the share of each GEMM operand's
elements clipped at the element format's largest value and flushed to zero
(quant.recipes.operand_fractions, the stats probe of ops.quantized_dot),
against plain-numpy counts over the oracle's scales
(tests/quant/lowp_oracle.py, ../shared/spec/lowp_training.md).

The fractions are counts over 2048 elements; jqlm and numpy compute the
same scales in float32, so the counts agree exactly (tolerance 0)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlm import ops, quant
from jqlm.quant import recipes as qr
from tests.quant import lowp_oracle as O

F32 = np.float32


def _heavy(shape, seed=0):
  """Student-t (3 dof) data: heavy tails, so blocks hold outliers that a
  rounded scale clips, and many small values that flush to zero."""
  return np.random.default_rng(seed).standard_t(3, shape).astype(F32)


def _fractions(t, q):
  op = qr.quantize_operand(jnp.asarray(t), q, axis=1)
  return np.asarray(qr.operand_fractions(op))


def _flushed(t, qv):
  return float(np.mean((np.asarray(t) != 0) & (np.asarray(qv) == 0)))


def test_mx_floor_clips_what_the_floor_scale_puts_above_6():
  t = _heavy((32, 64))
  got = _fractions(t, quant.recipe("mxfp4").x)
  g = t.reshape(32, 2, 32).astype(np.float64)
  amax = np.abs(g).max(-1, keepdims=True)
  e = np.floor(np.log2(amax)) - 2  # E2M1's emax
  clipped = float(np.mean(np.abs(g / 2.0 ** e) > 6.0))
  flushed = _flushed(t, O.q_mx(t, "e2m1", "floor"))
  assert clipped > 0.01 and flushed > 0.01  # the data exercise both
  np.testing.assert_array_equal(got, np.float32([clipped, flushed]))


def test_mx_rceil_never_clips():
  t = _heavy((32, 64))
  got = _fractions(t, quant.recipe("mxfp8").x)
  flushed = _flushed(t, O.q_mx(t, "e4m3", "rceil"))
  np.testing.assert_array_equal(got, np.float32([0.0, flushed]))


def test_nvfp4_clips_where_the_e4m3_block_scale_rounds_down():
  t = _heavy((32, 64), seed=1)
  got = _fractions(t, quant.recipe("nvfp4").x)
  g = t.reshape(32, 4, 16)
  a_b = np.abs(g).max(-1, keepdims=True)
  s_enc = F32(2688.0) / np.abs(t).max()
  s_b = O.round_fp8((a_b * F32(s_enc * F32(1 / 6))).astype(F32),
                    "e4m3").astype(F32)
  enc = (F32(1) / (s_b * (F32(1) / s_enc))).astype(F32)
  clipped = float(np.mean(np.abs((g * enc).astype(F32)) > 6.0))
  flushed = _flushed(t, O.q_nvfp4_te(t))
  assert clipped > 0.005
  np.testing.assert_array_equal(got, np.float32([clipped, flushed]))


def test_quest_clips_beyond_alpha_rms():
  t = _heavy((32, 64), seed=2)
  q = quant.recipe("quest").x
  got = _fractions(t, q)
  v = t.astype(np.float64)
  rms = np.sqrt((v * v).mean(1, keepdims=True))
  clipped = float(np.mean(np.abs(v) > qr.QUEST_ALPHA[4] * rms + 1e-8))
  assert clipped > 0.01
  np.testing.assert_allclose(got, [clipped, 0.0], atol=1 / t.size)


def test_fp8_amax_scales_never_clip():
  t = _heavy((32, 64), seed=3)
  got = _fractions(t, quant.recipe("fp8_tensorwise").x)
  flushed = _flushed(t, O.q_torchao(t, "e4m3"))
  np.testing.assert_array_equal(got, np.float32([0.0, flushed]))


def test_zeros_are_not_flushed_and_nothing_is_clipped():
  for name in ("mxfp4", "nvfp4", "quartet", "halo0_int8"):
    got = _fractions(np.zeros((32, 64), F32), quant.recipe(name).x)
    np.testing.assert_array_equal(got, [0.0, 0.0])


# -- the probe of quantized_dot ------------------------------------------------


def _probe_grads(r, x, w, dy, key=None):
  def f(x, w, probe):
    return jnp.sum(ops.quantized_dot(x, w, r, key=key, stats=probe) * dy)
  return jax.grad(f, argnums=(0, 1, 2))(x, w, jnp.zeros(ops.STATS_SHAPE))


def test_probe_gradient_is_each_operands_fractions():
  r = quant.recipe("mxfp4")
  x, w, dy = (jnp.asarray(_heavy(s, i)) for i, s in enumerate(
    ((64, 64), (64, 32), (64, 32))))
  dx, dw, probe = _probe_grads(r, x, w, dy)
  # the gradients are those of the call without a probe
  dx0, dw0 = jax.grad(lambda a, b: jnp.sum(ops.quantized_dot(a, b, r) * dy),
                      argnums=(0, 1))(x, w)
  np.testing.assert_array_equal(dx, dx0)
  np.testing.assert_array_equal(dw, dw0)
  # each row: operand_fractions of that operand in its GEMM's layout
  want = [qr.operand_fractions(qr.quantize_operand(t, getattr(r, name),
                                                    axis=axis))
          for name, t, axis in (("x", x, 1), ("w", w, 0),
                                ("dgrad_dy", dy, 1), ("dgrad_w", w, 1),
                                ("wgrad_x", x, 0), ("wgrad_dy", dy, 0))]
  np.testing.assert_array_equal(probe, np.stack(want))
  assert np.all(np.asarray(probe)[:, 0] > 0)  # FLOOR clips everywhere


def test_probe_rows_of_high_precision_and_reused_operands_are_zero():
  x, w, dy = (jnp.asarray(_heavy(s, i)) for i, s in enumerate(
    ((64, 64), (64, 32), (64, 32))))
  _, _, probe = _probe_grads(quant.recipe("mxfp4", wgrad_x=None,
                                          wgrad_dy=None), x, w, dy)
  assert np.all(np.asarray(probe)[4:] == 0) and np.any(np.asarray(probe)[:4])
  # NVFP4 reuses the forward's 16x16 weight tiles in dgrad
  _, _, probe = _probe_grads(quant.recipe("nvfp4"), x, w, dy,
                             key=jax.random.key(0))
  assert np.all(np.asarray(probe)[3] == 0) and np.all(
    np.asarray(probe)[[0, 1, 2, 4, 5], 1] > 0)


def test_probe_of_the_wrong_shape_is_refused():
  with pytest.raises(ValueError, match=r"stats must be float32 zeros of "
                     r"shape \(6, 2\)"):
    ops.quantized_dot(jnp.ones((32, 32)), jnp.ones((32, 32)), "mxfp8",
                      stats=jnp.zeros((2, 6)))
