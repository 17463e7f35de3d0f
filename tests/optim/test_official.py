"""Opt-in parity of jqlm's optimizers with the OFFICIAL PyTorch code, on CPU.

Each test runs the official optimizer on small float64 torch params (torch
layout (out, in), the transpose of jqlm's Flax (in, out) kernels) side by
side with jqlm in float64 for 60 updates, the official random draws
replaced by jqlm's (they cannot be reproduced: torch's generators vs
``jax.random``), and asserts that the max over updates and params of
max|p_jqlm - p_official| / max|p_official| is <= 1e-6. The values measured
(jax 0.10.2, torch 2.13.0+cpu, tensorly 0.10.0) are given per test.

The official code is never part of jqlm. To run these tests, put these
files (``git show <commit>:<path>``) under one directory and point
``JQLM_OFFICIAL_DIR`` at it (spec ``optimizers_more.md`` §0):

* ``$JQLM_OFFICIAL_DIR/APOLLO/apollo_torch/{apollo,random_projector,
  svd_projector}.py``: ``zhuhanqing/APOLLO`` @ ``76b3472``
  (76b34725abcbd45aa47d8fdf831c8b5ba6d34dde), the same paths under
  ``apollo_torch/`` (``apollo.py`` imports ``transformers`` for a version
  check; a stub stands in when it is absent).
* ``$JQLM_OFFICIAL_DIR/SPAM-Optimizer/galore_torch/SPAM.py``:
  ``TianjinYellow/SPAM-Optimizer`` @ ``e8185fb``
  (e8185fbe695fdc449953b4a1f96121df5bf0d268), ``galore_torch/SPAM.py``.
* ``$JQLM_OFFICIAL_DIR/Natural-GaLore/code/natural_galore/{subspace_adamw,
  galore_projector_tensor}.py``: ``selfsupervised-ai/Natural-GaLore`` @
  ``e23336d`` (e23336d7ca1e9580494c13c8b1ac9ca623a1a2a1), the same paths;
  needs ``tensorly==0.10.0`` (the ``official`` extra:
  ``pip install -e ".[test,hf,official]"``).

For example, from clones of the three repositories::

  D=/tmp/official
  mkdir -p $D/APOLLO/apollo_torch $D/SPAM-Optimizer/galore_torch \\
    $D/Natural-GaLore/code/natural_galore
  for f in apollo random_projector svd_projector; do
    git -C APOLLO show 76b3472:apollo_torch/$f.py \\
      > $D/APOLLO/apollo_torch/$f.py; done
  git -C SPAM-Optimizer show e8185fb:galore_torch/SPAM.py \\
    > $D/SPAM-Optimizer/galore_torch/SPAM.py
  for f in subspace_adamw galore_projector_tensor; do
    git -C Natural-GaLore show e23336d:code/natural_galore/$f.py \\
      > $D/Natural-GaLore/code/natural_galore/$f.py; done
  JQLM_OFFICIAL_DIR=$D python -m pytest -m official \\
    tests/optim/test_official.py

The official modules are loaded from those files under a private package
name (their packages' ``__init__.py`` import optional extras such as
bitsandbytes, so they are not run) and dropped after each test. Without
``JQLM_OFFICIAL_DIR`` (or without torch / tensorly) the tests skip with the
reason; the component-wise clipping test needs torch only (its official
code is ``torch.nn.utils.clip_grad_norm_``) and runs whenever torch imports.

What is injected (the rest is the official code, unmodified):

* APOLLO: ``random_projector.stable_randn`` returns jqlm's current P (times
  sqrt(r), which the official code divides out) and ``next_seed`` keeps the
  param's position in the seed so the draw finds its param; the official
  code decides when to draw and which shape (checked against jqlm's).
* SPAM: the first masks are replaced by jqlm's after construction (the
  official count, int(density * numel), is checked equal); at each redraw
  ``torch.rand`` gives 0/1 values such that the official ``rand < density``
  is jqlm's new mask, inside the official ``update_mask_random``.
* Natural GaLore: ``GaLoreProjectorTensor.get_orthogonal_matrix`` runs the
  official tensorly Tucker (float32), checks its factors against jqlm's
  (SVD and tensorly's sign rule) and returns jqlm's float64 factors
  (the float32 tensorly factors themselves would leave a 2.7e-6 relative
  error in the params, above the tolerance).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import pathlib
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jqlm import optim
from jqlm.optim.spam import flagged_spikes

try:
  import torch
except ImportError:  # the `hf` extra brings it
  torch = None

ENV = "JQLM_OFFICIAL_DIR"
TOL = 1e-6
STEPS = 60

pytestmark = [
  pytest.mark.official,
  pytest.mark.skipif(torch is None, reason="needs torch (the `hf` extra)"),
]

# The official files each test needs, relative to $JQLM_OFFICIAL_DIR.
APOLLO_FILES = ("APOLLO/apollo_torch/apollo.py",
                "APOLLO/apollo_torch/random_projector.py",
                "APOLLO/apollo_torch/svd_projector.py")
SPAM_FILES = ("SPAM-Optimizer/galore_torch/SPAM.py",)
NGALORE_FILES = ("Natural-GaLore/code/natural_galore/subspace_adamw.py",
                 "Natural-GaLore/code/natural_galore/"
                 "galore_projector_tensor.py")


def _official_dir(files) -> pathlib.Path:
  """``$JQLM_OFFICIAL_DIR``, or a skip naming what is missing."""
  root = os.environ.get(ENV)
  if not root:
    pytest.skip(f"{ENV} is not set: it must point at a directory holding "
                f"the official code ({', '.join(files)}); see this file's "
                "docstring")
  base = pathlib.Path(root)
  missing = [f for f in files if not (base / f).is_file()]
  if missing:
    pytest.skip(f"{ENV}={root} lacks {', '.join(missing)}; see "
                "tests/optim/test_official.py's docstring")
  return base


@pytest.fixture
def load_official(monkeypatch):
  """``load(directory, *modules)``: the official modules imported from
  ``directory`` as submodules of a private package (so their relative
  imports work and their ``__init__.py`` is not run); removed afterwards."""
  names = []

  def load(directory, *modules):
    pkg = f"_jqlm_official_{len(names)}"
    mod = types.ModuleType(pkg)
    mod.__path__ = [str(directory)]
    sys.modules[pkg] = mod
    names.append(pkg)
    return [importlib.import_module(f"{pkg}.{m}") for m in modules]

  yield load
  for key in list(sys.modules):
    if any(key == p or key.startswith(p + ".") for p in names):
      del sys.modules[key]


def _t(x) -> np.ndarray:
  """A Flax-layout array as a torch-layout float64 numpy array."""
  x = np.asarray(x, np.float64)
  return x.T.copy() if x.ndim == 2 else x.copy()


def _torch_params(params, names):
  return {k: torch.nn.Parameter(torch.from_numpy(_t(params[k])))
          for k in names}


def _set_grads(tparams, grads):
  """Fresh torch-layout grads; returns them by name."""
  out = {}
  for k, p in tparams.items():
    p.grad = torch.from_numpy(_t(grads[k]))
    out[k] = p.grad
  return out


def _rel_err(params, tparams) -> float:
  worst = 0.0
  for k, p in tparams.items():
    want = p.detach().numpy()
    got = _t(params[k])
    worst = max(worst, float(np.max(np.abs(got - want))
                             / np.max(np.abs(want))))
  return worst


# ----------------------------------------------------------------- APOLLO

# Flax (in, out) kernels: up (in < out: torch "right", P (r, in)), down
# (in > out: "left", P (out, r)), q square ("right"); embed and bias are
# the regular (AdamW) group, which officially comes first.
AP_SHAPES = {"embed": (16, 12), "bias": (12,), "up": (12, 20),
             "down": (20, 12), "q": (12, 12)}
AP_REGULAR = ("embed", "bias")
AP_LOWRANK = ("up", "down", "q")
AP_SPIKES = (20, 45, 46)  # 30x gradient spikes at these update indices


def _ap_data(steps):
  rng = np.random.default_rng(0)
  params = {k: 0.1 * rng.normal(size=s) for k, s in AP_SHAPES.items()}
  rng = np.random.default_rng(1)
  base = {k: rng.normal(size=s) for k, s in AP_SHAPES.items()}
  grads = []
  for i in range(steps):
    g = {k: b * (1 + 0.5 * np.sin(i / 5)) + rng.normal(size=b.shape)
         for k, b in base.items()}
    if i in AP_SPIKES:
      g = {k: 30.0 * v for k, v in g.items()}
    grads.append(g)
  return params, grads


APOLLO_CASES = {
  # rank, scale, scale_type, gap, scale_front, disable_nl, wd
  "apollo_r4": dict(rank=4, scale=1.0, scale_type="channel", gap=7),
  "mini_front": dict(rank=1, scale=128.0, scale_type="tensor", gap=7,
                     scale_front=True),
  "mini_back": dict(rank=1, scale=128.0, scale_type="tensor", gap=7),
  "apollo_r3_wd_nl_off": dict(rank=3, scale=2.0, scale_type="channel",
                              gap=10, wd=0.1, disable_nl=True),
}


@contextlib.contextmanager
def _no_transformers_needed():
  """apollo.py imports ``transformers.utils.versions.require_version`` (to
  check torch >= 1.5); a no-op stub stands in when transformers is absent."""
  try:
    importlib.import_module("transformers.utils.versions")
    yield
    return
  except ImportError:
    pass
  stubs = {n: types.ModuleType(n) for n in
           ("transformers", "transformers.utils",
            "transformers.utils.versions")}
  stubs["transformers.utils.versions"].require_version = lambda *a, **k: None
  saved = {n: sys.modules.get(n) for n in stubs}
  sys.modules.update(stubs)
  try:
    yield
  finally:
    for n, m in saved.items():
      if m is None:
        sys.modules.pop(n, None)
      else:
        sys.modules[n] = m


@pytest.mark.parametrize("case", list(APOLLO_CASES))
def test_apollo_matches_official(case, load_official, monkeypatch):
  """APOLLO channel r=4 / APOLLO-Mini (r=1, scale 128, scale_front on and
  off) / channel r=3 with wd 0.1 and the limiter off, gap 7 (10), 60
  updates: 9 (6) draws of P, 30x spikes; ``zhuhanqing/APOLLO`` @ 76b3472.

  Measured max rel. error: 3.4e-16 (apollo_r4), 6.9e-16 (mini_front),
  4.4e-16 (mini_back), 1.1e-15 (apollo_r3_wd_nl_off).
  """
  base = _official_dir(APOLLO_FILES)
  kw = APOLLO_CASES[case]
  rank, gap = kw["rank"], kw["gap"]
  front = kw.get("scale_front", False)
  nl_off = kw.get("disable_nl", False)
  wd = kw.get("wd", 0.0)
  lr = 0.01
  with _no_transformers_needed():
    ap_mod, rp_mod = load_official(base / "APOLLO/apollo_torch", "apollo",
                                   "random_projector")

  # Seeds: the official 1-based position over all params (regular group
  # first). next_seed keeps it (mod 1000) so that a draw finds its param.
  order = AP_REGULAR + AP_LOWRANK
  current = {}  # name -> jqlm's P of this update, torch layout
  draws = []  # (update, name)
  update_no = [0]

  def stable_randn(shape, seed, device=None, dtype=torch.float32):
    name = order[seed % 1000 - 1]
    p = current[name]
    assert tuple(shape) == p.shape, (name, shape, p.shape)
    draws.append((update_no[0], name))
    # The official code asks for float32 (its draws are float32 for any
    # grad dtype) and divides by sqrt(r); a float64 tensor keeps jqlm's P
    # to 1 ulp through that division and the cast to the grads' float64.
    return torch.from_numpy(p * math.sqrt(rank))

  def next_seed(seed, adv=rp_mod.ADV_DEFAULT):
    return seed + 1000

  monkeypatch.setattr(rp_mod, "stable_randn", stable_randn)
  monkeypatch.setattr(rp_mod, "next_seed", next_seed)

  params_np, grads_np = _ap_data(STEPS)
  tparams = _torch_params(params_np, order)
  groups = [
    {"params": [tparams[k] for k in AP_REGULAR]},
    {"params": [tparams[k] for k in AP_LOWRANK], "rank": rank,
     "update_proj_gap": gap, "scale": kw["scale"], "proj_type": "std",
     "proj": "random", "scale_type": kw["scale_type"]},
  ]
  off = ap_mod.AdamW(groups, lr=lr, weight_decay=wd, scale_front=front,
                     disable_nl=nl_off)
  mask = {k: k in AP_LOWRANK for k in AP_SHAPES}
  with jax.enable_x64(True):
    if rank == 1 and kw["scale_type"] == "tensor":
      opt = optim.apollo_mini(lr, weight_decay=wd, mask=mask,
                              key=jax.random.key(3), update_proj_gap=gap,
                              scale=kw["scale"], scale_front=front,
                              disable_nl=nl_off)
    else:
      opt = optim.apollo(lr, rank, weight_decay=wd, mask=mask,
                         key=jax.random.key(3), update_proj_gap=gap,
                         scale=kw["scale"], scale_type=kw["scale_type"],
                         scale_front=front, disable_nl=nl_off)
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    update = jax.jit(opt.update)
    worst, limited = 0.0, []
    for t, g in enumerate(grads_np, start=1):
      u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state,
                        params)
      params = optax.apply_updates(params, u)
      for k in AP_LOWRANK:  # the P jqlm used: kernel (in, r) / (out, r)
        p = np.asarray(state[0].proj[k], np.float64)
        current[k] = p.T.copy() if AP_SHAPES[k][0] <= AP_SHAPES[k][1] else p
      update_no[0] = t
      z_before = {k: off.state[tparams[k]].get("scaled_grad")
                  for k in AP_LOWRANK}
      _set_grads(tparams, g)
      off.step()
      worst = max(worst, _rel_err(params, tparams))
      for k in AP_LOWRANK:  # the official limiter fired: z' = 1.01 z
        z0 = z_before[k]
        z1 = off.state[tparams[k]].get("scaled_grad")
        if z0 is not None and math.isclose(
            float(z1), 1.01 * (float(z0) + 1e-8), rel_tol=1e-12):
          limited.append(t)
  print(f"{case}: max rel err {worst:.2e}, {len(draws)} draws, limiter "
        f"fired {len(limited)} times")
  assert worst <= TOL, worst
  # The official code drew P for every APOLLO param at t = 1, gap+1, ...
  want = [(t, k) for t in range(1, STEPS + 1, gap) for k in AP_LOWRANK]
  assert sorted(draws) == sorted(want)
  if nl_off:
    assert not limited
  else:
    assert AP_SPIKES[0] + 1 in limited and len(limited) > 10


# ------------------------------------------------------------------- SPAM

SPAM_SHAPES = {"b": (7,), "w": (16, 24), "u": (24, 16)}
SPAM_DENSE = ("b",)
SPAM_SPARSE = ("w", "u")


def _spam_data(steps):
  rng = np.random.default_rng(1)
  params = {k: rng.normal(size=s) for k, s in SPAM_SHAPES.items()}
  rng = np.random.default_rng(0)
  grads = []
  for t in range(1, steps + 1):
    g = {}
    for k, s in SPAM_SHAPES.items():
      x = rng.normal(size=s) * (1 + 0.5 * np.sin(t / 9)) + 0.1
      if t % 5 == 0:  # spikes
        x.reshape(-1)[rng.integers(0, x.size, 6)] *= 300.0
      g[k] = x
    grads.append(g)
  return params, grads


def test_spam_density_matches_official(load_official, monkeypatch):
  """SPAM with sparse momentum, density 0.3, Delta T 12, N 5, theta 50,
  grace 3, wd 0.1 (dense group only, officially a no-op on density
  params), 60 updates: 5 mask redraws (t = 11, 23, ..., 59), 5 resets
  with warmup restarts, spike clipping; ``TianjinYellow/SPAM-Optimizer`` @
  e8185fb.

  Measured max rel. error: 1.2e-15.
  """
  base = _official_dir(SPAM_FILES)
  (spam_mod,) = load_official(base / "SPAM-Optimizer/galore_torch", "SPAM")
  density, dt, lr, wd = 0.3, 12, 1e-2, 0.1
  params_np, grads_np = _spam_data(STEPS)
  tparams = _torch_params(params_np, SPAM_SHAPES)
  groups = [{"params": [tparams[k] for k in SPAM_DENSE]},
            {"params": [tparams[k] for k in SPAM_SPARSE],
             "density": density}]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    off = spam_mod.AdamW(groups, lr=lr, weight_decay=wd, warmup_steps=5,
                         threshold=50.0, DeltaT=dt, grad_accu_steps=3,
                         no_deprecation_warning=True)
  with jax.enable_x64(True):
    opt = optim.spam(lr, weight_decay=wd, spike_threshold=50.0,
                     reset_interval=dt, warmup_steps=5, grace_steps=3,
                     sparse_momentum=density,
                     sparse_key=jax.random.key(3))
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    for k in SPAM_SPARSE:  # jqlm's first masks replace the official ones
      mine = _t(state[0].masks[k]).astype(bool)
      theirs = off.state[tparams[k]]["mask"]
      assert int(theirs.sum()) == int(mine.sum()) == int(density * mine.size)
      off.state[tparams[k]]["mask"] = torch.from_numpy(mine)

    name_of = {id(tparams[k]): k for k in SPAM_SPARSE}
    new_masks, redraws = {}, []
    orig_redraw = off.update_mask_random

    def update_mask_random(density_, p, old_mask):
      """The official redraw, its ``torch.rand`` giving jqlm's mask."""
      want = torch.from_numpy(new_masks[name_of[id(p)]])
      redraws.append((off.state["total_step"], name_of[id(p)]))
      real_rand = torch.rand

      def rand(shape, device=None, **kwargs):
        assert tuple(shape) == tuple(want.shape)
        return torch.where(want, 0.0, 1.0).to(torch.float64)

      torch.rand = rand
      try:
        return orig_redraw(density_, p, old_mask)
      finally:
        torch.rand = real_rand

    monkeypatch.setattr(off, "update_mask_random", update_mask_random)
    update = jax.jit(opt.update)
    worst, spikes = 0.0, 0
    for g in grads_np:
      u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state,
                        params)
      params = optax.apply_updates(params, u)
      spikes += int(flagged_spikes(state[0].nu))
      for k in SPAM_SPARSE:
        new_masks[k] = _t(state[0].masks[k]).astype(bool)
      _set_grads(tparams, g)
      with warnings.catch_warnings():  # the scheduler's step(epoch)
        warnings.simplefilter("ignore")
        off.step()
      worst = max(worst, _rel_err(params, tparams))
      for k in SPAM_SPARSE:
        np.testing.assert_array_equal(
          off.state[tparams[k]]["mask"].numpy(), new_masks[k])
  print(f"spam density: max rel err {worst:.2e}, {len(redraws)} redraws, "
        f"{spikes} clipped elements")
  assert worst <= TOL, worst
  want = [(t, k) for t in range(1, STEPS + 1) if (t + 1) % dt == 0
          for k in SPAM_SPARSE]
  assert redraws == want
  assert spikes > 10  # the clip fired (jqlm's flags; parity covers torch)


