"""Hugging Face LLaMA checkpoints: read and write local directories.

``load_hf_llama(path)`` reads ``config.json`` plus ``model.safetensors`` (or
a sharded ``model.safetensors.index.json``) into a :class:`Llama`;
``save_hf_llama(model, path)`` writes a directory that
``transformers.LlamaForCausalLM.from_pretrained`` loads. Nothing touches the
network and torch is not needed; the ``safetensors`` package does the file
format (imported when a checkpoint is read or written).

Both stream. The loader reads each tensor through safetensors' lazy,
memory-mapped reader and only the slices each device holds
(``jax.make_array_from_callback``), so no host copy of the model exists;
with ``quant=`` each linear is quantized as it is read, so no float copy
exists either. The writer gathers one tensor at a time and writes each
shard file as soon as its tensors are gathered. The host memory either
needs beyond the model's own arrays is a small multiple of one tensor
(of one shard, for the writer): ``tests/models/test_hf_stream.py``
measures it.

Config: the RoPE variants of transformers' ``rope_type`` that jqlm has
(``linear``, ``llama3``, ``yarn``, ``dynamic``: :class:`RopeScaling`) load;
others (``longrope``, partial rotary) raise, naming the type.

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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jqlm import quant as quant_lib
from jqlm.models import sharding as shd
from jqlm.models.layers import BLOCK_LINEARS, is_quantized
from jqlm.models.llama import Llama, LlamaConfig, RopeScaling, RopeType
from jqlm.models.sharding import LOGICAL_RULES

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def safetensors_io():
  """``(safe_open, save_file)`` of the ``safetensors`` package."""
  try:
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.numpy import save_file  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(
      "Reading and writing Hugging Face checkpoints needs the safetensors "
      "package: pip install safetensors (or jqlm's hf extra).") from e
  return safe_open, save_file


_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def _rope_from_hf(hf: dict[str, Any]) -> float | RopeScaling:
  """``LlamaConfig.rope_scaling`` from a HF config (transformers < 5:
  ``rope_scaling``; >= 5: ``rope_parameters``)."""
  params = hf.get("rope_parameters") or {}
  rs = hf.get("rope_scaling") or (params if params.get("rope_type") not in
                                  (None, "default") else None)
  if hf.get("partial_rotary_factor", params.get("partial_rotary_factor",
                                                1.0)) != 1.0:
    raise ValueError("partial_rotary_factor != 1 (RoPE on part of each head) "
                     "is not supported; jqlm's LLaMA rotates whole heads.")
  if not rs:
    return 1.0
  kind = rs.get("rope_type", rs.get("type"))
  if kind not in _ROPE_TYPES:
    raise ValueError(f"rope_scaling type {kind!r} is not supported; jqlm "
                     f"has {', '.join(_ROPE_TYPES)}.")
  if kind == "default":
    return 1.0
  if kind == "linear":
    return float(rs["factor"])
  original = hf.get("original_max_position_embeddings",
                    rs.get("original_max_position_embeddings",
                           hf.get("max_position_embeddings")))
  kw: dict[str, Any] = dict(
    type=kind, factor=None if rs.get("factor") is None
    else float(rs["factor"]),
    original_max_position_embeddings=None if original is None
    else int(original))
  if kind == "llama3":
    kw.update(low_freq_factor=float(rs["low_freq_factor"]),
              high_freq_factor=float(rs["high_freq_factor"]))
  elif kind == "yarn":
    for name in ("attention_factor", "mscale", "mscale_all_dim"):
      if rs.get(name) is not None:
        kw[name] = float(rs[name])
    # transformers: `beta_fast or 32`, `beta_slow or 1`
    kw["beta_fast"] = float(rs.get("beta_fast") or 32)
    kw["beta_slow"] = float(rs.get("beta_slow") or 1)
    kw["truncate"] = bool(rs.get("truncate", True))
  else:  # dynamic: M is the config's max_position_embeddings
    kw["original_max_position_embeddings"] = int(
      hf.get("max_position_embeddings", 2048))
  return RopeScaling(**kw)


def _rope_to_hf(cfg: LlamaConfig) -> dict[str, Any] | None:
  rs = cfg.rope_scaling
  if not isinstance(rs, RopeScaling):
    return None if rs == 1.0 else {"rope_type": "linear", "factor": rs}
  out: dict[str, Any] = {"rope_type": rs.type.value, "factor": rs.factor}
  if rs.type is RopeType.DYNAMIC:  # M is HF's max_position_embeddings
    return out
  if rs.type is RopeType.LLAMA3:
    out.update(low_freq_factor=rs.low_freq_factor,
               high_freq_factor=rs.high_freq_factor,
               original_max_position_embeddings=(
                 rs.original_max_position_embeddings))
  elif rs.type is RopeType.YARN:
    out.update(original_max_position_embeddings=(
      rs.original_max_position_embeddings), beta_fast=rs.beta_fast,
      beta_slow=rs.beta_slow, truncate=rs.truncate)
    for name in ("attention_factor", "mscale", "mscale_all_dim"):
      if getattr(rs, name) is not None:
        out[name] = getattr(rs, name)
  return out


def config_from_hf(hf: dict[str, Any], **overrides) -> LlamaConfig:
  """A :class:`LlamaConfig` from a HF LLaMA ``config.json`` dict.

  Raises:
    ValueError: features jqlm's LLaMA does not have (biases, a RoPE type
      other than linear / llama3 / yarn / dynamic, partial rotary, another
      activation).
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
  params = hf.get("rope_parameters") or {}
  theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
  scaling = _rope_from_hf(hf)
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


