"""Scanned layer stacks in the train step, and the layer-wise update.

* A ``scan_layers`` model trains like the unrolled one: its optimizer runs
  layer by layer (:class:`jqlm.train.LayeredState`), which for per-leaf
  optimizers is the same math.
* :func:`jqlm.train.layerwise_train_step` (each layer updated as soon as
  its gradient exists) gives the params and state of the ordinary step on
  the same scanned model.

Tolerances (float32): the layer-wise backward recomputes each layer from
its saved input, as remat does, so gradients agree to float32 rounding
(~1e-7 relative). After 3 Adam-family updates a rounding difference in a
tiny gradient coordinate can move a param by up to ~lr x 1e-2; params are
compared at atol 1e-5 (lr 1e-3) and losses at rtol 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlm import models, train
from jqlm.models import sharding as shd
from jqlm.train import plan

STEPS = 3


def _cfg(kind, *, scan=True, layerwise=False, norm_pass=False, **opt):
  return train.TrainConfig(
    model={"preset": "llama_tiny", "vocab_size": 256, "num_layers": 3,
           "scan_layers": scan},
    data={"seq_len": 16, "batch_size": 2},
    optimizer={"kind": kind, "warmup_steps": 0, "lr": 1e-3, **opt},
    run={"steps": 10, "layerwise_update": layerwise,
         "layerwise_norm_pass": norm_pass})


def _batches():
  return [jax.random.randint(jax.random.key(i), (2, 17), 0, 256)
          for i in range(STEPS)]


def _train(cfg):
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  s = train.setup(cfg, mesh)
  state = train.init_state(s)
  step = jax.jit(plan.step_function(cfg, s))
  metrics = []
  for b in _batches():
    state, m = step(state, b)
    metrics.append(jax.tree.map(float, m))
  return state, metrics


# GaLore's projection is exercised through Q-GaLore (the same projector,
# with int8 weights and their taps on top)
OPTS = {
  "adamw": {},
  "stable_spam": {},
  "q_galore": {"rank": 8, "update_proj_gap": 2, "stochastic_round": False,
               "state": "float"},
}


def _close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), atol=atol,
                               rtol=0)


@pytest.fixture(scope="module", params=sorted(OPTS))
def trained(request):
  kind = request.param
  return kind, {
    "scan": _train(_cfg(kind, **OPTS[kind])),
    "layerwise": _train(_cfg(kind, layerwise=True, **OPTS[kind])),
  }


def test_layerwise_equals_the_ordinary_scanned_step(trained):
  kind, runs = trained
  (s_ref, m_ref), (s_lw, m_lw) = runs["scan"], runs["layerwise"]
  np.testing.assert_allclose([m["loss"] for m in m_lw],
                             [m["loss"] for m in m_ref], rtol=1e-6)
  np.testing.assert_allclose([m["grad_norm"] for m in m_lw],
                             [m["grad_norm"] for m in m_ref], rtol=1e-5)
  assert all(m["skipped"] == 0 and m["skipped_layers"] == 0 for m in m_lw)
  assert int(s_lw.step) == int(s_ref.step) == STEPS
  assert isinstance(s_lw.opt_state, train.LayeredState)
  assert jax.tree.structure(s_lw) == jax.tree.structure(s_ref)
  _close(train.step.float_params(s_lw.params),
         train.step.float_params(s_ref.params), 1e-5)
  _close(s_lw.opt_state, s_ref.opt_state, 1e-5)


def test_scanned_model_trains_like_the_unrolled_one():
  """Per-leaf AdamW: the layered optimizer is the whole-tree optimizer."""
  s_scan, m_scan = _train(_cfg("adamw"))
  s_unr, m_unr = _train(_cfg("adamw", scan=False))
  np.testing.assert_allclose([m["loss"] for m in m_scan],
                             [m["loss"] for m in m_unr], rtol=1e-6)
  _close(s_scan.params, models.stack_layers(s_unr.params), 1e-5)
  # the layered state is the unrolled state, stacked
  def adam(state):
    return next(n for n in jax.tree.leaves(
      state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(n, "mu"))

  mu_scan = adam(s_scan.opt_state.layers).mu["layers"]
  mu_unr = models.stack_layers(adam(s_unr.opt_state).mu)["layers"]
  _close(mu_scan, mu_unr, 1e-6)


def test_layerwise_skips_a_non_finite_loss():
  cfg = _cfg("adamw", layerwise=True)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  s = train.setup(cfg, mesh)
  state = train.init_state(s)
  bad = state._replace(params={**state.params, "embed": jnp.full_like(
    state.params["embed"], jnp.nan)})
  new, m = jax.jit(plan.step_function(cfg, s))(bad, _batches()[0])
  assert float(m["skipped"]) == 1.0 and int(new.step) == 0
  for a, b in zip(jax.tree.leaves(new.params["layers"]),
                  jax.tree.leaves(state.params["layers"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(new.opt_state),
                  jax.tree.leaves(state.opt_state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_norm_pass_clips_like_the_ordinary_step():
  """With the norm pass, the layer-wise step clips the global norm (here
  always active: clip 0.05 is below every step's norm) and equals the
  ordinary scanned step with the same clipping."""
  ref, m_ref = _train(_cfg("adamw", grad_clip=0.05))
  lw, m_lw = _train(_cfg("adamw", layerwise=True, norm_pass=True,
                         grad_clip=0.05))
  assert all(m["grad_norm"] > 0.05 for m in m_ref)
  np.testing.assert_allclose([m["grad_norm"] for m in m_lw],
                             [m["grad_norm"] for m in m_ref], rtol=1e-5)
  np.testing.assert_allclose([m["loss"] for m in m_lw],
                             [m["loss"] for m in m_ref], rtol=1e-6)
  _close(lw.params, ref.params, 1e-5)
  _close(lw.opt_state, ref.opt_state, 1e-5)


def test_norm_pass_skips_a_non_finite_gradient_everywhere():
  """A finite loss with a non-finite gradient: the per-group guard would
  update the other groups; the norm pass changes nothing (train_step's
  policy): a huge final-norm weight gives huge but finite logits and loss, and
  gradients whose squared norm overflows."""
  cfg = _cfg("adamw", layerwise=True, norm_pass=True)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  s = train.setup(cfg, mesh)
  state = train.init_state(s)
  batch = _batches()[0]
  bad = state._replace(params={**state.params, "final_norm": {
    "weight": jnp.full_like(state.params["final_norm"]["weight"], 1e19)}})
  new, m = jax.jit(plan.step_function(cfg, s))(bad, batch)
  assert np.isfinite(float(m["loss"]))
  assert not np.isfinite(float(m["grad_norm"]))
  assert float(m["skipped"]) == 1.0 and int(new.step) == 0
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(bad), strict=True):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      continue
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("change, match", [
  ({"model": {"scan_layers": False}}, "model.scan_layers=true"),
  ({"optimizer": {"grad_clip": 1.0}}, "cannot clip the global gradient"),
  ({"data": {"grad_accum": 2}}, "cannot accumulate gradients"),
  ({"run": {"layerwise_update": False, "layerwise_norm_pass": True}},
   "a mode of the layer-wise update"),
])
def test_layerwise_config_errors(change, match):
  with pytest.raises(ValueError, match=match):
    _cfg("adamw", layerwise=True).replace(**change)


def test_layered_state_needs_a_scanned_model():
  cfg = _cfg("adamw", scan=False)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  s = train.setup(cfg, mesh)
  with pytest.raises(ValueError, match="needs a scan_layers model"):
    train.layerwise_train_step(train.init_state(s), _batches()[0],
                               graphdef=s.graphdef, nnx_state=s.nnx_state,
                               tx=s.tx)


def test_layerwise_run_resumes_exactly(tmp_path):
  """SPAM (spike counts summed over the stacked per-layer states by the
  logged diagnostics) on a 2 x 4 data x fsdp mesh, killed after step 3 and
  resumed from its step-2 checkpoint: the resumed step 3 repeats the killed
  run's step 3 bit for bit."""
  cfg = _cfg("spam", layerwise=True).replace(
    model={"vocab_size": 300}, data={"max_bytes": 60_000}, run={
      "steps": 4, "ckpt_every": 2, "log_every": 1, "eval_every": 4,
      "eval_batches": 1, "mesh_data": 2, "mesh_fsdp": 4,
      "workdir": str(tmp_path / "lw")})
  killed = train.run(cfg, progress=False, stop_after=3)
  resumed = train.run(cfg, resume=True, progress=False)
  assert [m["step"] for m in resumed.metrics] == [3, 4]
  assert resumed.metrics[0]["loss"] == killed.metrics[2]["loss"]
  assert resumed.metrics[-1]["loss"] < killed.metrics[0]["loss"]
  assert all(m["spikes"] >= 0 and m["warmup_factor"] == 1.0
             for m in killed.metrics + resumed.metrics)
  # eval reads the scanned checkpoint (generation with a scanned model:
  # tests/models/test_scan.py)
  ev = train.evaluate(cfg.run.workdir)
  assert ev["step"] == 4 and np.isfinite(ev["eval_loss"])


def test_layerwise_with_optax_adam_and_tied_embeddings():
  """Any per-leaf optax transform, and a tied embedding (its gradient sums
  the head's and the embedding's parts, updated last)."""
  import functools  # noqa: PLC0415

  import optax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  mcfg = models.llama_tiny(num_layers=2, scan_layers=True,
                           tie_embeddings=True)
  graphdef, nnx_state = nnx.split(
    nnx.eval_shape(lambda: models.Llama(mcfg, rngs=nnx.Rngs(0))))
  params = nnx.to_pure_dict(nnx.state(models.Llama(mcfg, rngs=nnx.Rngs(0)),
                                      nnx.Param))
  tx = optax.adam(1e-3)
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32), params=params,
    opt_state=train.init_opt_state(tx, params, layered=True),
    rng=jax.random.key(0))
  kw = dict(graphdef=graphdef, nnx_state=nnx_state, tx=tx)
  ordinary = jax.jit(functools.partial(train.train_step, grad_accum=1,
                                       grad_clip=0.0, **kw))
  layerwise = jax.jit(functools.partial(train.layerwise_train_step, **kw))
  a = b = state
  for batch in _batches()[:2]:
    a, ma = ordinary(a, batch)
    b, mb = layerwise(b, batch)
    np.testing.assert_allclose(float(mb["loss"]), float(ma["loss"]),
                               rtol=1e-6)
  assert "lm_head" not in b.params
  _close(b.params, a.params, 1e-5)
  _close(b.opt_state, a.opt_state, 1e-5)


def test_configs_saved_before_scan_layers_stay_unrolled():
  """A 350M run saved before ``scan_layers`` existed resumes with its
  (unrolled) checkpoint layout; a new config takes the preset's default."""
  new = train.TrainConfig(model={"preset": "llama_350m"})
  assert new.model.llama(max_seq_len=2).scan_layers
  saved = new.to_dict()
  assert saved["model"]["scan_layers"] is None
  del saved["model"]["scan_layers"]
  old = train.TrainConfig.from_dict(saved)
  assert old.model.scan_layers is False
  assert not old.model.llama(max_seq_len=2).scan_layers
  assert train.TrainConfig.from_dict(new.to_dict()) == new
