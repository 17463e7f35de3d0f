"""jqlm optimizers inside the optax ecosystem (one table, optax-style).

optax's own wrappers and schedules mix Python floats with int32 counts,
which strict dtype promotion rejects, so this module runs under standard
promotion; jqlm's transforms are checked under strict promotion elsewhere.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jqlm import optim

pytestmark = pytest.mark.usefixtures("standard_promotion")


@pytest.fixture
def standard_promotion():
  with jax.numpy_dtype_promotion("standard"):
    yield


def _pieces(learning_rate=1e-2):
  return optax.chain(
    optim.clip_spikes(50.0, grace_steps=1, reset_interval=5),
    optim.reset_momentum(optax.scale_by_adam(), 5, warmup_steps=2),
    optim.ada_gn(),
    optax.scale_by_learning_rate(learning_rate),
  )


OPTIMIZERS = {
  "spam": functools.partial(optim.spam, reset_interval=5, warmup_steps=2,
                            grace_steps=1, spike_threshold=50.0),
  "stable_spam": functools.partial(optim.stable_spam, reset_interval=5,
                                   total_steps=40),
  "spam_wd": functools.partial(optim.spam, weight_decay=0.01,
                               reset_interval=5, warmup_steps=2),
  "pieces": _pieces,
}


def _params(dtype=jnp.float32):
  return {
    "w": jnp.linspace(-1.0, 1.0, 48, dtype=jnp.float32).reshape(8, 6).astype(
      dtype),
    "b": jnp.ones((5,), dtype),
  }


def _loss(p):
  return sum(jnp.sum((x.astype(jnp.float32) - 0.5) ** 2)
             for x in jax.tree.leaves(p))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_minimises_a_parabola(name):
  opt = OPTIMIZERS[name](5e-2)
  p = _params()
  state = opt.init(p)

  @jax.jit
  def step(p, state):
    g = jax.grad(_loss)(p)
    u, state = opt.update(g, state, p)
    return optax.apply_updates(p, u), state

  loss0 = float(_loss(p))
  for _ in range(150):
    p, state = step(p, state)
  assert float(_loss(p)) < 0.1 * loss0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_preserved_and_no_recompile(name, dtype):
  opt = OPTIMIZERS[name](1e-2)
  p = _params(dtype)
  state = opt.init(p)
  update = jax.jit(opt.update)
  g = jax.tree.map(jnp.ones_like, p)
  u, state2 = update(g, state, p)
  u, state3 = update(g, state2, p)
  assert update._cache_size() == 1, "recompiled on the second call"
  for leaf in jax.tree.leaves(u):
    assert leaf.dtype == dtype
  # State leaves keep dtype and shape across updates (MultiSteps needs it).
  assert jax.tree.map(lambda a: (a.dtype, a.shape), state) == jax.tree.map(
    lambda a: (a.dtype, a.shape), state3)


def test_state_dtype_option():
  p = _params(jnp.bfloat16)
  s = optim.spam(1e-2, state_dtype=jnp.float32).init(p)
  assert s[0].mu["w"].dtype == jnp.float32
  s = optim.spam(1e-2).init(p)
  assert s[0].mu["w"].dtype == jnp.bfloat16  # official pure-bf16 default


@pytest.mark.parametrize("factory", [optim.spam, optim.stable_spam])
def test_inject_hyperparams_changes_lr_without_recompile(factory):
  opt = optax.inject_hyperparams(factory)(learning_rate=1e-2,
                                          reset_interval=5)
  p = _params()
  g = jax.tree.map(jnp.ones_like, p)
  state = opt.init(p)
  update = jax.jit(opt.update)
  _, state = update(g, state, p)  # the fresh state may be weakly typed
  u2, state = update(g, state, p)
  compiled = update._cache_size()
  lr = state.hyperparams["learning_rate"]
  state.hyperparams["learning_rate"] = jnp.full_like(lr, 2e-2)
  u3, state = update(g, state, p)
  assert update._cache_size() == compiled, "recompiled for a new lr"
  # For a constant gradient the bias-corrected Adam ratio is the same at
  # steps 2 and 3, so the update doubles with the learning rate.
  np.testing.assert_allclose(np.asarray(u3["w"]), 2 * np.asarray(u2["w"]),
                             rtol=1e-4)


@pytest.mark.parametrize("name", ["spam", "stable_spam"])
def test_multisteps(name):
  inner = OPTIMIZERS[name](1e-2)
  opt = optax.MultiSteps(inner, every_k_schedule=3)
  p = _params()
  state = opt.init(p)
  gs = [jax.tree.map(lambda a, i=i: a * (i + 1.0), p) for i in range(3)]
  for i, g in enumerate(gs):
    u, state = opt.update(g, state, p)
    if i < 2:
      assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  mean = jax.tree.map(lambda *a: sum(a) / 3, *gs)
  expect, _ = inner.update(mean, inner.init(p), p)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                            rtol=1e-5, atol=1e-7), u, expect)
  assert int(state.mini_step) == 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_apply_if_finite_skips_nan_steps(name):
  opt = optax.apply_if_finite(OPTIMIZERS[name](1e-2), max_consecutive_errors=3)
  p = _params()
  state = opt.init(p)
  g = jax.tree.map(jnp.ones_like, p)
  _, state = opt.update(g, state, p)
  bad = jax.tree.map(lambda a: a.at[0].set(jnp.nan), g)
  u, state2 = opt.update(bad, state, p)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  assert int(state2.notfinite_count) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
               state.inner_state, state2.inner_state)


def test_partition_and_masked():
  p = _params()
  labels = {"w": "spam", "b": "adam"}
  opt = optax.partition({"spam": optim.spam(1e-2), "adam": optax.adam(1e-2)},
                        labels)
  state = opt.init(p)
  g = jax.tree.map(jnp.ones_like, p)
  u, state = opt.update(g, state, p)
  solo, _ = optim.spam(1e-2).update({"w": g["w"]},
                                    optim.spam(1e-2).init({"w": p["w"]}),
                                    {"w": p["w"]})
  np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(solo["w"]))
  masked = optax.masked(optim.stable_spam(1e-2), {"w": True, "b": False})
  u, _ = masked.update(g, masked.init(p), p)
  np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(g["b"]))
  assert not np.allclose(np.asarray(u["w"]), np.asarray(g["w"]))


def test_chain_with_global_norm_clipping():
  p = _params()
  g = jax.tree.map(lambda a: 100.0 * jnp.ones_like(a), p)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optim.stable_spam(1e-2))
  u, _ = opt.update(g, opt.init(p), p)
  clipped, _ = optax.clip_by_global_norm(1.0).update(g, None)
  expect, _ = optim.stable_spam(1e-2).update(
    clipped, optim.stable_spam(1e-2).init(p), p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u,
               expect)


def test_diagnostics_through_wrappers():
  opt = optax.MultiSteps(
    optax.inject_hyperparams(optim.spam)(learning_rate=1e-2,
                                         spike_threshold=5000.0,
                                         grace_steps=2,
                                         reset_interval=4, warmup_steps=2),
    every_k_schedule=1)
  p = _params()
  state = opt.init(p)
  g = jax.tree.map(jnp.ones_like, p)
  counts, factors = [], []
  for t in range(1, 7):
    scale = 100.0 if t == 3 else 1.0
    _, state = opt.update(jax.tree.map(lambda a, s=scale: a * s, g), state, p)
    d = optim.spike_diagnostics(state)
    counts.append(int(d.spike_count))
    factors.append(float(d.warmup_factor))
  # The 100x step (t=3) clips all 53 elements; t=4 is a reset (s = 0.01)
  # and starts a grace step.
  assert counts == [0, 0, 53, 0, 0, 0]
  np.testing.assert_allclose(factors[:3], 1.0)
  np.testing.assert_allclose(factors[3], 0.01, rtol=1e-5)
  assert 0.01 < factors[4] < 1.0 and factors[5] == 1.0


# "pieces" chains optax.scale_by_adam, whose scalar count optax creates
# without a sharding; jqlm's own states replicate theirs on the params' mesh.
@pytest.mark.parametrize("name", ["spam", "stable_spam", "spam_wd"])
def test_sharded_state_follows_params(name):
  assert jax.device_count() >= 8
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  shardings = {"w": NamedSharding(mesh, P("data", "model")),
               "b": NamedSharding(mesh, P())}
  p = jax.device_put(
    {"w": jnp.ones((8, 6), jnp.float32), "b": jnp.ones((5,), jnp.float32)},
    shardings)
  opt = OPTIMIZERS[name](1e-2)
  state = opt.init(p)  # eagerly, on the sharded params
  for leaf in jax.tree.leaves(state):
    if leaf.shape == (8, 6):
      assert leaf.sharding == shardings["w"]
    else:
      assert leaf.sharding.is_fully_replicated and leaf.sharding.mesh == mesh
  type_before = jax.tree.map(jax.typeof, state)

  @jax.jit
  def step(p, state):
    g = jax.grad(_loss)(p)
    u, state = opt.update(g, state, p)
    return optax.apply_updates(p, u), state

  p2, state2 = step(p, state)
  p3, state3 = step(p2, state2)
  assert step._cache_size() == 1
  assert jax.tree.map(jax.typeof, state3) == type_before
  for leaf in jax.tree.leaves(state3):
    if leaf.shape == (8, 6):
      assert leaf.sharding.is_equivalent_to(shardings["w"], 2)
  assert p3["w"].sharding.is_equivalent_to(shardings["w"], 2)
  # Same numbers as the unsharded run.
  q = jax.device_get(p)
  unsharded = jax.jit(step.__wrapped__)
  q2, qs = unsharded(q, opt.init(q))
  q3, _ = unsharded(q2, qs)
  np.testing.assert_allclose(np.asarray(p3["w"]), np.asarray(q3["w"]),
                             rtol=1e-6)
