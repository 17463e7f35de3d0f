"""Hugging Face LLaMA checkpoints: read and write local directories.

``load_hf_llama(path)`` reads ``config.json`` plus ``model.safetensors`` (or
a sharded ``model.safetensors.index.json``) into a :class:`Llama`;
``save_hf_llama(model, path)`` writes a directory that
``transformers.LlamaForCausalLM.from_pretrained`` loads. Nothing touches the
network, and neither torch nor the ``safetensors`` package is needed (the
format is read and written here).

Mapping (torch ``Linear.weight`` is ``(out, in)``, a Flax kernel ``(in,
out)``, so linears are transposed; HF's q/k weights are already in the
"rotate half" RoPE layout jqlm uses, so no permutation):

=====================================================  =====================
HF name                                                jqlm param
=====================================================  =====================
``model.embed_tokens.weight``                          ``embed``
``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``   ``layers.{i}.attn.*``
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``    ``layers.{i}.mlp.*``
``model.layers.{i}.input_layernorm.weight``            ``layers.{i}.attn_norm``
``model.layers.{i}.post_attention_layernorm.weight``   ``layers.{i}.mlp_norm``
``model.norm.weight``                                  ``final_norm``
``lm_head.weight`` (absent when tied)                  ``lm_head`` (transposed)
=====================================================  =====================
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jqlm import quant
from jqlm.models.llama import Llama, LlamaConfig

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


# safetensors: an 8-byte little-endian header length, a JSON header
# {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw
# little-endian bytes. Read and written here directly, so bfloat16 needs no
# torch and no version of the `safetensors` package.
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(file: str) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as numpy arrays."""
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    data = f.read()
  out = {}
  for key, meta in header.items():
    if key == "__metadata__":
      continue
    if meta["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{file}: tensor {key} has unsupported dtype "
                       f"{meta['dtype']}.")
    lo, hi = meta["data_offsets"]
    arr = np.frombuffer(data[lo:hi], dtype=_ST_DTYPES[meta["dtype"]])
    out[key] = arr.reshape(meta["shape"])
  return out