def _hf_max_positions(cfg: LlamaConfig) -> int:
  rs = cfg.rope_scaling
  if isinstance(rs, RopeScaling) and rs.type is RopeType.DYNAMIC and (
      rs.original_max_position_embeddings):
    return rs.original_max_position_embeddings
  return cfg.max_seq_len


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
    "max_position_embeddings": _hf_max_positions(cfg),
    "rope_theta": cfg.rope_base,
    "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": cfg.init_std,
    "torch_dtype": dtype,
  }
  rope = _rope_to_hf(cfg)
  if rope is not None:
    out["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    out["rope_parameters"] = {**rope, "rope_theta": cfg.rope_base}
  else:
    out["rope_parameters"] = {"rope_type": "default",
                              "rope_theta": cfg.rope_base}
  return out


def _tensor_files(path: str) -> list[str]:
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
  return [os.path.join(path, name) for name in files]


class _Reader:
  """The tensors of a checkpoint directory, opened lazily: nothing is read
  until a slice is asked for, and then only that slice (safetensors maps
  the files and copies the requested region)."""

  def __init__(self, path: str):
    safe_open, _ = safetensors_io()
    self.path = path
    self.handles = [safe_open(f, framework="numpy")
                    for f in _tensor_files(path)]
    self.where: dict[str, Any] = {}
    for h in self.handles:
      for name in h.keys():
        self.where[name] = h

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.where[name].get_slice(name).get_shape())

  def read(self, name: str, index: tuple = ()) -> np.ndarray:
    """``tensor[index]`` (numpy, in the stored dtype)."""
    sl = self.where[name].get_slice(name)
    return np.asarray(sl[index] if index else sl[:])

  def close(self):
    for h in self.handles:
      h.__exit__(None, None, None)


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


def _param_spec(cfg: LlamaConfig, key: tuple, names) -> list:
  """The HF tensors of a jqlm param ``key``: ``[(name, transpose)]``, one
  per layer of a ``scan_layers`` stack, else one."""
  if cfg.scan_layers and key[0] == "layers":
    return [names[("layers", i, *key[1:])] for i in range(cfg.num_layers)]
  if key not in names:
    raise ValueError(f"No HF tensor is mapped to jqlm param {key}.")
  return [names[key]]


def _check_tensors(reader: _Reader, cfg: LlamaConfig, flat, names) -> None:
  """Every tensor present with the config's shape, none left over; reads
  only the headers."""
  want_names = set()
  for p, var in flat:
    key = tuple(p)
    shape = tuple(var.get_value().shape)
    per = shape[1:] if cfg.scan_layers and key[0] == "layers" else shape
    for hf_name, transpose in _param_spec(cfg, key, names):
      want_names.add(hf_name)
      if hf_name not in reader.where:
        raise ValueError(f"{hf_name} is missing from the checkpoint in "
                         f"{reader.path!r}.")
      got = reader.shape(hf_name)
      got = got[::-1] if transpose else got
      if got != per:
        raise ValueError(f"{hf_name} has shape {got} (after transpose), "
                         f"config implies {per}.")
  extra = sorted(k for k in reader.where if k not in want_names
                 and not k.endswith("rotary_emb.inv_freq"))
  if extra:
    raise ValueError(f"Unused tensors in the checkpoint: {extra}.")


