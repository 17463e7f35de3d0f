"""Hugging Face interop: a random transformers LlamaForCausalLM (tiny, GQA,
no network) loads into jqlm with equal logits, and jqlm's save reloads in
transformers. Needs the `hf` extra (installed by the README test command)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jqlm import models
from jqlm.models import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_model(tmp_path, **kw):
  kw = {"tie_word_embeddings": False, "rope_theta": 10000.0,
        "max_position_embeddings": 64, **kw}
  cfg = transformers.LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-6, **kw)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).float().eval()
  return model


def _hf_logits(model, tokens):
  with torch.no_grad():
    out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
  return out.logits.numpy()


# Llama 3.x's RoPE at a scaled-down Llama-3.2 shape (tied embeddings, GQA,
# base 500000): the 8-token "pretraining context" puts the 17-token
# sequences in every frequency band; YaRN and dynamic NTK likewise (dynamic
# only acts past max_position_embeddings, here 8).
_LLAMA3 = {"tie_word_embeddings": True, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8}}
_YARN = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                          "original_max_position_embeddings": 16}}
_YARN_MSCALE = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 16,
                                 "mscale": 1.0, "mscale_all_dim": 0.5,
                                 "beta_fast": 16, "beta_slow": 2}}
_DYNAMIC = {"max_position_embeddings": 8,
            "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}


@pytest.mark.parametrize("kw, shard", [
  ({}, None),
  ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "30KB"),
  ({"tie_word_embeddings": True}, None),
  (_LLAMA3, None), (_YARN, None), (_YARN_MSCALE, None), (_DYNAMIC, None),
], ids=["default", "linear", "tied", "llama3", "yarn", "yarn_mscale",
        "dynamic"])
def test_hf_round_trip_logits(tmp_path, kw, shard):
  ref = _hf_model(tmp_path, **kw)
  src = os.path.join(tmp_path, "hf")
  save_kw = {"safe_serialization": True}
  if shard:
    save_kw["max_shard_size"] = shard
  ref.save_pretrained(src, **save_kw)
  if shard:
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
  tokens = np.random.default_rng(0).integers(0, 128, size=(2, 17))
  want = _hf_logits(ref, tokens)

  # dynamic NTK extends past HF's max_position_embeddings (8 here)
  longer = {"max_seq_len": 64} if kw is _DYNAMIC else {}
  model = hf.load_hf_llama(src, dtype=jnp.float32, **longer)
  got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

  dst = os.path.join(tmp_path, "jqlm")
  hf.save_hf_llama(model, dst, max_shard_bytes=40_000 if shard else None)
  back = transformers.LlamaForCausalLM.from_pretrained(dst).float().eval()
  np.testing.assert_allclose(_hf_logits(back, tokens), want, atol=1e-5,
                             rtol=1e-5)


def test_bf16_save_and_load(tmp_path):
  ref = _hf_model(tmp_path)
  src = os.path.join(tmp_path, "hf")
  ref.to(torch.bfloat16).save_pretrained(src)
  model = hf.load_hf_llama(src, dtype=jnp.bfloat16)
  assert model.layers[0].attn.q.kernel[...].dtype == jnp.bfloat16
  w = ref.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(
    np.asarray(model.layers[0].attn.q.kernel[...].astype(jnp.float32)), w.T)
  dst = os.path.join(tmp_path, "out")
  hf.save_hf_llama(model, dst)
  back = transformers.LlamaForCausalLM.from_pretrained(
    dst, torch_dtype=torch.bfloat16)
  np.testing.assert_array_equal(
    back.model.layers[0].self_attn.q_proj.weight.detach().float().numpy(), w)


def test_quantized_model_saves_dequantized(tmp_path):
  from flax import nnx

  from jqlm import quant

  model = models.Llama(models.llama_tiny(), rngs=nnx.Rngs(0))
  q = models.quantize_model(model, quant.QuantSpec(format="int8",
                                                   granularity="channel"))
  dst = os.path.join(tmp_path, "q")
  hf.save_hf_llama(q, dst)
  back = hf.load_hf_llama(dst)
  tokens = jnp.zeros((1, 5), jnp.int32)
  np.testing.assert_allclose(np.asarray(back(tokens)), np.asarray(q(tokens)),
                             atol=1e-5, rtol=1e-5)


def test_bad_checkpoints_raise(tmp_path):
  ref = _hf_model(tmp_path)
  src = os.path.join(tmp_path, "hf")
  ref.save_pretrained(src)
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg["intermediate_size"] = 80
  json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
  with pytest.raises(ValueError, match="shape"):
    hf.load_hf_llama(src)
  with pytest.raises(FileNotFoundError, match="safetensors"):
    os.makedirs(os.path.join(tmp_path, "empty"))
    json.dump(cfg, open(os.path.join(tmp_path, "empty", "config.json"), "w"))
    hf.load_hf_llama(os.path.join(tmp_path, "empty"))
  with pytest.raises(ValueError, match="'longrope' is not supported"):
    hf.config_from_hf({**cfg, "rope_scaling": {"rope_type": "longrope",
                                               "factor": 4.0}})
  with pytest.raises(ValueError, match="partial_rotary_factor"):
    hf.config_from_hf({**cfg, "partial_rotary_factor": 0.5})
  with pytest.raises(ValueError, match="original_max_position_embeddings"):
    models.RopeScaling(type="llama3", factor=8.0)
  with pytest.raises(ValueError, match="must be one of"):
    models.RopeScaling(type="ntk", factor=8.0)


# meta-llama/Llama-3.2-1B's config.json (as published)
_LLAMA32_1B = {
  "architectures": ["LlamaForCausalLM"], "attention_bias": False,
  "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
  "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
  "initializer_range": 0.02, "intermediate_size": 8192,
  "max_position_embeddings": 131072, "mlp_bias": False,
  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
  "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                   "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192,
                   "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": True,
  "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256}


def test_llama3_presets_match_hf_configs():
  got = hf.config_from_hf(_LLAMA32_1B)
  assert got == models.llama3_2_1b(scan_layers=False)
  back = hf.config_from_hf(hf.config_to_hf(models.llama3_1_8b()))
  assert back == models.llama3_1_8b(scan_layers=False)
  assert back.rope_scaling.factor == 8.0
  # the inverse frequencies equal transformers' for the 3B preset's heads
  cfg = models.llama3_2_3b()
  tcfg = transformers.LlamaConfig(**hf.config_to_hf(cfg))
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  want, att = ROPE_INIT_FUNCTIONS["llama3"](tcfg, "cpu")
  inv, att_got = models.scaled_rope_frequencies(
    cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
  np.testing.assert_allclose(np.asarray(inv), want.numpy(), rtol=1e-6)
  assert att_got == att == 1.0
