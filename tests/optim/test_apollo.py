"""APOLLO and APOLLO-Mini: parity with a numpy transcription of the official
code (spec ``optimizers_more.md`` §1), projection statistics and schedule,
layout, dtypes, jit and bad input."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.optim.reference_apollo import NumpyApolloAdamW

# the module (jqlm.optim.apollo is the function)
ap = importlib.import_module("jqlm.optim.apollo")

# Flax kernel shapes (in, out): up (in < out: the in-dim is projected, the
# factor scales columns), down (in > out: the out-dim is projected, rows)
# and square (in-dim projected, columns = torch rows). "embed" is 2-D but
# outside the mask (regular AdamW group), as is the 1-D bias.
SHAPES = {"up": (12, 20), "down": (20, 12), "q": (12, 12), "embed": (16, 12),
          "bias": (12,)}
MASK = {"up": True, "down": True, "q": True, "embed": False, "bias": False}
APOLLO_NAMES = {"up", "down", "q"}
SPIKES = (20, 45, 46, 80)  # 30x gradient spikes at these step indices


def _params(dtype=np.float64, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(0.1 * rng.normal(size=s), dtype)
          for k, s in SHAPES.items()}


def _grads(steps, dtype=np.float64, seed=1):
  rng = np.random.default_rng(seed)
  base = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  out = []
  for t in range(steps):
    g = {k: b * (1 + 0.5 * np.sin(t / 5)) + rng.normal(size=b.shape)
         for k, b in base.items()}
    if t in SPIKES:
      g = {k: 30.0 * v for k, v in g.items()}
    out.append({k: jnp.asarray(v, dtype) for k, v in g.items()})
  return out


def _torch(x):
  """A Flax-layout array as the official torch-layout numpy array."""
  x = np.asarray(x, np.float64)
  return x.T.copy() if x.ndim == 2 else x.copy()


def _torch_proj(p_k, kernel_shape):
  """jqlm's kernel-coordinate P as the official one: (r, n) = P^T when the
  in-dim is projected (torch m >= n, "right"), else (m, r) = P."""
  p = np.asarray(p_k, np.float64)
  return p.T if kernel_shape[0] <= kernel_shape[1] else p


def _run_parity(steps, gap, rank, scale, scale_type, *, scale_front=False,
                disable_nl=False, wd=0.0, lr=0.01):
  """Runs jqlm and the reference side by side in float64, the reference
  drawing jqlm's P at its own refresh steps; returns (max rel. error,
  reference)."""
  with jax.enable_x64(True):
    params = _params()
    grads = _grads(steps)
    opt = ap.apollo(lr, rank, weight_decay=wd, mask=MASK,
                    key=jax.random.key(3), update_proj_gap=gap, scale=scale,
                    scale_type=scale_type, scale_front=scale_front,
                    disable_nl=disable_nl)
    state = opt.init(params)
    update = jax.jit(opt.update)
    ref_params = {k: _torch(v) for k, v in params.items()}
    ref = NumpyApolloAdamW(lr, rank, gap, scale, scale_type, APOLLO_NAMES,
                           weight_decay=wd, scale_front=scale_front,
                           disable_nl=disable_nl)
    prev = None
    worst = 0.0
    for i, g in enumerate(grads):
      u, state = update(g, state, params)
      params = optax.apply_updates(params, u)
      projs = {k: np.asarray(state[0].proj[k]) for k in APOLLO_NAMES}
      # P changes exactly at the refresh steps (t = 1, gap+1, ...).
      for k in APOLLO_NAMES:
        if prev is not None:
          assert (i % gap == 0) == (not np.array_equal(projs[k], prev[k])), \
            (k, i)
      prev = projs
      ref.step(ref_params, {k: _torch(v) for k, v in g.items()},
               lambda name, shape, projs=projs: _torch_proj(
                 projs[name], SHAPES[name]))
      for k, v in params.items():
        want = ref_params[k]
        got = _torch(v)
        worst = max(worst, float(np.max(np.abs(got - want))
                                 / np.max(np.abs(want))))
    assert int(state[0].count) == steps
    draws = sorted({s for _, s in ref.draws})
    assert draws == list(range(0, steps, gap))
    return worst, ref


PARITY = {
  "apollo_r4": dict(rank=4, scale=1.0, scale_type="channel", gap=7),
  "mini_front": dict(rank=1, scale=128.0, scale_type="tensor", gap=7,
                     scale_front=True),
  "mini_back": dict(rank=1, scale=128.0, scale_type="tensor", gap=7),
  "apollo_r3_wd_nl_off": dict(rank=3, scale=2.0, scale_type="channel",
                              gap=10, wd=0.1, disable_nl=True),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_matches_numpy_transcription_of_official_code(case):
  """Float64, 100 steps, 10-15 draws of P, spikes; max over steps and
  params of max|p_jqlm - p_np| / max|p_np| <= 1e-6."""
  kw = PARITY[case]
  worst, ref = _run_parity(100, **kw)
  assert worst <= 1e-6, worst
  if not kw.get("disable_nl"):
    # The limiter fired, on the spikes among other steps.
    steps = {s for _, s in ref.limited}
    assert {s + 1 for s in SPIKES[:1]} <= steps
    assert len(ref.limited) > 20
  else:
    assert not ref.limited
  print(f"{case}: max rel err {worst:.2e}")


def test_apollo_with_schedule_matches_reference():
  """An optax schedule: the step size and the decay both use lr(count)."""
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.02, 5, 30, 0.002)
  with jax.enable_x64(True):
    params = _params()
    grads = _grads(30)
    opt = ap.apollo(sched, 2, weight_decay=0.05, mask=MASK, key=7,
                    update_proj_gap=6)
    state = opt.init(params)
    ref_params = {k: _torch(v) for k, v in params.items()}
    def lr_at(step):
      # jqlm evaluates the schedule at the int32 count (float32 values)
      with jax.numpy_dtype_promotion("standard"):
        return float(sched(jnp.asarray(step, jnp.int32)))

    ref = NumpyApolloAdamW(lr_at, 2, 6, 1.0, "channel", APOLLO_NAMES,
                           weight_decay=0.05)
    update = jax.jit(opt.update)
    for g in grads:
      u, state = update(g, state, params)
      params = optax.apply_updates(params, u)
      projs = {k: np.asarray(state[0].proj[k]) for k in APOLLO_NAMES}
      ref.step(ref_params, {k: _torch(v) for k, v in g.items()},
               lambda n, s, projs=projs: _torch_proj(projs[n], SHAPES[n]))
    for k, v in params.items():
      np.testing.assert_allclose(_torch(v), ref_params[k], rtol=1e-9,
                                 atol=1e-12, err_msg=k)


def test_channel_factor_lies_along_the_larger_dimension():
  """First update, limiter off: u / g is one factor per column for an
  (in <= out) kernel (square included: torch rows), one per row for
  (in > out); APOLLO-Mini's is one scalar. Step 1 has ss = 0.316."""
  params = _params(np.float32)
  g = _grads(1, np.float32)[0]
  for stype in ("channel", "tensor"):
    opt = ap.scale_by_apollo(4, key=0, mask=MASK, disable_nl=True,
                             scale_type=stype)
    u, _ = jax.jit(opt.update)(g, opt.init(params))
    for k in APOLLO_NAMES:
      ratio = np.asarray(u[k]) / np.asarray(g[k])
      if stype == "tensor":
        np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-5)
      elif SHAPES[k][0] <= SHAPES[k][1]:  # constant down each column
        np.testing.assert_allclose(ratio, ratio[:1, :].repeat(
          ratio.shape[0], 0), rtol=1e-5)
        assert np.ptp(ratio[0]) > 1e-3
      else:  # constant along each row
        np.testing.assert_allclose(ratio, ratio[:, :1].repeat(
          ratio.shape[1], 1), rtol=1e-5)
        assert np.ptp(ratio[:, 0]) > 1e-3


