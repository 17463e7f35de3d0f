"""The low-precision training recipes (jqlm.quant.recipe, ops.quantized_dot)
against the plain-numpy oracle of ../shared/spec/lowp_training.md
(tests/quant/lowp_oracle.py), and the quirks the spec lists.

Parity tolerance: max|Δ| / max|ref| <= 1e-5 on y, dx and dW. Both sides
multiply the same quantized operands; jqlm accumulates in float32 over at
most K = 128 terms (K·2^-24 ≈ 7.6e-6), the oracle in float64. The random
numbers (SR uniforms, EDEN's scale uniforms, sign vectors) are those of the
call, from ops.quantized_dot_noise, so stochastic recipes are checked
exactly too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlm import ops, quant
from jqlm.quant import recipes as qr
from jqlm.quant import rounding as rnd
from jqlm.quant import scales as sc
from tests.quant import lowp_oracle as O

TOL = 1e-5
KEY = jax.random.key(3)


def _shape(name):
  if name.startswith("halo"):
    return 64, 64, 32  # whole-dim Hadamards of 64: exact (1/8) on the grid
  if name == "quartet2":
    return 128, 128, 128  # H128 and EDEN's chunk on every GEMM dim
  return 64, 128, 64


def _data(n, k, m, grid, seed=0):
  r = np.random.default_rng(seed)
  if grid:  # multiples of 1/16: exact ties, exact bf16 rotations
    f = lambda *s: (r.integers(-64, 65, s) / 16).astype(np.float32)  # noqa
  else:
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
  return f(n, k), f(k, m), f(n, m)


def _rel(a, ref):
  ref = np.asarray(ref, np.float64)
  return float(np.max(np.abs(np.asarray(a, np.float64) - ref))
               / np.max(np.abs(ref)))


def _jqlm(r, x, w, dy, key=KEY, impl="emulate"):
  y, vjp = jax.vjp(lambda a, b: ops.quantized_dot(a, b, r, key=key,
                                                  impl=impl),
                   jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(dy))
  return np.asarray(y), np.asarray(dx), np.asarray(dw)


CASES = [(name, {}) for name in quant.RECIPES[1:]] + [
  ("fp8_rowwise", {"pow2": False}),
  ("mxfp8", {"scale": "floor"}),
  ("mxfp4", {"scale": "rceil"}),
  ("nvfp4", {"stochastic_rounding": False}),
  ("nvfp4", {"hadamard": False}),
  ("nvfp4", {"weight_2d": False}),
  ("quartet", {"signs": "random"}),
  ("quartet2", {"hadamard_dim": 32}),
  ("halo1_fp8", {"eager": True}),
  ("halo2_int8", {"eager": True}),
  ("quest", {"bits": 2}),
  ("quest", {"bits": 8, "hadamard_dim": 64}),
  ("quest", {"trust": False}),
]


# QuEST runs on Gaussian data only: grid data puts values exactly on its
# level midpoints and trust boundaries, where the float32 vs float64 rms
# decides (measured: 1.5e-2 on dx from a few flipped masks)
PARITY = [(n, s, g) for n, s in CASES for g in (False, True)
          if not (g and n == "quest")]


@pytest.mark.parametrize("name,sw,grid", PARITY, ids=[
  f"{n}{'-' + str(s) if s else ''}-{'grid' if g else 'gauss'}"
  for n, s, g in PARITY])
def test_recipe_matches_the_numpy_oracle(name, sw, grid):
  n, k, m = _shape(name)
  x, w, dy = _data(n, k, m, grid)
  r = quant.recipe(name, **sw)
  noise = ops.quantized_dot_noise(r, KEY, n, k, m)
  got = _jqlm(r, x, w, dy)
  want = O.run(name, x, w, dy, noise, **sw)
  for what, a, b in zip(("y", "dx", "dW"), got, want, strict=True):
    assert np.all(np.isfinite(a)), what
    assert _rel(a, b) <= TOL, (what, _rel(a, b))


def test_quartet_post_signs_cancel_and_the_fix_does_not():
  """§7.3 quirk 1: Q(v ⊙ s) = Q(v) ⊙ s, so the original 'post' signs leave
  the backward exactly as without signs; Quartet-II's 'pre' fix changes
  it."""
  n, k, m = _shape("quartet")
  x, w, dy = _data(n, k, m, grid=False, seed=1)
  post = _jqlm(quant.recipe("quartet"), x, w, dy)
  none = _jqlm(quant.recipe("quartet", signs="none"), x, w, dy)
  pre = _jqlm(quant.recipe("quartet", signs="random"), x, w, dy)
  for a, b in zip(post, none, strict=True):
    np.testing.assert_array_equal(a, b)
  assert _rel(pre[1], post[1]) > 1e-3 and _rel(pre[2], post[2]) > 1e-3


@pytest.mark.parametrize("tie,want", [
  ("even", [0, 1, 1, 2, 2, 4, 4]),
  ("away", [0.5, 1, 1.5, 2, 3, 4, 6]),
  ("zero", [0, 0.5, 1, 1.5, 2, 3, 4]),
])
def test_fp4_three_tie_rules(tie, want):
  """§1.1: the midpoints 0.25 .. 5 under each recipe's tie rule, signs
  kept, and the oracle agrees off the midpoints too."""
  mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
  got = np.asarray(rnd.round_fp4(jnp.asarray(mids), tie))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(
    np.asarray(rnd.round_fp4(jnp.asarray(-mids), tie)), -np.array(want))
  v = np.random.default_rng(0).uniform(-8, 8, 4096).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(rnd.round_fp4(jnp.asarray(v),
                                                         tie)),
                                O.round_fp4(v, tie))


def _enumerated_mean(fn, v, levels=1024):
  """E_u[fn(v, u)] over u on a fine regular grid: exact up to 1/levels."""
  u = (np.arange(levels) + 0.5) / levels
  vv = np.broadcast_to(v[:, None], (v.size, levels))
  uu = np.broadcast_to(u[None, :], (v.size, levels))
  out = fn(jnp.asarray(vv, jnp.float32), jnp.asarray(uu, jnp.float32))
  return np.asarray(out, np.float64).mean(1)


@pytest.mark.parametrize("variant", ["exact", "quartet2"])
def test_fp4_sr_is_unbiased(variant):
  """§1.2: Quartet's and Quartet-II's SR are unbiased inside [-6, 6]
  (the mean over u is exact up to the u grid: bias <= step / 1024)."""
  v = np.random.default_rng(1).uniform(-6, 6, 257).astype(np.float32)
  v = np.concatenate([v, O.FP4[1:], -O.FP4[1:]]).astype(np.float32)
  mean = _enumerated_mean(lambda a, u: rnd.sr_fp4(a, u, variant), v)
  np.testing.assert_allclose(mean, v, atol=2.0 / 1024)


def test_te_sr_bias_is_minus_half_a_256th_step():
  """§1.2: PTX cvt.rs keeps 8 random bits, p_up = floor(256 f) / 256, a
  bias toward zero of up to 1/256 step, -1/512 step on average over the
  fractional position f (here in [0.5, 1), step 0.5)."""
  f = (np.arange(4096) + 0.5) / 4096
  v = (0.5 + 0.5 * f).astype(np.float32)
  mean = _enumerated_mean(lambda a, u: rnd.sr_fp4(a, u, "te"), v, 256)
  bias = (mean - v) / 0.5  # in steps
  assert np.all(bias <= 1e-6) and np.all(bias >= -1 / 256 - 1e-6)
  assert abs(bias.mean() + 1 / 512) < 1e-4
  exact = _enumerated_mean(lambda a, u: rnd.sr_fp4(a, u, "exact"), v, 256)
  assert abs(((exact - v) / 0.5).mean()) < 1e-4


@pytest.mark.parametrize("elem", ["e4m3", "e5m2", "int8"])
def test_element_sr_is_unbiased(elem):
  """Stochastic rounding of every element format (and the E4M3 scale
  rounding of EDEN) is unbiased: the mean over u is v up to the u grid."""
  r = np.random.default_rng(2)
  v = (r.standard_normal(256) * 40).astype(np.float32)
  if elem == "int8":
    v = np.clip(v, -120, 120)
  mean = _enumerated_mean(lambda a, u: rnd.round_float(a, elem, u=u), v)
  step = np.abs(v) * 2.0 ** -2 + 1e-3  # coarser than any of their steps
  assert np.all(np.abs(mean - v) <= step / 1024 * 2)
  s = np.abs(v) / 7 + 0.01
  mean = _enumerated_mean(lambda a, u: sc.e4m3_scale(a, u=u), s)
  np.testing.assert_allclose(mean, s, rtol=2 ** -3 / 1024 * 2)


def test_quest_bf16_hadamard_shrinks_by_0_999786():
  """§10: QuEST's H128 is built in bf16 (entries ±0.08837890625), so a
  rotation and its transpose give 0.999786·v, not v."""
  v = jnp.asarray(np.random.default_rng(3).standard_normal((4, 256)),
                  jnp.float32)
  rot = qr.Rotation(128, matrix_dtype="bfloat16")
  back = qr.rotate(qr.rotate(v, 1, rot), 1, rot, transpose=True)
  # float32 sums of 128 terms: atol 1e-5 on unit-variance entries
  np.testing.assert_allclose(np.asarray(back), 128 * 0.08837890625 ** 2
                             * np.asarray(v), atol=1e-5)
  assert abs(128 * 0.08837890625 ** 2 - 0.999786) < 1e-6
  f32 = qr.rotate(qr.rotate(v, 1, qr.Rotation(128)), 1, qr.Rotation(128),
                  transpose=True)
  np.testing.assert_allclose(np.asarray(f32), np.asarray(v), atol=1e-5)


@pytest.mark.parametrize("elem,lo,hi", [("e4m3", 0.005, 0.15),
                                        ("int8", 0.01, 0.2)])
def test_halo_compiled_and_eager_differ(elem, lo, hi):
  """§9 quirk: eager PyTorch rounds t / c to bf16 before the cast (double
  rounding); the compiled code, the default, does not. They disagree on a
  few percent of the elements (spec: 3.3% FP8, 7.1% INT8), and each
  matches the oracle's own semantics."""
  t = np.random.default_rng(4).standard_normal((64, 256)).astype(np.float32)
  q = qr.OperandQuant(elem, "halo", bf16=True)
  comp = np.asarray(qr.quantize_operand(jnp.asarray(t), q, axis=1).values)
  eager = np.asarray(qr.quantize_operand(
    jnp.asarray(t), q.replace(eager=True), axis=1).values)
  np.testing.assert_allclose(comp, O.q_halo(t, elem), rtol=1e-6)
  np.testing.assert_allclose(eager, O.q_halo(t, elem, eager=True), rtol=1e-6)
  frac = float(np.mean(comp != eager))
  assert lo < frac < hi, frac


