"""The training configuration: four frozen sub-configs, validated at
construction, with dotted ``--set`` overrides and a nested ``config.json``.

A :class:`TrainConfig` holds

* ``model``: :class:`ModelConfig`: the LLaMA preset, its size overrides,
  the QAT policy, dtypes and remat;
* ``data``: :class:`DataConfig`: the text source, tokenizer, cache and the
  batch shape;
* ``optimizer``: one frozen dataclass per optimizer kind
  (:class:`AdamWConfig`, :class:`SpamConfig`, :class:`StableSpamConfig`,
  :class:`GaLoreConfig`, :class:`QGaLoreConfig`), whose defaults are that
  optimizer's official ones (spec §2-§5), plus the LR schedule and
  clipping they all share;
* ``run``: :class:`RunConfig`: steps, cadences, seed, work dir, NaN
  policy, mesh and processes.

Every field is checked when the config is built (types, ranges, enum
values, known presets and policies, and the rules that tie fields together,
such as ``grad_accum`` dividing ``batch_size``), so a typo fails before any
data is read. Each message names the field, the bad value, what is allowed
and how to fix it.

``jqlm train --set`` takes dotted keys (:func:`apply_overrides`)::

  --set optimizer.lr=1e-3 --set model.num_layers=4 --set run.steps=300
  --set optimizer=q_galore      # switch kind, with that kind's defaults

``config.json`` holds the nested form (:meth:`TrainConfig.to_json`); a flat
``config.json`` of jqlm <= 0.1 still loads (:meth:`TrainConfig.from_json`),
with a one-line notice.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import json
import logging
import math
import os
import types
import typing
from typing import Any, ClassVar

from jqlm import data as jdata
from jqlm import models, quant

_log = logging.getLogger("jqlm")


class OptimizerKind(enum.Enum):
  """Which optimizer a run uses (see :func:`jqlm.train.build_optimizer`)."""

  ADAMW = "adamw"
  SPAM = "spam"
  STABLE_SPAM = "stable_spam"
  GALORE = "galore"
  Q_GALORE = "q_galore"
  NATURAL_GALORE = "natural_galore"
  MICRO_ADAM = "micro_adam"
  APOLLO = "apollo"
  APOLLO_MINI = "apollo_mini"
  MUON = "muon"


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


class StateFormat(enum.Enum):
  """How the optimizer's moments are stored: ``float`` (the params' dtype),
  ``8bit`` or ``4bit`` block-wise (:class:`jqlm.optim.StateQuant`)."""

  FLOAT = "float"
  INT8 = "8bit"
  INT4 = "4bit"

  @property
  def bits(self) -> int | None:
    return {"float": None, "8bit": 8, "4bit": 4}[self.value]


# ---------------------------------------------------------------------------
# field checking shared by every sub-config


def _type_ok(value: Any, hint: Any) -> bool:
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return any(_type_ok(value, a) for a in typing.get_args(hint))
  if hint is type(None):
    return value is None
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(hint, type):
    return isinstance(value, hint)
  return True


def _hint_name(hint: Any) -> str:
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_hint_name(a) for a in typing.get_args(hint))
  if hint is type(None):
    return "None"
  if isinstance(hint, type) and issubclass(hint, enum.Enum):
    return "one of " + str([m.value for m in hint])
  return getattr(hint, "__name__", str(hint))


def _enum_in(hint: Any) -> type[enum.Enum] | None:
  for a in (typing.get_args(hint) or (hint,)):
    if isinstance(a, type) and issubclass(a, enum.Enum):
      return a
  return None


class _Section:
  """Base of the frozen sub-configs: coerces enum values given as strings,
  checks every field's type, then runs the subclass' ``_check``."""

  section: ClassVar[str] = ""

  def __post_init__(self):
    hints = typing.get_type_hints(type(self))
    for f in dataclasses.fields(self):
      v, hint = getattr(self, f.name), hints[f.name]
      kind = _enum_in(hint)
      if kind is not None and isinstance(v, str):
        try:
          v = kind(v)
        except ValueError:
          raise ValueError(
            f"{self.where(f.name)}={v!r} is not one of "
            f"{[m.value for m in kind]}.") from None
        object.__setattr__(self, f.name, v)
      if isinstance(v, int) and not isinstance(v, bool) and hint is float:
        object.__setattr__(self, f.name, float(v))
      if not _type_ok(v, hint):
        raise ValueError(f"{self.where(f.name)}={v!r} must be "
                         f"{_hint_name(hint)}, got {type(v).__name__}.")
      if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{self.where(f.name)}={v!r} must be a finite "
                         "number.")
    self._check()

  def _check(self) -> None:
    pass

  def where(self, name: str) -> str:
    return f"{self.section}.{name}" if self.section else name

  def require(self, name: str, ok: bool, allowed: str, fix: str = "") -> None:
    """A ValueError naming the field, its value, what is allowed and how
    to fix it, unless ``ok``."""
    if not ok:
      raise ValueError(f"{self.where(name)}={getattr(self, name)!r}: must be "
                       f"{allowed}.{' ' + fix if fix else ''}")

  def positive(self, *names: str) -> None:
    for n in names:
      v = getattr(self, n)
      if v is not None:
        self.require(n, v >= 1, ">= 1")

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      out[f.name] = v.value if isinstance(v, enum.Enum) else v
    return out


# ---------------------------------------------------------------------------
# model


def _option_value(text: str):
  """A recipe switch's value: an int, a float, a bool or the string."""
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
  """The model of a run.

  Attributes:
    preset: a name of :data:`jqlm.models.PRESETS` (``llama_60m`` ...
      ``llama_7b``, ``llama_tiny``).
    vocab_size: the embedding's rows (the tokenizer's size for a trained
      tokenizer).
    hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads:
      override the preset's sizes when set (``None`` keeps the preset's).
    quant: the QAT policy, a name of :data:`jqlm.models.POLICIES`
      (``none``; ``int4`` and ``fp4`` = Stable-SPAM's recipes; ``w8a8``,
      ``w4a16``, ``hadamard``).
    recipe: a fully quantized training recipe, ``none`` or a name of
      :data:`jqlm.quant.RECIPES` (``nvfp4``, ``mxfp8``, ``quest`` ...),
      with its default layer selection (:func:`jqlm.models.
      training_recipe`); excludes ``quant``. Other layer selections:
      build the policy in Python.
    recipe_options: the recipe's switches as ``"name=value,..."``, e.g.
      ``"hadamard_dim=64"`` for ``quest`` on a model whose widths 128 does
      not divide, ``"stochastic_rounding=false"`` for ``nvfp4`` (values
      are ints, floats, ``true``/``false`` or strings).
    late_high_precision: the final fraction of ``run.steps`` during which
      the recipe's forward GEMMs (``y = x W``) run in high precision,
      the backward's staying quantized: NVIDIA's switch to higher
      precision late in NVFP4 training (arXiv 2509.25149, App. D). The
      switch happens at step ``round(run.steps * (1 - fraction))``
      (:meth:`TrainConfig.late_switch_step`); 0 (the default) never
      switches. Needs ``recipe``.
    dtype, param_dtype: compute and storage dtypes (``float32``,
      ``bfloat16``, ``float16``).
    remat: rematerialise each block in the backward pass.
    lora_rank: train LoRA adapters of this rank on ``lora_targets`` with
      the rest of the model frozen (:mod:`jqlm.models.lora`; 0: train
      every param). The frozen base has no gradient, optimizer state or
      update (:class:`jqlm.train.TrainState` ``frozen``).
    lora_alpha: LoRA's :math:`\\alpha` (the adapters' output is scaled by
      :math:`\\alpha / r`).
    lora_targets: comma-separated ``fnmatch`` patterns of the adapted
      linears (``"layers.*.attn.q,layers.*.attn.v"``); empty: every block
      linear (QLoRA's choice).
    lora_plus_ratio: LoRA+'s :math:`\\eta_B / \\eta_A` (1: plain LoRA;
      16 in the LoRA+ paper).
    lora_base: ``none``, or the weight format of QLoRA's frozen base:
      ``nf4`` (QLoRA: 64-element blocks, :func:`jqlm.quant.QuantSpec`),
      ``int4`` (groups of 128) or ``int8`` (per channel); the block
      linears are quantized once at init and run through the
      dequantizing kernel path. Groups shrink to a power of two dividing
      every linear's input dim (:meth:`lora_base_spec`).
    scan_layers: run the blocks as one scanned, stacked block
      (:class:`jqlm.models.LlamaConfig`); ``None`` keeps the preset's
      default (on for the official presets, off for ``llama_tiny``), or
      off under a recipe that keeps some blocks in high precision
      (``nvfp4`` on 4+ blocks).
  """

  section: ClassVar[str] = "model"
  preset: str = "llama_tiny"
  vocab_size: int = 2048
  hidden_size: int | None = None
  intermediate_size: int | None = None
  num_layers: int | None = None
  num_heads: int | None = None
  num_kv_heads: int | None = None
  quant: str = "none"
  recipe: str = "none"
  recipe_options: str = ""
  late_high_precision: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  scan_layers: bool | None = None
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: str = ""
  lora_plus_ratio: float = 1.0
  lora_base: str = "none"

  def _check(self):
    self.require("lora_rank", not isinstance(self.lora_rank, bool)
                 and isinstance(self.lora_rank, int) and self.lora_rank >= 0,
                 "an int >= 0 (0: no LoRA)")
    self.require("lora_base", self.lora_base in LORA_BASES,
                 f"one of {LORA_BASES}", _close(self.lora_base, LORA_BASES))
    self.require("lora_base", self.lora_base == "none" or self.lora_rank,
                 "none without LoRA", "Set model.lora_rank too (QLoRA).")
    self.require("lora_base", self.lora_base == "none" or (
      self.quant == "none" and self.recipe == "none"),
                 "none with model.quant or model.recipe (the base is "
                 "stored quantized, not quantized-aware trained)")
    self.require("preset", self.preset in models.PRESETS,
                 f"one of {sorted(models.PRESETS)}",
                 _close(self.preset, models.PRESETS))
    self.require("quant", self.quant in models.POLICIES,
                 f"one of {sorted(models.POLICIES)}",
                 _close(self.quant, models.POLICIES))
    recipes = ("none", *quant.RECIPES)
    self.require("recipe", self.recipe in recipes, f"one of {recipes}",
                 _close(self.recipe, recipes))
    self.require("recipe", self.recipe == "none" or self.quant == "none",
                 "none while model.quant is set (a recipe quantizes the "
                 "weights itself)", "Set model.quant=none, or "
                 "model.recipe=none.")
    self.require("recipe_options", not self.recipe_options
                 or self.recipe != "none", "empty without model.recipe",
                 "Set model.recipe too, or drop model.recipe_options.")
    lhp = self.late_high_precision
    self.require("late_high_precision", not isinstance(lhp, bool) and
                 isinstance(lhp, int | float) and 0 <= lhp < 1,
                 "a fraction of run.steps in [0, 1)")
    self.require("late_high_precision", not lhp or self.recipe != "none",
                 "0 without model.recipe (it switches a recipe's forward "
                 "to high precision)", "Set model.recipe too.")
    if self.recipe != "none":
      try:
        quant.recipe(self.recipe, **self.recipe_switches())
      except (ValueError, TypeError) as e:
        raise ValueError(f"model.recipe_options: {e}") from None
    for name in ("dtype", "param_dtype"):
      self.require(name, getattr(self, name) in _DTYPES, f"one of {_DTYPES}")
    self.positive("vocab_size", "hidden_size", "intermediate_size",
                  "num_layers", "num_heads", "num_kv_heads")
    try:
      self.llama(max_seq_len=2)
    except ValueError as e:  # sizes that do not fit together
      raise ValueError(f"model: {e}") from None
    if self.lora_rank:
      try:
        self.lora()
        self.lora_base_spec()
      except ValueError as e:
        raise ValueError(f"model.lora_*: {e}") from None

  def recipe_switches(self, *, late: bool = False) -> dict:
    """``recipe_options`` parsed: ``"hadamard_dim=64,trust=false"`` ->
    ``{"hadamard_dim": 64, "trust": False}``; with ``late``, those of the
    run's last steps under ``late_high_precision`` (``x=None, w=None``: the
    forward GEMM in high precision).

    Raises:
      ValueError: an item without ``=``.
    """
    out = {}
    for item in filter(None, (s.strip() for s in
                              self.recipe_options.split(","))):
      name, eq, text = (s.strip() for s in item.partition("="))
      if not eq or not name:
        raise ValueError(
          f"{item!r} is not name=value; write e.g. "
          "model.recipe_options=hadamard_dim=64,trust=false.")
      out[name] = _option_value(text)
    if late:
      out.update(x=None, w=None)
    return out

  def lora(self) -> models.LoraConfig | None:
    """The :class:`jqlm.models.LoraConfig` (``None`` without LoRA)."""
    if not self.lora_rank:
      return None
    kw = {}
    if self.lora_targets.strip():
      kw["patterns"] = tuple(t.strip() for t in self.lora_targets.split(",")
                             if t.strip())
    return models.LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha,
                             lr_ratio=self.lora_plus_ratio, **kw)

  def lora_base_spec(self) -> quant.QuantSpec | None:
    """The weight format of QLoRA's frozen base (``None``: float): the
    format's groups (NF4: QLoRA's 64, int4: 128) along each linear's input
    dim, or the largest power of two below that dividing every block
    linear's input dim (32 on LLaMA-60M's 1376-wide MLP).

    Raises:
      ValueError: no group of 8 or more divides them.
    """
    spec = LORA_BASES_SPECS[self.lora_base]
    if spec is None or spec.granularity is not quant.Granularity.GROUP:
      return spec
    dims = {d_in for _, d_in, _ in self.llama(max_seq_len=2).linears}
    g = spec.group_size
    while g >= 8 and any(d % g for d in dims):
      g //= 2
    if g < 8:
      raise ValueError(
        f"model.lora_base={self.lora_base} quantizes in groups along each "
        f"linear's input dim, and no group of 8 or more divides all of "
        f"{sorted(dims)}; use lora_base=int8 (per output channel).")
    return dataclasses.replace(spec, group_size=g)

  def _policy(self, num_layers: int, late: bool = False):
    if self.recipe != "none":
      return models.training_recipe(self.recipe, num_layers=num_layers,
                                    **self.recipe_switches(late=late))
    return models.POLICIES[self.quant]()

  def llama(self, max_seq_len: int, *,
            late: bool = False) -> models.LlamaConfig:
    """The :class:`jqlm.models.LlamaConfig`: the preset with this config's
    overrides, holding sequences of up to ``max_seq_len`` tokens.
    ``late``: the model of the run's last steps under
    ``late_high_precision`` (the recipe's forward GEMMs unquantized)."""
    base = models.PRESETS[self.preset]()
    over = {k: getattr(self, k) for k in (
      "hidden_size", "intermediate_size", "num_layers", "num_heads",
      "num_kv_heads") if getattr(self, k) is not None}
    kw = {f.name: getattr(base, f.name)
          for f in dataclasses.fields(models.LlamaConfig)}
    if "hidden_size" in over or "num_heads" in over:
      kw["head_dim"] = None
    if "num_heads" in over and "num_kv_heads" not in over:
      kw["num_kv_heads"] = None
    kw.update(over)
    kw.update(vocab_size=self.vocab_size,
              max_seq_len=max(max_seq_len, base.max_seq_len),
              dtype=self.dtype, param_dtype=self.param_dtype,
              remat=self.remat, quant=self._policy(kw["num_layers"], late))
    if self.scan_layers is not None:
      kw["scan_layers"] = self.scan_layers
    elif self.recipe != "none" and kw["quant"] is not None and any(
        r.recipe is None for r in kw["quant"].rules):
      # the recipe keeps some blocks in high precision (NVFP4's first and
      # last): a per-layer policy, which the scanned stack cannot run
      kw["scan_layers"] = False
    return models.LlamaConfig(**kw)


