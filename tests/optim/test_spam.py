"""SPAM and Stable-SPAM: parity with numpy transcriptions of the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jqlm import optim
from tests.optim.reference import NumpySpam, NumpyStableSpam

STEPS = 120
SHAPES = {"w": (8, 6), "b": (5,)}


def _grads(steps=STEPS, seed=0, spike_every=7):
  """A gradient stream with a drifting mean and injected spikes."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(1, steps + 1):
    g = {}
    for name, shape in SHAPES.items():
      x = rng.normal(size=shape) * (1 + 0.5 * np.sin(t / 9)) + 0.1
      if t % spike_every == 0:
        idx = rng.integers(0, x.size, 3)
        x.reshape(-1)[idx] *= 200.0
      g[name] = x
    out.append(g)
  return out


def _params(seed=1):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s) for k, s in SHAPES.items()}


def _run_jqlm(opt, params, grads, dtype, promotion="strict"):
  """Runs ``opt`` under jit. optax's own transforms (scale_by_adam, schedules)
  mix Python floats with int32 counts, which strict dtype promotion rejects:
  tests that chain them pass ``promotion="standard"``."""
  with jax.numpy_dtype_promotion(promotion):
    return _run(opt, params, grads, dtype)


def _run(opt, params, grads, dtype):
  p = {k: jnp.asarray(v, dtype) for k, v in params.items()}
  state = opt.init(p)

  @jax.jit
  def step(p, state, g):
    u, state = opt.update(g, state, p)
    return optax.apply_updates(p, u), state

  count = jax.jit(lambda s: optim.spike_diagnostics(s).spike_count)
  traj, spikes = [], 0
  for g in grads:
    p, state = step(p, state, {k: jnp.asarray(v, dtype) for k, v in g.items()})
    spikes += int(count(state))
    traj.append({k: np.asarray(v, np.float64) for k, v in p.items()})
  return traj, spikes


def _run_numpy(ref, params, grads, dtype, lrs=None):
  p = {k: np.asarray(v, dtype) for k, v in params.items()}
  traj = []
  for t, g in enumerate(grads):
    ref.step(p, {k: np.asarray(v, dtype) for k, v in g.items()},
             lr=None if lrs is None else lrs[t])
    traj.append({k: v.astype(np.float64) for k, v in p.items()})
  return traj


def _max_rel_err(a, b):
  err = 0.0
  for x, y in zip(a, b, strict=True):
    for k in x:
      err = max(err, float(np.max(np.abs(x[k] - y[k]) /
                                  (np.abs(y[k]) + 1e-3))))
  return err


SPAM_KW = dict(spike_threshold=50.0, reset_interval=25, warmup_steps=6,
               grace_steps=4)
STABLE_KW = dict(gamma1=0.7, gamma2=0.9, gamma3=0.999, reset_interval=30,
                 total_steps=150)

# float64: the transcription and jqlm agree to rounding. float32: the order
# of float32 operations differs (XLA fuses and reassociates), and 120 steps of
# sign-like Adam updates with clipping masks amplify the 1e-7 roundoff; we
# measured up to 1.4e-4 and allow 5e-4 (relative to |p| + 1e-3).
TOL = {jnp.float64: 1e-10, jnp.float32: 5e-4}


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_spam_matches_numpy_transcription(dtype, wd):
  with jax.enable_x64(dtype == jnp.float64):
    opt = optim.spam(1e-2, weight_decay=wd, **SPAM_KW)
    traj, spikes = _run_jqlm(opt, _params(), _grads(), dtype)
  ref = NumpySpam(1e-2, weight_decay=wd, warmup_steps=6, threshold=50.0,
                  delta_t=25, grad_accu_steps=4)
  expect = _run_numpy(ref, _params(), _grads(), np.dtype(dtype))
  assert spikes > 10  # clipping really happened
  assert _max_rel_err(traj, expect) < TOL[dtype]


