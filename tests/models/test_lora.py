"""LoRA / QLoRA adapters: the forward against a numpy transcription of
y = xW + (alpha/r)(xA)B, float and quantized bases, scanned and unrolled
stacks, merge, the optax partition and LoRA+, PEFT's format against peft
itself."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jqlm import models, quant
from jqlm.models import lora
from tests.utils import tolerance

TOL32 = tolerance(jnp.float32)
NF4 = quant.QuantSpec(format="nf4", granularity="group", group_size=32,
                      axis=0)


def _randomize(model, seed=0):
  """Non-zero B (a fresh adapter's B is 0)."""
  key = jax.random.key(seed)
  for i, (_, m) in enumerate(nnx.iter_modules(model)):
    if isinstance(m, models.QLinear) and getattr(m, "lora_b", None) is not None:
      b = m.lora_b.get_value()
      m.lora_b.set_value(0.05 * jax.random.normal(jax.random.fold_in(key, i),
                                                  b.shape, b.dtype))
  return model


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)),
                     jnp.int32)


def test_init_is_the_base_model_and_a_is_pefts_uniform(tokens):
  base = models.Llama(models.llama_tiny(), rngs=nnx.Rngs(0))
  want = base(tokens)
  cfg = models.LoraConfig(rank=4, alpha=8.0)
  model = models.add_lora(nnx.clone(base), cfg, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(want))
  q = model.layers[0].attn.q
  a = np.asarray(q.lora_a.get_value())
  assert a.shape == (64, 4) and q.lora_b.get_value().shape == (4, 64)
  assert np.abs(a).max() <= 1 / np.sqrt(64) and np.abs(a).max() > 0.1
  assert q.lora_scale == 2.0
  assert models.LoraConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0


@pytest.mark.parametrize("base", ["float", "nf4", "int8"])
def test_linear_matches_numpy(base):
  cfg = models.llama_tiny()
  model = models.Llama(cfg, rngs=nnx.Rngs(0))
  if base != "float":
    spec = NF4 if base == "nf4" else quant.QuantSpec(format="int8",
                                                     granularity="channel")
    model = models.quantize_model(model, spec)
  models.add_lora(model, models.LoraConfig(rank=3, alpha=5.0),
                  rngs=nnx.Rngs(2))
  _randomize(model)
  lin = model.layers[1].mlp.down
  x = np.random.default_rng(1).normal(size=(2, 5, 128)).astype(np.float32)
  w = lin.kernel.get_value()
  w = np.asarray(w.dequantize(jnp.float32) if models.is_quantized(w) else w)
  a, b = (np.asarray(v.get_value()) for v in (lin.lora_a, lin.lora_b))
  want = x @ w + (5.0 / 3) * ((x @ a) @ b)
  np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), want,
                             atol=1e-4, rtol=1e-4)  # f32 sums over K=128