_DTYPES = ("float32", "bfloat16", "float16")

# QLoRA's frozen base: NF4 in 64-element blocks (Dettmers et al. 2023; the
# double quantization of the scales is not applied), int4 groups of 128,
# int8 per output channel
LORA_BASES_SPECS = {
  "none": None,
  "nf4": quant.QuantSpec(format="nf4", granularity="group", group_size=64,
                         axis=0),
  "int4": quant.QuantSpec(format="int4", granularity="group",
                          group_size=128, axis=0),
  "int8": quant.QuantSpec(format="int8", granularity="channel"),
}
LORA_BASES = tuple(LORA_BASES_SPECS)


def _close(value: str, choices) -> str:
  close = difflib.get_close_matches(str(value), list(choices), n=3)
  return f"Did you mean {', '.join(close)}?" if close else ""


# ---------------------------------------------------------------------------
# data


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(_Section):
  """The data of a run (:func:`jqlm.train.prepare_data`).

  Attributes:
    source: ``stdlib`` (the embedded corpus; ``stdlib:lib`` and
      ``stdlib:tests`` its library modules and its tests, two
      distributions), local files or a hub dataset name
      (:func:`jqlm.data.load_texts`).
    source_config: the hub dataset's config (C4's ``"en"``).
    text_field: the text column.
    max_bytes: read at most this much text (``None``: all).
    eval_split: the hub split held out for evaluation (C4's
      ``"validation"``); ``None`` holds out the stream's last 2% (the
      embedded corpus has its own eval split).
    tokenizer: a local ``tokenizer.json`` or a hub name (``"t5-base"``,
      the official runs', spec §6); ``None`` trains a BPE tokenizer of
      ``model.vocab_size`` tokens on the data.
    cache_dir: where the tokenizer and token arrays are cached (default
      ``run.workdir/cache``; runs on the same data can share one).
    seq_len: tokens per sequence.
    batch_size: sequences per update, split into ``grad_accum``
      micro-batches.
  """

  section: ClassVar[str] = "data"
  source: str = "stdlib"
  source_config: str | None = None
  text_field: str = "text"
  max_bytes: int | None = 2_000_000
  eval_split: str | None = None
  tokenizer: str | None = None
  cache_dir: str | None = None
  seq_len: int = 64
  batch_size: int = 16
  grad_accum: int = 1

  def _check(self):
    self.positive("seq_len", "batch_size", "grad_accum", "max_bytes")
    self.require("grad_accum", self.batch_size % self.grad_accum == 0,
                 f"a divisor of data.batch_size={self.batch_size}",
                 "Choose grad_accum so that each micro-batch has the same "
                 "number of sequences.")
    local = (self.source in jdata.STDLIB_SOURCES
             or os.path.exists(self.source))
    self.require("eval_split", self.eval_split is None or not local,
                 f"None for local data (source={self.source!r})",
                 "It names a split of a hub dataset; the held-out data of "
                 "local data is the corpus' own eval split ('stdlib') or "
                 "the stream's last 2%. Unset eval_split.")