def test_spam_spike_flags_count_every_step_and_keep_v():
  # Float moments carry the spike flags in nu's sign bits: the count read by
  # spike_diagnostics equals the reference's clipped elements at every step,
  # |nu| is the reference's v, and quantized moments count eagerly.
  ref = NumpySpam(1e-2, warmup_steps=6, threshold=50.0, delta_t=25,
                  grad_accu_steps=4)
  p_ref = {k: v.copy() for k, v in _params().items()}
  with jax.enable_x64(True):
    opt = optim.spam(1e-2, **SPAM_KW)
    q_opt = optim.spam(1e-2, state_quant=optim.StateQuant(min_size=1),
                       **SPAM_KW)
    p = {k: jnp.asarray(v) for k, v in _params().items()}
    state, q_state = opt.init(p), q_opt.init(p)
    step = jax.jit(opt.update)
    q_step = jax.jit(q_opt.update)
    diag = jax.jit(optim.spike_diagnostics)
    counts, q_counts = [], []
    for g in _grads():
      ref.step(p_ref, g)
      gj = {k: jnp.asarray(v) for k, v in g.items()}
      u, state = step(gj, state, p)
      _, q_state = q_step(gj, q_state, p)
      p = optax.apply_updates(p, u)
      counts.append((int(diag(state).spike_count), ref.spikes))
      q_counts.append(int(diag(q_state).spike_count))
      v = optim.spam_second_moment(state[0])
      for k in v:
        np.testing.assert_allclose(np.asarray(v[k]), ref.state[k]["v"],
                                   rtol=1e-9, atol=1e-300)
    assert float(jnp.min(v["w"])) >= 0
  got, want = zip(*counts, strict=True)
  assert sum(want) > 10 and got == want
  assert sum(q_counts) > 10  # 8-bit moments: eager count, near the float one


def test_spam_with_schedule_matches_numpy():
  # The schedule is evaluated at count = t - 1 (the official LambdaLR is
  # stepped after optimizer.step()).
  def sched(count):
    c = jnp.asarray(count).astype(jnp.float64)
    return 1e-2 * (1.0 + c) / (1.0 + 0.5 * c)

  with jax.enable_x64(True):
    traj, _ = _run_jqlm(optim.spam(sched, **SPAM_KW), _params(), _grads(),
                        jnp.float64)
  lrs = [1e-2 * (1.0 + t) / (1.0 + 0.5 * t) for t in range(STEPS)]
  ref = NumpySpam(None, warmup_steps=6, threshold=50.0, delta_t=25,
                  grad_accu_steps=4)
  expect = _run_numpy(ref, _params(), _grads(), np.float64, lrs)
  assert _max_rel_err(traj, expect) < 1e-10


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_stable_spam_matches_numpy_transcription(dtype, wd):
  with jax.enable_x64(dtype == jnp.float64):
    opt = optim.stable_spam(1e-2, weight_decay=wd, **STABLE_KW)
    traj, spikes = _run_jqlm(opt, _params(), _grads(), dtype)
  ref = NumpyStableSpam(1e-2, weight_decay=wd, total_t=150,
                        update_proj_gap=30)
  expect = _run_numpy(ref, _params(), _grads(), np.dtype(dtype))
  assert spikes > 10
  assert _max_rel_err(traj, expect) < TOL[dtype]


def test_stable_spam_reset_modes_differ_only_from_first_reset():
  with jax.enable_x64(True):
    a, _ = _run_jqlm(optim.stable_spam(1e-2, **STABLE_KW), _params(),
                     _grads(40), jnp.float64)
    b, _ = _run_jqlm(optim.stable_spam(1e-2, reset_on_step="before",
                                       **STABLE_KW), _params(), _grads(40),
                     jnp.float64)
  assert _max_rel_err(a[:29], b[:29]) < 1e-12  # steps 1..29 equal
  assert _max_rel_err(a[29:30], b[29:30]) > 1e-6  # the reset step (t=30)


