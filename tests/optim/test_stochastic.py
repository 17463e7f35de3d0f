"""Stochastic-rounding parameter updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jqlm import optim

N = 4096


def _tree(dtype):
  k1, k2 = jax.random.split(jax.random.key(0))
  p = {"w": jax.random.normal(k1, (16, 8), jnp.float32).astype(dtype),
       "b": jnp.ones((8,), dtype)}
  u = {"w": 1e-3 * jax.random.normal(k2, (16, 8), jnp.float32),
       "b": jnp.full((8,), 3e-4, jnp.float32)}
  return p, u


@pytest.mark.parametrize("noise", ["hash", "jax"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_expected_value_is_the_float32_update(dtype, noise):
  p, u = _tree(dtype)
  keys = jax.random.split(jax.random.key(1), N)
  out = jax.jit(jax.vmap(
    lambda k: optim.apply_updates_stochastic(p, u, key=k, noise=noise)))(keys)
  for name in p:
    target = np.asarray(p[name], np.float64) + np.asarray(u[name], np.float64)
    samples = np.asarray(out[name].astype(jnp.float32), np.float64)
    assert out[name].dtype == dtype
    lo, hi = samples.min(0), samples.max(0)
    # Neighbours at most one ulp apart; Bernoulli mean within 5 sigma.
    bound = 5 * (hi - lo) / (2 * np.sqrt(N)) + 1e-12
    assert (np.abs(samples.mean(0) - target) <= bound).all()
    assert (lo <= target).all() and (target <= hi).all()


def test_round_to_nearest_loses_small_updates_and_sr_does_not():
  # 1 + 3e-4 is below half a bf16 ulp (2^-8): RNE never moves, SR moves with
  # probability 3e-4 / 2^-7 ~ 3.8% per step, so the mean over many steps
  # tracks the float32 sum.
  p = {"b": jnp.ones((4096,), jnp.bfloat16)}
  u = {"b": jnp.full((4096,), 3e-4, jnp.float32)}
  rne = optax.apply_updates(p, jax.tree.map(
    lambda a: a.astype(jnp.bfloat16), u))
  assert float(jnp.max(rne["b"].astype(jnp.float32))) == 1.0

  @jax.jit
  def run(p, key):
    def body(carry, k):
      return optim.apply_updates_stochastic(carry, u, key=k), None
    return jax.lax.scan(body, p, jax.random.split(key, 100))[0]

  out = run(p, jax.random.key(2))["b"].astype(jnp.float32)
  mean = float(jnp.mean(out))
  np.testing.assert_allclose(mean, 1.0 + 100 * 3e-4, rtol=2e-3)


def test_float32_params_are_added_exactly():
  p, u = _tree(jnp.float32)
  out = optim.apply_updates_stochastic(p, u, key=jax.random.key(0))
  for name in p:
    np.testing.assert_array_equal(np.asarray(out[name]),
                                  np.asarray(p[name] + u[name]))


def test_same_key_same_result():
  p, u = _tree(jnp.bfloat16)
  a = optim.apply_updates_stochastic(p, u, key=jax.random.key(5))
  b = optim.apply_updates_stochastic(p, u, key=jax.random.key(5))
  c = optim.apply_updates_stochastic(p, u, key=jax.random.key(6))
  np.testing.assert_array_equal(np.asarray(a["w"], np.float32),
                                np.asarray(b["w"], np.float32))
  assert not np.array_equal(np.asarray(a["w"], np.float32),
                            np.asarray(c["w"], np.float32))


def test_transform_in_chain_matches_function_and_carries_key():
  p, u = _tree(jnp.bfloat16)
  key = jax.random.key(7)
  tx = optim.stochastic_rounding(key)
  state = tx.init(p)
  out_u, state2 = jax.jit(tx.update)(u, state, p)
  new_p = optim.apply_updates(p, out_u)
  expect = optim.apply_updates_stochastic(p, u, key=jax.random.split(key)[1])
  for name in p:
    assert new_p[name].dtype == jnp.bfloat16
    assert out_u[name].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(new_p[name], np.float32),
                                  np.asarray(expect[name], np.float32))
  # optax.apply_updates (standard promotion) lands on the same params.
  with jax.numpy_dtype_promotion("standard"):
    via_optax = optax.apply_updates(p, out_u)
  np.testing.assert_array_equal(np.asarray(via_optax["w"], np.float32),
                                np.asarray(new_p["w"], np.float32))
  # The key in the state advanced: the next step rounds differently.
  assert not np.array_equal(jax.random.key_data(state.rng_key),
                            jax.random.key_data(state2.rng_key))


@pytest.mark.parametrize("sr", [True, False])
def test_sr_chain_with_spam_trains_bf16_params(sr):
  # SPAM's normalised steps are ~lr = 1e-3, below half a bf16 ulp at 2.0
  # (2^-7 = 0.0078): round-to-nearest never moves the params, stochastic
  # rounding moves them by ~0.05 in 50 steps, as float32 math would.
  p = {"w": jnp.full((64,), 2.0, jnp.bfloat16)}
  parts = [optim.spam(1e-3, reset_interval=None)]
  if sr:
    parts.append(optim.stochastic_rounding(jax.random.key(0)))
  opt = optax.chain(*parts)
  state = opt.init(p)

  @jax.jit
  def step(p, state):
    g = jax.grad(lambda q: jnp.sum(q["w"].astype(jnp.float32) ** 2))(p)
    u, state = opt.update(g, state, p)
    return optim.apply_updates(p, u), state

  for _ in range(50):
    p, state = step(p, state)
  mean = float(jnp.mean(p["w"].astype(jnp.float32)))
  if sr:
    assert 1.93 < mean < 1.97
  else:
    assert mean == 2.0


def test_errors():
  p, u = _tree(jnp.bfloat16)
  with pytest.raises(ValueError, match="PRNG key"):
    optim.apply_updates_stochastic(p, u, key=None)
  with pytest.raises(ValueError, match="PRNG key"):
    optim.stochastic_rounding(None)
  with pytest.raises(ValueError, match="noise must be"):
    optim.stochastic_rounding(jax.random.key(0), noise="fast")
  tx = optim.stochastic_rounding(jax.random.key(0))
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(u, tx.init(p))