# ---------------------------------------------------------------------------
# optimizers


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig(_Section):
  """Fields every optimizer shares: the learning rate and its schedule
  (spec §1), decoupled weight decay and global-norm clipping.

  The subclasses add their optimizer's own hyper-parameters, with the
  official defaults. ``lr`` defaults to the official LLaMA-130M value of
  each method; the schedule's defaults are for short runs (the official
  warmups, 1000-2000 updates or 10%, are in ``experiments/configs``).

  Attributes:
    lr: peak learning rate.
    schedule: ``cosine`` (to ``min_lr_ratio`` x lr, spec §1) or
      ``constant``, after a linear warmup of ``warmup_steps``.
    warmup_steps: linear warmup updates (the first update has lr 0 when >
      0, as the official ``LambdaLR``).
    min_lr_ratio: the cosine's floor.
    weight_decay: decoupled weight decay.
    grad_clip: clip the global gradient norm to this (torch's
      ``clip_grad_norm_``); 0 disables it.
    component_clip: clip each param tensor's gradient norm to this
      separately (:func:`jqlm.optim.clip_by_component_norm`, Yang & Ma
      2022, which the official runs use *instead of* the global clip); 0
      disables it.
  """

  kind: ClassVar[OptimizerKind]
  section: ClassVar[str] = "optimizer"
  lr: float = 1e-3
  schedule: ScheduleKind = ScheduleKind.COSINE
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  grad_clip: float = 0.0
  component_clip: float = 0.0

  def _check(self):
    self.require("lr", self.lr > 0, "> 0")
    self.require("warmup_steps", self.warmup_steps >= 0, ">= 0")
    self.require("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
    self.require("weight_decay", self.weight_decay >= 0, ">= 0")
    self.require("grad_clip", self.grad_clip >= 0, ">= 0 (0 disables it)")
    self.require("component_clip", self.component_clip >= 0,
                 ">= 0 (0 disables it)")
    for name in ("b1", "b2", "gamma1", "gamma2", "gamma3"):
      if hasattr(self, name):
        self.require(name, 0 <= getattr(self, name) < 1,
                     "in [0, 1) (an EMA coefficient)")
    if hasattr(self, "eps"):
      self.require("eps", self.eps > 0, "> 0")

  def to_dict(self) -> dict:
    return {"kind": self.kind.value, **super().to_dict()}

  def schedule_fields(self) -> dict:
    """The fields every optimizer shares (lr, schedule, warmup, floor,
    weight decay, clipping), by name."""
    return {f.name: getattr(self, f.name)
            for f in dataclasses.fields(OptimizerConfig)}

  def with_kind(self, kind: OptimizerKind | str, **fields
                ) -> OptimizerConfig:
    """Optimizer ``kind`` with this config's shared fields
    (:meth:`schedule_fields`), its own official defaults, and ``fields``:
    the same schedule on another optimizer, carrying none of this one's
    hyper-parameters."""
    return optimizer_config(kind, **{**self.schedule_fields(), **fields})


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamWConfig(OptimizerConfig):
  """AdamW, torch-style epsilon (:func:`jqlm.optim.adamw`); ``state``
  ``8bit`` / ``4bit`` stores the moments block-wise quantized (spec §5.4)."""

  kind: ClassVar[OptimizerKind] = OptimizerKind.ADAMW
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  state: StateFormat = StateFormat.FLOAT


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpamConfig(OptimizerConfig):
  """SPAM (spec §2, :func:`jqlm.optim.spam`), official defaults: θ 5000,
  ΔT 500, post-reset warmup N 150, grace A 20, HF-style eps 1e-6, lr 8e-4
  (130M). ``density`` < 1 is SPAM's sparse momentum on the block linears
  (optimizers_more.md §4; 1.0, every official script's, is dense)."""

  kind: ClassVar[OptimizerKind] = OptimizerKind.SPAM
  lr: float = 8e-4
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  spike_threshold: float = 5000.0
  reset_interval: int = 500
  reset_warmup_steps: int = 150
  spike_grace_steps: int = 20
  density: float = 1.0
  state: StateFormat = StateFormat.FLOAT

  def _check(self):
    super()._check()
    self.require("density", 0 < self.density <= 1, "in (0, 1] (1 is dense)")
    self.positive("reset_interval", "reset_warmup_steps")
    self.require("spike_grace_steps", self.spike_grace_steps >= 0, ">= 0")
    self.require("spike_threshold", self.spike_threshold > 0, "> 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StableSpamConfig(OptimizerConfig):
  """Stable-SPAM (spec §3, :func:`jqlm.optim.stable_spam`), official
  defaults: γ1 0.7, γ2 0.9, γ3 0.999, ΔT 1000, torch-style eps 1e-8, lr
  8e-4 (130M). ``total_steps_scale`` sets its ``total_T`` to the run's
  steps (as the official scripts do); False leaves it unset."""

  kind: ClassVar[OptimizerKind] = OptimizerKind.STABLE_SPAM
  lr: float = 8e-4
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  gamma1: float = 0.7
  gamma2: float = 0.9
  gamma3: float = 0.999
  reset_interval: int = 1000
  total_steps_scale: bool = True
  state: StateFormat = StateFormat.FLOAT

  def _check(self):
    super()._check()
    self.positive("reset_interval")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaLoreConfig(OptimizerConfig):
  """GaLore (spec §4, :func:`jqlm.optim.galore`) on the block linears
  (:data:`jqlm.models.BLOCK_LINEARS`), official defaults: gap 200, scale
  0.25, HF-style Adam eps 1e-6, lr 0.01. ``rank`` has no universal
  default: 128 is the official 60M rank (256 for 130M/350M, 1024 for
  1B/7B); it must be below the smallest dimension of every block linear."""

  kind: ClassVar[OptimizerKind] = OptimizerKind.GALORE
  lr: float = 0.01
  rank: int = 128
  update_proj_gap: int = 200
  scale: float = 0.25
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  state: StateFormat = StateFormat.FLOAT

  def _check(self):
    super()._check()
    self.positive("rank", "update_proj_gap")
    self.require("scale", self.scale > 0, "> 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QGaLoreConfig(GaLoreConfig):
  """Q-GaLore (spec §5, :func:`jqlm.optim.q_galore`): GaLore with int4
  projections in groups of ``proj_group_size``, the lazy layer-adaptive
  refresh, 8-bit Adam states (β2 0.95, torch-style eps 1e-8) and int8
  weights updated by stochastic rounding (``stochastic_round``; False
  rounds to nearest), lr 0.015 (130M)."""

  kind: ClassVar[OptimizerKind] = OptimizerKind.Q_GALORE
  lr: float = 0.015
  b2: float = 0.95
  eps: float = 1e-8
  state: StateFormat = StateFormat.INT8
  stochastic_round: bool = True
  proj_bits: int = 4
  proj_group_size: int = 256
  weight_bits: int = 8
  weight_group_size: int = 256

  def _check(self):
    super()._check()
    self.positive("proj_group_size", "weight_group_size")
    for n in ("proj_bits", "weight_bits"):
      self.require(n, 2 <= getattr(self, n) <= 8, "in [2, 8]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NaturalGaLoreConfig(GaLoreConfig):
  """Natural GaLore (optimizers_more.md §3, :func:`jqlm.optim.natural_galore`):
  two-sided GaLore (r x r states) whose projected gradient is
  preconditioned by the inverse empirical Fisher of the last ``history``
  ones (Woodbury, damping λ ``damping``), official defaults: history 20,
  λ 1e-3, gap 200, scale 0.25, HF-style eps 1e-6, lr 0.01; float
  states."""

  kind: ClassVar[OptimizerKind] = OptimizerKind.NATURAL_GALORE
  history: int = 20
  damping: float = 1e-3

  def _check(self):
    super()._check()
    self.require("history", self.history >= 0, ">= 0 (0: two-sided GaLore)")
    self.require("damping", self.damping > 0, "> 0")
    self.require("state", self.state is StateFormat.FLOAT,
                 "float (Natural GaLore keeps float r x r states)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MicroAdamConfig(OptimizerConfig):
  """MicroAdam (optimizers_more.md §2, :func:`jqlm.optim.micro_adam`) on
  every param, official defaults: a window of m=10 top-k gradients at
  k_init 1% per top-k block, 4-bit error feedback in blocks of 64 (the
  Llama-2-7B script's ``quant_block_size``), eps 1e-8, weight decay before
  the step. ``block_size`` (the top-k block, GPU-dependent in the official
  code) defaults to the H100/H200 value 29056 (A100: 20864). No official
  pre-training LR exists; the fine-tuning runs use Adam's LR (4e-5), so
  ``lr`` defaults to the AdamW value 1e-3."""

  kind: ClassVar[OptimizerKind] = OptimizerKind.MICRO_ADAM
  window: int = 10
  k_init: float = 0.01
  block_size: int = 29056
  quant_block_size: int = 64
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def _check(self):
    super()._check()
    self.positive("window", "block_size", "quant_block_size")
    self.require("k_init", 0 < self.k_init <= 1, "in (0, 1]")
    self.require("quant_block_size", self.quant_block_size % 2 == 0,
                 "even (two 4-bit codes per byte)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApolloConfig(OptimizerConfig):
  """APOLLO (optimizers_more.md §1, :func:`jqlm.optim.apollo`) on the block
  linears, official defaults: channel-wise scaling, random projections
  re-drawn every ``update_proj_gap`` updates, √``scale`` 1, Fira's
  limiter, HF-style eps 1e-6, lr 0.01; ``rank`` 192 is the official
  130M script's (128 for 60M, 256 for 350M-7B). The projections draw
  from the run's seed."""

  kind: ClassVar[OptimizerKind] = OptimizerKind.APOLLO
  lr: float = 0.01
  rank: int = 192
  update_proj_gap: int = 200
  scale: float = 1.0
  scale_front: bool = False
  disable_nl: bool = False
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6

  def _check(self):
    super()._check()
    self.positive("rank", "update_proj_gap")
    self.require("scale", self.scale > 0, "> 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApolloMiniConfig(ApolloConfig):
  """APOLLO-Mini (:func:`jqlm.optim.apollo_mini`): rank 1, one tensor-wise
  factor per kernel; the official 130M script's scale 192 with
  ``scale_front`` (60M: 128 front; 350M-7B: 128, not front)."""

  kind: ClassVar[OptimizerKind] = OptimizerKind.APOLLO_MINI
  rank: int = 1
  scale: float = 192.0
  scale_front: bool = True

  def _check(self):
    super()._check()
    self.require("rank", self.rank == 1, "1 (APOLLO-Mini is rank 1; use "
                 "optimizer=apollo for higher ranks)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MuonConfig(OptimizerConfig):
  """Muon (``optax.contrib.muon``, optimizers_more.md §6.1) on the block
  linears, AdamW (optax's NAdamW, β 0.9/0.999) on the embeddings, norms
  and head; ``state`` ``8bit`` is 8-bit Muon (:func:`jqlm.optim.muon_8bit`:
  the momentum in linear int8 codes per block of 2048, arXiv 2509.23106).
  Moonlight's update scale (``consistent_rms`` 0.2: the Muon update's RMS
  matches AdamW's, so one AdamW-like lr serves both groups), momentum
  0.95 with Nesterov, Newton-Schulz 5 steps. lr 1e-3 (the LLaMA-130M
  AdamW range; Moonlight reuses the AdamW LR)."""

  kind: ClassVar[OptimizerKind] = OptimizerKind.MUON
  lr: float = 1e-3
  beta: float = 0.95
  nesterov: bool = True
  ns_steps: int = 5
  consistent_rms: float = 0.2
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  state: StateFormat = StateFormat.FLOAT

  def _check(self):
    super()._check()
    self.positive("ns_steps")
    self.require("beta", 0 <= self.beta < 1, "in [0, 1)")
    self.require("consistent_rms", self.consistent_rms >= 0,
                 ">= 0 (0: Keller's width scaling instead)")
    self.require("state", self.state is not StateFormat.INT4,
                 "float or 8bit (8-bit Muon; no 4-bit Muon is published)")


OPTIMIZERS: dict[OptimizerKind, type[OptimizerConfig]] = {
  c.kind: c for c in (AdamWConfig, SpamConfig, StableSpamConfig,
                      GaLoreConfig, QGaLoreConfig, NaturalGaLoreConfig,
                      MicroAdamConfig, ApolloConfig,
                      ApolloMiniConfig, MuonConfig)}
"""The config class of each optimizer kind."""


def optimizer_config(kind: OptimizerKind | str, **fields) -> OptimizerConfig:
  """The config of optimizer ``kind`` with ``fields`` (the rest default)."""
  try:
    kind = OptimizerKind(kind)
  except ValueError:
    raise ValueError(
      f"optimizer={kind!r} is not one of {[k.value for k in OptimizerKind]}."
      f" {_close(kind, [k.value for k in OptimizerKind])}".rstrip()
    ) from None
  cls = OPTIMIZERS[kind]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(
      f"optimizer {kind.value!r} has no field {unknown}; its fields: "
      f"{sorted(known)}. {_close(unknown[0], known)}".rstrip())
  return cls(**fields)


# ---------------------------------------------------------------------------
# run


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig(_Section):
  """How a run proceeds.

  Attributes:
    steps: updates.
    eval_every, eval_batches: held-out loss every ``eval_every`` updates,
      on ``eval_batches`` batches (each ``data.batch_size`` sequences).
    log_every: metrics every this many updates.
    ckpt_every, keep_checkpoints: checkpoint cadence and how many to keep.
    seed: init, data order and every random draw of the train step.
    workdir: the run's directory (config, metrics, checkpoints, cache).
    nan_policy: ``skip`` or ``stop`` on a non-finite loss or gradient;
      ``max_skip_streak`` consecutive skips stop the run.
    operand_stats: under a recipe (``model.recipe``), every evaluation
      also logs each GEMM operand's share of elements clipped and flushed
      to zero (:func:`jqlm.train.operand_stats`: one more forward and
      backward pass on the first held-out batch, and one more compile).
    mesh_data, mesh_fsdp, mesh_tensor: the device mesh (-1: the rest);
      ``mesh_devices`` uses only the first N devices.
    coordinator, num_processes, process_id: a multi-process run (or the
      ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
      ``JAX_PROCESS_ID`` environment variables).
    layerwise_update: update each layer as soon as its gradient exists, in
      a backward pass that runs layer by layer (GaLore's and Q-GaLore's
      per-layer weight update; :func:`jqlm.train.layerwise_train_step`):
      the full gradient never exists. Needs a scanned model
      (``model.scan_layers``) and no gradient accumulation; global-norm
      clipping needs ``layerwise_norm_pass``.
    init_from: start from pretrained weights instead of a random init: a
      local Hugging Face LLaMA directory (``config.json`` +
      safetensors) or a jqlm run's work dir (its newest checkpoint's
      params). The model section must describe the same shapes (for an
      HF model: its preset or sizes, and ``vocab_size`` with
      ``data.tokenizer`` its ``tokenizer.json``); a mismatch is an error
      naming the param. Fine-tuning with any optimizer, recipe or LoRA
      setting (LoRA's adapters start fresh). Ignored when the run resumes
      from its own checkpoint.
    layerwise_norm_pass: with ``layerwise_update``, first a backward pass
      that computes the global gradient norm (one layer's gradient at a
      time), then the updating pass: the exact NaN policy (a non-finite
      loss or gradient norm changes nothing) and ``optimizer.grad_clip``,
      for a second backward pass of compute.
  """

  section: ClassVar[str] = "run"
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
  operand_stats: bool = True
  mesh_data: int = -1
  mesh_fsdp: int = 1
  mesh_tensor: int = 1
  mesh_devices: int | None = None
  coordinator: str | None = None
  num_processes: int = 1
  process_id: int = 0
  layerwise_update: bool = False
  layerwise_norm_pass: bool = False
  init_from: str | None = None

  def _check(self):
    self.positive("steps", "eval_every", "eval_batches", "log_every",
                  "ckpt_every", "keep_checkpoints", "max_skip_streak",
                  "mesh_fsdp", "mesh_tensor", "mesh_devices",
                  "num_processes")
    self.require("mesh_data", self.mesh_data == -1 or self.mesh_data >= 1,
                 ">= 1 or -1 (the remaining devices)")
    self.require("process_id", 0 <= self.process_id < self.num_processes,
                 f"in [0, num_processes={self.num_processes})")
    self.require("coordinator", self.num_processes == 1 or bool(
      self.coordinator), "host:port when num_processes > 1")
    self.require("workdir", bool(self.workdir.strip()),
                 "a directory path", "e.g. run.workdir=runs/my_run.")


# ---------------------------------------------------------------------------
# the whole config


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "run": RunConfig}


@dataclasses.dataclass(frozen=True, kw_only=True, init=False)
class TrainConfig:
  """Everything a run needs, as four frozen sub-configs; saved as
  ``config.json`` in the work dir.

  Sub-configs may be given as dicts (``model={"preset": "llama_60m"}``)
  and the optimizer as a kind name (``optimizer="galore"``: that kind's
  defaults) or a dict with a ``kind`` key.

  Examples:
    >>> cfg = TrainConfig(optimizer=SpamConfig(lr=4e-4),
    ...                   run=RunConfig(steps=100))
    >>> cfg = cfg.replace(optimizer={"lr": 1e-3}, run={"workdir": "r"})
    >>> cfg.optimizer.lr, cfg.run.steps
    (0.001, 100)
  """

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(
    default_factory=StableSpamConfig)
  run: RunConfig = dataclasses.field(default_factory=RunConfig)

  def __init__(self, *, model=None, data=None, optimizer=None, run=None,
               **unknown):
    if unknown:
      hints = []
      for k in unknown:
        home = _flat_home(k)
        sec, field = home.split(".") if home else ("", "")
        hints.append(f"{k!r} (it is {home}: set it with TrainConfig()."
                     f"replace({sec}={{{field!r}: ...}}))" if home
                     else f"{k!r}")
      raise ValueError(
        f"TrainConfig has no field {', '.join(hints)}; its sections are "
        "model, data, optimizer and run, each a config or a dict of its "
        "fields.")
    object.__setattr__(self, "model", ModelConfig() if model is None
                       else model)
    object.__setattr__(self, "data", DataConfig() if data is None else data)
    object.__setattr__(self, "optimizer", StableSpamConfig()
                       if optimizer is None else optimizer)
    object.__setattr__(self, "run", RunConfig() if run is None else run)
    self.__post_init__()

  def __post_init__(self):
    for name, cls in _SECTIONS.items():
      v = getattr(self, name)
      if isinstance(v, dict):
        object.__setattr__(self, name, _build(cls, v, name))
      elif not isinstance(v, cls):
        raise ValueError(f"{name} must be a {cls.__name__} (or a dict of "
                         f"its fields), got {type(v).__name__}.")
    opt = self.optimizer
    if isinstance(opt, (str, OptimizerKind)):
      object.__setattr__(self, "optimizer", optimizer_config(opt))
    elif isinstance(opt, dict):
      if "kind" not in opt:
        raise ValueError("optimizer as a dict needs a 'kind' key, one of "
                         f"{[k.value for k in OptimizerKind]}.")
      rest = {k: v for k, v in opt.items() if k != "kind"}
      object.__setattr__(self, "optimizer", optimizer_config(opt["kind"],
                                                             **rest))
    elif not isinstance(opt, OptimizerConfig):
      raise ValueError(
        f"optimizer must be an optimizer config ({', '.join(c.__name__ for c in OPTIMIZERS.values())}), "
        f"a kind name or a dict, got {type(opt).__name__}.")
    self._check()

  def _check(self):
    o, r = self.optimizer, self.run
    if not (o.warmup_steps == 0 or r.steps == 1 or o.warmup_steps < r.steps):
      raise ValueError(
        f"optimizer.warmup_steps={o.warmup_steps} must be below "
        f"run.steps={r.steps}. Shorten the warmup or run longer.")
    if self.model.lora_rank and r.layerwise_update:
      raise ValueError(
        "model.lora_rank > 0 trains the adapters only; the layer-wise "
        "update is for full-rank training. Set run.layerwise_update=false.")
    if self.model.lora_rank and o.kind is OptimizerKind.Q_GALORE:
      raise ValueError(
        "Q-GaLore quantizes the trained weights itself; it does not train "
        "LoRA adapters. Use model.lora_rank=0 with optimizer q_galore (its "
        "fine-tuning arm), or another optimizer for the adapters.")
    if r.layerwise_norm_pass and not r.layerwise_update:
      raise ValueError(
        "run.layerwise_norm_pass=true is a mode of the layer-wise update; "
        "set run.layerwise_update=true as well (or drop the norm pass).")
    if r.layerwise_update:
      if not self.model.llama(max_seq_len=2).scan_layers:
        raise ValueError(
          "run.layerwise_update=true runs the backward pass layer by layer "
          f"over a scanned layer stack, but model {self.model.preset} is "
          "unrolled. Set model.scan_layers=true.")
      if o.grad_clip > 0 and not r.layerwise_norm_pass:
        raise ValueError(
          f"run.layerwise_update=true cannot clip the global gradient norm "
          f"(optimizer.grad_clip={o.grad_clip}): each layer is updated "
          "before the next layer's gradient exists, so the global norm is "
          "known only after every update. Set run.layerwise_norm_pass=true "
          "(a first backward pass computes the norm), "
          "optimizer.grad_clip=0 or run.layerwise_update=false.")
      if self.data.grad_accum > 1:
        raise ValueError(
          f"run.layerwise_update=true cannot accumulate gradients "
          f"(data.grad_accum={self.data.grad_accum}): it updates each layer "
          "from one backward pass and keeps no gradient. Set "
          "data.grad_accum=1 or run.layerwise_update=false.")
    if self.model.recipe != "none":
      self._check_recipe_tokens()
    if isinstance(o, (GaLoreConfig, ApolloConfig)):
      llama = self.model.llama(max_seq_len=2)
      dims = {"hidden_size": llama.hidden_size,
              "intermediate_size": llama.intermediate_size,
              "num_heads * head_dim": llama.num_heads * llama.head_dim,
              "num_kv_heads * head_dim": llama.num_kv_heads * llama.head_dim}
      name, small = min(dims.items(), key=lambda kv: kv[1])
      if o.rank >= small:
        raise ValueError(
          f"optimizer.rank={o.rank} must be below the smallest dimension of "
          f"every block linear; model {self.model.preset} has {name}="
          f"{small}. Set optimizer.rank below {small} (the official ranks "
          "are 128-1024 for LLaMA-60M-7B).")
      if isinstance(o, QGaLoreConfig):
        _check_q_galore_groups(o, llama)

  def late_switch_step(self) -> int | None:
    """The step from which the forward GEMMs run in high precision
    (``model.late_high_precision``), or None: steps ``s >= late_switch_step``
    (counting from 0) use the late model."""
    frac = self.model.late_high_precision
    if not frac:
      return None
    return int(round(self.run.steps * (1 - frac)))

  def _check_recipe_tokens(self) -> None:
    """A recipe's wgrad GEMM contracts over the tokens of a micro-batch
    (``batch_size // grad_accum * seq_len``): its blocks (32 for MX, 16 for
    NVFP4) and Hadamard blocks must divide that count. Checked here so a
    misfit fails before the step compiles (the widths are checked by
    :class:`jqlm.models.LlamaConfig`)."""
    d = self.data
    tokens = d.batch_size // d.grad_accum * d.seq_len
    r = quant.recipe(self.model.recipe, **self.model.recipe_switches())
    wide = 1 << 16  # fits every block and rotation: only the tokens count
    try:
      quant.check_shapes(r, tokens, wide, wide)
    except ValueError as e:
      raise ValueError(
        f"data: a micro-batch of data.batch_size // data.grad_accum * "
        f"data.seq_len = {d.batch_size} // {d.grad_accum} * {d.seq_len} = "
        f"{tokens} tokens does not fit model.recipe={self.model.recipe}: "
        f"{e.args[0].split(' Pad it')[0]} Choose a batch_size or seq_len "
        "that makes the count a multiple of it.") from None

  # -- construction helpers --------------------------------------------------

  def replace(self, **changes) -> TrainConfig:
    """A copy with sub-configs replaced: a sub-config object replaces it,
    a dict updates some of its fields (``run={"steps": 10}``), a kind name
    switches the optimizer to that kind's defaults."""
    out = {}
    for name, v in changes.items():
      if name not in ("model", "data", "optimizer", "run"):
        raise ValueError(f"TrainConfig has no section {name!r}; sections: "
                         "model, data, optimizer, run (set a field with "
                         f"{name.split('.')[0]}={{...}} or "
                         "apply_overrides(cfg, ['section.field=value'])).")
      cur = getattr(self, name)
      opt = name == "optimizer"
      if isinstance(v, dict) and (
          not opt or OptimizerKind(v.get("kind", cur.kind)) is cur.kind):
        fields = {k: x for k, x in v.items() if not (opt and k == "kind")}
        _check_keys(name, type(cur), fields)
        v = cur.replace(**fields)
      # a kind name or a dict of another kind is built by __post_init__
      out[name] = v
    return dataclasses.replace(self, **out)

  def to_dict(self) -> dict:
    return {name: getattr(self, name).to_dict()
            for name in ("model", "data", "optimizer", "run")}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> TrainConfig:
    """From :meth:`to_dict`'s nested form, or the flat form of jqlm <= 0.1
    (converted, with a one-line notice)."""
    if not set(d) <= {"model", "data", "optimizer", "run"}:
      _log.warning("jqlm: converting a flat config of jqlm <= 0.1 to the "
                   "nested form (model, data, optimizer, run).")
      d = from_flat(d)
    model = d.get("model")
    if isinstance(model, dict) and "remat" in model and (
        "scan_layers" not in model):
      # a config saved before scan_layers existed (to_dict writes every
      # field): its run, and its checkpoints, are unrolled
      d = {**d, "model": {**model, "scan_layers": False}}
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> TrainConfig:
    """From :meth:`to_json`'s text (or a flat config of jqlm <= 0.1).

    Raises:
      ValueError: text that is not a JSON object, or invalid fields.
    """
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"A jqlm config must be JSON; this text is not "
                       f"({e}).") from None
    if not isinstance(d, dict):
      raise ValueError(f"A jqlm config must be a JSON object of sections "
                       f"(model, data, optimizer, run), got "
                       f"{type(d).__name__}.")
    return cls.from_dict(d)


def _check_q_galore_groups(o: QGaLoreConfig, llama) -> None:
  """Q-GaLore's int8 weights are quantized in groups of
  ``weight_group_size`` over each block kernel, and its int4 projections
  (``min(in, out) x rank`` for the default projection side) in groups of
  ``proj_group_size``: both must divide. The block kernels' shapes follow
  from the sizes (q, k, v, o, gate, up, down; :data:`jqlm.models.
  BLOCK_LINEARS`), so no model is built."""
  d, f = llama.hidden_size, llama.intermediate_size
  qd = llama.num_heads * llama.head_dim
  kvd = llama.num_kv_heads * llama.head_dim
  shapes = {(d, qd), (d, kvd), (qd, d), (d, f), (f, d)}
  for shape in sorted(shapes):
    size = shape[0] * shape[1]
    if size % o.weight_group_size:
      raise ValueError(
        f"optimizer.weight_group_size={o.weight_group_size} must divide the "
        f"size {size} of every block kernel; the model has a kernel of "
        f"shape {shape}. Use a divisor of {size}, such as 64 or 256 (the "
        "official value).")
    proj = min(shape) * o.rank
    if proj % o.proj_group_size:
      raise ValueError(
        f"optimizer.proj_group_size={o.proj_group_size} must divide the "
        f"size {proj} of every int4 projection (rank {o.rank} x "
        f"{min(shape)} for the kernel of shape {shape}). Use a divisor of "
        f"{proj}, e.g. 64.")


def _check_keys(section: str, cls: type, changes: dict) -> None:
  """A ValueError listing the section's valid keys for a key of
  ``changes`` that is not a field of ``cls``."""
  known = [f.name for f in dataclasses.fields(cls)]
  for k in changes:
    if k not in known:
      what = (f"optimizer {cls.kind.value!r}" if section == "optimizer"
              else section)
      raise ValueError(
        f"{what} has no field {k!r}. {_close(k, known)} Valid keys: "
        f"{', '.join(f'{section}.{n}' for n in known)}.")


def _build(cls, d: dict, section: str):
  _check_keys(section, cls, d)
  return cls(**d)


# ---------------------------------------------------------------------------
# the flat config.json of jqlm <= 0.1

_FLAT_RENAMES = {
  "model": {"model": "preset"},
  "data": {"data": "source", "data_config": "source_config",
           "data_max_bytes": "max_bytes"},
  "optimizer": {"galore_scale": "scale"},
}
_FLAT_OPT_NONE_DEFAULT = ("reset_interval", "reset_warmup_steps",
                          "spike_grace_steps", "spike_threshold", "gamma1",
                          "gamma2", "gamma3")


def from_flat(flat: dict) -> dict:
  """The nested form of a flat ``config.json`` written by jqlm <= 0.1.

  Optimizer fields that were ``None`` (= the optimizer's default) take the
  new config's defaults, which are the same official values; fields that
  do not belong to the run's optimizer kind are dropped; ``state_quant``
  0 becomes ``state="float"`` (``8bit`` for Q-GaLore, which it meant
  there), 8 ``8bit`` and 4 ``4bit``.
  """
  flat = dict(flat)
  out: dict[str, dict] = {"model": {}, "data": {}, "run": {}}
  for section in ("model", "data", "run"):
    cls = _SECTIONS[section]
    names = {f.name for f in dataclasses.fields(cls)}
    renames = _FLAT_RENAMES.get(section, {})
    for old, new in renames.items():
      if old in flat:
        out[section][new] = flat.pop(old)
    for n in list(flat):
      if n in names:
        out[section][n] = flat.pop(n)
  kind = OptimizerKind(flat.pop("optimizer", "stable_spam"))
  cls = OPTIMIZERS[kind]
  names = {f.name for f in dataclasses.fields(cls)}
  opt: dict[str, Any] = {}
  for old, new in _FLAT_RENAMES["optimizer"].items():
    if old in flat:
      flat[new] = flat.pop(old)
  sq = flat.pop("state_quant", 0)
  if "state" in names:
    opt["state"] = {0: StateFormat.INT8 if kind is OptimizerKind.Q_GALORE
                    else StateFormat.FLOAT, 8: StateFormat.INT8,
                    4: StateFormat.INT4}[sq].value
  for n, v in flat.items():
    if n in names and not (n in _FLAT_OPT_NONE_DEFAULT and v is None):
      opt[n] = v
  if kind is OptimizerKind.Q_GALORE:
    # jqlm <= 0.1 chose 256 unless rank * 64 was not a multiple of it
    opt["proj_group_size"] = 256 if opt.get("rank", 16) * 64 % 256 == 0 \
      else 64
  out["optimizer"] = {"kind": kind.value, **opt}
  return out


# ---------------------------------------------------------------------------
# --set overrides


def _coerce(key: str, text: str, hint) -> Any:
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    if text.lower() in ("none", "null") and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    return _coerce(key, text, inner[0])
  if hint is bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"--set {key}={text!r}: expected a bool (true/false).")
  if isinstance(hint, type) and issubclass(hint, enum.Enum):
    try:
      return hint(text)
    except ValueError:
      raise ValueError(f"--set {key}={text!r}: expected one of "
                       f"{[m.value for m in hint]}.") from None
  try:
    if hint is int:
      return int(text.replace("_", ""))
    if hint is float:
      return float(text)
  except ValueError:
    raise ValueError(f"--set {key}={text!r}: expected "
                     f"{hint.__name__}.") from None
  return text


def apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
  """``cfg`` with ``section.field=value`` overrides applied in order, each
  value coerced to the field's type; ``optimizer=KIND`` switches the
  optimizer to that kind's defaults (later ``optimizer.*`` items apply to
  it). The result is validated once, after every item is applied (so
  ``optimizer=galore optimizer.rank=32`` never builds the default rank).

  Raises:
    ValueError: a malformed item, an unknown section or key (listing the
      section's valid keys), or a value of the wrong type or range.
  """
  d = cfg.to_dict()
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set expects section.field=value (e.g. "
                       f"optimizer.lr=1e-3), got {item!r}.")
    key, value = (s.strip() for s in item.split("=", 1))
    if key == "optimizer":
      d["optimizer"] = {"kind": optimizer_config(value).kind.value}
      continue
    section, _, name = key.partition(".")
    if section not in ("model", "data", "optimizer", "run") or not name:
      flat = _flat_home(key)
      raise ValueError(
        f"Unknown config key {key!r}: keys are section.field with section "
        "model, data, optimizer or run"
        + (f"; did you mean {flat}?" if flat else ".")
        + " (optimizer=KIND switches the optimizer.)")
    if key == "optimizer.kind":
      raise ValueError(
        f"--set optimizer.kind={value}: switch the optimizer with --set "
        f"optimizer={value} (that kind's official defaults; later "
        "optimizer.* items apply to it).")
    cls = (OPTIMIZERS[OptimizerKind(d["optimizer"]["kind"])]
           if section == "optimizer" else _SECTIONS[section])
    hints = typing.get_type_hints(cls)
    _check_keys(section, cls, {name: None})
    d[section][name] = _coerce(key, value, hints[name])
  return TrainConfig(**d)


def _flat_home(name: str) -> str | None:
  """Where a flat (jqlm <= 0.1) key lives now: ``lr`` -> ``optimizer.lr``."""
  for section, renames in _FLAT_RENAMES.items():
    if name in renames:
      return f"{section}.{renames[name]}"
  for section, cls in {**_SECTIONS, "optimizer": QGaLoreConfig}.items():
    if name in {f.name for f in dataclasses.fields(cls)}:
      return f"{section}.{name}"
  for cls in OPTIMIZERS.values():
    if name in {f.name for f in dataclasses.fields(cls)}:
      return f"optimizer.{name}"
  return None


def read_config(path: str) -> TrainConfig:
  """The config saved in ``path`` (a run's ``config.json``).

  Raises:
    ValueError: the file is not a valid config (the message names it).
  """
  with open(path) as f:
    text = f.read()
  try:
    return TrainConfig.from_json(text)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def load_python_file(path: str, name: str) -> types.ModuleType:
  """Runs a user's ``.py`` file (a config or suite) as module ``name``. A
  syntax error in it is a ValueError naming the file, line and text (the
  CLI prints it in one line); other errors its code raises propagate."""
  mod_spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(mod)
  except SyntaxError as e:
    text = (e.text or "").strip()
    raise ValueError(f"{path}, line {e.lineno}: {e.msg}"
                     + (f": {text!r}" if text else "")
                     + ". Fix the Python file.") from None
  return mod


def load_config(spec: str | None) -> TrainConfig:
  """A preset name of :data:`jqlm.train.CONFIGS`, a ``.py`` file defining
  ``get_config()``, ``file.py:ARG`` (calls ``get_config("ARG")``, e.g.
  ``experiments/configs/galore.py:130m``), a saved ``config.json`` (nested,
  or flat from jqlm <= 0.1), or ``None`` (the default)."""
  from jqlm.train.presets import CONFIGS  # noqa: PLC0415

  if spec is None:
    return TrainConfig()
  if spec in CONFIGS:
    return CONFIGS[spec]()
  if spec.endswith(".json") and os.path.exists(spec):
    return read_config(spec)
  path, arg = spec, None
  if ".py:" in spec:
    path, arg = spec.rsplit(":", 1)
  if path.endswith(".py") and os.path.exists(path):
    mod = load_python_file(path, "jqlm_user_config")
    if not hasattr(mod, "get_config"):
      raise ValueError(f"{path} defines no get_config().")
    cfg = mod.get_config() if arg is None else mod.get_config(arg)
    if not isinstance(cfg, TrainConfig):
      raise ValueError(f"{path}: get_config() must return a TrainConfig, "
                       f"got {type(cfg).__name__}.")
    return cfg
  raise ValueError(f"Unknown config {spec!r}: not a preset ({sorted(CONFIGS)}"
                   f"; {_close(spec, CONFIGS) or 'no close match'}) nor an "
                   "existing .py (optionally file.py:ARG) / .json file.")