def _read_param(reader: _Reader, spec: list, stacked: bool, index: tuple,
                dtype) -> np.ndarray:
  """The ``index`` slice of a jqlm param (jqlm layout, ``dtype``), reading
  only that region of each HF tensor."""
  def one(hf_name, transpose, idx):
    hf_idx = tuple(reversed(idx)) if transpose else idx
    arr = reader.read(hf_name, hf_idx)
    arr = arr.T if transpose else arr
    # through float32, as a float32 array cast to ``dtype`` would round
    return arr.astype(np.float32).astype(dtype)

  if not stacked:
    return one(*spec[0], tuple(index))
  lay = index[0] if index else slice(None)
  rest = tuple(index[1:])
  return np.stack([one(n, t, rest) for n, t in spec[lay]])


def load_hf_llama(path: str, *, dtype=jnp.float32, param_dtype=None,
                  mesh: Mesh | None = None,
                  rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES,
                  quant: quant_lib.QuantSpec | None = None,
                  quant_patterns: Sequence[str] = BLOCK_LINEARS,
                  **overrides) -> Llama:
  """Reads a local HF LLaMA directory into a :class:`Llama`, streaming.

  Each param is built by ``jax.make_array_from_callback`` from the slices
  its devices hold, read from the memory-mapped safetensors files, so the
  host never holds the model (on one device: one tensor at a time). With
  ``quant``, each matching linear is read whole, cast to ``param_dtype``
  and quantized (as :func:`jqlm.models.quantize_model` does, packed for the
  kernels), then placed; the float model never exists.

  Args:
    path: directory with ``config.json`` and safetensors weights.
    dtype: compute dtype.
    param_dtype: storage dtype of the params (default ``dtype``).
    mesh: place each param with its logical axes' sharding on this mesh
      (:class:`jqlm.models.sharding.ParamShardings`, as the train state
      does); ``None`` puts the model on the default device.
    rules: logical axis -> mesh axis (with ``mesh``).
    quant: a weight :class:`jqlm.quant.QuantSpec` (``int8`` per channel,
      ``int4`` / ``nf4`` per group ...) to quantize the linears on load.
    quant_patterns: the linears ``quant`` applies to (default the block
      linears).
    **overrides: other :class:`LlamaConfig` fields (``remat``,
      ``scan_layers``, ``quant`` policies ...).

  Raises:
    ValueError: a tensor missing from, or left over in, the checkpoint, or a
      shape that disagrees with the config (checked from the headers, before
      any data is read).
  """
  from jqlm.models.quantize import quantize_fn, quantize_model  # noqa: PLC0415

  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  param_dtype = dtype if param_dtype is None else param_dtype
  cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, **overrides)
  np_dtype = np.dtype(jnp.dtype(param_dtype))

  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  names = _hf_names(cfg)
  reader = _Reader(path)
  try:
    # the float shapes (a stacked PackedQArray's static shape is a layer's)
    _check_tensors(reader, cfg, nnx.to_flat_state(nnx.state(model,
                                                            nnx.Param)),
                   names)
    if quant is not None:
      model = nnx.eval_shape(lambda: quantize_model(
        Llama(cfg, rngs=nnx.Rngs(0)), quant, patterns=quant_patterns))
    state = nnx.state(model, nnx.Param)
    flat = list(nnx.to_flat_state(state))
    if mesh is not None:
      pure = nnx.to_pure_dict(state)
      shard = shd.ParamShardings(pure, shd.param_axis_names(model), mesh,
                                 rules).params
    one_q = None if quant is None else jax.jit(quantize_fn(quant))
    for p, var in flat:
      key = tuple(p)
      abstract = var.get_value()
      stacked = cfg.scan_layers and key[0] == "layers"
      spec = _param_spec(cfg, key, names)
      target = (_lookup(shard, key) if mesh is not None else None)
      if is_quantized(abstract):
        value = _load_quantized(reader, spec, stacked, abstract, target,
                                np_dtype, one_q)
      else:
        sharding = target or jax.sharding.SingleDeviceSharding(
          jax.devices()[0])
        value = jax.make_array_from_callback(
          tuple(abstract.shape), sharding,
          lambda idx, spec=spec, stacked=stacked: _read_param(
            reader, spec, stacked, idx, np_dtype))
      var.set_value(value)
  finally:
    reader.close()
  nnx.update(model, state)
  return model


def _lookup(tree, key: tuple):
  for k in key:
    tree = tree[k]
  return tree


