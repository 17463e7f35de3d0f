"""Building the model and a sharded :class:`TrainState` from ``eval_shape``.

The state is never materialised on one device: its shape comes from
``jax.eval_shape`` of the init function, shardings from the params' logical
axis names (:mod:`jqlm.models.sharding`), and ``jax.jit(init,
out_shardings=...)`` creates every array directly where it lives. Optimizer
state leaves follow the param they belong to (same path suffix and shape);
others (counts, block-quantized moments, low-rank moments) are replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jqlm import models, optim, quant
from jqlm.models import sharding as shd
from jqlm.train.config import OptimizerKind, TrainConfig
from jqlm.train.step import TrainState, build_optimizer

QUANT_POLICIES = {
  "none": lambda: None,
  "int4": models.stable_spam_int4,
  "fp4": models.stable_spam_fp4,
  "w8a8": models.w8a8,
  "w4a16": models.w4a16,
  "hadamard": models.hadamard_w4a4,
}


def model_config(cfg: TrainConfig) -> models.LlamaConfig:
  """The :class:`jqlm.models.LlamaConfig` of a run."""
  if cfg.model not in models.PRESETS:
    raise ValueError(f"Unknown model preset {cfg.model!r}; known: "
                     f"{sorted(models.PRESETS)}.")
  if cfg.quant not in QUANT_POLICIES:
    raise ValueError(f"Unknown quant policy {cfg.quant!r}; known: "
                     f"{sorted(QUANT_POLICIES)}.")
  over = {k: getattr(cfg, k) for k in (
    "hidden_size", "intermediate_size", "num_layers", "num_heads",
    "num_kv_heads") if getattr(cfg, k) is not None}
  base = models.PRESETS[cfg.model]()
  fields = {f.name for f in dataclasses.fields(models.LlamaConfig)}
  kw = {f: getattr(base, f) for f in fields}
  if "hidden_size" in over or "num_heads" in over:
    kw["head_dim"] = None
  if "num_heads" in over and "num_kv_heads" not in over:
    kw["num_kv_heads"] = None
  kw.update(over)
  kw.update(vocab_size=cfg.vocab_size, max_seq_len=max(cfg.seq_len + 1,
                                                       base.max_seq_len),
            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(
              cfg.param_dtype), remat=cfg.remat,
            quant=QUANT_POLICIES[cfg.quant]())
  return models.LlamaConfig(**kw)


def _path(keypath) -> tuple:
  out = []
  for k in keypath:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
  return tuple(out)


def _fit(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes that do not divide their dim."""
  out = []
  for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)),
                     strict=False):
    ok = ax is not None and ax in mesh.shape and dim % mesh.shape[ax] == 0
    out.append(ax if ok else None)
  return PartitionSpec(*out)


@dataclasses.dataclass
class Setup:
  """The static pieces of a run: model graph, abstract nnx state, optimizer,
  and the state's shardings."""

  mcfg: models.LlamaConfig
  graphdef: Any
  nnx_state: Any
  tx: Any
  shardings: Any
  init: Any


def setup(cfg: TrainConfig, mesh: Mesh) -> Setup:
  """Model graph, optimizer and the shardings of the train state."""
  mcfg = model_config(cfg)
  abstract_model = nnx.eval_shape(lambda: models.Llama(mcfg,
                                                       rngs=nnx.Rngs(0)))
  graphdef, nnx_state = nnx.split(abstract_model)
  flat = dict(nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)))
  axes = {tuple(p): v.get_metadata().get("axes") for p, v in flat.items()}
  key = jax.random.key(cfg.seed)
  k_model, k_opt, k_run = jax.random.split(key, 3)
  tx = build_optimizer(cfg, k_opt)

  def init():
    model = models.Llama(mcfg, rngs=nnx.Rngs(params=k_model))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if cfg.optimizer is OptimizerKind.Q_GALORE:
      params = optim.quantize_weights(params)
    with jax.numpy_dtype_promotion("standard"):
      opt_state = tx.init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=opt_state, rng=k_run)

  abstract = jax.eval_shape(init)
  repl = NamedSharding(mesh, PartitionSpec())
  param_specs: dict[tuple, tuple[PartitionSpec, tuple]] = {}

  def param_sharding(kp, leaf):
    names = axes.get(_path(kp))
    spec = shd.to_pspec(names) if names else PartitionSpec()
    if isinstance(leaf, quant.QArray):
      spec = _fit(spec, leaf.codes.shape, mesh)
      param_specs[_path(kp)] = (spec, tuple(leaf.codes.shape))
      return jax.tree.map(
        lambda x: NamedSharding(mesh, spec) if x.shape == leaf.codes.shape
        else repl, leaf)
    spec = _fit(spec, leaf.shape, mesh)
    param_specs[_path(kp)] = (spec, tuple(leaf.shape))
    return NamedSharding(mesh, spec)

  p_shard = jax.tree_util.tree_map_with_path(
    param_sharding, abstract.params,
    is_leaf=lambda x: isinstance(x, quant.QArray))

  def opt_sharding(kp, leaf):
    path = _path(kp)
    for n in range(len(path), 0, -1):
      hit = param_specs.get(path[-n:])
      if hit is not None and hit[1] == tuple(leaf.shape):
        return NamedSharding(mesh, hit[0])
    return repl

  o_shard = jax.tree_util.tree_map_with_path(opt_sharding, abstract.opt_state)
  shardings = TrainState(step=repl, params=p_shard, opt_state=o_shard,
                         rng=repl)
  return Setup(mcfg=mcfg, graphdef=graphdef, nnx_state=nnx_state, tx=tx,
               shardings=shardings, init=init)


def init_state(s: Setup) -> TrainState:
  """The initial state, created sharded (never on one device first)."""
  return jax.jit(s.init, out_shardings=s.shardings)()
