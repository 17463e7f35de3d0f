"""jqlm.train: the pure train step, sharded state, checkpoints and the loop.

* :class:`TrainConfig` (frozen, enums) with presets and ``--set`` overrides
  (:func:`apply_overrides`, :func:`load_config`);
* :func:`train_step`, :func:`eval_loss`, :func:`build_optimizer`,
  :func:`lr_schedule`;
* :func:`setup`, :func:`init_state`: sharded state from ``eval_shape``;
* :class:`Checkpointer`: async keep-last-N orbax checkpoints with fallback;
* :func:`run`: the loop (metrics JSONL, progress bar, eval, plot).
"""

from jqlm.train.checkpoint import Checkpointer, CheckpointError
from jqlm.train.config import (
  CONFIGS,
  NanPolicy,
  OptimizerKind,
  ScheduleKind,
  TrainConfig,
  apply_overrides,
  load_config,
)
from jqlm.train.loop import (
  NonFiniteError,
  RunResult,
  distributed_init,
  evaluate,
  load_run,
  prepare_data,
  run,
  sample,
)
from jqlm.train.state import init_state, model_config, setup
from jqlm.train.step import (
  TrainState,
  build_optimizer,
  eval_loss,
  lr_schedule,
  step_diagnostics,
  train_step,
)

__all__ = [
  "CONFIGS", "CheckpointError", "Checkpointer", "NanPolicy",
  "NonFiniteError", "OptimizerKind", "RunResult", "ScheduleKind",
  "TrainConfig", "TrainState", "apply_overrides", "build_optimizer",
  "distributed_init", "eval_loss", "evaluate", "init_state", "load_config",
  "load_run", "lr_schedule", "model_config", "prepare_data", "run",
  "sample", "setup", "step_diagnostics", "train_step",
]