def test_mx_floor_clips_the_top_rceil_does_not():
  """§4: with amax mantissa above 448's (1.75), FLOOR's 2^(floor(log2 a) -
  8) maps the block max above 448, which saturates; RCEIL never clips."""
  block = np.linspace(-1, 1, 32).astype(np.float32)
  block[7] = 500.0  # 500 / 2^(8 - 8) > 448
  t = jnp.asarray(block[None, :])
  floor = qr.quantize_operand(t, qr.OperandQuant("e4m3", "e8m0_floor",
                                                 block=32), axis=1)
  rceil = qr.quantize_operand(t, qr.OperandQuant("e4m3", "e8m0_rceil",
                                                 block=32), axis=1)
  assert float(floor.values[0, 7]) == 448.0
  assert float(rceil.values[0, 7]) == 512.0 or abs(
    float(rceil.values[0, 7]) - 500) <= 500 * 2 ** -4
  for rule, got in (("floor", floor), ("rceil", rceil)):
    np.testing.assert_array_equal(np.asarray(got.values),
                                  O.q_mx(block[None, :], "e4m3", rule))


def test_nvfp4_weight_tiles_are_transpose_free():
  """§6.1: 16x16 tiles give the same values whichever dim is contracted,
  so dgrad reuses the forward's W; 1x16 blocks do not."""
  w = jnp.asarray(np.random.default_rng(5).standard_normal((64, 32)),
                  jnp.float32)
  tile = qr.OperandQuant("e2m1", "nvfp4", block=16, tile=True)
  a = qr.quantize_operand(w, tile, axis=0).values
  b = qr.quantize_operand(w, tile, axis=1).values
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  row = tile.replace(tile=False)
  assert not np.array_equal(
    np.asarray(qr.quantize_operand(w, row, axis=0).values),
    np.asarray(qr.quantize_operand(w, row, axis=1).values))