def test_spam_warmup_factor_values():
  # Spec §2.1: for N = 150, s(0)=0.0100, s(1)=0.010107, s(75)=0.49985,
  # s(149)=0.999572, s(>=150)=1; before the first reset s = 1.
  f = lambda t: float(optim.spam_warmup_factor(t - 1, 500, 150))  # noqa
  assert f(1) == 1.0 and f(499) == 1.0
  np.testing.assert_allclose(
    [f(500), f(501), f(575), f(649), f(650), f(1000)],
    [0.0100, 0.010107, 0.49985, 0.999572, 1.0, 0.0100], atol=2e-6)


def test_stable_spam_scale_values():
  # Spec §3.1: 1 at t=1, 0.75002 at t=10000, 0.5 at t=20000, 0.573 at 25000.
  s = lambda t: float(optim.stable_spam_scale(t - 1, 20000, 0.5))  # noqa
  np.testing.assert_allclose([s(1), s(10000), s(20000), s(25000)],
                             [1.0, 0.75002, 0.5, 0.5732], atol=1e-4)


# --------------------------------------------------------------------------
# The composable pieces, alone and chained with optax.


def test_pieces_chained_with_adam_reproduce_spam():
  # clip_spikes keeps its own EMA of the clipped g^2, which equals Adam's
  # nu; with eps -> 0 HF- and torch-style epsilon coincide.
  eps = 1e-30
  chain = optax.chain(
    optim.clip_spikes(50.0, b2=0.999, grace_steps=4, reset_interval=25),
    optim.reset_momentum(optax.scale_by_adam(0.9, 0.999, eps=eps), 25,
                         warmup_steps=6),
    optax.scale_by_learning_rate(1e-2),
  )
  with jax.enable_x64(True):
    a, spikes_a = _run_jqlm(chain, _params(), _grads(), jnp.float64,
                            "standard")
    b, spikes_b = _run_jqlm(optim.spam(1e-2, eps=eps, **SPAM_KW), _params(),
                            _grads(), jnp.float64)
  assert spikes_a == spikes_b > 10
  assert _max_rel_err(a, b) < 1e-9


def test_pieces_chained_with_adam_reproduce_stable_spam_before_reset():
  chain = optax.chain(
    optim.ada_clip(0.999), optim.ada_gn(0.7, 0.9, 1e-8),
    optax.scale_by_adam(0.9, 0.999, eps=1e-8),
    optax.scale_by_learning_rate(1e-2),
  )
  with jax.enable_x64(True):
    a, _ = _run_jqlm(chain, _params(), _grads(), jnp.float64, "standard")
    b, _ = _run_jqlm(optim.stable_spam(1e-2, reset_interval=None), _params(),
                     _grads(), jnp.float64)
  assert _max_rel_err(a, b) < 1e-10


@jax.numpy_dtype_promotion("standard")  # optax.adam inside
def test_clip_spikes_tames_spikes_in_front_of_optax_adam():
  # A 200x spike inflates Adam's second moment by ~40x for ~1/(1-b2) steps,
  # which freezes that coordinate; clipping in front of optax.adam keeps the
  # second moment at the scale of the regular gradients.
  plain = optax.adam(1e-2)
  clipped = optax.chain(optim.clip_spikes(50.0, grace_steps=4), plain)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in _params().items()}
  nu_max = {}
  for name, opt in (("plain", plain), ("clipped", clipped)):
    state = opt.init(p)
    update = jax.jit(opt.update)
    spikes = 0
    for g in _grads(60):
      _, state = update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()},
                        state, p)
      spikes += int(optim.spike_diagnostics(state).spike_count)
    adam = [n for n in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
      if isinstance(n, optax.ScaleByAdamState)][0]
    nu_max[name] = float(jnp.max(adam.nu["w"]))
    assert (spikes > 5) == (name == "clipped")
  assert nu_max["plain"] > 10 * nu_max["clipped"]