def test_state_layout_and_apollo_mini_memory():
  """Moments (r, out) / (in, r); P (in, r) / (out, r); APOLLO-Mini keeps
  2 * max(m, n) moment floats and a min(m, n) P per kernel."""
  params = _params(np.float32)
  st = ap.scale_by_apollo(4, key=0, mask=MASK).init(params)
  assert st.mu["up"].shape == (4, 20) and st.proj["up"].shape == (12, 4)
  assert st.mu["down"].shape == (20, 4) and st.proj["down"].shape == (12, 4)
  assert st.mu["q"].shape == (4, 12) and st.proj["q"].shape == (12, 4)
  assert st.mu["embed"].shape == (16, 12) and st.nu["bias"].shape == (12,)
  assert isinstance(st.proj["embed"], optax.MaskedNode)
  assert isinstance(st.norm["bias"], optax.MaskedNode)
  big = {"up": jnp.zeros((64, 256)), "down": jnp.zeros((256, 64))}
  mini = ap.apollo_mini(1e-2, key=0).init(big)[0]
  for k in big:
    m, n = big[k].shape
    assert mini.mu[k].size + mini.nu[k].size == 2 * max(m, n)
    assert mini.proj[k].size == min(m, n)
    assert mini.norm[k].shape == ()


def test_projection_statistics_and_refresh_schedule():
  """P ~ N(0, 1/r) i.i.d. (no QR), a fresh independent draw per kernel and
  per refresh, redrawn exactly at t = 1, gap+1, ...; the moments are not
  reset at a refresh; the same key gives the same draws."""
  rank, gap = 8, 3
  params = {"a": jnp.zeros((256, 512)), "b": jnp.zeros((512, 256))}
  g = {k: jnp.ones_like(v) for k, v in params.items()}
  opt = ap.scale_by_apollo(rank, key=jax.random.key(0),
                           update_proj_gap=gap)
  state = opt.init(params)
  update = jax.jit(opt.update)
  seen, mus = [], []
  for _ in range(2 * gap + 2):
    _, state = update(g, state)
    seen.append({k: np.asarray(v) for k, v in state.proj.items()})
    mus.append(np.asarray(state.mu["a"]))
  for i in range(1, len(seen)):
    changed = not np.array_equal(seen[i]["a"], seen[i - 1]["a"])
    assert changed == (i % gap == 0), i
  draws = [seen[i][k] for i in (0, gap, 2 * gap) for k in ("a", "b")]
  for p in draws:
    assert p.shape == (256, rank)
    assert abs(p.mean()) < 4 / np.sqrt(p.size * rank)
    np.testing.assert_allclose(p.var(), 1 / rank, rtol=0.1)
    # not orthonormalised: columns have random norms, not 1
    assert np.ptp(np.linalg.norm(p, axis=0)) > 0.05
  flat = np.stack([p.ravel() for p in draws])
  corr = np.corrcoef(flat)
  assert np.max(np.abs(corr - np.eye(len(draws)))) < 0.1
  # no reset at the refresh: mu keeps its decayed history
  assert np.abs(mus[gap]).max() > 0
  np.testing.assert_allclose(
    mus[gap], 0.9 * mus[gap - 1] + 0.1 * (seen[gap]["a"].T @ np.ones(
      (256, 512), np.float32)), rtol=1e-4, atol=1e-5)
  _, again = update(g, opt.init(params))
  np.testing.assert_array_equal(np.asarray(again.proj["a"]), seen[0]["a"])
  # another key: other draws (the key is state, so the same program runs)
  other = ap.scale_by_apollo(rank, key=jax.random.key(1),
                             update_proj_gap=gap).init(params)
  _, st1 = update(g, other)
  assert not np.array_equal(np.asarray(st1.proj["a"]), seen[0]["a"])
  assert update._cache_size() == 1