@pytest.mark.parametrize("name", ops.native_recipes())
def test_native_matches_emulated(name):
  """The native path (fp8 / int8 dots, scales outside) gives the emulated
  numbers up to accumulation order (the codes and scales are the same)."""
  n, k, m = _shape(name)
  x, w, dy = _data(n, k, m, grid=False, seed=6)
  r = quant.recipe(name)
  for a, b in zip(_jqlm(r, x, w, dy, impl="native"),
                  _jqlm(r, x, w, dy, impl="emulate"), strict=True):
    assert _rel(a, b) <= TOL


def test_native_recipes_are_the_per_tensor_and_per_row_ones():
  assert set(ops.native_recipes()) == {
    "fp8_tensorwise", "fp8_rowwise", *(f"halo{lv}_{e}" for lv in (0, 1, 2)
                                       for e in ("fp8", "int8"))}


def test_random_recipes_follow_their_key():
  """Same key: the same rounding; another key: other SR draws and signs."""
  n, k, m = _shape("quartet2")
  x, w, dy = _data(n, k, m, grid=False, seed=7)
  r = quant.recipe("quartet2")
  a = _jqlm(r, x, w, dy, key=jax.random.key(1))
  b = _jqlm(r, x, w, dy, key=jax.random.key(1))
  c = _jqlm(r, x, w, dy, key=jax.random.key(2))
  for u, v in zip(a, b, strict=True):
    np.testing.assert_array_equal(u, v)
  np.testing.assert_array_equal(a[0], c[0])  # the forward is deterministic
  assert _rel(c[1], a[1]) > 1e-3