@jax.numpy_dtype_promotion("standard")  # optax.scale_by_adam inside
def test_reset_momentum_zeroes_moments_not_counts():
  opt = optim.reset_momentum(optax.scale_by_adam(), 3)
  p = {"w": jnp.ones((2,))}
  s = opt.init(p)
  for _ in range(2):
    _, s = opt.update({"w": jnp.ones((2,))}, s)
  assert float(s.inner_state.mu["w"][0]) > 0
  _, s3 = opt.update({"w": jnp.full((2,), 2.0)}, s)  # t = 3: reset first
  np.testing.assert_allclose(np.asarray(s3.inner_state.mu["w"]), 0.2,
                             rtol=1e-6)
  assert int(s3.inner_state.count) == 3
  opt_c = optim.reset_momentum(optax.scale_by_adam(), 3, reset_counts=True)
  s = opt_c.init(p)
  for _ in range(3):
    _, s = opt_c.update({"w": jnp.ones((2,))}, s)
  assert int(s.inner_state.count) == 1


def test_ada_gn_normalises_norm():
  opt = optim.ada_gn()
  g = {"w": jnp.full((4,), 3.0)}
  u, _ = opt.update(g, opt.init(g))
  # At t=1 the bias-corrected EMAs equal n and n^2, so the norm becomes ~1.
  np.testing.assert_allclose(float(jnp.linalg.norm(u["w"])), 1.0, rtol=1e-6)


def test_ada_clip_clips_above_running_max():
  opt = optim.ada_clip(0.5)
  s = opt.init({"w": jnp.zeros(3)})
  _, s = opt.update({"w": jnp.asarray([1.0, -1.0, 0.5])}, s)
  u, s = opt.update({"w": jnp.asarray([10.0, -1.0, 0.5])}, s)
  # m_max = 0.5*0.5 + 0.5*10 = 5.25; T = 5.25 / (1 - 0.25) = 7.
  np.testing.assert_allclose(np.asarray(u["w"]), [7.0, -1.0, 0.5], rtol=1e-6)
  assert int(optim.spike_diagnostics(s).spike_count) == 1


# --------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize(
  "factory, kwargs, match",
  [
    (optim.spam, dict(b1=1.0), "b1"),
    (optim.spam, dict(b2=-0.1), "b2"),
    (optim.spam, dict(spike_threshold=-1.0), "spike_threshold"),
    (optim.spam, dict(reset_interval=0), "reset_interval"),
    (optim.spam, dict(warmup_steps=-1), "warmup_steps"),
    (optim.spam, dict(grace_steps=1.5), "grace_steps"),
    (optim.spam, dict(weight_decay=-1.0), "weight_decay"),
    (optim.spam, dict(eps=float("nan")), "eps"),
    (optim.stable_spam, dict(gamma1=1.5), "gamma1"),
    (optim.stable_spam, dict(gamma3=1.0), "gamma3"),
    (optim.stable_spam, dict(reset_interval=-5), "reset_interval"),
    (optim.stable_spam, dict(total_steps=0), "total_steps"),
    (optim.stable_spam, dict(eta_min=2.0), "eta_min"),
    (optim.stable_spam, dict(reset_on_step="after"), "reset_on_step"),
    (optim.stable_spam, dict(weight_decay=-0.1), "weight_decay"),
  ],
)
def test_invalid_hyperparameters_raise(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(1e-3, **kwargs)


def test_invalid_piece_hyperparameters_raise():
  with pytest.raises(ValueError, match="spike_threshold"):
    optim.clip_spikes(0.0)
  with pytest.raises(ValueError, match="reset_interval"):
    optim.reset_momentum(optax.scale_by_adam(), 0)
  with pytest.raises(ValueError, match="reset_interval"):
    optim.reset_momentum(optax.scale_by_adam(), None)
  with pytest.raises(ValueError, match="gamma"):
    optim.ada_clip(1.0)
  with pytest.raises(ValueError, match="gamma2"):
    optim.ada_gn(gamma2=-0.5)
  with pytest.raises(ValueError, match="params"):
    opt = optim.spam(1e-3, weight_decay=0.1)
    p = {"w": jnp.ones(2)}
    opt.update(p, opt.init(p))