def test_bf16_params_keep_bf16_and_jit_compiles_once():
  params = _params(jnp.bfloat16)
  params.pop("embed")
  mask = {k: MASK[k] for k in params}
  opt = ap.apollo(1e-2, 4, mask=mask, key=0, update_proj_gap=2,
                  weight_decay=0.1)
  state = opt.init(params)
  step = jax.jit(opt.update)
  for g in _grads(5, jnp.bfloat16)[:5]:
    g = {k: g[k] for k in params}
    u, state = step(g, state, params)
    for k, v in u.items():
      assert v.dtype == jnp.bfloat16 and v.shape == params[k].shape
      assert bool(jnp.all(jnp.isfinite(v.astype(jnp.float32))))
    params = jax.tree.map(lambda p, d: (p + d).astype(p.dtype), params, u)
  assert state[0].mu["up"].dtype == jnp.bfloat16
  assert state[0].proj["up"].dtype == jnp.bfloat16
  assert state[0].norm["up"].dtype == jnp.float32
  assert step._cache_size() == 1  # refresh and plain steps share one program
  st32 = ap.apollo(1e-2, 4, mask=mask, key=0,
                   state_dtype=jnp.float32).init(params)
  assert st32[0].mu["up"].dtype == jnp.float32


def test_inject_hyperparams_and_learning_progress():
  """Works under inject_hyperparams (rank static) and trains a small
  regression."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  w_true = jnp.asarray(rng.normal(size=(16, 24)), jnp.float32)
  y = x @ w_true
  params = {"w": jnp.zeros((16, 24)), "b": jnp.zeros((24,))}
  opt = optax.inject_hyperparams(ap.apollo, static_args=("rank",))(
    learning_rate=0.05, rank=4, key=jax.random.key(0), update_proj_gap=10)
  state = opt.init(params)

  def loss(p):
    return jnp.mean((x @ p["w"] + p["b"][None, :] - y) ** 2)

  @jax.jit
  def train(p, s):
    val, g = jax.value_and_grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, val

  first = None
  for _ in range(150):
    params, state, val = train(params, state)
    first = val if first is None else first
  assert float(val) < 0.2 * float(first)


@pytest.mark.parametrize("call, match", [
  (lambda: ap.apollo(1e-2, 0, key=0), "rank"),
  (lambda: ap.apollo(1e-2, -2, key=0), "rank"),
  (lambda: ap.apollo(1e-2, 4, key=0, scale_type="row"), "scale_type"),
  (lambda: ap.apollo(1e-2, 4, key=None), "PRNG key"),
  (lambda: ap.apollo(1e-2, 4, key="seed"), "key"),
  (lambda: ap.apollo(1e-2, 4, key=0, update_proj_gap=0), "update_proj_gap"),
  (lambda: ap.apollo(1e-2, 4, key=0, scale=0.0), "scale"),
  (lambda: ap.apollo(1e-2, 4, key=0, b1=1.0), "b1"),
  (lambda: ap.apollo(-1.0, 4, key=0), "learning_rate"),
  (lambda: ap.apollo(1e-2, 4, key=0, weight_decay=-1.0), "weight_decay"),
  (lambda: ap.apollo(1e-2, 4, key=0, state_dtype=jnp.int8), "state_dtype"),
  (lambda: ap.apollo(1e-2, jnp.asarray(4), key=0), "static_args"),
])
def test_bad_configs_raise_at_construction(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_shape_dependent_configs_raise_at_init():
  params = {"w": jnp.zeros((12, 20)), "b": jnp.zeros((20,))}
  # rank > min(in, out) is refused; rank == min(in, out) is allowed
  with pytest.raises(ValueError, match="at most the smallest dimension"):
    ap.apollo(1e-2, 13, key=0).init(params)
  ap.apollo(1e-2, 12, key=0).init(params)
  with pytest.raises(ValueError, match="2-D"):
    ap.apollo(1e-2, 4, key=0, mask={"w": True, "b": True}).init(params)
  with pytest.raises(ValueError, match="structure"):
    ap.apollo(1e-2, 4, key=0, mask={"w": True}).init(params)
  with pytest.raises(TypeError, match="key"):
    ap.apollo(1e-2, 4)  # the key is required


def test_default_mask_is_every_2d_param():
  params = {"w": jnp.zeros((12, 20)), "e": jnp.zeros((30, 8)),
            "b": jnp.zeros((20,))}
  st = ap.scale_by_apollo(2, key=0).init(params)
  assert st.mu["w"].shape == (2, 20) and st.mu["e"].shape == (30, 2)
  assert st.mu["b"].shape == (20,)


def test_sharded_state_follows_params():
  """Params over 8 devices: the eagerly built state lives on their mesh
  (the kept dim of the low-rank moments and P keeps the param's axis), and
  the jitted update keeps every leaf's type and sharding, without
  recompiling, and gives the unsharded numbers."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  shard = {"w": NamedSharding(mesh, P("data", "model")),
           "d": NamedSharding(mesh, P("data", "model")),
           "b": NamedSharding(mesh, P())}
  host = {"w": np.ones((4, 8), np.float32) * 0.1,   # in < out
          "d": np.ones((8, 6), np.float32) * 0.1,   # in > out
          "b": np.zeros((8,), np.float32)}
  p = jax.device_put(host, shard)
  opt = ap.apollo(1e-2, 2, key=0, update_proj_gap=1)
  state = opt.init(p)
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf.sharding, NamedSharding)
    assert leaf.sharding.mesh == mesh
  assert state[0].mu["w"].sharding.spec == P(None, "model")  # (r, out)
  assert state[0].proj["w"].sharding.spec == P("data")       # (in, r)
  assert state[0].mu["d"].sharding.spec == P("data")         # (in, r)
  assert state[0].proj["d"].sharding.spec == P("model")      # (out, r)
  before = jax.tree.map(jax.typeof, state)

  def step(p, s):
    g = jax.tree.map(lambda a: jnp.cos(a * 3.0) + a, p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  sharded = jax.jit(step)
  p2, s2 = sharded(*sharded(p, state))
  assert sharded._cache_size() == 1
  assert jax.tree.map(jax.typeof, s2) == before
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s2), strict=True):
    assert b.sharding.is_equivalent_to(a.sharding, a.ndim)
  q = jax.jit(step)
  q2, _ = q(*q(host, opt.init(host)))
  for k in host:
    np.testing.assert_allclose(np.asarray(p2[k]), np.asarray(q2[k]),
                               rtol=1e-6, atol=1e-7)
