"""The train state of a run: its model, optimizer and shardings, built from
``eval_shape``.

The state is never materialised on one device: its shape comes from
``jax.eval_shape`` of the init function, its shardings from the params'
logical axis names (:class:`jqlm.models.sharding.ParamShardings`, the one
place where logical names meet the mesh), and ``jax.jit(init,
out_shardings=...)`` creates every array directly where it lives.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jqlm import models, optim
from jqlm.models import sharding as shd
from jqlm.train.config import QGaLoreConfig, TrainConfig
from jqlm.train.optimizer import build_optimizer
from jqlm.train.step import TrainState, init_opt_state, split_trainable


def model_config(cfg: TrainConfig) -> models.LlamaConfig:
  """The :class:`jqlm.models.LlamaConfig` of a run (sequences of
  ``data.seq_len + 1`` tokens fit)."""
  return cfg.model.llama(max_seq_len=cfg.data.seq_len + 1)


@dataclasses.dataclass
class Setup:
  """The static pieces of a run.

  Attributes:
    mcfg: the model config.
    graphdef, nnx_state: the model's graph and abstract state.
    tx: the optimizer.
    shardings: a :class:`TrainState` of ``NamedSharding`` s.
    init: ``(base_params=None) -> TrainState`` (jit it with
      ``out_shardings``; ``base_params``: :func:`pretrained_params`).
    abstract: the state's shapes and dtypes (``jax.eval_shape(init)``).
  """

  mcfg: models.LlamaConfig
  graphdef: Any
  nnx_state: Any
  tx: Any
  shardings: Any
  init: Any
  abstract: Any

  def restore_target(self) -> TrainState:
    """The state's shapes, dtypes and shardings (a checkpoint restore
    target)."""
    return jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      self.abstract, self.shardings)


def build_model(cfg: TrainConfig, mcfg: models.LlamaConfig, key: jax.Array,
                base_params=None) -> models.Llama:
  """The run's model: the LLaMA of ``mcfg`` initialised from ``key`` (its
  params replaced by ``base_params``, a pure params dict, when given:
  ``run.init_from``), its block linears quantized for QLoRA
  (``model.lora_base``) and LoRA adapters added (``model.lora_rank``;
  drawn from a key of their own, so the base's init does not depend on
  them)."""
  model = models.Llama(mcfg, rngs=nnx.Rngs(params=key))
  if base_params is not None:
    nnx.update(model, base_params)
  spec = cfg.model.lora_base_spec()
  if spec is not None:
    model = models.quantize_model(model, spec)
  lcfg = cfg.model.lora()
  if lcfg is not None:
    models.add_lora(model, lcfg, rngs=nnx.Rngs(
      params=jax.random.fold_in(key, 0x10AA)))
  return model


def setup(cfg: TrainConfig, mesh: Mesh) -> Setup:
  """Model graph, optimizer, init function and the shardings of the train
  state."""
  mcfg = model_config(cfg)
  abstract_model = nnx.eval_shape(
    lambda: build_model(cfg, mcfg, jax.random.key(0)))
  graphdef, nnx_state = nnx.split(abstract_model)
  # three keys as in jqlm 0.1 (whose second one seeded Q-GaLore's rounding;
  # the train step now draws it from TrainState.rng), so that init and run
  # keys are unchanged
  k_model, _, k_run = jax.random.split(jax.random.key(cfg.run.seed), 3)
  opt = cfg.optimizer
  tx = build_optimizer(opt, cfg.run.steps, seed=cfg.run.seed)
  lcfg = cfg.model.lora()
  if lcfg is not None:  # LoRA+: B's learning rate lr_ratio times A's
    tx = models.lora.lora_plus(tx, lcfg.lr_ratio)

  def init(base_params=None) -> TrainState:
    model = build_model(cfg, mcfg, k_model, base_params)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if isinstance(opt, QGaLoreConfig):
      def to_int8(p):
        return optim.quantize_weights(
          p, models.block_linear_mask, bits=opt.weight_bits,
          group_size=opt.weight_group_size)
      if mcfg.scan_layers:  # each layer's kernels, one layer at a time
        params = {**params, "layers": jax.lax.map(
          lambda p: to_int8({"layers": p})["layers"], params["layers"])}
      else:
        params = to_int8(params)
    frozen = None
    if lcfg is not None:  # the adapters train, the base is frozen
      params, frozen = split_trainable(
        params, models.lora.trainable_mask(params))
    opt_state = init_opt_state(tx, params, layered=mcfg.scan_layers)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=opt_state, rng=k_run, frozen=frozen)

  abstract = jax.eval_shape(init)
  ps = shd.ParamShardings(abstract.model_params,
                          shd.param_axis_names(abstract_model), mesh)
  p_shard, f_shard = ps.params, None
  if lcfg is not None:
    p_shard, f_shard = split_trainable(
      ps.params, models.lora.trainable_mask(abstract.model_params))
  shardings = TrainState(step=ps.replicated, params=p_shard,
                         opt_state=ps.follow(
                           abstract.opt_state, is_blocked=lambda x: isinstance(
                             x, optim.QuantizedMoment)),
                         rng=ps.replicated, frozen=f_shard)
  return Setup(mcfg=mcfg, graphdef=graphdef, nnx_state=nnx_state, tx=tx,
               shardings=shardings, init=init, abstract=abstract)


def late_setup(cfg: TrainConfig, s: Setup) -> Setup:
  """``s`` with the model of ``model.late_high_precision``'s last steps
  (the recipe's forward GEMMs in high precision): the same params, state
  and shardings, another graph."""
  mcfg = cfg.model.llama(max_seq_len=cfg.data.seq_len + 1, late=True)
  abstract_model = nnx.eval_shape(
    lambda: build_model(cfg, mcfg, jax.random.key(0)))
  graphdef, nnx_state = nnx.split(abstract_model)
  return dataclasses.replace(s, mcfg=mcfg, graphdef=graphdef,
                             nnx_state=nnx_state)


def init_state(s: Setup, base_params=None) -> TrainState:
  """The initial state, created sharded (never on one device first);
  ``base_params`` (:func:`pretrained_params`) replace the random init."""
  if base_params is None:
    return jax.jit(s.init, out_shardings=s.shardings)()
  # the pretrained arrays become the params (donated), unless the init
  # quantizes them (QLoRA's base, Q-GaLore's int8 weights): then no
  # output can reuse their buffers
  quantized = any(models.is_quantized(x) for x in jax.tree.leaves(
    s.abstract.model_params, is_leaf=models.is_quantized))
  fn = jax.jit(s.init, out_shardings=s.shardings,
               donate_argnums=() if quantized else (0,))
  return fn(base_params)


def _float_base(s: Setup):
  """The abstract params of the run's LLaMA before QLoRA quantization and
  adapters (the pure dict :func:`pretrained_params` must match)."""
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(
    lambda: models.Llama(s.mcfg, rngs=nnx.Rngs(0))), nnx.Param))


def pretrained_params(cfg: TrainConfig, s: Setup, mesh: Mesh):
  """``run.init_from``'s params as a pure dict of the run's (float) LLaMA,
  placed with the params' shardings on ``mesh``.

  An HF directory streams in (:func:`jqlm.models.load_hf_llama`); its
  config must agree with the run's model on every shape and on RoPE, norm
  epsilon and tied embeddings. A jqlm run's newest checkpoint is restored
  (LoRA adapters it trained are merged into its base first).

  Raises:
    FileNotFoundError: ``init_from`` is neither.
    ValueError: a config or a param that disagrees with the run's model.
  """
  path = cfg.run.init_from
  want = _float_base(s)
  mcfg = s.mcfg
  if os.path.exists(os.path.join(path, "model.safetensors")) or (
      os.path.exists(os.path.join(path, "model.safetensors.index.json"))):
    with open(os.path.join(path, "config.json")) as f:
      hf_cfg = models.hf.config_from_hf(json.load(f))
    fields = ("vocab_size", "hidden_size", "intermediate_size",
              "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "rope_base", "rope_scaling", "norm_eps", "tie_embeddings")
    diff = [f"{k}: checkpoint {getattr(hf_cfg, k)!r}, run "
            f"{getattr(mcfg, k)!r}" for k in fields
            if getattr(hf_cfg, k) != getattr(mcfg, k)]
    if diff:
      raise ValueError(
        f"run.init_from={path!r} holds another model than the run's: "
        f"{'; '.join(diff)}. Set model.preset / the model sizes and "
        "model.vocab_size to the checkpoint's (and data.tokenizer to its "
        "tokenizer.json).")
    model = models.load_hf_llama(path, dtype=mcfg.dtype,
                                 param_dtype=mcfg.param_dtype, mesh=mesh,
                                 scan_layers=mcfg.scan_layers)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  elif os.path.exists(os.path.join(path, "config.json")):
    from jqlm.train.inference import load_run  # noqa: PLC0415
    src_cfg, src, state, _, _ = load_run(path)
    src_state = jax.tree.map(lambda x: x, src.nnx_state)
    nnx.replace_by_pure_dict(src_state, state.model_params)
    model = nnx.merge(src.graphdef, src_state)
    if src_cfg.model.lora_rank:
      model = models.merge_lora(model)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if any(models.is_quantized(x) for x in jax.tree.leaves(
        got, is_leaf=models.is_quantized)):
      raise ValueError(
        f"run.init_from={path!r}: that run's weights are quantized (QLoRA "
        "base, Q-GaLore's int8 weights); start from a float checkpoint.")
    if mcfg.scan_layers != src.mcfg.scan_layers:
      got = (models.stack_layers(got) if mcfg.scan_layers
             else models.unstack_layers(got))
  else:
    raise FileNotFoundError(
      f"run.init_from={path!r} is neither a Hugging Face model directory "
      "(config.json + model.safetensors) nor a jqlm run's work dir.")
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  def shape_of(k):
    return tuple(flat_got[k].shape) if k in flat_got else "missing"

  bad = [f"{jax.tree_util.keystr(k)}: {shape_of(k)} vs {tuple(v.shape)}"
         for k, v in flat_want.items() if shape_of(k) != tuple(v.shape)]
  extra = [jax.tree_util.keystr(k) for k in flat_got if k not in flat_want]
  if bad or extra:
    raise ValueError(
      f"run.init_from={path!r}: params that do not fit the run's model "
      f"({'; '.join(bad[:5] + extra[:5])}). Set the model section to the "
      "checkpoint's shapes.")
  ps = shd.ParamShardings(want, shd.param_axis_names(nnx.eval_shape(
    lambda: models.Llama(mcfg, rngs=nnx.Rngs(0)))), mesh)
  return jax.tree.map(
    lambda x, w, sh: jax.device_put(jnp.asarray(x).astype(w.dtype), sh),
    got, want, ps.params)


# ---------------------------------------------------------------------------
# states saved by jqlm 0.1


class _LegacyWeightRounding(NamedTuple):
  """jqlm 0.1's ``WeightRoundingState``: Q-GaLore's rounding key, carried
  in the optimizer state (now drawn from ``TrainState.rng``)."""

  key: jax.Array
  step_key: jax.Array


def legacy_target(cfg: TrainConfig, s: Setup):
  """``(restore target, convert)`` for a checkpoint of the same run saved
  by jqlm 0.1, or ``None`` when its state has the current layout.

  Only Q-GaLore with stochastic rounding differs: its optimizer state ended
  with the rounding key. ``convert`` drops that key; the run continues with
  its rounding noise drawn from ``TrainState.rng`` (so a resumed run of
  jqlm 0.1 is not bit-identical to the uninterrupted one after the resume
  point; its params, moments, projections and step are restored exactly).
  """
  opt = cfg.optimizer
  if not (isinstance(opt, QGaLoreConfig) and opt.stochastic_round) or (
      s.mcfg.scan_layers):  # jqlm 0.1 had no scanned layers
    return None
  target = s.restore_target()
  key = target.rng
  legacy = target._replace(opt_state=tuple(target.opt_state) + (
    _LegacyWeightRounding(key=key, step_key=key),))

  def convert(state: TrainState) -> TrainState:
    return state._replace(opt_state=tuple(state.opt_state)[:-1])

  return legacy, convert
