"""Comparison suites: :class:`Arm` s of full configs trained on the same
data, seeds and token budget, and the built-in CPU-scale :data:`SUITES`.

The built-in suites are the seed papers' comparisons scaled down to a 2-core
CPU by :func:`scale_down`: the official hyper-parameters (spec §2.5, §3.3,
§4.4, §5.5) on 1000 steps of a 2-layer width-128 LLaMA on the embedded
corpus. ``experiments/suites/`` holds the same comparisons at the papers'
scale (LLaMA-130M/350M on C4). Each arm is built from its own optimizer's
config: no arm carries (or nulls out) another optimizer's fields.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from jqlm.train.config import (
  AdamWConfig,
  ApolloConfig,
  ApolloMiniConfig,
  GaLoreConfig,
  MicroAdamConfig,
  MuonConfig,
  NaturalGaLoreConfig,
  QGaLoreConfig,
  SpamConfig,
  StableSpamConfig,
  TrainConfig,
  load_python_file,
)

CPU_MODEL = dict(preset="llama_tiny", hidden_size=128, intermediate_size=256,
                 num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=2048,
                 dtype="float32", param_dtype="float32", remat=False)
"""The scaled-down model (``model`` fields): LLaMA with 2 layers of width
128 (0.85M params, of which 0.33M in the attention and MLP linears),
float32 (XLA:CPU has no fast bf16 matmul)."""

CPU_DATA = dict(source="stdlib", source_config=None, max_bytes=6_000_000,
                tokenizer=None, eval_split=None, seq_len=64, batch_size=16,
                grad_accum=1)
"""The scaled-down data (``data`` fields): 16 sequences of 64 tokens per
update from the embedded corpus (6 MB of it: 1000 updates see each token
about once)."""


def rescale_steps(cfg: TrainConfig, steps: int) -> TrainConfig:
  """``cfg`` run for ``steps`` updates, its LR warmup scaled by ``steps /
  run.steps`` so that the schedule keeps its shape (Stable-SPAM's
  ``total_T`` follows ``steps``).

  The optimizers' own step constants are kept: SPAM and Stable-SPAM's
  reset interval ΔT, SPAM's post-reset warmup N and grace period A, and
  GaLore's projection gap. Their effect depends on Adam's β2 time scale
  (1000 updates at 0.999), which does not shrink with the run: SPAM
  compressed 20x (ΔT 25, N 8) resets its moments before they average over
  enough steps, and its first full-size post-reset updates are several
  times larger than in the official run.

  Raises:
    ValueError: ``steps`` < 2.
  """
  if steps < 2:
    raise ValueError(f"steps must be >= 2 to rescale a run, got {steps}.")
  warmup = int(round(cfg.optimizer.warmup_steps * steps / cfg.run.steps))
  return cfg.replace(run={"steps": steps},
                     optimizer={"warmup_steps": min(warmup, steps - 1)})


def scale_down(cfg: TrainConfig, *, steps: int = 1000,
               lr_factor: float = 4.0) -> TrainConfig:
  """An official config shrunk to run on a 2-core CPU in about a minute
  and a half, keeping what the comparison is about.

  Kept: the optimizer, its non-step hyper-parameters (γ's, θ, GaLore
  scale, state format, stochastic rounding), QAT policy, LR schedule
  shape, weight decay and gradient clipping. Changed:

  * model and data: :data:`CPU_MODEL`, :data:`CPU_DATA`;
  * the run length: ``steps`` updates, the LR warmup in proportion
    (:func:`rescale_steps`; the optimizers' ΔT, N, A and projection gap
    keep their official values, so 1000 steps see one SPAM / Stable-SPAM
    momentum reset at update 500 and five GaLore projection refreshes);
  * GaLore's (Q-GaLore's, Natural GaLore's, APOLLO's) rank: in proportion
    to the width (multiple of 8, at least 8; APOLLO-Mini stays rank 1);
  * the learning rate: times ``lr_factor``. The default 4 was chosen once,
    before any comparison ran, as the best of 1, 4, 8 and 16 for AdamW at
    lr 4e-4 on this model (held-out loss 4.97, 4.17, 4.25, 4.42 after 400
    steps of a first draft of these settings); every arm of every suite
    gets the same factor, so the arms' LRs keep the papers' ratios.
  """
  opt = cfg.optimizer
  changes = {"lr": opt.lr * lr_factor}
  if isinstance(opt, GaLoreConfig) or type(opt) is ApolloConfig:
    width = cfg.model.llama(max_seq_len=2).hidden_size
    changes["rank"] = max(8, int(round(opt.rank * CPU_MODEL["hidden_size"]
                                       / width / 8)) * 8)
  # one replace: the official rank only fits the scaled-down model once
  # the model is scaled down too
  out = cfg.replace(model={**CPU_MODEL}, data={**CPU_DATA},
                    optimizer=opt.replace(**changes),
                    run={"eval_batches": 16, "keep_checkpoints": 1})
  return _run_settings(rescale_steps(out, steps))


def _run_settings(cfg: TrainConfig) -> TrainConfig:
  """Logging and evaluation often enough for curves (about 80 logged
  points, 40 evaluations), one checkpoint at the end. (:func:`scale_down`
  evaluates on 16 batches: 16K held-out tokens, the same for every seed.)"""
  steps = cfg.run.steps
  return cfg.replace(run={"log_every": max(1, steps // 80),
                          "eval_every": max(1, steps // 40),
                          "ckpt_every": steps})


@dataclasses.dataclass(frozen=True)
class Arm:
  """One side of a comparison: a name (a directory name too) and the full
  config it trains with (its ``seed`` and ``workdir`` are set per run)."""

  name: str
  config: TrainConfig

  def __post_init__(self):
    if not self.name or any(c in self.name for c in "/\\ "):
      raise ValueError(f"Arm name {self.name!r} must be non-empty without "
                       "spaces or slashes (it names a directory).")
    if not isinstance(self.config, TrainConfig):
      raise TypeError(f"Arm {self.name!r}: config must be a TrainConfig, "
                      f"got {type(self.config).__name__}.")


@dataclasses.dataclass(frozen=True)
class Suite:
  """A comparison: arms trained on the same data, seeds and token budget.

  Attributes:
    name: short name (the default output directory).
    title: one line saying what is compared.
    arms: the arms, in table order.
    seeds: seeds run for every arm (init, data order and rounding keys).
    target: the arm whose final held-out loss the others race to (steps to
      reach it are reported), or None.
    reference: the arm that loss differences are taken against, or None.
    note: how the suite maps to the paper's setting.
    memory: arm name -> the ``jqlm bench memory`` recipe (a key of
      :func:`jqlm.bench.memory_recipes`) whose params + optimizer state at
      LLaMA-7B the report sets against the arm's loss (a Pareto table and
      plot); ``None`` for suites that do not compare memory.
    step_memory: set each arm's loss against the peak memory of its own
      compiled train step (:func:`jqlm.train.plan.step_memory`, from
      abstract inputs), in a Pareto table and plot.
    pretrain: a run trained once (seed of its config, in
      ``out_dir/pretrain``) before the arms, which all start from it
      (``run.init_from``) and use its tokenizer (``data.tokenizer``):
      a fine-tuning comparison.
  """

  name: str
  title: str
  arms: tuple[Arm, ...]
  seeds: tuple[int, ...] = (0, 1, 2)
  target: str | None = None
  reference: str | None = None
  note: str = ""
  memory: dict[str, str] | None = None
  step_memory: bool = False
  pretrain: Arm | None = None

  def __post_init__(self):
    object.__setattr__(self, "arms", tuple(self.arms))
    object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
    names = [a.name for a in self.arms]
    if not names:
      raise ValueError(f"Suite {self.name!r} has no arms.")
    if len(set(names)) != len(names):
      raise ValueError(f"Suite {self.name!r}: arm names repeat: {names}.")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"Suite {self.name!r}: seeds must be distinct and "
                       f"non-empty, got {self.seeds}.")
    if self.memory is not None:
      extra = sorted(set(self.memory) - set(names))
      if extra:
        raise ValueError(f"Suite {self.name!r}: memory names {extra}, "
                         f"which are not arms ({names}).")
    for field in ("target", "reference"):
      v = getattr(self, field)
      if v is not None and v not in names:
        raise ValueError(f"Suite {self.name!r}: {field}={v!r} is not an "
                         f"arm ({names}).")
    budgets = {a.name: (a.config.run.steps, a.config.data.batch_size,
                        a.config.data.seq_len) for a in self.arms}
    if len(set(budgets.values())) != 1:
      raise ValueError(
        f"Suite {self.name!r}: the arms must share steps, batch_size and "
        f"seq_len (one token budget); got {budgets}.")

  def arm(self, name: str) -> Arm:
    for a in self.arms:
      if a.name == name:
        return a
    raise KeyError(f"No arm {name!r} in suite {self.name!r}; arms: "
                   f"{[a.name for a in self.arms]}.")

  def with_steps(self, steps: int) -> Suite:
    """Every arm run for ``steps`` updates (:func:`rescale_steps`),
    logging and evaluation rescaled too."""
    return dataclasses.replace(self, arms=tuple(
      Arm(a.name, _run_settings(rescale_steps(a.config, steps)))
      for a in self.arms))

  def select(self, names: Sequence[str]) -> Suite:
    """The suite restricted to the arms ``names`` (in the suite's order);
    ``target`` / ``reference`` become None when left out.

    Raises:
      ValueError: a name that is not an arm.
    """
    have = [a.name for a in self.arms]
    unknown = [n for n in names if n not in have]
    if unknown:
      raise ValueError(f"{unknown} not in suite {self.name!r} (arms: "
                       f"{have}).")
    keep = set(names)
    return dataclasses.replace(
      self, arms=tuple(a for a in self.arms if a.name in keep),
      target=self.target if self.target in keep else None,
      reference=self.reference if self.reference in keep else None,
      memory=None if self.memory is None else {
        k: v for k, v in self.memory.items() if k in keep})

  def with_seeds(self, seeds: Sequence[int]) -> Suite:
    return dataclasses.replace(self, seeds=tuple(seeds))

  def with_overrides(self, **changes) -> Suite:
    """Every arm's config with ``changes``, as
    :meth:`jqlm.train.TrainConfig.replace` takes them (e.g.
    ``model={"num_layers": 4}``)."""
    return dataclasses.replace(self, arms=tuple(
      Arm(a.name, a.config.replace(**changes)) for a in self.arms))


# ---------------------------------------------------------------------------
# the built-in, CPU-sized suites

def _official(preset: str) -> TrainConfig:
  """The paper-scale base of the CPU suites: ``preset`` with the T5 vocab
  (its width sets the GaLore rank's scaling), 20K steps."""
  return TrainConfig(model={"preset": preset, "vocab_size": 32000},
                     optimizer=AdamWConfig(warmup_steps=2000),
                     run={"steps": 20_000})


def stable_spam_suite() -> Suite:
  """Stable-SPAM's 4-bit setting (spec §3.3, arXiv 2502.17055), scaled
  down: Adam in float and INT4 QAT, SPAM INT4, Stable-SPAM INT4 and FP4.

  Every arm has the official INT4/FP4 run's settings (LLaMA-350M, lr 4e-4,
  warmup 2000 of 20K steps, no clipping); Stable-SPAM adds γ 0.7/0.9/0.999,
  ΔT 500, total_T = steps; SPAM its official θ 5000, ΔT 500, N 150. The
  Adam arms use the same lr (the paper compares at one lr).
  """
  base = _official("llama_350m")
  sched = dict(lr=4e-4, warmup_steps=2000, weight_decay=0.0)
  adam = AdamWConfig(**sched)
  spam = SpamConfig(**sched, reset_interval=500, reset_warmup_steps=150,
                    spike_grace_steps=20, spike_threshold=5000.0)
  stable = StableSpamConfig(**sched, gamma1=0.7, gamma2=0.9, gamma3=0.999,
                            reset_interval=500)

  def arm(name, opt, quant):
    return Arm(name, scale_down(base.replace(optimizer=opt,
                                             model={"quant": quant})))

  return Suite(
    name="stable_spam", title="Stable-SPAM's 4-bit setting, CPU scale",
    arms=(arm("adam_bf16", adam, "none"), arm("adam_int4", adam, "int4"),
          arm("spam_int4", spam, "int4"),
          arm("stable_spam_int4", stable, "int4"),
          arm("stable_spam_fp4", stable, "fp4")),
    target="adam_int4", reference="adam_bf16",
    note="Scaled down from the official INT4/FP4 LLaMA-350M runs (spec "
    "§3.3) by `jqlm.train.compare.scale_down`. `adam_bf16` trains in "
    "float32 here (no QAT); the name keeps the paper's label.")


def spam_suite() -> Suite:
  """SPAM vs Adam without quantization (spec §2.5, arXiv 2501.06842),
  scaled down from the official LLaMA-130M run: lr 8e-4, warmup 1000 of
  20K steps; SPAM θ 5000, ΔT 500, N 150. Adam uses the same lr."""
  base = _official("llama_130m")
  sched = dict(lr=8e-4, warmup_steps=1000)
  arms = {
    "adam": AdamWConfig(**sched),
    "spam": SpamConfig(**sched, reset_interval=500, reset_warmup_steps=150,
                       spike_grace_steps=20, spike_threshold=5000.0),
  }
  return Suite(name="spam", title="SPAM vs Adam, CPU scale",
               arms=tuple(Arm(k, scale_down(base.replace(optimizer=v)))
                          for k, v in arms.items()),
               target="adam", reference="adam",
               note="Scaled down from the official SPAM LLaMA-130M run "
               "(spec §2.5) by `jqlm.train.compare.scale_down`.")


def q_galore_suite() -> Suite:
  """Q-GaLore vs GaLore vs Adam (spec §4.4, §5.5, arXiv 2407.08296,
  2403.03507), with round-to-nearest or stochastic rounding of Q-GaLore's
  int8 weights; scaled down from the official LLaMA-130M runs: GaLore lr
  0.01, Q-GaLore lr 0.015, rank 256, scale 0.25, gap 200, warmup 2000 of
  20K steps. Adam takes SPAM's 130M lr 8e-4 (the spec gives none for
  GaLore's full-rank baseline)."""
  base = _official("llama_130m")
  low_rank = dict(rank=256, update_proj_gap=200, scale=0.25,
                  warmup_steps=2000)
  arms = {
    "adam": AdamWConfig(lr=8e-4, warmup_steps=2000),
    "galore": GaLoreConfig(lr=0.01, **low_rank),
    "q_galore_sr": QGaLoreConfig(lr=0.015, stochastic_round=True,
                                 **low_rank),
    "q_galore_rne": QGaLoreConfig(lr=0.015, stochastic_round=False,
                                  **low_rank),
  }
  return Suite(name="q_galore", title="Q-GaLore vs GaLore vs Adam, CPU "
               "scale", arms=tuple(Arm(k, scale_down(base.replace(
                 optimizer=v))) for k, v in arms.items()),
               target="galore", reference="galore",
               note="Scaled down from the official LLaMA-130M GaLore and "
               "Q-GaLore runs (spec §4.4, §5.5) by "
               "`jqlm.train.compare.scale_down`. `q_galore_rne` rounds the "
               "int8 weight updates to nearest: small updates are lost.")


LOWP_STEPS = 400
"""The low-precision suites' run length: 400 updates (410K tokens) of the
CPU model, 40% of the other suites' 1000, because an emulated recipe's
step costs up to about twice a float32 one on a CPU and a suite has 10-15
arms; the warmup scales with it (:func:`rescale_steps`). ``lowp`` still
takes about 25 minutes per seed on 2 cores (15 runs of 50-190 s,
docs/results.md §4)."""


def _lowp_base(opt) -> TrainConfig:
  """The low-precision suites' base: Stable-SPAM's 4-bit LLaMA-350M
  setting (lr 4e-4, warmup 2000 of 20K steps, no weight decay) scaled
  down (:func:`scale_down`) to :data:`LOWP_STEPS`, with ``opt``."""
  return scale_down(_official("llama_350m").replace(optimizer=opt),
                    steps=LOWP_STEPS)


def _with_recipe(cfg: TrainConfig, recipe: str, options: str = "",
                 late: float = 0.0) -> TrainConfig:
  """``cfg`` (already scaled down: the recipes' blocks fit the CPU model,
  not every paper-scale width) under ``recipe``."""
  if recipe == "bf16":
    return cfg
  return cfg.replace(model={"recipe": recipe, "recipe_options": options,
                            "late_high_precision": late})


LOWP_ARMS = (
  ("bf16", "bf16", ""),
  ("fp8_rowwise", "fp8_rowwise", ""),
  ("mxfp8", "mxfp8", ""),
  ("nvfp4", "nvfp4", ""),
  ("nvfp4_no_sr", "nvfp4", "stochastic_rounding=false"),
  ("nvfp4_no_rht", "nvfp4", "hadamard=false"),
  ("nvfp4_no_2d", "nvfp4", "weight_2d=false"),
  ("mxfp4", "mxfp4", ""),
  ("quartet", "quartet", ""),
  ("quartet2", "quartet2", ""),
  ("halo2_fp8", "halo2_fp8", ""),
  ("halo2_int8", "halo2_int8", ""),
  ("quest", "quest", "bits=4"),
  ("quest_no_trust", "quest", "bits=4,trust=false"),
)
"""The :func:`lowp_suite` arms: (name, recipe, recipe_options)."""

LATE_FRACTION = 0.2
"""The ``nvfp4_late`` arm's ``model.late_high_precision``: the forward
GEMMs in high precision for the last 20% of the updates (NVIDIA switched
at 8.2T of 10T tokens, 18%, App. D)."""


def lowp_suite() -> Suite:
  """The low-precision training recipes side by side (issue 19): AdamW at
  one shared LR (Stable-SPAM's 4-bit setting, lr 4e-4 x 4, scaled down)
  on the same data, seeds and tokens, under each recipe of
  :func:`jqlm.quant.recipe` with its default layer selection, plus the
  NVFP4 ablations (no SR, no RHT, 1x16 weight blocks), NVFP4 with the late
  switch of the forward to high precision, and QuEST without its trust
  estimator."""
  adam = AdamWConfig(lr=4e-4, warmup_steps=2000, weight_decay=0.0)
  base = _lowp_base(adam)
  arms = [Arm(name, _with_recipe(base, recipe, opts))
          for name, recipe, opts in LOWP_ARMS]
  arms.insert(4, Arm("nvfp4_late", _with_recipe(base, "nvfp4",
                                                late=LATE_FRACTION)))
  return Suite(
    name="lowp", title="Low-precision training recipes, CPU scale",
    arms=tuple(arms), target="bf16", reference="bf16",
    note="AdamW at one LR for every arm, from Stable-SPAM's LLaMA-350M "
    "setting scaled down by `jqlm.train.compare.scale_down` to "
    f"{LOWP_STEPS} steps. Every recipe is emulated (quantize, dequantize, "
    "float32 GEMM), so the numerics are the recipe's and the seconds are "
    "not its speed. `bf16` trains in float32 here (no recipe). The "
    "operand table gives the share of each GEMM operand's elements that "
    "the recipe clipped at its format's largest value / flushed to zero, "
    "on the first held-out batch at every evaluation, mean over "
    "evaluations, linears and seeds.")


def lowp_optim_suite() -> Suite:
  """AdamW, SPAM and Stable-SPAM under fully quantized FP4 training
  (``nvfp4``, ``mxfp4``) and 4-bit QuEST, against AdamW without a recipe
  (issue 19). Stable-SPAM's official 4-bit constants (spec §3.3: γ
  0.7/0.9/0.999, ΔT 500, lr 4e-4), SPAM's (θ 5000, ΔT 500, N 150), as the
  stable_spam suite has them, scaled down the same way to
  :data:`LOWP_STEPS`. ``stable_spam_bf16`` (Stable-SPAM without a recipe)
  separates what the optimizer does by itself from what it does against
  the quantization: a Stable-SPAM arm below ``adamw_bf16`` says little
  about quantization unless it is also below ``stable_spam_bf16``."""
  sched = dict(lr=4e-4, warmup_steps=2000, weight_decay=0.0)
  opts = {
    "adamw": AdamWConfig(**sched),
    "spam": SpamConfig(**sched, reset_interval=500, reset_warmup_steps=150,
                       spike_grace_steps=20, spike_threshold=5000.0),
    "stable_spam": StableSpamConfig(**sched, gamma1=0.7, gamma2=0.9,
                                    gamma3=0.999, reset_interval=500),
  }
  arms = [Arm("adamw_bf16", _lowp_base(opts["adamw"])),
          Arm("stable_spam_bf16", _lowp_base(opts["stable_spam"]))]
  for recipe, options in (("nvfp4", ""), ("mxfp4", ""), ("quest", "bits=4")):
    for name, opt in opts.items():
      arms.append(Arm(f"{name}_{recipe}", _with_recipe(
        _lowp_base(opt), recipe, options)))
  return Suite(
    name="lowp_optim", title="SPAM and Stable-SPAM under fully quantized "
    "training, CPU scale", arms=tuple(arms), target="adamw_bf16",
    reference="adamw_bf16",
    note="Each optimizer with its official 4-bit constants (spec §2.5, "
    "§3.3) at the stable_spam suite's LR, scaled down by "
    f"`jqlm.train.compare.scale_down` to {LOWP_STEPS} steps; SPAM's and "
    "Stable-SPAM's official ΔT 500 is longer than the run, so neither "
    "resets its moments: what acts is their spike clipping (and "
    "Stable-SPAM's adaptive norm scaling). "
    "`adamw_bf16` and `stable_spam_bf16` train in float32 (no recipe): "
    "a Stable-SPAM arm's gap to `stable_spam_bf16` is the cost of the "
    "quantization under Stable-SPAM.")


MEMORY_STEPS = 600
"""The memory_efficient suite's run length: 600 updates (614K tokens) of
the CPU model, three GaLore / APOLLO projection refreshes (gap 200); 60% of
the other suites' 1000 so that 9 arms x 3 seeds fit about 40 minutes on 2
cores (Muon's Newton-Schulz and the 8-bit codes cost up to 2x AdamW's
step on a CPU)."""

# arm -> its row of jqlm bench memory (params + state at LLaMA-7B)
MEMORY_ROWS = {
  "adamw": "pure bf16 (AdamW, bf16 states)",
  "adamw_8bit": "AdamW 8-bit states, bf16 params",
  "galore": "GaLore, bf16",
  "q_galore": "Q-GaLore (int8 W, int4 P, 8-bit)",
  "apollo": "APOLLO (official rank), bf16",
  "apollo_mini": "APOLLO-Mini, bf16",
  "micro_adam": "MicroAdam (m=10, k=1%), bf16",
  "muon_8bit": "8-bit Muon, bf16",
  "natural_galore": "Natural GaLore (s=20), bf16",
}


def memory_efficient_suite() -> Suite:
  """The memory-efficient optimizers side by side (issue 20): AdamW,
  8-bit AdamW, GaLore, Q-GaLore, APOLLO, APOLLO-Mini, MicroAdam, 8-bit
  Muon and Natural GaLore, each at its official LLaMA-130M setting
  (optimizers_more.md §1.5, §3.3; spec §4.4, §5.5), scaled down to
  :data:`MEMORY_STEPS` by :func:`scale_down` (LR x 4, warmup in
  proportion, ranks with the width). The methods without an official
  130M LR take AdamW's (8e-4, SPAM's 130M LR, as the q_galore suite's
  Adam): MicroAdam (its fine-tuning LR equals Adam's) and 8-bit Muon
  (Moonlight's RMS-matched update reuses the AdamW LR)."""
  base = _official("llama_130m")
  warm = dict(warmup_steps=2000)
  low_rank = dict(rank=256, update_proj_gap=200, scale=0.25, **warm)
  arms = {
    "adamw": AdamWConfig(lr=8e-4, **warm),
    "adamw_8bit": AdamWConfig(lr=8e-4, state="8bit", **warm),
    "galore": GaLoreConfig(lr=0.01, **low_rank),
    "q_galore": QGaLoreConfig(lr=0.015, stochastic_round=True, **low_rank),
    "apollo": ApolloConfig(lr=0.01, rank=192, scale=1.0, **warm),
    "apollo_mini": ApolloMiniConfig(lr=0.01, scale=192.0, scale_front=True,
                                    **warm),
    "micro_adam": MicroAdamConfig(lr=8e-4, **warm),
    "muon_8bit": MuonConfig(lr=8e-4, state="8bit", **warm),
    "natural_galore": NaturalGaLoreConfig(lr=0.01, history=20,
                                          damping=1e-3, **low_rank),
  }
  return Suite(
    name="memory_efficient", title="Memory-efficient optimizers, CPU scale",
    arms=tuple(Arm(k, scale_down(base.replace(optimizer=v),
                                 steps=MEMORY_STEPS))
               for k, v in arms.items()),
    target="adamw", reference="adamw", memory=dict(MEMORY_ROWS),
    note="Each optimizer at its official LLaMA-130M setting (APOLLO rank "
    "192, APOLLO-Mini scale 192 front, GaLore/Q-GaLore/Natural GaLore "
    "rank 256, lr 0.01 / 0.015), AdamW, 8-bit AdamW, MicroAdam and 8-bit "
    "Muon at AdamW's 8e-4, scaled down by `jqlm.train.compare.scale_down` "
    f"to {MEMORY_STEPS} steps (LR x 4, ranks with the width). The memory "
    "column is params + optimizer state of the same method at LLaMA-7B "
    "with its official 7B settings (`jqlm bench memory`, bf16 params; "
    "Q-GaLore with int8 kernels), not of the CPU model.")


FINETUNE_MODEL = dict(preset="llama_tiny", hidden_size=256,
                      intermediate_size=768, num_layers=4, num_heads=4,
                      num_kv_heads=4, vocab_size=2048, dtype="float32",
                      param_dtype="float32", remat=False)
"""The finetune suite's model: LLaMA with 4 layers of width 256 (4.2M
params, 3.1M in the block linears; MLP 768 so that Q-GaLore's groups of
256 divide every dim), float32: the largest that pretrains in about 15
minutes on 2 cores (:data:`FINETUNE_PRETRAIN_STEPS`)."""

FINETUNE_PRETRAIN_STEPS = 1600
FINETUNE_STEPS = 300
FINETUNE_LR = 4e-4
"""Full fine-tuning's LR: a quarter of the pretraining peak (1.6e-3, the
CPU suites' 4e-4 x 4)."""


def finetune_suite() -> Suite:
  """Q-GaLore's fine-tuning claim (issue 21; arXiv 2407.08296: "memory
  reduced by up to 50% compared to LoRA and GaLore, while consistently
  outperforming QLoRA at the same memory cost"), small and honest.

  A LLaMA (:data:`FINETUNE_MODEL`) pretrains once on the standard
  library's modules (``stdlib:lib``, 1600 steps); each arm fine-tunes it
  for 300 steps on the standard library's tests (``stdlib:tests``, no
  file in common) and is evaluated on held-out tests. Arms: full
  fine-tuning (AdamW), LoRA, QLoRA (NF4 base), GaLore and Q-GaLore. The
  papers' fine-tuning settings are for 7B models and GLUE/MMLU, so they
  are scaled as the other CPU suites scale them: LoRA rank 8 (QLoRA's 64
  at width 4096 is 4 at 256; 8 is the suites' floor), alpha 16, every
  block linear adapted (QLoRA's choice); GaLore / Q-GaLore rank 8 with
  their pretraining scale 0.25 and gap 200, Q-GaLore's int8 weights and
  int4 projections in groups of 256. LRs keep the pretraining suites'
  ratios to AdamW: GaLore 10x (0.01 vs 1e-3), Q-GaLore 15x, and LoRA /
  QLoRA 4x (LoRA trains at several times full fine-tuning's LR); none
  was tuned. Memory: each arm's compiled train-step peak."""
  pre = TrainConfig(
    model={**FINETUNE_MODEL},
    data={**CPU_DATA, "source": "stdlib:lib", "max_bytes": 8_000_000},
    optimizer=AdamWConfig(lr=1.6e-3, warmup_steps=160, weight_decay=0.0),
    run={"steps": FINETUNE_PRETRAIN_STEPS, "eval_batches": 16,
         "keep_checkpoints": 1, "seed": 0})
  ft = pre.replace(data={"source": "stdlib:tests", "max_bytes": 2_000_000},
                   run={"steps": FINETUNE_STEPS})
  warm = dict(warmup_steps=30, weight_decay=0.0)
  low_rank = dict(rank=8, update_proj_gap=200, scale=0.25, **warm)
  lora = {"lora_rank": 8, "lora_alpha": 16.0}
  arms = {
    "full_adamw": ft.replace(optimizer=AdamWConfig(lr=FINETUNE_LR, **warm)),
    "lora": ft.replace(model=lora, optimizer=AdamWConfig(
      lr=4 * FINETUNE_LR, **warm)),
    "qlora_nf4": ft.replace(model={**lora, "lora_base": "nf4"},
                            optimizer=AdamWConfig(lr=4 * FINETUNE_LR,
                                                  **warm)),
    "galore": ft.replace(optimizer=GaLoreConfig(lr=10 * FINETUNE_LR,
                                                **low_rank)),
    "q_galore": ft.replace(optimizer=QGaLoreConfig(
      lr=15 * FINETUNE_LR, stochastic_round=True, **low_rank)),
  }
  return Suite(
    name="finetune", title="Fine-tuning: full, LoRA, QLoRA, GaLore, "
    "Q-GaLore, CPU scale",
    arms=tuple(Arm(k, _run_settings(v)) for k, v in arms.items()),
    target="full_adamw", reference="full_adamw", step_memory=True,
    pretrain=Arm("pretrain", _run_settings(pre)),
    note=f"Pretrained once ({FINETUNE_PRETRAIN_STEPS} AdamW steps on the "
    "standard library's modules), then fine-tuned for "
    f"{FINETUNE_STEPS} steps on its tests (another distribution: no file "
    "in common) and evaluated on held-out tests. LoRA / QLoRA rank 8, "
    "alpha 16, all block linears, 4x full fine-tuning's LR; GaLore / "
    "Q-GaLore rank 8, scale 0.25, 10x / 15x (the pretraining ratios); no "
    "LR was tuned. The memory column is each arm's own train step on "
    "this 4.2M-parameter model, where the embedding and head (1M "
    "params, float in every arm) weigh more than at 7B.")


SUITES: dict[str, Callable[[], Suite]] = {
  "stable_spam": stable_spam_suite,
  "spam": spam_suite,
  "q_galore": q_galore_suite,
  "lowp": lowp_suite,
  "lowp_optim": lowp_optim_suite,
  "memory_efficient": memory_efficient_suite,
  "finetune": finetune_suite,
}
"""The built-in CPU-scale suites by name (``jqlm compare <name>``)."""


def load_suite(spec: str) -> Suite:
  """A built-in suite name, or a ``.py`` file whose ``get_suite()`` returns
  a :class:`Suite` (``experiments/suites/`` holds the paper-scale ones)."""
  if spec in SUITES:
    return SUITES[spec]()
  if spec.endswith(".py") and os.path.exists(spec):
    mod = load_python_file(spec, "jqlm_user_suite")
    if not hasattr(mod, "get_suite"):
      raise ValueError(f"{spec} defines no get_suite(); a suite file's "
                       "get_suite() returns a jqlm.train.compare.Suite "
                       "(see experiments/suites/).")
    suite = mod.get_suite()
    if not isinstance(suite, Suite):
      raise ValueError(f"{spec}: get_suite() must return a "
                       f"jqlm.train.compare.Suite, got "
                       f"{type(suite).__name__}.")
    return suite
  raise ValueError(f"Unknown suite {spec!r}: not one of {sorted(SUITES)} "
                   "nor an existing .py file defining get_suite().")
