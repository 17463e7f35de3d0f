"""Fine-tuning through jqlm train: run.init_from (a jqlm run or an HF
directory), LoRA and QLoRA with the base frozen (no gradient, state or
update), LoRA+ and the config's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jqlm import models, train
from jqlm.train import state as jstate

BASE = train.TrainConfig(
  model=train.ModelConfig(vocab_size=400),
  data=train.DataConfig(max_bytes=150_000, seq_len=32, batch_size=8),
  optimizer=train.AdamWConfig(lr=3e-3, warmup_steps=1),
  run=train.RunConfig(steps=4, log_every=1, eval_every=4, ckpt_every=2,
                      eval_batches=1))


def _cfg(tmp_path, name, **sections):
  return BASE.replace(**sections).replace(
    run={"workdir": str(tmp_path / name)})


def _leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree,
                                             is_leaf=models.is_quantized)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 4-step AdamW run: the checkpoint fine-tuning starts from."""
  path = tmp_path_factory.mktemp("pre")
  cfg = _cfg(path, "pre")
  res = train.run(cfg, progress=False)
  return cfg, res.state


def _state0(cfg):
  mesh = models.make_mesh()
  s = jstate.setup(cfg, mesh)
  return s, jstate.init_state(s, jstate.pretrained_params(cfg, s, mesh))


def test_init_from_run_and_hf_dir(pretrained, tmp_path):
  pcfg, pstate = pretrained
  want = pstate.model_params
  cfg = _cfg(tmp_path, "ft", run={"init_from": pcfg.run.workdir})
  _, st = _state0(cfg)
  for (p, a), (_, b) in zip(_leaves(st.params), _leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), str(p))
  # the same weights through an HF directory
  model = nnx.eval_shape(lambda: models.Llama(
    jstate.model_config(pcfg), rngs=nnx.Rngs(0)))
  nnx.update(model, want)
  models.save_hf_llama(model, str(tmp_path / "hf"))
  cfg = _cfg(tmp_path, "ft_hf", run={"init_from": str(tmp_path / "hf")})
  _, st = _state0(cfg)
  for (p, a), (_, b) in zip(_leaves(st.params), _leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), str(p))
  # another model's checkpoint is refused, naming the difference
  bad = _cfg(tmp_path, "bad", model={"hidden_size": 128},
             run={"init_from": str(tmp_path / "hf")})
  with pytest.raises(ValueError, match="hidden_size: checkpoint 64, run "
                     "128"):
    _state0(bad)
  with pytest.raises(FileNotFoundError, match="neither"):
    _state0(_cfg(tmp_path, "nowhere", run={"init_from": str(tmp_path)}))


@pytest.mark.parametrize("base", ["none", "nf4"])
def test_lora_trains_adapters_only(pretrained, tmp_path, base):
  pcfg, pstate = pretrained
  cfg = _cfg(tmp_path, f"lora_{base}",
             model={"lora_rank": 4, "lora_alpha": 8.0, "lora_base": base,
                    "lora_plus_ratio": 4.0},
             run={"init_from": pcfg.run.workdir})
  s, st0 = _state0(cfg)
  # the frozen base is the pretrained model (quantized for QLoRA)
  ref = nnx.eval_shape(lambda: models.Llama(s.mcfg, rngs=nnx.Rngs(0)))
  nnx.update(ref, pstate.model_params)
  if base == "nf4":
    ref = models.quantize_model(ref, cfg.model.lora_base_spec())
  ref_params = nnx.to_pure_dict(nnx.state(ref, nnx.Param))
  frozen = dict(_leaves(st0.frozen))
  for p, leaf in _leaves(ref_params):
    got = frozen[p]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(leaf),
                    strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # only adapters train, and only they have optimizer state
  trained = [p for p, _ in _leaves(st0.params)]
  assert trained and all(str(p[-1].key) in ("lora_a", "lora_b")
                         for p in trained)
  n_state = sum(x.size for x in jax.tree.leaves(st0.opt_state))
  n_adapt = sum(x.size for x in jax.tree.leaves(st0.params))
  assert n_state <= 2 * n_adapt + 8
  res = train.run(cfg, progress=False)
  end = res.state
  for p, leaf in _leaves(st0.frozen):  # untouched
    for a, b in zip(jax.tree.leaves(dict(_leaves(end.frozen))[p]),
                    jax.tree.leaves(leaf), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = [float(jnp.abs(dict(_leaves(end.params))[p] - x).max())
           for p, x in _leaves(st0.params)]
  assert min(moved) > 0
  losses = [m["loss"] for m in res.metrics]
  assert np.isfinite(losses).all()
  # the run's evaluation and resume paths see the merged params
  assert np.isfinite(train.evaluate(cfg.run.workdir)["eval_loss"])


def test_qlora_groups_fit_the_model():
  """NF4's 64-element groups shrink to a power of two dividing every
  linear's input dim: 32 on LLaMA-60M (MLP 1376)."""
  m = train.ModelConfig(preset="llama_60m", lora_rank=8, lora_base="nf4")
  assert m.lora_base_spec().group_size == 32
  tiny = train.ModelConfig(lora_rank=8, lora_base="nf4")
  assert tiny.lora_base_spec().group_size == 64
  with pytest.raises(ValueError, match="no group of 8"):
    train.ModelConfig(lora_rank=8, lora_base="int4", intermediate_size=100)


def test_config_errors():
  with pytest.raises(ValueError, match="lora_base"):
    train.ModelConfig(lora_base="nf4")
  with pytest.raises(ValueError, match="one of"):
    train.ModelConfig(lora_rank=2, lora_base="nf3")
  with pytest.raises(ValueError, match="Q-GaLore"):
    BASE.replace(model={"lora_rank": 2},
                 optimizer=train.QGaLoreConfig(warmup_steps=1))
  with pytest.raises(ValueError, match="no linear|patterns"):
    cfg = BASE.replace(model={"lora_rank": 2, "lora_targets": "nothing.*"})
    jstate.setup(cfg, models.make_mesh())