# --------------------------------------------------------- Natural GaLore

NG_SHAPES = {"embed": (10, 12), "bias": (12,), "q": (12, 12),
             "up": (12, 20), "down": (20, 12)}
NG_REGULAR = ("embed", "bias")
NG_LOWRANK = ("q", "up", "down")
# Well-separated singular values: tensorly's float32 HOOI and jqlm's SVD
# agree to float32 rounding (the sign rule fixes the rest).
NG_SV = np.array([12, 9, 7, 5.5, 4.2, 3.2, 2.4, 1.8, 1.3, 1.0, 0.7, 0.5])


def _ng_data(steps):
  """A fresh random singular basis every update, a fixed spectrum."""
  rng = np.random.default_rng(0)
  params = {k: 0.1 * rng.normal(size=s) for k, s in NG_SHAPES.items()}
  rng = np.random.default_rng(1)
  grads = []
  for t in range(steps):
    g = {}
    for k, s in NG_SHAPES.items():
      if len(s) == 1:
        g[k] = rng.normal(size=s)
        continue
      n = min(s)
      q1, _ = np.linalg.qr(rng.normal(size=(s[0], n)))
      q2, _ = np.linalg.qr(rng.normal(size=(s[1], n)))
      g[k] = (q1 * NG_SV[:n]) @ q2.T * (1 + 0.3 * np.sin(t / 4))
    grads.append(g)
  return params, grads


