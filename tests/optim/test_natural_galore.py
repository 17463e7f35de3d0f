"""Natural GaLore: parity with a numpy transcription of the official
``SubSpaceAdamW`` (spec §3), the Woodbury solve, layouts, dtypes, memory."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jqlm.optim._projector import galore_projector
from jqlm.optim.adam import ScaleByAdamState
from jqlm.optim.natural_galore import (
  NaturalGradientState,
  natural_galore,
  natural_gradient,
  scale_by_natural_galore,
)
from tests.optim.reference_natural_galore import (
  NumpyNaturalGaLore,
  svd_flip_columns,
)

# Flax kernel shapes (in, out): square, up (in < out), down (in > out); an
# unmasked 2-D param and a 1-D bias take the plain AdamW path.
SHAPES = {"q": (12, 12), "up": (12, 20), "down": (20, 12), "embed": (10, 12),
          "bias": (12,)}
PROJECTED = ("q", "up", "down")
MASK = {k: k in PROJECTED for k in SHAPES}
# Well-separated singular values: the jax and numpy SVDs agree to rounding,
# the sign rule fixes the rest.
SV = np.array([12, 9, 7, 5.5, 4.2, 3.2, 2.4, 1.8, 1.3, 1.0, 0.7, 0.5])


def _params(dtype=np.float64, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(0.1 * rng.normal(size=s), dtype)
          for k, s in SHAPES.items()}


def _grads(steps, seed=1, dtype=np.float64, shapes=SHAPES):
  """A fresh random singular basis every step (every refresh gives new
  factors), a fixed well-separated spectrum, a slowly varying scale."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    g = {}
    for k, sh in shapes.items():
      if len(sh) == 1:
        g[k] = rng.normal(size=sh)
        continue
      n = min(sh)
      q1, _ = np.linalg.qr(rng.normal(size=(sh[0], n)))
      q2, _ = np.linalg.qr(rng.normal(size=(sh[1], n)))
      g[k] = (q1 * SV[:n]) @ q2.T * (1 + 0.3 * np.sin(t / 4))
    out.append({k: v.astype(dtype) for k, v in g.items()})
  return out


def _torch(tree):
  """Flax (in, out) -> torch (out, in), as float64 numpy copies."""
  return {k: np.array(v, np.float64).T.copy() for k, v in tree.items()}


def _run_parity(rank, history, gap, wd, steps=105, shapes=SHAPES,
                mask=MASK):
  """Max over steps and params of max|p_jqlm - p_np| / max|p_np|, float64,
  jitted; and the final states."""
  lr = 0.01
  projected = {k for k, on in mask.items() if on}
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(0.1 * rng.normal(size=s)) for k, s in
              shapes.items()}
    opt = natural_galore(lr, rank, weight_decay=wd, update_proj_gap=gap,
                         history=history, mask=mask)
    state = opt.init(params)
    step = jax.jit(opt.update)
    ref = NumpyNaturalGaLore(lr, rank, gap, 0.25, projected,
                             history=history, weight_decay=wd,
                             natural=history > 0)
    ref_params = _torch(params)
    err = 0.0
    for g in _grads(steps, shapes=shapes):
      u, state = step(jax.tree.map(jnp.asarray, g), state, params)
      params = optax.apply_updates(params, u)
      ref.step(ref_params, _torch(g))
      for k, v in params.items():
        want = ref_params[k].T
        err = max(err, float(np.max(np.abs(np.asarray(v) - want))
                             / np.max(np.abs(want))))
    assert step._cache_size() == 1
  return err, state, ref


@pytest.mark.parametrize("rank, history, gap, wd", [
  (4, 5, 7, 0.0),     # 15 refreshes, the history wraps 20 times
  (3, 20, 10, 0.01),  # 11 refreshes, the history wraps 4 times, wd
  (4, 0, 7, 0.0),     # natural transform off: official proj_type='galore'
])
def test_matches_numpy_transcription_of_official(rank, history, gap, wd):
  """Float64, 105 steps, refreshes inside the window, history wrap-around,
  non-square kernels both ways and a square one."""
  steps = 105
  err, state, ref = _run_parity(rank, history, gap, wd, steps)
  print(f"max relative error: {err:.2e}")
  assert err <= 1e-6, err
  refreshes = math.ceil(steps / gap)
  assert ref.factor_computations == refreshes * len(PROJECTED)
  ng = state[0]
  for k in PROJECTED:
    assert int(ng.projector[k].svd_count) == refreshes
  if history:
    hist = ng.inner[0]
    assert isinstance(hist, NaturalGradientState)
    assert int(hist.count) >= history  # full, and wrapped
    assert int(hist.count) % history == steps % history


