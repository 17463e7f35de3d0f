"""The frozen training configuration, its presets and ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import json
import os
import types
import typing
from typing import Any


class OptimizerKind(enum.Enum):
  """Which optimizer a run uses (see :func:`jqlm.train.build_optimizer`)."""

  ADAMW = "adamw"
  SPAM = "spam"
  STABLE_SPAM = "stable_spam"
  GALORE = "galore"
  Q_GALORE = "q_galore"


class ScheduleKind(enum.Enum):
  """``cosine``: the official linear warmup then cosine to ``min_lr_ratio``
  (spec §1); ``constant``: linear warmup then constant."""

  COSINE = "cosine"
  CONSTANT = "constant"


class NanPolicy(enum.Enum):
  """What a non-finite loss or gradient does: ``skip`` the update (params
  and optimizer state unchanged) and count it, or ``stop`` the run with an
  error. Never silent."""

  SKIP = "skip"
  STOP = "stop"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Everything a run needs; saved as ``config.json`` in the work dir.

  Model: ``model`` is a preset of :data:`jqlm.models.PRESETS`; the size
  fields override it when set. ``quant`` names a QAT policy (``none``,
  ``int4`` and ``fp4`` = Stable-SPAM's recipes, ``w8a8``, ``w4a16``,
  ``hadamard``). Data: ``data`` is ``stdlib`` (the embedded corpus), local
  files or a hub name (:func:`jqlm.data.load_texts`). Batches hold
  ``batch_size`` sequences of ``seq_len`` tokens, split into ``grad_accum``
  micro-batches.
  """

  # model
  model: str = "llama_tiny"
  vocab_size: int = 2048
  hidden_size: int | None = None
  intermediate_size: int | None = None
  num_layers: int | None = None
  num_heads: int | None = None
  num_kv_heads: int | None = None
  quant: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  # data
  data: str = "stdlib"
  data_config: str | None = None
  text_field: str = "text"
  data_max_bytes: int | None = 2_000_000
  tokenizer: str | None = None
  seq_len: int = 64
  batch_size: int = 16
  grad_accum: int = 1
  # optimizer
  optimizer: OptimizerKind = OptimizerKind.STABLE_SPAM
  lr: float = 3e-3
  weight_decay: float = 0.0
  schedule: ScheduleKind = ScheduleKind.COSINE
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  grad_clip: float = 0.0
  reset_interval: int | None = None
  total_steps_scale: bool = True
  rank: int = 16
  update_proj_gap: int = 50
  galore_scale: float = 0.25
  state_quant: int = 0
  stochastic_round: bool = True
  # run
  steps: int = 200
  eval_every: int = 50
  eval_batches: int = 4
  log_every: int = 10
  ckpt_every: int = 100
  keep_checkpoints: int = 3
  seed: int = 0
  workdir: str = "runs/default"
  nan_policy: NanPolicy = NanPolicy.SKIP
  max_skip_streak: int = 20
  mesh_data: int = -1
  mesh_fsdp: int = 1
  mesh_tensor: int = 1
  mesh_devices: int | None = None
  # multi-host: set all three (or the JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables)
  coordinator: str | None = None
  num_processes: int = 1
  process_id: int = 0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      kind = _enum_of(f)
      if kind is not None and not isinstance(v, kind):
        try:
          object.__setattr__(self, f.name, kind(v))
        except ValueError:
          raise ValueError(
            f"{f.name}={v!r} is not one of "
            f"{[m.value for m in kind]}.") from None
    for name in ("steps", "seq_len", "batch_size", "grad_accum",
                 "eval_every", "log_every", "ckpt_every", "keep_checkpoints",
                 "vocab_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"grad_accum={self.grad_accum} must divide "
                       f"batch_size={self.batch_size}.")
    if self.state_quant not in (0, 4, 8):
      raise ValueError(f"state_quant must be 0 (float), 8 or 4, got "
                       f"{self.state_quant}.")
    if self.warmup_steps < 0 or (self.steps > 1
                                 and self.warmup_steps >= self.steps):
      raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, "
                       f"steps={self.steps}).")

  def replace(self, **changes) -> TrainConfig:
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d = {k: v.value if isinstance(v, enum.Enum) else v for k, v in d.items()}
    return json.dumps(d, indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> TrainConfig:
    return cls(**json.loads(text))


def _hints():
  return typing.get_type_hints(TrainConfig)


def _enum_of(field) -> type[enum.Enum] | None:
  t = _hints()[field.name]
  return t if isinstance(t, type) and issubclass(t, enum.Enum) else None


def _coerce(name: str, text: str, hint) -> Any:
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if text.lower() in ("none", "null") and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    return _coerce(name, text, inner[0])
  if hint is bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"--set {name}={text!r}: expected a bool (true/false).")
  if isinstance(hint, type) and issubclass(hint, enum.Enum):
    try:
      return hint(text)
    except ValueError:
      raise ValueError(f"--set {name}={text!r}: expected one of "
                       f"{[m.value for m in hint]}.") from None
  try:
    if hint is int:
      return int(text.replace("_", ""))
    if hint is float:
      return float(text)
  except ValueError:
    raise ValueError(f"--set {name}={text!r}: expected "
                     f"{hint.__name__}.") from None
  return text


def apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
  """``cfg`` with ``key=value`` overrides, each coerced to the field's type.

  Raises:
    ValueError: a malformed item, an unknown key (listing close matches) or
      a value of the wrong type.
  """
  hints = _hints()
  changes = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set expects key=value, got {item!r}.")
    key, value = item.split("=", 1)
    key = key.strip()
    if key not in hints:
      close = difflib.get_close_matches(key, list(hints), n=3)
      hint = f" Did you mean {', '.join(close)}?" if close else ""
      raise ValueError(f"Unknown config key {key!r}.{hint}")
    changes[key] = _coerce(key, value.strip(), hints[key])
  return cfg.replace(**changes)


def load_config(spec: str | None) -> TrainConfig:
  """A preset name of :data:`CONFIGS`, a ``.py`` file defining
  ``get_config()``, a saved ``config.json``, or ``None`` (the default)."""
  if spec is None:
    return TrainConfig()
  if spec in CONFIGS:
    return CONFIGS[spec]()
  if spec.endswith(".json") and os.path.exists(spec):
    with open(spec) as f:
      return TrainConfig.from_json(f.read())
  if spec.endswith(".py") and os.path.exists(spec):
    mod_spec = importlib.util.spec_from_file_location("jqlm_user_config", spec)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    cfg = mod.get_config()
    if not isinstance(cfg, TrainConfig):
      raise ValueError(f"{spec}: get_config() must return a TrainConfig, "
                       f"got {type(cfg).__name__}.")
    return cfg
  close = difflib.get_close_matches(spec, list(CONFIGS), n=3)
  raise ValueError(f"Unknown config {spec!r}: not a preset ({sorted(CONFIGS)}"
                   f"{'; close: ' + ', '.join(close) if close else ''}) nor "
                   "an existing .py / .json file.")


def demo_config() -> TrainConfig:
  """The README's run: a small LLaMA (4 layers, width 128) with Stable-SPAM
  and INT4 QAT on the embedded corpus; a few minutes on 2 CPU cores."""
  return TrainConfig(model="llama_tiny", hidden_size=128,
                     intermediate_size=256, num_layers=4, num_heads=4,
                     num_kv_heads=4, quant="int4", vocab_size=2048,
                     seq_len=128, batch_size=16, steps=150, lr=3e-3,
                     warmup_steps=15, eval_every=50, ckpt_every=50,
                     workdir="runs/demo")


CONFIGS = {"default": TrainConfig, "demo": demo_config}
