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
  files or a hub name (:func:`jqlm.data.load_texts`); the trained
  tokenizer and token arrays are cached in ``cache_dir`` (default
  ``workdir/cache``; runs on the same data can share one). ``tokenizer``
  is a local ``tokenizer.json`` or a hub name such as ``"t5-base"`` (the
  official runs', spec §6). Batches hold ``batch_size`` sequences of
  ``seq_len`` tokens, split into ``grad_accum`` micro-batches.

  Optimizer fields left at ``None`` take the optimizer's own (official)
  default: ``reset_interval`` (SPAM and Stable-SPAM's ΔT),
  ``reset_warmup_steps`` (SPAM's post-reset warmup N),
  ``spike_grace_steps`` (SPAM's 20 updates without clipping after each
  reset), ``spike_threshold`` (SPAM's θ), ``gamma1``/``gamma2``/``gamma3`` (Stable-SPAM's γ's, spec
  §3.3). ``total_steps_scale`` sets Stable-SPAM's ``total_T`` to
  ``steps``.
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
  eval_split: str | None = None
  tokenizer: str | None = None
  cache_dir: str | None = None
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
  reset_warmup_steps: int | None = None
  spike_grace_steps: int | None = None
  spike_threshold: float | None = None
  gamma1: float | None = None
  gamma2: float | None = None
  gamma3: float | None = None
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
    for name in ("gamma1", "gamma2", "gamma3"):
      g = getattr(self, name)
      if g is not None and not 0.0 <= g < 1.0:
        raise ValueError(f"{name}={g} must be in [0, 1) (an EMA "
                         "coefficient).")
    for name in ("reset_interval", "reset_warmup_steps", "update_proj_gap",
                 "rank"):
      v = getattr(self, name)
      if v is not None and v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}.")
    if self.spike_grace_steps is not None and self.spike_grace_steps < 0:
      raise ValueError(f"spike_grace_steps must be >= 0, got "
                       f"{self.spike_grace_steps}.")
    if self.spike_threshold is not None and self.spike_threshold <= 0:
      raise ValueError(f"spike_threshold must be > 0, got "
                       f"{self.spike_threshold}.")
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
  ``get_config()``, ``file.py:ARG`` (calls ``get_config("ARG")``, e.g.
  ``experiments/configs/galore.py:130m``), a saved ``config.json``, or
  ``None`` (the default)."""
  if spec is None:
    return TrainConfig()
  if spec in CONFIGS:
    return CONFIGS[spec]()
  if spec.endswith(".json") and os.path.exists(spec):
    with open(spec) as f:
      return TrainConfig.from_json(f.read())
  path, arg = spec, None
  if ".py:" in spec:
    path, arg = spec.rsplit(":", 1)
  if path.endswith(".py") and os.path.exists(path):
    mod_spec = importlib.util.spec_from_file_location("jqlm_user_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
      raise ValueError(f"{path} defines no get_config().")
    cfg = mod.get_config() if arg is None else mod.get_config(arg)
    if not isinstance(cfg, TrainConfig):
      raise ValueError(f"{path}: get_config() must return a TrainConfig, "
                       f"got {type(cfg).__name__}.")
    return cfg
  close = difflib.get_close_matches(spec, list(CONFIGS), n=3)
  raise ValueError(f"Unknown config {spec!r}: not a preset ({sorted(CONFIGS)}"
                   f"{'; close: ' + ', '.join(close) if close else ''}) nor "
                   "an existing .py (optionally file.py:ARG) / .json file.")


def pick(table: dict, arg: str | None, what: str):
  """``table[arg]`` for a config file's ``get_config(arg)``; a clear error
  naming the choices when ``arg`` is missing or unknown."""
  if arg not in table:
    raise ValueError(f"{what}: choose one of {sorted(table)} (as "
                     f"file.py:{next(iter(table))}), got {arg!r}.")
  return table[arg]


def official_c4(*, steps: int, model: str, grad_accum: int = 1,
                **changes) -> TrainConfig:
  """The setting every official run shares (spec §1, §6), as a base for
  ``experiments/configs``: LLaMA with the T5 tokenizer's 32000 tokens,
  C4 ``en`` streamed from the hub, 512 sequences of 256 tokens per update,
  pure bf16 (no float32 master weights), cosine to 0.1x, no weight decay,
  no clipping, evaluated on about 10M tokens of C4 validation every 1000
  updates.

  Deviations (documented in ``experiments/README.md``): sequences are
  packed from the token stream (the official code truncates and pads each
  document to 256 tokens and masks the pads); the training text is read
  once up to a byte budget of about 5 bytes per token of the run
  (``data_max_bytes``) and tokenized into a cached array.

  Args:
    steps: updates.
    model: a preset of :data:`jqlm.models.PRESETS`.
    grad_accum: micro-batches per update (choose for the memory at hand;
      the update is the same).
    **changes: the run's own fields (optimizer, lr, warmup, ...).
  """
  base = dict(model=model, vocab_size=32000, data="allenai/c4",
              data_config="en", tokenizer="t5-base", eval_split="validation",
              data_max_bytes=5 * steps * 512 * 257, seq_len=256,
              batch_size=512, grad_accum=grad_accum, dtype="bfloat16",
              param_dtype="bfloat16", schedule="cosine", min_lr_ratio=0.1,
              weight_decay=0.0, grad_clip=0.0, steps=steps,
              eval_every=1000, eval_batches=77, log_every=50,
              ckpt_every=1000, keep_checkpoints=2)
  base.update(changes)
  opt = base.get("optimizer", "run")
  base.setdefault("workdir", f"runs/{model}_{getattr(opt, 'value', opt)}")
  return TrainConfig(**base)


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