def test_rank_equal_to_smallest_dim_matches_and_larger_raises():
  """rank == min(m, n) is allowed (full factors on that side); rank >
  min(m, n) raises at init (the official code pads tensorly's factors with
  random columns)."""
  shapes = {"up": (12, 20), "sq": (6, 6)}
  mask = {"up": True, "sq": True}
  err, _, _ = _run_parity(6, 4, 5, 0.0, steps=12, shapes=shapes, mask=mask)
  print(f"max relative error: {err:.2e}")
  assert err <= 1e-6, err
  params = {"up": jnp.zeros((12, 20)), "sq": jnp.zeros((6, 6))}
  with pytest.raises(ValueError, match="must not exceed the smallest"):
    natural_galore(1e-2, 7, mask=mask).init(params)


def test_state_layout_and_memory():
  """r x r moments and an (s, r*r) history per masked param; factors A (in,
  r) and B (out, r); the others plain AdamW. The bytes of the state arrays
  match that count."""
  rank, s = 4, 5
  params = _params(np.float32)
  state = natural_galore(1e-2, rank, history=s, mask=MASK).init(params)
  ng = state[0]
  hist, adam = ng.inner
  total = {}
  for k, shape in SHAPES.items():
    ps = ng.projector[k]
    if k in PROJECTED:
      a, b = ps.proj
      assert a.shape == (shape[0], rank) and b.shape == (shape[1], rank)
      assert adam.mu[k].shape == adam.nu[k].shape == (rank, rank)
      assert hist.history[k].shape == (s, rank * rank)
      total[k] = sum(x.nbytes for x in (adam.mu[k], adam.nu[k],
                                        hist.history[k], a, b))
      assert total[k] == 4 * (2 * rank**2 + s * rank**2
                              + (shape[0] + shape[1]) * rank)
    else:
      assert isinstance(ps, optax.MaskedNode)
      assert isinstance(hist.history[k], optax.MaskedNode)
      assert adam.mu[k].shape == shape
  # the whole state: the above, plain moments, and a few scalars
  plain = sum(2 * 4 * math.prod(SHAPES[k]) for k in ("embed", "bias"))
  scalars = sum(x.nbytes for x in jax.tree.leaves(state) if x.size == 1)
  all_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert all_bytes == sum(total.values()) + plain + scalars


_natural_gradient = jax.jit(natural_gradient)


@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([4, 16]),
       s=st.sampled_from([1, 5]), log_scale=st.floats(-2, 1),
       damping=st.sampled_from([1e-3, 1e-1, 1.0]))
def test_woodbury_equals_direct_solve(seed, k, s, log_scale, damping):
  """(lambda I + G G^T) r~ = r with G = history^T, in float64; appended zero
  history rows (unused ring slots) leave r~ unchanged."""
  rng = np.random.default_rng(seed)
  hist = rng.normal(size=(s, k)) * 10.0**log_scale
  r = rng.normal(size=(k,)) * 10.0**log_scale
  with jax.enable_x64(True):
    lam = jnp.asarray(damping)
    got = np.asarray(_natural_gradient(jnp.asarray(r), jnp.asarray(hist),
                                       lam))
    padded = np.concatenate([hist, np.zeros((3, k))])
    got_pad = np.asarray(_natural_gradient(jnp.asarray(r),
                                           jnp.asarray(padded), lam))
  want = np.linalg.solve(damping * np.eye(k) + hist.T @ hist, r)
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(got, want, atol=1e-8 * scale, rtol=0)
  np.testing.assert_allclose(got_pad, got, atol=1e-12 * scale, rtol=0)


