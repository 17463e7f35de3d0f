"""jqlm.train: configs, the pure train step, sharded state, checkpoints, the
loop and comparisons.

Modules, one concern each:

* :mod:`~jqlm.train.config`: :class:`TrainConfig` of four frozen
  sub-configs (:class:`ModelConfig`, :class:`DataConfig`, one optimizer
  config per kind, :class:`RunConfig`), dotted ``--set`` overrides
  (:func:`apply_overrides`), :func:`load_config`; :mod:`~jqlm.train.presets`:
  the named configs (:data:`CONFIGS`) and :func:`official_c4`;
* :mod:`~jqlm.train.optimizer`: :func:`build_optimizer`, :func:`lr_schedule`;
* :mod:`~jqlm.train.step`: :class:`TrainState`, :func:`train_step`,
  :func:`eval_loss`, :func:`step_diagnostics` (pure functions);
* :mod:`~jqlm.train.state`: :func:`setup`, :func:`init_state`: the model,
  optimizer and the state's shardings from ``eval_shape``;
* :mod:`~jqlm.train.data`: :func:`prepare_data`;
* :mod:`~jqlm.train.checkpoint`: :class:`Checkpointer`;
* :mod:`~jqlm.train.loop`: :func:`run`; :mod:`~jqlm.train.metrics`: the
  metrics log and curves;
* :mod:`~jqlm.train.inference`: :func:`load_run`, :func:`evaluate`,
  :func:`sample`;
* :mod:`~jqlm.train.compare`: suites, their runner and report.
"""

from jqlm.train.checkpoint import (
  Checkpointer,
  CheckpointError,
  CheckpointMismatchError,
  CorruptCheckpointError,
)
from jqlm.train.config import (
  OPTIMIZERS,
  AdamWConfig,
  ApolloConfig,
  ApolloMiniConfig,
  DataConfig,
  GaLoreConfig,
  MicroAdamConfig,
  ModelConfig,
  MuonConfig,
  NanPolicy,
  NaturalGaLoreConfig,
  OptimizerConfig,
  OptimizerKind,
  QGaLoreConfig,
  RunConfig,
  ScheduleKind,
  SpamConfig,
  StableSpamConfig,
  StateFormat,
  TrainConfig,
  apply_overrides,
  load_config,
  optimizer_config,
)
from jqlm.train.data import prepare_data
from jqlm.train.inference import evaluate, load_run, sample
from jqlm.train.loop import NonFiniteError, RunResult, distributed_init, run
from jqlm.train.optimizer import build_optimizer, lr_schedule
from jqlm.train.presets import CONFIGS, demo_config, official_c4
from jqlm.train.resume import ResumeConfigError
from jqlm.train.state import Setup, init_state, model_config, setup
from jqlm.train.step import (
  LayeredState,
  TrainState,
  eval_loss,
  init_opt_state,
  layerwise_train_step,
  operand_stats,
  step_diagnostics,
  train_step,
)

__all__ = [
  "CONFIGS", "OPTIMIZERS", "AdamWConfig", "ApolloConfig", "ApolloMiniConfig",
  "MicroAdamConfig", "MuonConfig", "NaturalGaLoreConfig", "CheckpointError", "CheckpointMismatchError", "Checkpointer",
  "CorruptCheckpointError", "ResumeConfigError",
  "DataConfig", "GaLoreConfig", "LayeredState", "ModelConfig", "NanPolicy",
  "NonFiniteError", "OptimizerConfig", "OptimizerKind", "QGaLoreConfig",
  "RunConfig", "RunResult", "ScheduleKind", "Setup", "SpamConfig",
  "StableSpamConfig", "StateFormat", "TrainConfig", "TrainState",
  "apply_overrides", "build_optimizer", "demo_config", "distributed_init",
  "eval_loss", "evaluate", "init_opt_state", "init_state",
  "layerwise_train_step", "load_config", "load_run",
  "lr_schedule", "model_config", "official_c4", "operand_stats",
  "optimizer_config",
  "prepare_data", "run", "sample", "setup", "step_diagnostics",
  "train_step",
]
