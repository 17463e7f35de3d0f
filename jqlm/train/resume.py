"""What a resume may change: the saved config against the new one.

A run's ``config.json`` is the config its checkpoints were saved with.
Resuming compares the new config with it field by field:

* **fixed** fields decide the state's shapes or the data and randomness
  the run reproduces: the model, the data (source, tokenizer, sequence
  length, batch size, accumulation), the optimizer kind, its state format
  and low-rank / quantization sizes, the seed and the layer-wise update.
  A change is refused, in one message listing every differing field with
  both values;
* **free** fields change how the run proceeds, not what it computes: the
  number of steps, the log / eval / checkpoint cadences, how many
  checkpoints to keep, the NaN policy, the mesh and process layout, the
  work dir and the data cache. A change is applied with a notice;
* every other field is a **hyper-parameter** (learning rate, schedule,
  decay, clipping, betas, thresholds, ...): it changes the trajectory of
  the run being resumed, so a change is refused unless named in
  ``allow_change`` (``jqlm train --resume --allow-change optimizer.lr``;
  ``lr`` alone works too), then applied with a notice.

Applied changes are appended to ``config_history.jsonl`` beside
``config.json`` (the step they apply from, each field's old and new value),
and ``config.json`` is rewritten only once the restore has succeeded.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from jqlm.train.config import TrainConfig

FREE = frozenset({
  "run.steps", "run.eval_every", "run.eval_batches", "run.log_every",
  "run.ckpt_every", "run.keep_checkpoints", "run.nan_policy",
  "run.max_skip_streak", "run.mesh_data", "run.mesh_fsdp", "run.mesh_tensor",
  "run.mesh_devices", "run.coordinator", "run.num_processes",
  "run.process_id", "run.workdir", "data.cache_dir",
})
FIXED_OPTIMIZER = frozenset({
  "optimizer.kind", "optimizer.state", "optimizer.rank",
  "optimizer.proj_bits", "optimizer.proj_group_size",
  "optimizer.weight_bits", "optimizer.weight_group_size",
  "optimizer.stochastic_round",
})
FIXED_RUN = frozenset({"run.seed", "run.layerwise_update"})


class ResumeConfigError(ValueError):
  """The new config changes what the saved run's checkpoints can resume."""


def flat(cfg: TrainConfig) -> dict[str, Any]:
  """``{"section.field": value}`` of a config (enums as their values)."""
  return {f"{sec}.{k}": v for sec, fields in cfg.to_dict().items()
          for k, v in fields.items()}


def kind_of(field: str) -> str:
  """``"fixed"``, ``"free"`` or ``"hyper"`` (see the module docstring)."""
  if field in FREE:
    return "free"
  if (field.startswith(("model.", "data.")) or field in FIXED_OPTIMIZER
      or field in FIXED_RUN):
    return "fixed"
  return "hyper"


def _allowed(field: str, allow: set[str]) -> bool:
  return field in allow or field.split(".", 1)[1] in allow


def check_allow(cfg: TrainConfig, allow_change) -> None:
  """Raises ResumeConfigError for a name in ``allow_change`` that is no
  field of ``cfg`` (``section.field`` or the bare field name)."""
  b = flat(cfg)
  unknown = [f for f in set(allow_change) if not any(
    f == k or f == k.split(".", 1)[1] for k in b)]
  if unknown:
    raise ResumeConfigError(
      f"--allow-change {', '.join(sorted(unknown))}: no such config field "
      "(use section.field names such as optimizer.lr).")


def check(saved: TrainConfig, new: TrainConfig,
          allow_change=()) -> dict[str, tuple[Any, Any]]:
  """The changes ``new`` makes to ``saved`` that a resume applies,
  ``{field: (old, new)}``.

  Raises:
    ResumeConfigError: a fixed field changed, or a hyper-parameter not in
      ``allow_change``; the message lists each with both values and says
      how to proceed.
  """
  allow = set(allow_change)
  check_allow(new, allow)
  a, b = flat(saved), flat(new)
  changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)}
  fixed = {k: v for k, v in changed.items() if kind_of(k) == "fixed"}
  hyper = {k: v for k, v in changed.items()
           if kind_of(k) == "hyper" and not _allowed(k, allow)}
  if fixed or hyper:
    lines = [f"{k}: saved {o!r}, now {n!r}" for k, (o, n) in
             {**fixed, **hyper}.items()]
    how = []
    if fixed:
      how.append("the fixed fields (" + ", ".join(fixed) + ") decide the "
                 "state's shapes or the data; resume with their saved "
                 "values, or start a new run in another workdir")
    if hyper:
      how.append("to change a hyper-parameter mid-run, name it: "
                 + " ".join(f"--allow-change {k}" for k in hyper))
    how_text = "; ".join(how)
    raise ResumeConfigError(  # one line: the CLI prints it as it is
      "Cannot resume with this config; it differs from the run's saved "
      "config.json in " + "; ".join(lines) + ". " + how_text[0].upper()
      + how_text[1:] + ".")
  return changed


def record(workdir: str, step: int, changes: dict[str, tuple[Any, Any]]
           ) -> str:
  """Appends the applied changes to ``config_history.jsonl``; returns its
  path."""
  path = os.path.join(workdir, "config_history.jsonl")
  rec = {"time": datetime.datetime.now(datetime.UTC).isoformat(
    timespec="seconds"), "from_step": int(step),
    "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
  with open(path, "a") as f:
    f.write(json.dumps(rec) + "\n")
  return path


def saved_config(workdir: str) -> TrainConfig | None:
  """The run's saved ``config.json``, or None if there is none.

  Raises:
    ResumeConfigError: a ``config.json`` that cannot be read.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return TrainConfig.from_json(f.read())
  except (OSError, ValueError, TypeError) as e:
    raise ResumeConfigError(
      f"{path} cannot be read ({type(e).__name__}: {e}); it records the "
      "config the checkpoints were saved with. Restore it, or start a new "
      "run in another workdir.") from e


def write_config(workdir: str, cfg: TrainConfig) -> None:
  """``config.json``, written atomically (a temporary file, then a
  rename)."""
  path = os.path.join(workdir, "config.json")
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(cfg.to_json())
  os.replace(tmp, path)