def test_single_history_entry_damps_the_current_direction():
  """Spec §3.4 quirk 3: with only the current gradient in the history,
  r~ = r / (lambda + |r|^2)."""
  r = jnp.asarray(np.random.default_rng(0).normal(size=(9,)), jnp.float32)
  got = natural_gradient(r, r[None, :])
  want = np.asarray(r) / (1e-3 + float(jnp.sum(r * r)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3)


def test_factors_follow_the_sign_rule_on_both_sides():
  """After a refresh, A and B are the sign-fixed top singular vectors of the
  kernel gradient (A: left, in-dim; B: right, out-dim)."""
  g = _grads(1, dtype=np.float32)[0]
  params = _params(np.float32)
  opt = scale_by_natural_galore(4, mask=MASK)
  _, state = jax.jit(opt.update)(jax.tree.map(jnp.asarray, g),
                                 opt.init(params))
  for k in PROJECTED:
    a, b = (np.asarray(x) for x in state.projector[k].proj)
    u, _, vh = np.linalg.svd(g[k].astype(np.float64))
    np.testing.assert_allclose(a, svd_flip_columns(u[:, :4]), atol=1e-5)
    np.testing.assert_allclose(b, svd_flip_columns(vh[:4].T), atol=1e-5)
    assert np.all(a[np.argmax(np.abs(a), 0), range(4)] > 0)


def test_bf16_params_keep_bf16_updates_and_jit_once():
  params = _params(jnp.bfloat16)
  grads = _grads(3, dtype=jnp.bfloat16)
  opt = natural_galore(1e-2, 4, history=3, update_proj_gap=2,
                       weight_decay=0.01, mask=MASK)
  state = opt.init(params)
  step = jax.jit(opt.update)
  for g in grads:
    u, state = step(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, u)
  assert step._cache_size() == 1
  for k, v in u.items():
    assert v.dtype == jnp.bfloat16, k
    assert bool(jnp.all(jnp.isfinite(v)))
    assert params[k].dtype == jnp.bfloat16
  # the pure-bf16 policy: float state tensors of bf16 params are bf16
  assert state[0].inner[0].history["up"].dtype == jnp.bfloat16
  assert state[0].inner[1].mu["up"].dtype == jnp.bfloat16


def test_history_off_is_two_sided_adam():
  """history=0 drops the transform: the inner state is the Adam state."""
  params = _params(np.float32)
  state = scale_by_natural_galore(4, history=0, mask=MASK).init(params)
  assert isinstance(state.inner, ScaleByAdamState)
  assert state.inner.mu["up"].shape == (4, 4)


@pytest.mark.parametrize("call, match", [
  (lambda: natural_galore(1e-2, 0), "rank"),
  (lambda: natural_galore(1e-2, jnp.asarray(4)), "static_args"),
  (lambda: natural_galore(1e-2, 4, history=-1), "history"),
  (lambda: natural_galore(1e-2, 4, history=2.5), "history"),
  (lambda: natural_galore(1e-2, 4, damping=0.0), "damping"),
  (lambda: natural_galore(1e-2, 4, update_proj_gap=0), "update_proj_gap"),
  (lambda: natural_galore(1e-2, 4, scale=-1.0), "scale"),
  (lambda: natural_galore(1e-2, 4, b2=1.0), "b2"),
  (lambda: natural_galore(-1.0, 4), "learning_rate"),
  (lambda: natural_galore(1e-2, 4, weight_decay=-0.1), "weight_decay"),
])
def test_bad_configs_raise_at_construction(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_shape_dependent_configs_raise_at_init():
  params = {"attn": {"q": jnp.zeros((12, 20))}}
  with pytest.raises(ValueError, match="mask=None") as e:
    natural_galore(1e-2, 4).init(params)
  assert "Natural GaLore" in str(e.value)
  with pytest.raises(ValueError, match="structure"):
    natural_galore(1e-2, 4, mask={"dense": True}).init(params)
  with pytest.raises(ValueError, match="2-D"):
    natural_galore(1e-2, 4, mask={"attn": {"q": True}}).init(
      {"attn": {"q": jnp.zeros((4, 5, 6))}})
  with pytest.raises(ValueError, match="two-sided"):
    galore_projector(
      4, update_proj_gap=2, scale=1.0, proj_type="std", inner=None,
      mask={"w": True}, proj_bits=4, two_sided=True)