def test_natural_galore_matches_official(load_official, monkeypatch):
  """Natural GaLore r=4, s=5 (history wraps), gap 7, scale 0.25, 60
  updates: 9 factor refreshes per kernel, square and both non-square
  kernels plus a regular AdamW group; ``selfsupervised-ai/Natural-GaLore``
  @ e23336d with tensorly 0.10.0.

  Measured max rel. error: 8.4e-13 (the official Woodbury form
  r/lambda - G z/lambda^2 cancels: float64 rounding times ||G||^2/lambda);
  official float32 Tucker factors vs jqlm's: 9.9e-7 max abs.
  """
  base = _official_dir(NGALORE_FILES)
  pytest.importorskip("tensorly", reason="Natural GaLore's official "
                      "projector needs tensorly (pip install "
                      "'jqlm[official]')")
  import tensorly

  backend = tensorly.get_backend()
  ng_dir = base / "Natural-GaLore/code/natural_galore"
  try:
    sub_mod, proj_mod = load_official(ng_dir, "subspace_adamw",
                                      "galore_projector_tensor")
    _run_natural_galore(sub_mod, proj_mod, monkeypatch)
  finally:
    tensorly.set_backend(backend)  # the official module sets "pytorch"


def _run_natural_galore(sub_mod, proj_mod, monkeypatch):
  rank, history, gap, lr, scale = 4, 5, 7, 0.01, 0.25
  cls = proj_mod.GaLoreProjectorTensor
  orig = cls.get_orthogonal_matrix
  factors = {}  # name -> jqlm's [U (out, r), V (in, r)] of this update
  grads_t = {}  # name -> the torch grad tensor of this update
  refreshes, factor_err = [], [0.0]
  update_no = [0]

  def get_orthogonal_matrix(self, weights, rank_):
    name = next(k for k, v in grads_t.items() if v is weights)
    core, theirs = orig(self, weights, rank_)  # tensorly, float32
    mine = factors[name]
    for a, b in zip(theirs, mine, strict=True):
      assert a.shape == b.shape
      factor_err[0] = max(factor_err[0],
                          float(np.max(np.abs(a.numpy() - b))))
    refreshes.append((update_no[0], name))
    return core, [torch.from_numpy(f.copy()) for f in mine]

  monkeypatch.setattr(cls, "get_orthogonal_matrix", get_orthogonal_matrix)
  params_np, grads_np = _ng_data(STEPS)
  tparams = _torch_params(params_np, NG_REGULAR + NG_LOWRANK)
  groups = [
    {"params": [tparams[k] for k in NG_REGULAR]},
    {"params": [tparams[k] for k in NG_LOWRANK], "rank": rank,
     "update_proj_gap": gap, "scale": scale,
     "proj_type": "natural_galore", "natural_history": history},
  ]
  off = sub_mod.SubSpaceAdamW(groups, lr=lr)
  mask = {k: k in NG_LOWRANK for k in NG_SHAPES}
  with jax.enable_x64(True):
    opt = optim.natural_galore(lr, rank, mask=mask, update_proj_gap=gap,
                               scale=scale, history=history)
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    state = opt.init(params)
    update = jax.jit(opt.update)
    worst = 0.0
    for t, g in enumerate(grads_np, start=1):
      u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state,
                        params)
      params = optax.apply_updates(params, u)
      for k in NG_LOWRANK:
        # Kernel K = W^T: jqlm's A (in, r) is torch's V, B (out, r) its U.
        a, b = (np.asarray(f, np.float64)
                for f in state[0].projector[k].proj)
        factors[k] = [b, a]
      update_no[0] = t
      grads_t.clear()
      grads_t.update(_set_grads(tparams, g))
      off.step()
      worst = max(worst, _rel_err(params, tparams))
  print(f"natural galore: max rel err {worst:.2e}, {len(refreshes)} "
        f"refreshes, factors vs tensorly {factor_err[0]:.1e}")
  assert worst <= TOL, worst
  assert factor_err[0] <= 1e-4, factor_err[0]
  want = [(t, k) for t in range(1, STEPS + 1, gap) for k in NG_LOWRANK]
  assert sorted(refreshes) == sorted(want)


