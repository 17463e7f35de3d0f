"""The scanned layer stack (``LlamaConfig.scan_layers``): same init, same
math, and every path that reads or writes params (HF, quantization,
generation, sharding names) works with it.

Tolerances: float32 compute. The scanned forward runs the same ops in the
same order as the unrolled one; XLA may fuse them differently, so logits
agree to 1e-6 relative (a few float32 ulps of O(1) logits) rather than
bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jqlm import models, quant
from jqlm.models import sharding as shd

CFG = models.llama_tiny(num_layers=3)


@pytest.fixture(scope="module")
def pair():
  unrolled = models.Llama(CFG, rngs=nnx.Rngs(0))
  scanned = models.Llama(CFG.replace(scan_layers=True), rngs=nnx.Rngs(0))
  return unrolled, scanned


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


TOKENS = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)


def test_init_is_the_unrolled_init_stacked(pair):
  unrolled, scanned = pair
  stacked = models.stack_layers(_params(unrolled))
  got = _params(scanned)
  assert jax.tree.structure(stacked) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(got),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # and back
  back = models.unstack_layers(got)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(_params(unrolled)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert got["layers"]["attn"]["q"]["kernel"].shape == (3, 64, 64)


def test_forward_and_grads_match_unrolled(pair):
  unrolled, scanned = pair
  np.testing.assert_allclose(np.asarray(scanned(TOKENS)),
                             np.asarray(unrolled(TOKENS)), rtol=1e-6,
                             atol=1e-6)
  remat = models.Llama(CFG.replace(scan_layers=True, remat=True),
                       rngs=nnx.Rngs(0))

  def loss(m):
    return jnp.mean(m(TOKENS) ** 2)

  g_s = _params(nnx.grad(loss)(remat))
  g_u = models.stack_layers(_params(nnx.grad(loss)(unrolled)))
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-7)


def test_kv_cache_and_generation(pair):
  unrolled, scanned = pair
  cache = models.init_cache(scanned.cfg, 2, 16, jnp.float32)
  assert cache.layers.k.shape == (3, 2, 16, 2, 16)  # one stacked cache
  logits, cache = scanned(TOKENS, cache=cache)
  ref, _ = unrolled(TOKENS, cache=models.init_cache(CFG, 2, 16, jnp.float32))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-6,
                             atol=1e-6)
  assert int(cache.length) == 9
  kw = dict(max_new_tokens=4, key=jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(
    np.asarray(models.generate(scanned, TOKENS[:, :4], **kw)),
    np.asarray(models.generate(unrolled, TOKENS[:, :4], **kw)))


def test_hf_round_trip_between_layouts(pair, tmp_path):
  unrolled, scanned = pair
  models.save_hf_llama(scanned, str(tmp_path / "s"))
  back = models.load_hf_llama(str(tmp_path / "s"))  # unrolled
  assert not back.cfg.scan_layers
  for a, b in zip(jax.tree.leaves(_params(back)),
                  jax.tree.leaves(_params(unrolled)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  again = models.load_hf_llama(str(tmp_path / "s"), scan_layers=True)
  for a, b in zip(jax.tree.leaves(_params(again)),
                  jax.tree.leaves(_params(scanned)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_model_per_layer(pair, fmt):
  unrolled, scanned = pair
  spec = quant.QuantSpec(format=fmt, granularity="group", group_size=32,
                         axis=0)
  qu = models.quantize_model(unrolled, spec)
  qs = models.quantize_model(scanned, spec)
  assert models.weight_bytes(qu) == models.weight_bytes(qs)
  np.testing.assert_allclose(np.asarray(qs(TOKENS)), np.asarray(qu(TOKENS)),
                             rtol=1e-6, atol=1e-6)


def test_layer_axis_is_a_logical_axis(pair):
  _, scanned = pair
  names = shd.param_axis_names(scanned)
  assert names[("layers", "attn", "q", "kernel")] == ("layers", "embed",
                                                      "heads")
  assert names[("layers", "attn_norm", "weight")] == ("layers", "norm")
  assert shd.to_pspec(names[("layers", "mlp", "up", "kernel")]) == (
    jax.sharding.PartitionSpec(None, "fsdp", "tensor"))


def test_per_layer_policy_is_refused():
  rule_first = models.QuantRule(
    patterns=("layers.0.*",), weight=quant.QuantSpec(format="int4"))
  policy = models.QuantPolicy(rules=(rule_first,))
  with pytest.raises(ValueError, match="layer 1's rules differ"):
    models.Llama(CFG.replace(scan_layers=True, quant=policy),
                 rngs=nnx.Rngs(0))


def test_official_presets_scan_by_default():
  assert models.llama_7b().scan_layers and models.llama_60m().scan_layers
  assert not models.llama_tiny().scan_layers
  assert models.linear_shapes(models.llama_tiny(scan_layers=True)) == (
    models.linear_shapes(models.llama_tiny()))
