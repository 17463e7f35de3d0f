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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jqlm import models, optim
from jqlm.models import sharding as shd
from jqlm.train.config import QGaLoreConfig, TrainConfig
from jqlm.train.optimizer import build_optimizer
from jqlm.train.step import TrainState, init_opt_state


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
    init: ``() -> TrainState`` (jit it with ``out_shardings``).
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


def setup(cfg: TrainConfig, mesh: Mesh) -> Setup:
  """Model graph, optimizer, init function and the shardings of the train
  state."""
  mcfg = model_config(cfg)
  abstract_model = nnx.eval_shape(lambda: models.Llama(mcfg,
                                                       rngs=nnx.Rngs(0)))
  graphdef, nnx_state = nnx.split(abstract_model)
  # three keys as in jqlm 0.1 (whose second one seeded Q-GaLore's rounding;
  # the train step now draws it from TrainState.rng), so that init and run
  # keys are unchanged
  k_model, _, k_run = jax.random.split(jax.random.key(cfg.run.seed), 3)
  opt = cfg.optimizer
  tx = build_optimizer(opt, cfg.run.steps, seed=cfg.run.seed)

  def init() -> TrainState:
    model = models.Llama(mcfg, rngs=nnx.Rngs(params=k_model))
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
    opt_state = init_opt_state(tx, params, layered=mcfg.scan_layers)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=opt_state, rng=k_run)

  abstract = jax.eval_shape(init)
  ps = shd.ParamShardings(abstract.params,
                          shd.param_axis_names(abstract_model), mesh)
  shardings = TrainState(step=ps.replicated, params=ps.params,
                         opt_state=ps.follow(
                           abstract.opt_state, is_blocked=lambda x: isinstance(
                             x, optim.QuantizedMoment)),
                         rng=ps.replicated)
  return Setup(mcfg=mcfg, graphdef=graphdef, nnx_state=nnx_state, tx=tx,
               shardings=shardings, init=init, abstract=abstract)


def late_setup(cfg: TrainConfig, s: Setup) -> Setup:
  """``s`` with the model of ``model.late_high_precision``'s last steps
  (the recipe's forward GEMMs in high precision): the same params, state
  and shardings, another graph."""
  mcfg = cfg.model.llama(max_seq_len=cfg.data.seq_len + 1, late=True)
  abstract_model = nnx.eval_shape(lambda: models.Llama(mcfg,
                                                       rngs=nnx.Rngs(0)))
  graphdef, nnx_state = nnx.split(abstract_model)
  return dataclasses.replace(s, mcfg=mcfg, graphdef=graphdef,
                             nnx_state=nnx_state)


def init_state(s: Setup) -> TrainState:
  """The initial state, created sharded (never on one device first)."""
  return jax.jit(s.init, out_shardings=s.shardings)()


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