def test_nvfp4_sr_gradient_is_unbiased_over_keys():
  """NVFP4's dgrad with SR (no RHT on dgrad) averages, over keys, to the
  gradient with the same operands' exact values: the mean over 32 keys
  is closer to dy·Q(W)ᵀ than one draw, by about √32."""
  n, k, m = 32, 32, 64
  x, w, dy = _data(n, k, m, grid=False, seed=8)
  r = quant.recipe("nvfp4", hadamard=False)
  qw = O.q_nvfp4_te(w.T, tile=True)
  exact = dy.astype(np.float64) @ qw  # dx with dy unquantized
  grads = jax.vmap(lambda kk: jax.vjp(
    lambda a, b: ops.quantized_dot(a, b, r, key=kk, impl="emulate"),
    jnp.asarray(x), jnp.asarray(w))[1](jnp.asarray(dy))[0])(
      jax.random.split(jax.random.key(0), 32))
  one = np.sqrt(np.mean((np.asarray(grads[0]) - exact) ** 2))
  mean = np.sqrt(np.mean((np.asarray(grads).mean(0) - exact) ** 2))
  assert mean < one / 3, (mean, one)


def test_recipe_errors_name_the_problem():
  x, w = jnp.ones((32, 32)), jnp.ones((32, 32))
  with pytest.raises(ValueError, match="Unknown recipe 'nvfp5'"):
    quant.recipe("nvfp5")
  with pytest.raises(ValueError, match="no option 'sr'"):
    quant.recipe("nvfp4", sr=True)
  with pytest.raises(ValueError, match="no native path"):
    ops.quantized_dot(x, w, "nvfp4", impl="native")
  with pytest.raises(ValueError, match="impl must be"):
    ops.quantized_dot(x, w, "mxfp8", impl="cuda")
  with pytest.raises(ValueError, match="not a multiple of the e8m0_rceil"):
    ops.quantized_dot(jnp.ones((32, 24)), jnp.ones((24, 32)), "mxfp8")
  with pytest.raises(ValueError, match="w must be"):
    ops.quantized_dot(x, jnp.ones((16, 8)), "mxfp8")
  y = ops.quantized_dot(jnp.ones((16, 32)), jnp.ones((32, 32)), "nvfp4")
  assert np.all(np.isfinite(np.asarray(y)))  # forward needs no key
  with pytest.raises(ValueError, match="pass key="):
    jax.grad(lambda a: ops.quantized_dot(a, jnp.ones((32, 32)),
                                         "nvfp4").sum())(jnp.ones((16, 32)))


def test_nan_poisons_its_scale_group_only():
  """jqlm.quant's NaN policy: a NaN dequantizes its scale group to NaN (the
  block for MX) and leaves the others finite."""
  t = np.random.default_rng(9).standard_normal((2, 64)).astype(np.float32)
  t[0, 3] = np.nan
  v = np.asarray(qr.quantize_operand(jnp.asarray(t), qr.OperandQuant(
    "e4m3", "e8m0_rceil", block=32), axis=1).values)
  assert np.all(np.isnan(v[0, :32])) and np.all(np.isfinite(v[0, 32:]))
  assert np.all(np.isfinite(v[1]))


def test_forward_only_calls_need_not_fit_the_backward_blocks():
  """A decode step (1 token) runs the forward of a blocked recipe; only
  its gradient needs N to fit wgrad's blocks, and says so."""
  x, w = jnp.ones((1, 64)), jnp.ones((64, 32))
  assert ops.quantized_dot(x, w, "mxfp8").shape == (1, 32)
  with pytest.raises(ValueError, match=r"x \(wgrad, along N\)"):
    jax.grad(lambda a: ops.quantized_dot(a, w, "mxfp8").sum())(x)