def test_scanned_equals_unrolled_and_merge(tokens):
  cfg = models.llama_tiny()
  model = _randomize(models.add_lora(
    models.Llama(cfg, rngs=nnx.Rngs(0)), models.LoraConfig(rank=4),
    rngs=nnx.Rngs(1)))
  want = model(tokens)
  scanned = models.Llama(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0))
  models.add_lora(scanned, models.LoraConfig(rank=4), rngs=nnx.Rngs(1))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  nnx.update(scanned, models.stack_layers(params))
  np.testing.assert_allclose(np.asarray(scanned(tokens)), np.asarray(want),
                             **TOL32)
  for m in (model, scanned):
    merged = models.merge_lora(m)
    assert not any(lora.is_lora_path(p) for p, _ in nnx.to_flat_state(
      nnx.state(merged, nnx.Param)))
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(want),
                               atol=1e-5, rtol=1e-5)
  # merge left the adapted model itself alone
  assert model.layers[0].attn.q.lora_a is not None


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_qlora_merge_dequantizes(tokens, scan):
  cfg = models.llama_tiny(scan_layers=scan)
  base = models.quantize_model(models.Llama(cfg, rngs=nnx.Rngs(0)), NF4)
  model = _randomize(models.add_lora(base, models.LoraConfig(rank=2),
                                     rngs=nnx.Rngs(1)))
  if scan:  # stacked adapters on the stacked NF4 kernels
    assert model.layers.mlp.up.lora_a.get_value().shape == (2, 64, 2)
  merged = models.merge_lora(model)
  up = (merged.layers if scan else merged.layers[0]).mlp.up
  k = up.kernel.get_value()
  assert not models.is_quantized(k) and k.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(merged(tokens)),
                             np.asarray(model(tokens)), atol=1e-5, rtol=1e-5)
  if scan:  # the same model unrolled: equal logits
    unrolled = models.quantize_model(models.Llama(
      cfg.replace(scan_layers=False), rngs=nnx.Rngs(0)), NF4)
    models.add_lora(unrolled, models.LoraConfig(rank=2), rngs=nnx.Rngs(1))
    nnx.update(unrolled, models.unstack_layers(
      nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    np.testing.assert_allclose(np.asarray(unrolled(tokens)),
                               np.asarray(model(tokens)), **TOL32)


def test_freeze_base_and_lora_plus():
  model = _randomize(models.add_lora(
    models.Llama(models.llama_tiny(), rngs=nnx.Rngs(0)),
    models.LoraConfig(rank=2), rngs=nnx.Rngs(1)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mask = lora.trainable_mask(params)
  n_lora = sum(jax.tree.leaves(mask))
  assert n_lora == 2 * 7 * 2
  grads = jax.tree.map(jnp.ones_like, params)
  adamw = optax.adamw(1e-3, weight_decay=0.1)
  with jax.numpy_dtype_promotion("standard"):
    tx = lora.lora_plus(lora.freeze_base(adamw, params), 16.0)
    state = tx.init(params)
    # state only for the adapters: adam's mu / nu count n_lora leaves each
    assert len(jax.tree.leaves(state)) == 2 * n_lora + 1
    upd, _ = tx.update(grads, state, params)
    # reference: torch-style param groups, lr for A and 16 lr for B
    ref_a = optax.adamw(1e-3, weight_decay=0.1)
    ref_b = optax.adamw(16e-3, weight_decay=0.1)
    for path, u in jax.tree_util.tree_leaves_with_path(upd):
      name = path[-1].key
      p = params
      for k in path:
        p = p[k.key]
      if name in ("lora_a", "lora_b"):
        ref = ref_b if name == "lora_b" else ref_a
        want, _ = ref.update(jnp.ones_like(p), ref.init(p), p)
        np.testing.assert_allclose(np.asarray(u), np.asarray(want), **TOL32)
      else:
        assert not np.any(np.asarray(u))


def test_peft_format_against_peft(tmp_path, tokens):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  cfg = models.llama_tiny()
  model = _randomize(models.add_lora(
    models.Llama(cfg, rngs=nnx.Rngs(0)),
    models.LoraConfig(rank=4, alpha=8.0,
                      patterns=("layers.*.attn.q", "layers.*.attn.v",
                                "layers.*.mlp.down")), rngs=nnx.Rngs(1)))
  base_dir, ad_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
  models.save_hf_llama(models.Llama(cfg, rngs=nnx.Rngs(0)), base_dir)
  models.save_peft_adapters(model, ad_dir, base_model=base_dir)
  assert sorted(os.listdir(ad_dir)) == ["adapter_config.json",
                                        "adapter_model.safetensors"]
  hf_base = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
  hf_model = peft.PeftModel.from_pretrained(hf_base, ad_dir).eval()
  with torch.no_grad():
    want = hf_model(torch.as_tensor(np.asarray(tokens))).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(tokens)), want, atol=1e-4,
                             rtol=1e-4)
  back = models.load_peft_adapters(
    models.load_hf_llama(base_dir), ad_dir)
  np.testing.assert_allclose(np.asarray(back(tokens)), want, atol=1e-4,
                             rtol=1e-4)
  # and the scanned model writes the same file
  scanned = models.Llama(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0))
  models.add_lora(scanned, models.LoraConfig(
    rank=4, alpha=8.0, patterns=("layers.*.attn.q", "layers.*.attn.v",
                                 "layers.*.mlp.down")), rngs=nnx.Rngs(1))
  nnx.update(scanned, models.stack_layers(
    nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  models.save_peft_adapters(scanned, str(tmp_path / "s"))
  from safetensors.numpy import load_file
  a = load_file(os.path.join(ad_dir, "adapter_model.safetensors"))
  b = load_file(str(tmp_path / "s" / "adapter_model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_bad_inputs():
  model = models.Llama(models.llama_tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rank must be a positive int"):
    models.LoraConfig(rank=0)
  with pytest.raises(ValueError, match="alpha"):
    models.LoraConfig(alpha=float("nan"))
  with pytest.raises(ValueError, match="no linear matches"):
    models.add_lora(model, models.LoraConfig(patterns=("nothing.*",)),
                    rngs=nnx.Rngs(0))
  models.add_lora(model, models.LoraConfig(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="already has LoRA"):
    models.add_lora(model, models.LoraConfig(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no LoRA adapters"):
    models.save_peft_adapters(models.Llama(models.llama_tiny(),
                                           rngs=nnx.Rngs(0)), "/tmp/x")
