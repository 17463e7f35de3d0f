"""jqlm.models: Flax NNX LLaMA with quantized linears.

* :class:`Llama`, :class:`LlamaConfig` and the presets of the official runs
  (:func:`llama_60m` ... :func:`llama_7b`, spec §6), LLaMA-2-7B,
  LLaMA-3-8B, Llama-3.1-8B and Llama-3.2-1B / 3B shapes (with the
  ``llama3`` RoPE; :class:`RopeScaling` also has YaRN and dynamic NTK), and :func:`llama_tiny` for tests.
* Quantization policies by module-path pattern (:class:`QuantPolicy`):
  Stable-SPAM's INT4 and FP4 QAT recipes, W8A8, W4A16, Hadamard W4A4; real
  int8 / int4 / NF4 weights (:func:`quantize_model`); fully quantized
  training recipes (:func:`training_recipe`: FP8, MX, NVFP4, Quartet,
  Quartet-II, HALO, QuEST).
* LoRA / QLoRA adapters (:mod:`jqlm.models.lora`): :class:`LoraConfig`,
  :func:`add_lora`, :func:`merge_lora`, PEFT-format export.
* :func:`generate` with a bf16 or int8 KV cache.
* Local Hugging Face checkpoints: :func:`load_hf_llama`,
  :func:`save_hf_llama`.
* Logical axis names of every param and their mesh rules
  (:mod:`jqlm.models.sharding`).
"""

from jqlm.models.generate import decode_step, generate, sample_logits
from jqlm.models.hf import load_hf_llama, save_hf_llama
from jqlm.models.layers import (
  BLOCK_LINEARS,
  POLICIES,
  QLinear,
  QuantPolicy,
  QuantRule,
  RecipeProbe,
  block_linear_mask,
  hadamard_w4a4,
  is_quantized,
  module_path,
  recipe_probes,
  stable_spam_fp4,
  stable_spam_int4,
  training_recipe,
  w4a16,
  w8a8,
)
from jqlm.models.llama import (
  PRESETS,
  KVCache,
  Llama,
  LlamaConfig,
  RopeScaling,
  RopeType,
  apply_rope,
  check_token_ids,
  init_cache,
  linear_shapes,
  llama2_7b,
  llama3_1_8b,
  llama3_2_1b,
  llama3_2_3b,
  llama3_8b,
  llama_1b,
  llama_7b,
  llama_60m,
  llama_130m,
  llama_350m,
  llama_tiny,
  param_count,
  scaled_rope_frequencies,
  stack_layers,
  unstack_layers,
)
from jqlm.models.lora import (
  LoraConfig,
  add_lora,
  load_peft_adapters,
  merge_lora,
  save_peft_adapters,
)
from jqlm.models.quantize import quantize_model, weight_bytes
from jqlm.models.sharding import LOGICAL_RULES, make_mesh, to_pspec

__all__ = [
  "LoraConfig", "add_lora", "load_peft_adapters", "merge_lora",
  "save_peft_adapters",
  "BLOCK_LINEARS", "POLICIES", "block_linear_mask", "is_quantized", "linear_shapes", "module_path",
  "LOGICAL_RULES", "PRESETS", "KVCache", "Llama", "LlamaConfig", "QLinear",
  "QuantPolicy", "QuantRule", "RecipeProbe", "recipe_probes", "apply_rope", "decode_step", "generate",
  "check_token_ids", "hadamard_w4a4", "init_cache", "load_hf_llama", "llama2_7b", "llama3_8b",
  "llama3_1_8b", "llama3_2_1b", "llama3_2_3b", "RopeScaling", "RopeType",
  "scaled_rope_frequencies", "llama_130m",
  "llama_1b", "llama_350m", "llama_60m", "llama_7b", "llama_tiny",
  "make_mesh", "param_count", "quantize_model", "sample_logits", "save_hf_llama", "stable_spam_fp4", "stack_layers", "unstack_layers",
  "stable_spam_int4", "to_pspec", "training_recipe", "w4a16", "w8a8", "weight_bytes",
]