def write_safetensors(file: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes numpy arrays as one ``.safetensors`` file."""
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = metadata
  offset, blobs = 0, []
  for key in sorted(tensors):
    arr = np.ascontiguousarray(tensors[key])
    raw = arr.tobytes()
    header[key] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)  # align the data to 8 bytes
  with open(file, "wb") as f:
    f.write(len(head).to_bytes(8, "little"))
    f.write(head)
    for raw in blobs:
      f.write(raw)


def config_from_hf(hf: dict[str, Any], **overrides) -> LlamaConfig:
  """A :class:`LlamaConfig` from a HF LLaMA ``config.json`` dict.

  Raises:
    ValueError: features jqlm's LLaMA does not have (biases, non-linear
      RoPE scaling, another activation).
  """
  if not isinstance(hf, dict):
    raise ValueError(f"A HF config is a dict (config.json), got "
                     f"{type(hf).__name__}.")
  if hf.get("model_type", "llama") != "llama":
    raise ValueError(f"Expected a LLaMA config (model_type 'llama'), got "
                     f"{hf.get('model_type')!r}.")
  required = ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads")
  missing = [k for k in required if k not in hf]
  if missing:
    raise ValueError(
      f"The HF config lacks {', '.join(missing)} (a LLaMA config.json "
      f"needs {', '.join(required)}); is this the model's config.json?")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ValueError("HF config has attention/MLP biases; jqlm's LLaMA is "
                     "bias-free.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported "
                     "(SwiGLU with silu only).")
  scaling = 1.0
  # transformers < 5: "rope_theta" + "rope_scaling"; >= 5: "rope_parameters"
  params = hf.get("rope_parameters") or {}
  rs = hf.get("rope_scaling") or (params if params.get("rope_type") not in
                                  (None, "default") else None)
  theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
  if rs:
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ("linear", "default"):
      raise ValueError(f"rope_scaling type {kind!r} is not supported; only "
                       "'linear' position scaling is.")
    if kind == "linear":
      scaling = float(rs["factor"])
  kw = dict(
    vocab_size=int(hf["vocab_size"]),
    hidden_size=int(hf["hidden_size"]),
    intermediate_size=int(hf["intermediate_size"]),
    num_layers=int(hf["num_hidden_layers"]),
    num_heads=int(hf["num_attention_heads"]),
    num_kv_heads=int(hf.get("num_key_value_heads")
                     or hf["num_attention_heads"]),
    head_dim=hf.get("head_dim"),
    max_seq_len=int(hf.get("max_position_embeddings", 2048)),
    rope_base=float(theta),
    rope_scaling=scaling,
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )
  kw.update(overrides)
  return LlamaConfig(**kw)


def config_to_hf(cfg: LlamaConfig, dtype: str = "float32") -> dict:
  """The HF ``config.json`` dict of a :class:`LlamaConfig`."""
  out = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "max_position_embeddings": cfg.max_seq_len,
    "rope_theta": cfg.rope_base,
    "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": cfg.init_std,
    "torch_dtype": dtype,
  }
  if cfg.rope_scaling != 1.0:
    out["rope_scaling"] = {"rope_type": "linear", "type": "linear",
                           "factor": cfg.rope_scaling}
    out["rope_parameters"] = {"rope_type": "linear",
                              "factor": cfg.rope_scaling,
                              "rope_theta": cfg.rope_base}
  else:
    out["rope_parameters"] = {"rope_type": "default",
                              "rope_theta": cfg.rope_base}
  return out


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(
      f"No model.safetensors or model.safetensors.index.json in {path!r}. "
      "Save the model with safe_serialization=True (the default).")
  out: dict[str, np.ndarray] = {}
  for name in files:
    out.update(read_safetensors(os.path.join(path, name)))
  return out


def _hf_names(cfg: LlamaConfig) -> dict[tuple, tuple[str, bool]]:
  """jqlm param path -> (HF name, transpose)."""
  names = {("embed",): ("model.embed_tokens.weight", False),
           ("final_norm", "weight"): ("model.norm.weight", False)}
  if not cfg.tie_embeddings:
    names[("lm_head",)] = ("lm_head.weight", True)
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}"
    for k, v in _ATTN.items():
      names[("layers", i, "attn", k, "kernel")] = (
        f"{pre}.self_attn.{v}.weight", True)
    for k, v in _MLP.items():
      names[("layers", i, "mlp", k, "kernel")] = (f"{pre}.mlp.{v}.weight",
                                                   True)
    names[("layers", i, "attn_norm", "weight")] = (
      f"{pre}.input_layernorm.weight", False)
    names[("layers", i, "mlp_norm", "weight")] = (
      f"{pre}.post_attention_layernorm.weight", False)
  return names


def load_hf_llama(path: str, *, dtype=jnp.float32, param_dtype=None,
                  **overrides) -> Llama:
  """Reads a local HF LLaMA directory into a :class:`Llama`.

  Args:
    path: directory with ``config.json`` and safetensors weights.
    dtype: compute dtype.
    param_dtype: storage dtype of the params (default ``dtype``).
    **overrides: other :class:`LlamaConfig` fields (``remat``, ``quant``,
      ...).

  Raises:
    ValueError: a tensor missing from, or left over in, the checkpoint, or a
      shape that disagrees with the config.
  """
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  param_dtype = dtype if param_dtype is None else param_dtype
  cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, **overrides)
  tensors = _read_tensors(path)
  for key in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
    tensors.pop(key)
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  names = _hf_names(cfg)

  def read(key, want):
    if key not in names:
      raise ValueError(f"No HF tensor is mapped to jqlm param {key}.")
    hf_name, transpose = names[key]
    if hf_name not in tensors:
      raise ValueError(f"{hf_name} is missing from the checkpoint in "
                       f"{path!r}.")
    arr = np.asarray(tensors.pop(hf_name))
    if transpose:
      arr = arr.T
    if arr.shape != want:
      raise ValueError(f"{hf_name} has shape {arr.shape} (after transpose), "
                       f"config implies {want}.")
    return jnp.asarray(arr.astype(np.float32)).astype(param_dtype)

  for p, var in nnx.to_flat_state(state):
    key = tuple(p)
    want = tuple(var.get_value().shape)
    if cfg.scan_layers and key[0] == "layers":  # stacked: layer by layer
      value = jnp.stack([read(("layers", i, *key[1:]), want[1:])
                         for i in range(cfg.num_layers)])
    else:
      value = read(key, want)
    var.set_value(value)
  if tensors:
    raise ValueError(f"Unused tensors in the checkpoint: {sorted(tensors)}.")
  nnx.update(model, state)
  return model


def save_hf_llama(model: Llama, path: str, *, dtype=None,
                  max_shard_bytes: int | None = None) -> None:
  """Writes ``model`` as a HF LLaMA directory (``config.json`` and
  safetensors, sharded with an index when ``max_shard_bytes`` is set).

  Quantized kernels (QArray / PackedQArray) are written dequantized.

  Args:
    model: a :class:`Llama`.
    path: output directory (created).
    dtype: storage dtype (default the params' dtype; float32 or bfloat16).
    max_shard_bytes: largest shard; ``None`` writes one file.
  """
  cfg = model.cfg
  dtype = jnp.dtype(cfg.param_dtype if dtype is None else dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                   jnp.dtype(jnp.float16)):
    raise ValueError(f"save dtype must be float32, bfloat16 or float16, got "
                     f"{dtype}.")
  os.makedirs(path, exist_ok=True)
  names = _hf_names(cfg)
  tensors = {}
  def put(key, value):
    hf_name, transpose = names[key]
    if isinstance(value, (quant.QArray, quant.PackedQArray)):
      value = value.dequantize()
    arr = np.asarray(jnp.asarray(value).astype(jnp.float32))
    arr = np.ascontiguousarray(arr.T if transpose else arr)
    tensors[hf_name] = arr.astype(np.dtype(dtype))

  for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key, value = tuple(p), var.get_value()
    if cfg.scan_layers and key[0] == "layers":  # stacked: layer by layer
      for i in range(cfg.num_layers):
        put(("layers", i, *key[1:]),
            jax.tree.map(lambda x, i=i: x[i], value))
    else:
      put(key, value)
  tname = {"float32": "float32", "bfloat16": "bfloat16",
           "float16": "float16"}[dtype.name]
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, tname), f, indent=2)
  meta = {"format": "pt"}
  if max_shard_bytes is None:
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, meta)
    return
  shards, cur, size = [], {}, 0
  for k in sorted(tensors):
    n = tensors[k].nbytes
    if cur and size + n > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[k] = tensors[k]
    size += n
  shards.append(cur)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(path, fname), shard, meta)
    weight_map.update({k: fname for k in shard})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              f, indent=2)
