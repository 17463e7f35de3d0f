"""SPAM's sparse momentum (optimizers_more.md §4) against the numpy
transcription of the official ``density`` group, masks injected from jqlm's
state (the official draws are torch's), float64 over 120 updates with
redraws, resets, warmup restarts and spike clipping inside the window:
relative error <= 1e-10."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jqlm import optim
from tests.optim.reference import NumpySpam, NumpySpamDensity

SHAPES = {"w": (16, 24), "u": (24, 16), "b": (7,)}
STEPS = 120


def _params(seed=1):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s) for k, s in SHAPES.items()}


def _grads(seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for t in range(1, STEPS + 1):
    g = {}
    for name, shape in SHAPES.items():
      x = rng.normal(size=shape) * (1 + 0.5 * np.sin(t / 9)) + 0.1
      if t % 5 == 0:  # spikes
        x.reshape(-1)[rng.integers(0, x.size, 6)] *= 300.0
      g[name] = x
    out.append(g)
  return out


def _run(opt, grads):
  """jqlm's trajectory and the masks after every update."""
  p = {k: jnp.asarray(v) for k, v in _params().items()}
  state = opt.init(p)
  first = jax.tree.map(np.asarray, state[0].masks)
  update = jax.jit(opt.update)
  traj, masks = [], []
  for g in grads:
    u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
    p = optax.apply_updates(p, u)
    traj.append({k: np.asarray(v) for k, v in p.items()})
    masks.append(jax.tree.map(np.asarray, state[0].masks))
  return traj, first, masks


def _max_rel_err(a, b):
  return max(float(np.max(np.abs(x[k] - y[k])) / np.max(np.abs(y[k])))
             for x, y in zip(a, b, strict=True) for k in x)


CASES = {
  "d0.3_dt12_wd": dict(density=0.3, dt=12, n=5, theta=50.0, grace=3,
                       wd=0.1),
  "d0.5_dt7": dict(density=0.5, dt=7, n=3, theta=50.0, grace=2, wd=0.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_numpy_density_group(name):
  c = CASES[name]
  with jax.enable_x64(True):
    opt = optim.spam(
      1e-2, weight_decay=c["wd"], spike_threshold=c["theta"],
      reset_interval=c["dt"], warmup_steps=c["n"], grace_steps=c["grace"],
      sparse_momentum=c["density"], sparse_key=jax.random.key(3))
    traj, first, masks = _run(opt, _grads())
  sparse = {k: v for k, v in first.items() if v.ndim}
  assert set(sparse) == {"w", "u"}  # default: the 2-D params
  ref = NumpySpamDensity(
    1e-2, sparse, lambda k, t: masks[t - 1][k], weight_decay=c["wd"],
    warmup_steps=c["n"], threshold=c["theta"], delta_t=c["dt"],
    grad_accu_steps=c["grace"])
  p = _params()
  expect = []
  for g in _grads():
    ref.step(p, g)
    expect.append({k: v.copy() for k, v in p.items()})
  err = _max_rel_err(traj, expect)
  assert err <= 1e-10, err
  # the masks: exact count first, then Bernoulli redraws after t = dt-1,
  # 2dt-1, ... (and only then)
  for m in sparse.values():
    assert m.sum() == int(c["density"] * m.size)
  changed = [t for t in range(1, STEPS + 1)
             if not np.array_equal((masks[t - 2] if t > 1 else first)["w"],
                                   masks[t - 1]["w"])]
  assert changed == [t for t in range(1, STEPS + 1) if (t + 1) % c["dt"] == 0]
  counts = np.array([m["w"].sum() for m in masks])
  assert len(set(counts.tolist())) > 2  # random counts
  assert abs(counts.mean() / masks[0]["w"].size - c["density"]) < 0.05


def test_frozen_outside_the_mask_and_no_decay():
  """Within a window the sparse params change only on their mask, and
  weight decay reaches only the dense params."""
  with jax.enable_x64(True):
    opt = optim.spam(1e-2, weight_decay=0.5, reset_interval=10,
                     warmup_steps=2, grace_steps=2, sparse_momentum=0.2)
    traj, first, masks = _run(opt, _grads()[:8])
  p0 = _params()
  for k in ("w", "u"):
    moved = traj[-1][k] != p0[k]
    assert not np.any(moved & ~first[k])
    assert np.all(moved[first[k]])
  assert np.all(traj[0]["b"] != p0["b"])


def test_density_one_is_dense_spam():
  kw = dict(spike_threshold=50.0, reset_interval=12, warmup_steps=5,
            grace_steps=3)
  with jax.enable_x64(True):
    a, _, _ = _run(optim.spam(1e-2, sparse_momentum=1.0, **kw), _grads())
  ref = NumpySpam(1e-2, warmup_steps=5, threshold=50.0, delta_t=12,
                  grad_accu_steps=3)
  p = _params()
  expect = []
  for g in _grads():
    ref.step(p, g)
    expect.append({k: v.copy() for k, v in p.items()})
  assert _max_rel_err(a, expect) <= 1e-10


def test_official_selection_and_bad_density():
  p = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  state = optim.scale_by_spam(
    sparse_momentum=0.5, sparse_mask={"w": True, "u": False, "b": False},
  ).init(p)
  assert state.masks["w"].shape == (16, 24)
  assert state.masks["u"].shape == ()
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="sparse_momentum"):
      optim.spam(1e-3, sparse_momentum=bad)
  with pytest.raises(ValueError, match="sparse_mask"):
    optim.scale_by_spam(sparse_momentum=0.5, sparse_mask={"w": True}).init(p)