def _load_quantized(reader: _Reader, spec: list, stacked: bool, abstract,
                    target, np_dtype, one_q):
  """A quantized param: each layer's tensor read whole, quantized on the
  default device, its leaves written into host buffers shaped like the
  (stacked) quantized param, which are then placed slice by slice."""
  leaves, treedef = jax.tree.flatten(abstract)
  bufs = [np.empty(x.shape, x.dtype) for x in leaves]
  for i, (hf_name, transpose) in enumerate(spec):
    w = reader.read(hf_name)
    w = (w.T if transpose else w).astype(np.float32).astype(np_dtype)
    q = jax.device_get(jax.tree.leaves(one_q(jnp.asarray(w))))
    del w
    for buf, leaf in zip(bufs, q, strict=True):
      if stacked:
        buf[i] = leaf
      else:
        buf[...] = leaf
  shardings = (jax.tree.leaves(target) if target is not None else
               [jax.sharding.SingleDeviceSharding(jax.devices()[0])]
               * len(bufs))
  out = [jax.make_array_from_callback(b.shape, s, lambda idx, b=b: b[idx])
         for b, s in zip(bufs, shardings, strict=True)]
  return jax.tree.unflatten(treedef, out)


def gather_to_host(x) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def save_hf_llama(model: Llama, path: str, *, dtype=None,
                  max_shard_bytes: int | None = 5 * 10**9) -> None:
  """Writes ``model`` as a HF LLaMA directory (``config.json`` and
  safetensors shards of at most ``max_shard_bytes``, with an index when
  there are several; transformers' ``max_shard_size="5GB"`` by default).

  Streaming: tensors are gathered one at a time (a sharded param's layer,
  dequantized when it is a QArray / PackedQArray) and each shard file is
  written once its tensors are gathered, so the host holds at most one
  shard. On several processes every process gathers (collectives) and
  process 0 writes.

  Args:
    model: a :class:`Llama`.
    path: output directory (created).
    dtype: storage dtype (default the params' dtype; float32, bfloat16 or
      float16).
    max_shard_bytes: largest shard; ``None`` writes one file.
  """
  _, save_file = safetensors_io()
  cfg = model.cfg
  dtype = jnp.dtype(cfg.param_dtype if dtype is None else dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                   jnp.dtype(jnp.float16)):
    raise ValueError(f"save dtype must be float32, bfloat16 or float16, got "
                     f"{dtype}.")
  if max_shard_bytes is not None and (
      isinstance(max_shard_bytes, bool) or max_shard_bytes < 1):
    raise ValueError(f"max_shard_bytes must be a positive int or None, got "
                     f"{max_shard_bytes!r}.")
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
  names = _hf_names(cfg)
  itemsize = np.dtype(dtype).itemsize
  # every HF tensor: (name, getter), getters gathering on demand
  jobs = []
  for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key, value = tuple(p), var.get_value()
    stacked = cfg.scan_layers and key[0] == "layers"
    for i, (hf_name, transpose) in enumerate(_param_spec(cfg, key, names)):
      shape = tuple(value.shape[1:] if stacked else value.shape)
      jobs.append((hf_name, transpose, shape,
                   (value, i if stacked else None)))
  jobs.sort(key=lambda j: j[0])
  limit = max_shard_bytes or float("inf")
  shards, size = [[]], 0
  for job in jobs:
    n = int(np.prod(job[2])) * itemsize
    if shards[-1] and size + n > limit:
      shards.append([])
      size = 0
    shards[-1].append(job)
    size += n
  single = len(shards) == 1
  fnames = (["model.safetensors"] if single else
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
             for i in range(len(shards))])
  np_dtype = np.dtype(dtype)
  weight_map, total = {}, 0
  for fname, shard in zip(fnames, shards, strict=True):
    tensors = {}
    for hf_name, transpose, _, (value, i) in shard:
      v = value if i is None else jax.tree.map(lambda x, i=i: x[i], value)
      if is_quantized(v):
        v = v.dequantize()
      arr = gather_to_host(jnp.asarray(v).astype(jnp.float32))
      arr = np.ascontiguousarray(arr.T if transpose else arr)
      tensors[hf_name] = arr.astype(np_dtype)
      weight_map[hf_name] = fname
      total += tensors[hf_name].nbytes
    if writer:
      save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
    del tensors
  if not writer:
    return
  tname = {"float32": "float32", "bfloat16": "bfloat16",
           "float16": "float16"}[dtype.name]
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, tname), f, indent=2)
  index = os.path.join(path, "model.safetensors.index.json")
  if single:
    if os.path.exists(index):  # a stale index would shadow the new file
      os.remove(index)
    return
  with open(index, "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              f, indent=2)