# -------------------------------------------- component-wise clipping

CLIP_SHAPES = {"layers": [{"attn": {"q": (6, 8), "o": (8, 6)},
                           "mlp": {"up": (6, 10)}, "norm": (6,)}
                          for _ in range(2)],
               "embed": (11, 6)}


def test_component_clip_matches_torch_clip_grad_norm():
  """Every tensor clipped against its own L2 norm, as
  ``GradClipTrainer.py:327`` (``yangalan123/FineTuningStability`` @
  a75412a) calls ``torch.nn.utils.clip_grad_norm_(param, c)`` per named
  parameter, then SGD; c = 0.5, grad norms 0.01-3, 60 updates. Needs
  torch only (no official repository).

  Measured max rel. error: 4.3e-16 (clipped grads), 2.1e-16 (params).
  """
  c, lr = 0.5, 0.1
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten(
    CLIP_SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  init = [rng.normal(size=s) for s in leaves]
  tparams = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in init]
  sgd = torch.optim.SGD(tparams, lr=lr)
  opt = optax.chain(optim.clip_by_component_norm(c), optax.sgd(lr))
  worst_g = worst_p = 0.0
  clipped = kept = 0
  with jax.enable_x64(True):
    params = treedef.unflatten([jnp.asarray(x) for x in init])
    state = opt.init(params)
    clip = jax.jit(optim.clip_by_component_norm(c).update)
    update = jax.jit(opt.update)
    for _ in range(STEPS):
      g = [rng.normal(size=s) * 10 ** rng.uniform(-2.5, 0.3)
           for s in leaves]
      for p, x in zip(tparams, g, strict=True):
        p.grad = torch.from_numpy(x.copy())
        clipped += np.linalg.norm(x) > c
        kept += np.linalg.norm(x) <= c
        torch.nn.utils.clip_grad_norm_(p, c)  # per tensor, officially
      gj = treedef.unflatten([jnp.asarray(x) for x in g])
      cg, _ = clip(gj, optax.EmptyState())
      for a, p in zip(jax.tree.leaves(cg), tparams, strict=True):
        want = p.grad.numpy()
        worst_g = max(worst_g, float(np.max(np.abs(np.asarray(a) - want))
                                     / np.max(np.abs(want))))
      sgd.step()
      u, state = update(gj, state, params)
      params = optax.apply_updates(params, u)
      for a, p in zip(jax.tree.leaves(params), tparams, strict=True):
        want = p.detach().numpy()
        worst_p = max(worst_p, float(np.max(np.abs(np.asarray(a) - want))
                                     / np.max(np.abs(want))))
  print(f"component clip: max rel err grads {worst_g:.2e}, params "
        f"{worst_p:.2e}")
  assert worst_g <= TOL and worst_p <= TOL, (worst_g, worst_p)
  assert clipped > 50 and kept > 50  # both sides of the threshold
