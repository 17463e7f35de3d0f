"""A tiny LLaMA under every low-precision training recipe: the gradient is
finite and close to the float32 one by a recipe-dependent bound, the key
reaches every linear, and a short training run lowers the loss (slow).

The bounds (relative L2 error of the whole gradient, and its cosine with
the float32 gradient) are about 1.5-2x the errors measured on this model
and batch (jqlm 2026-12-01, CPU): FP8 and HALO ~0.02-0.07, MX/NV FP4
~0.22, Quartet-II ~0.20, QuEST ~0.24, Quartet 0.46 (its forward clips at
between 1/2 and 1x the MSE-optimal scale: spec §7.3). A bound that fails
means a recipe's numerics moved by far more than its own noise.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jqlm import models, quant, train

# tiny llama: hidden 64, MLP 128, k/v out 32: Quartet-II's and QuEST's
# Hadamard blocks must divide those (spec defaults: 128)
SWITCHES = {"quartet2": {"hadamard_dim": 32}, "quest": {"hadamard_dim": 64}}
BOUNDS = {  # name: (max relative L2 error, min cosine)
  "fp8_tensorwise": (0.15, 0.99), "fp8_rowwise": (0.12, 0.99),
  "mxfp8": (0.12, 0.99), "mxfp4": (0.4, 0.93), "nvfp4": (0.4, 0.93),
  "quartet": (0.7, 0.8), "quartet2": (0.4, 0.93), "quest": (0.45, 0.9),
  **{f"halo{lv}_{e}": (0.12, 0.99) for lv in (0, 1, 2)
     for e in ("fp8", "int8")},
}
TOKENS = jax.random.randint(jax.random.key(1), (4, 33), 0, 256)


def _model(name):
  policy = None if name == "bf16" else models.training_recipe(
    name, num_layers=2, **SWITCHES.get(name, {}))
  return models.Llama(models.llama_tiny(quant=policy), rngs=nnx.Rngs(0))


@functools.cache
def _compiled(name):
  """(jitted gradient of the loss w.r.t. the params, the params): one
  compile per recipe, shared by the tests."""
  model = _model(name)
  gdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def grad(p, k):
    def loss(p):
      m = nnx.merge(gdef, p, rest)
      logits = m(TOKENS[:, :-1], key=k)
      return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), TOKENS[:, 1:]).mean()
    return jax.grad(loss)(p)

  return grad, params


def _grad(name, key=None):
  grad, params = _compiled(name)
  key = jax.random.key(7) if key is None else key
  return np.concatenate([np.ravel(g) for g in jax.tree.leaves(
    grad(params, key))])


@pytest.fixture(scope="module")
def baseline():
  return _grad("bf16")


@pytest.mark.parametrize("name", quant.RECIPES[1:])
def test_recipe_gradient_is_finite_and_close(name, baseline):
  g = _grad(name)
  assert np.all(np.isfinite(g))
  rel = np.linalg.norm(g - baseline) / np.linalg.norm(baseline)
  cos = g @ baseline / np.linalg.norm(g) / np.linalg.norm(baseline)
  bound, min_cos = BOUNDS[name]
  assert rel <= bound and cos >= min_cos, (rel, cos)
  assert rel > 1e-4  # the recipe really quantized something


def test_the_key_reaches_every_stochastic_linear():
  """nvfp4's SR draws from the step key: another key, another gradient;
  the same key, the same gradient (folded per layer, block and linear)."""
  a, b = _grad("nvfp4", jax.random.key(1)), _grad("nvfp4", jax.random.key(1))
  c = _grad("nvfp4", jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_training_recipe_layer_selection():
  """NVFP4 keeps round(16%) of the blocks in BF16, one fifth of them
  first and the rest last (spec §6.4); keep_high_precision overrides."""
  kept = models.training_recipe("nvfp4", num_layers=62).rules[0].patterns
  assert kept == ("layers.0.*", "layers.1.*", *(f"layers.{i}.*"
                                                for i in range(54, 62)))
  kept = models.training_recipe("nvfp4", num_layers=12).rules[0].patterns
  assert kept == ("layers.10.*", "layers.11.*")
  assert len(models.training_recipe("nvfp4", num_layers=2).rules) == 1
  p = models.training_recipe("mxfp8", num_layers=4,
                             keep_high_precision=["layers.0.*"])
  assert p.rules[0].patterns == ("layers.0.*",) and p.rules[0].recipe is None
  assert p.rules[1].recipe == quant.recipe("mxfp8")
  assert models.training_recipe("bf16", num_layers=2).rules == ()


def test_model_recipe_config_and_errors():
  cfg = train.apply_overrides(train.TrainConfig(), [
    "model.recipe=quest", "model.recipe_options=hadamard_dim=64,bits=3"])
  assert cfg.model.recipe_switches() == {"hadamard_dim": 64, "bits": 3}
  for items, needle in (
      (["model.recipe=nvfp5"], "model.recipe"),
      (["model.recipe=nvfp4", "model.quant=int4"], "model.quant=none"),
      (["model.recipe_options=bits=3"], "Set model.recipe too"),
      (["model.recipe=quest", "model.recipe_options=dim=64"],
       "no option 'dim'"),
      (["model.recipe=quest", "model.recipe_options=bits"],
       "not name=value")):
    with pytest.raises(ValueError, match=needle):
      train.apply_overrides(train.TrainConfig(), items)


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [
  ("nvfp4", ""), ("mxfp8", ""), ("quest", "hadamard_dim=64")])
def test_100_steps_lower_the_loss(name, options, tmp_path):
  cfg = train.apply_overrides(train.TrainConfig(), [
    f"model.recipe={name}", f"model.recipe_options={options}",
    "run.steps=100", "run.eval_every=100", "run.ckpt_every=100",
    "run.log_every=10", "optimizer.lr=3e-3", "optimizer.warmup_steps=10",
    "data.batch_size=8", "data.seq_len=32",
    f"run.workdir={tmp_path}"])
  res = train.run(cfg, progress=False)
  losses = [r["loss"] for r in res.metrics]
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 1.0, losses
  assert all(r["recipe"] == name for r in res.metrics)


@pytest.mark.parametrize("scan", [False, True])
def test_operand_stats_through_the_probes(scan):
  """train.operand_stats: the probes' gradients, averaged over the linears;
  the weight row checked against the kernels quantized directly, the
  training model left without probes."""
  policy = models.training_recipe("mxfp4", num_layers=2)
  model = models.Llama(models.llama_tiny(quant=policy, scan_layers=scan),
                       rngs=nnx.Rngs(0))
  view, count = models.recipe_probes(model)
  assert count == (7 if scan else 14)
  assert not jax.tree.leaves(nnx.state(model, models.RecipeProbe))
  assert len(jax.tree.leaves(nnx.state(view, models.RecipeProbe))) == count
  gdef, state = nnx.split(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stats = np.asarray(jax.jit(functools.partial(
    train.operand_stats, graphdef=gdef, nnx_state=state))(
      params, TOKENS, jax.random.key(0)))
  assert stats.shape == (6, 2) and np.all((stats >= 0) & (stats <= 1))
  assert np.all(stats[:, 0] > 0)  # MX FLOOR clips every operand's tops
  kernels = [k.reshape(-1, *k.shape[-2:]) for p, k in
             jax.tree_util.tree_flatten_with_path(params)[0]
             if "kernel" in jax.tree_util.keystr(p)]
  w_rows = [quant.recipes.operand_fractions(quant.quantize_operand(
    k, quant.recipe("mxfp4").w, axis=0)) for ks in kernels for k in ks]
  np.testing.assert_allclose(stats[1], np.mean(w_rows, axis=0), atol=1e-6)


def test_late_high_precision_switches_the_forward(tmp_path):
  """model.late_high_precision=0.5 of 6 steps: steps 1-3 are those of the
  run without the switch bit for bit, steps 4-6 run the forward in high
  precision (logged), and the evaluations' operand statistics lose the
  forward's rows from the switch on."""
  def run(late, sub):
    cfg = train.apply_overrides(train.TrainConfig(), [
      f"run.operand_stats={late > 0}",
      "model.recipe=fp8_tensorwise", f"model.late_high_precision={late}",
      "model.scan_layers=true", "optimizer=adamw",
      "run.steps=6", "run.log_every=1", "run.eval_every=2",
      "run.eval_batches=1", "run.ckpt_every=6", "optimizer.warmup_steps=2",
      "data.batch_size=8", "data.seq_len=16", "data.max_bytes=150000",
      "model.vocab_size=400", f"data.cache_dir={tmp_path / 'cache'}",
      f"run.workdir={tmp_path / sub}"])
    return cfg, train.run(cfg, progress=False)

  cfg, late = run(0.5, "late")
  assert cfg.late_switch_step() == 3
  _, plain = run(0.0, "plain")
  lo = [m["loss"] for m in late.metrics]
  lp = [m["loss"] for m in plain.metrics]
  assert lo[:3] == lp[:3] and lo[3:] != lp[3:]
  assert [m.get("forward_high_precision", False) for m in late.metrics] == [
    False] * 3 + [True] * 3
  first, *rest = late.evals
  assert set(first["operand_clipped"]) == set(quant.recipes.OPERANDS)
  for e in rest:
    assert set(e["operand_clipped"]) == set(quant.recipes.OPERANDS[2:])
  assert plain.evals[-1]["eval_loss"] != late.evals[-1]["eval_loss"]
