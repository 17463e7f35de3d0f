"""Component-wise gradient norm clipping against a numpy transcription of
the official per-tensor ``clip_grad_norm_`` (optimizers_more.md §5):
coef = c / (||g|| + 1e-6), clamped to <= 1, float64 over 100 steps of
norms from 0.01 to 3 around c = 0.5 (relative error <= 1e-12)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jqlm import optim

SHAPES = {"layers": [{"attn": {"q": (6, 8), "o": (8, 6)},
                      "mlp": {"up": (6, 10)}, "norm": (6,)}
                     for _ in range(2)],
          "embed": (11, 6)}


def _np_clip(g, c):
  """torch.nn.utils.clip_grad_norm_(param, c) on one tensor."""
  coef = c / (np.sqrt(np.sum(g * g)) + 1e-6)
  return g * min(coef, 1.0)


def _random_grads(rng):
  return jax.tree.map(
    lambda s: rng.normal(size=s) * 10 ** rng.uniform(-2.5, 0.3),
    SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def test_per_tensor_matches_numpy_over_100_steps():
  rng = np.random.default_rng(0)
  clip = optim.clip_by_component_norm(0.5)
  update = jax.jit(clip.update)
  worst, clipped, kept = 0.0, 0, 0
  with jax.enable_x64(True):
    for _ in range(100):
      g = _random_grads(rng)
      u, _ = update(jax.tree.map(jnp.asarray, g), optax.EmptyState())
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(g), strict=True):
        ref = _np_clip(b, 0.5)
        worst = max(worst, float(np.max(np.abs(np.asarray(a) - ref))
                                 / np.max(np.abs(ref))))
        clipped += np.linalg.norm(b) > 0.5
        kept += np.linalg.norm(b) <= 0.5
  assert worst <= 1e-12, worst
  assert clipped > 100 and kept > 100  # both sides of the threshold


def test_groups_clip_against_their_joint_norm():
  """Each layer's attention as one component: its tensors share one
  coefficient; unmatched tensors stay their own components."""
  rng = np.random.default_rng(1)
  g = _random_grads(rng)
  pattern = r"\['layers'\]\[\d+\]\['attn'\]"
  u, _ = optim.clip_by_component_norm(0.1, components=[pattern]).update(
    jax.tree.map(jnp.asarray, g), optax.EmptyState())
  for i in range(2):
    attn = g["layers"][i]["attn"]
    joint = np.sqrt(sum(np.sum(x * x) for x in attn.values()))
    coef = min(0.1 / (joint + 1e-6), 1.0)
    for k in attn:
      np.testing.assert_allclose(u["layers"][i]["attn"][k], attn[k] * coef,
                                 rtol=1e-6)
    np.testing.assert_allclose(u["layers"][i]["mlp"]["up"],
                               _np_clip(g["layers"][i]["mlp"]["up"], 0.1),
                               rtol=1e-6)
  names = optim.component_names(g, [pattern])
  assert sum(n.startswith("group") for n in names) == 4  # q, o x 2 layers
  assert len(set(names)) == len(names) - 2


def test_dtype_and_chain():
  g = {"w": jnp.full((4, 4), 2.0, jnp.bfloat16), "b": jnp.ones((3,))}
  u, _ = optim.clip_by_component_norm(1.0).update(g, optax.EmptyState())
  assert u["w"].dtype == jnp.bfloat16
  assert float(jnp.linalg.norm(u["w"].astype(jnp.float32))) == pytest.approx(
    1.0, rel=1e-2)
  assert float(jnp.linalg.norm(u["b"])) == pytest.approx(1.0, rel=1e-5)
  opt = optax.chain(optim.clip_by_component_norm(1.0), optim.adamw(1e-2))
  p = {"w": jnp.ones((4, 4)), "b": jnp.ones((3,))}
  opt.update(jax.tree.map(lambda x: x.astype(jnp.float32), g),
             opt.init(p), p)


@pytest.mark.parametrize("kwargs,match", [
  (dict(max_norm=-1.0), "max_norm"),
  (dict(max_norm=1.0, components=["(unclosed"]), "regular expressions"),
  (dict(max_norm=1.0, components=[3]), "regular expressions"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.clip_by_component_norm(**kwargs)
