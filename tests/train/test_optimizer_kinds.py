"""Every optimizer kind of the train config builds (``build_optimizer``)
and runs one update on a tiny LLaMA's params, by ``jax.eval_shape`` (no
compilation): the wiring of issue 20's kinds (APOLLO, APOLLO-Mini, Natural
GaLore, MicroAdam, Muon / 8-bit Muon, SPAM's density, component-wise
clipping) from the config to the transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from jqlm import bench, models, optim, train
from jqlm.train.optimizer import build_optimizer

TINY = models.LlamaConfig(hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=2, num_kv_heads=2, vocab_size=300)
SMALL = {"galore": dict(rank=8), "q_galore": dict(rank=8, proj_group_size=8),
         "natural_galore": dict(rank=8), "apollo": dict(rank=8)}


def _state_leaves(state):
  return jax.tree.leaves(state, is_leaf=lambda x: isinstance(
    x, optim.QuantizedMoment))


@pytest.mark.parametrize("kind", [k.value for k in train.OptimizerKind])
def test_every_kind_builds_and_updates(kind):
  opt = train.optimizer_config(kind, **SMALL.get(kind, {}))
  tx = build_optimizer(opt, 100, seed=3)
  # (Q-GaLore's optimizer sees the dequantized kernels, as in the step)
  params = bench.param_structs(TINY, jnp.float32)
  with jax.numpy_dtype_promotion("standard"):
    state = jax.eval_shape(tx.init, params)
    u, new = jax.eval_shape(tx.update, params, state, params)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  assert jax.tree.structure(new) == jax.tree.structure(state)


def test_kind_options_reach_the_transform():
  """Muon (8bit) stores the block linears' momentum quantized and keeps
  the embeddings on AdamW (a 64 x 64 kernel: 4096 elements, the minimum
  quantized); SPAM's density makes masks on the block linears
  only; component_clip puts the clip in front."""
  params = bench.param_structs(TINY, jnp.float32)
  with jax.numpy_dtype_promotion("standard"):
    muon = build_optimizer(train.MuonConfig(state="8bit"), 10)
    st = jax.eval_shape(muon.init, params)
    mu = st.inner_states["muon"].inner_state[0].mu
    assert isinstance(mu["layers"][0]["attn"]["q"]["kernel"],
                      optim.QuantizedMoment)
    assert jax.tree.leaves(mu["embed"]) == []  # masked off: AdamW's
    spam = build_optimizer(train.SpamConfig(density=0.5), 10, seed=1)
    masks = jax.eval_shape(spam.init, params)[0].masks
    assert masks["layers"][0]["mlp"]["up"]["kernel"].shape == (64, 128)
    assert [m.shape for m in jax.tree.leaves(masks["embed"])] == [()]
    clip = build_optimizer(train.AdamWConfig(component_clip=1.0), 10)
    assert isinstance(jax.eval_shape(clip.init, params)[0],
                      optax.EmptyState)
  with pytest.raises(ValueError, match="optimizer.density"):
    train.SpamConfig(density=0.0)
  with pytest.raises(ValueError, match="optimizer.rank"):
    train.ApolloMiniConfig(rank=2)
  with pytest.raises(ValueError, match="optimizer.state"):
    train.MuonConfig(state="4bit")
  with pytest.raises(ValueError, match="optimizer.state"):
    train.NaturalGaLoreConfig(state="8bit")
