"""Comparison runs: several optimizer / precision arms on the same data,
seeds and token budget, summarised as a markdown table and plots.

A :class:`Suite` holds :class:`Arm` s (a name and a full
:class:`TrainConfig` each) and the seeds to run. :func:`run_suite` trains
every (arm, seed) with :func:`jqlm.train.run` (one shared tokenizer and
token cache; finished runs are reused), and returns a :class:`SuiteResult`
whose :meth:`~SuiteResult.table` reports, per arm, the final held-out loss
(mean ± sample std over seeds), perplexity, the step at which the arm first
reaches the ``target`` arm's final loss (linear interpolation between
evaluations, per seed), the spikes clipped and the non-finite steps
skipped.

The built-in :data:`SUITES` are the seed papers' comparisons scaled down
to a 2-core CPU by :func:`scale_down`: the official hyper-parameters (spec
§2.5, §3.3, §4.4, §5.5) on 1000 steps of a
2-layer width-128 LLaMA on the embedded corpus. ``experiments/suites/``
holds the same comparisons at the papers' scale (LLaMA-130M/350M on C4).

Example::

  suite = compare.SUITES["spam"]().with_steps(100).with_seeds((0,))
  result = compare.run_suite(suite, "runs/compare/spam")
  print(result.table())
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence

import numpy as np

from jqlm import models
from jqlm.train.config import OptimizerKind, TrainConfig

CPU_MODEL = dict(model="llama_tiny", hidden_size=128, intermediate_size=256,
                 num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=2048)
"""The scaled-down model: LLaMA with 2 layers of width 128 (0.85M params,
of which 0.33M in the attention and MLP linears)."""

CPU_DATA = dict(data="stdlib", data_config=None, data_max_bytes=6_000_000,
                tokenizer=None, eval_split=None, seq_len=64, batch_size=16,
                grad_accum=1, dtype="float32", param_dtype="float32",
                remat=False)
"""The scaled-down data: 16 sequences of 64 tokens per update from the
embedded corpus (6 MB of it: 1000 updates see each token about once),
float32 (XLA:CPU has no fast bf16 matmul)."""


def rescale_steps(cfg: TrainConfig, steps: int) -> TrainConfig:
  """``cfg`` run for ``steps`` updates, its LR warmup scaled by ``steps /
  cfg.steps`` so that the schedule keeps its shape (Stable-SPAM's
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
  warmup = int(round(cfg.warmup_steps * steps / cfg.steps))
  return cfg.replace(steps=steps, warmup_steps=min(warmup, steps - 1))


def scale_down(cfg: TrainConfig, *, steps: int = 1000,
               lr_factor: float = 4.0
               ) -> TrainConfig:
  """An official config shrunk to run on a 2-core CPU in about a minute
  and a half, keeping what the comparison is about.

  Kept: optimizer, its non-step hyper-parameters (γ's, θ, GaLore scale,
  state quantization, stochastic rounding), QAT policy, LR schedule shape,
  weight decay and gradient clipping. Changed:

  * model and data: :data:`CPU_MODEL`, :data:`CPU_DATA`;
  * the run length: ``steps`` updates, the LR warmup in proportion
    (:func:`rescale_steps`; the optimizers' ΔT, N, A and projection gap
    keep their official values, so 1000 steps see one SPAM / Stable-SPAM
    momentum reset at update 500 and five GaLore projection refreshes);
  * GaLore's rank: in proportion to the width (multiple of 8, at least 8);
  * the learning rate: times ``lr_factor``. The default 4 was chosen once,
    before any comparison ran, as the best of 1, 4, 8 and 16 for AdamW at
    lr 4e-4 on this model (held-out loss 4.97, 4.17, 4.25, 4.42 after 400
    steps of a first draft of these settings); every arm of every suite
    gets the same factor, so the arms' LRs keep the papers' ratios.
  """
  width = models.PRESETS[cfg.model]().hidden_size
  if cfg.hidden_size is not None:
    width = cfg.hidden_size
  rank = max(8, int(round(cfg.rank * CPU_MODEL["hidden_size"] / width / 8))
             * 8)
  out = cfg.replace(**CPU_MODEL, **CPU_DATA, lr=cfg.lr * lr_factor,
                    rank=rank, eval_batches=16, keep_checkpoints=1)
  out = rescale_steps(out, steps)
  return _run_settings(out)


def _run_settings(cfg: TrainConfig) -> TrainConfig:
  """Logging and evaluation often enough for curves (about 80 logged
  points, 40 evaluations), one checkpoint at the end. (:func:`scale_down`
  evaluates on 16 batches: 16K held-out tokens, the same for every seed.)"""
  return cfg.replace(log_every=max(1, cfg.steps // 80),
                     eval_every=max(1, cfg.steps // 40),
                     ckpt_every=cfg.steps)


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
  """

  name: str
  title: str
  arms: tuple[Arm, ...]
  seeds: tuple[int, ...] = (0, 1, 2)
  target: str | None = None
  reference: str | None = None
  note: str = ""

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
    for field in ("target", "reference"):
      v = getattr(self, field)
      if v is not None and v not in names:
        raise ValueError(f"Suite {self.name!r}: {field}={v!r} is not an "
                         f"arm ({names}).")
    budgets = {a.name: (a.config.steps, a.config.batch_size,
                        a.config.seq_len) for a in self.arms}
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
      reference=self.reference if self.reference in keep else None)

  def with_seeds(self, seeds: Sequence[int]) -> Suite:
    return dataclasses.replace(self, seeds=tuple(seeds))

  def with_overrides(self, **changes) -> Suite:
    """Every arm's config with ``changes`` (e.g. ``num_layers=4``)."""
    return dataclasses.replace(self, arms=tuple(
      Arm(a.name, a.config.replace(**changes)) for a in self.arms))


@dataclasses.dataclass
class RunRecord:
  """One (arm, seed) run: its logged metrics and evaluations, wall time."""

  arm: str
  seed: int
  metrics: list[dict]
  evals: list[dict]
  wall_s: float
  reused: bool = False


def _finished(arm: str, cfg: TrainConfig) -> RunRecord | None:
  """The record of a finished run in ``cfg.workdir`` with this exact
  config, or None."""
  try:
    with open(os.path.join(cfg.workdir, "config.json")) as f:
      same = TrainConfig.from_json(f.read()) == cfg
    with open(os.path.join(cfg.workdir, "run.json")) as f:
      info = json.load(f)
    metrics, evals = _read_metrics(os.path.join(cfg.workdir,
                                                "metrics.jsonl"))
  except (OSError, ValueError, TypeError):
    return None
  if not (same and evals and evals[-1]["step"] == cfg.steps):
    return None
  return RunRecord(arm=arm, seed=cfg.seed, metrics=metrics, evals=evals,
                   wall_s=float(info["wall_s"]), reused=True)


def _read_metrics(path: str) -> tuple[list[dict], list[dict]]:
  metrics, evals = [], []
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      (evals if "eval_loss" in rec else metrics).append(rec)
  return metrics, evals


def run_suite(suite: Suite, out_dir: str, *, reuse: bool = True,
              log: Callable[[str], None] | None = print) -> SuiteResult:
  """Trains every arm of ``suite`` with every seed under ``out_dir``.

  Runs go to ``out_dir/<arm>/seed<k>``; the tokenizer and token arrays are
  built once in ``out_dir/cache``. With ``reuse``, a run whose directory
  holds a finished run of the identical config is read back instead of
  trained again (so an interrupted comparison continues where it
  stopped).

  Returns:
    A :class:`SuiteResult`; also written as ``results.md``,
    ``results.json`` and ``curves.png`` in ``out_dir`` by
    :meth:`SuiteResult.save`.
  """
  from jqlm.train.loop import run  # noqa: PLC0415

  os.makedirs(out_dir, exist_ok=True)
  records = []
  total = len(suite.arms) * len(suite.seeds)
  for seed in suite.seeds:
    for arm in suite.arms:
      cfg = arm.config.replace(
        seed=seed, workdir=os.path.join(out_dir, arm.name, f"seed{seed}"),
        cache_dir=os.path.join(out_dir, "cache"))
      rec = _finished(arm.name, cfg) if reuse else None
      if rec is None:
        # the suite owns this directory: a stale or changed run is replaced
        shutil.rmtree(cfg.workdir, ignore_errors=True)
        t0 = time.perf_counter()
        res = run(cfg, progress=False)
        wall = time.perf_counter() - t0
        with open(os.path.join(cfg.workdir, "run.json"), "w") as f:
          json.dump({"wall_s": wall, "skipped": res.skipped}, f)
        rec = RunRecord(arm=arm.name, seed=seed, metrics=res.metrics,
                        evals=res.evals, wall_s=wall)
      records.append(rec)
      if log is not None:
        ev = rec.evals[-1]["eval_loss"] if rec.evals else float("nan")
        log(f"[{len(records)}/{total}] {arm.name} seed {seed}: held-out "
            f"loss {ev:.4f} ({'reused' if rec.reused else 'trained'}, "
            f"{rec.wall_s:.0f} s)")
  return SuiteResult(suite=suite, records=records)


@dataclasses.dataclass(frozen=True)
class ArmSummary:
  """An arm's numbers over its seeds (means, sample std; NaN when one
  seed). ``delta``: held-out loss minus the reference arm's, paired by
  seed; ``steps_to_target``: mean over the seeds that reach the target
  arm's final loss (``reached`` of ``n``)."""

  name: str
  n: int
  eval_loss: float
  eval_loss_std: float
  ppl: float
  train_loss: float
  delta: float | None
  delta_std: float | None
  steps_to_target: float | None
  steps_to_target_std: float | None
  reached: int
  spikes: float
  skipped: float
  max_grad_norm: float
  wall_s: float


def _mean_std(xs) -> tuple[float, float]:
  a = np.asarray(xs, np.float64)
  return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1
                           else float("nan"))


def crossing_step(evals: list[dict], level: float) -> float | None:
  """The first step at which the held-out loss curve reaches ``level``,
  linearly interpolated between evaluations (None if it never does)."""
  prev_s, prev_l = 0.0, math.inf
  for e in evals:
    s, loss = float(e["step"]), float(e["eval_loss"])
    if loss <= level:
      if not math.isfinite(prev_l):
        return s
      return prev_s + (prev_l - level) / (prev_l - loss) * (s - prev_s)
    prev_s, prev_l = s, loss
  return None


@dataclasses.dataclass
class SuiteResult:
  """All runs of a suite, with the summary table and plots."""

  suite: Suite
  records: list[RunRecord]

  def runs(self, arm: str) -> list[RunRecord]:
    return [r for r in self.records if r.arm == arm]

  def final_loss(self, arm: str, seed: int) -> float:
    for r in self.runs(arm):
      if r.seed == seed:
        return float(r.evals[-1]["eval_loss"])
    raise KeyError((arm, seed))

  def summary(self) -> list[ArmSummary]:
    out = []
    suite = self.suite
    for arm in suite.arms:
      runs = self.runs(arm.name)
      finals = [r.evals[-1]["eval_loss"] for r in runs]
      ev, ev_sd = _mean_std(finals)
      tail = [np.mean([m["loss"] for m in r.metrics[-max(
        1, len(r.metrics) // 10):]]) for r in runs]
      delta = delta_sd = None
      if suite.reference is not None:  # paired by seed
        delta, delta_sd = _mean_std([
          r.evals[-1]["eval_loss"] - self.final_loss(suite.reference, r.seed)
          for r in runs])
      hits, reached = [], 0
      if suite.target is not None:
        for r in runs:
          s = crossing_step(r.evals, self.final_loss(suite.target, r.seed))
          if s is not None:
            hits.append(s)
            reached += 1
      st, st_sd = _mean_std(hits) if hits else (None, None)
      out.append(ArmSummary(
        name=arm.name, n=len(runs), eval_loss=ev, eval_loss_std=ev_sd,
        ppl=float(np.mean([math.exp(x) for x in finals])),
        train_loss=float(np.mean(tail)), delta=delta, delta_std=delta_sd,
        steps_to_target=st,
        steps_to_target_std=st_sd, reached=reached,
        spikes=float(np.mean([sum(m.get("spikes", 0.0) for m in r.metrics)
                              / max(len(r.metrics), 1) for r in runs])),
        skipped=float(np.mean([r.metrics[-1].get("skipped_total", 0)
                               if r.metrics else 0 for r in runs])),
        max_grad_norm=float(np.mean([max(m["grad_norm"] for m in r.metrics)
                                     for r in runs])),
        wall_s=float(np.mean([r.wall_s for r in runs]))))
    return out

  def table(self) -> str:
    """The markdown results table."""
    suite = self.suite
    steps = suite.arms[0].config.steps
    rows = self.summary()
    head = ["arm", "optimizer", "QAT", "lr", "held-out loss", "ppl"]
    if suite.reference is not None:
      head.append(f"Δ vs {suite.reference}")
    if suite.target is not None:
      head.append(f"steps to {suite.target}'s final loss")
    head += ["spikes clipped / logged update", "max grad norm",
             "skipped steps", "s / run"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
      c = suite.arm(r.name).config
      opt = c.optimizer.value + ("" if c.optimizer is not
                                 OptimizerKind.Q_GALORE else
                                 (" SR" if c.stochastic_round else " RNE"))
      cells = [r.name, opt, c.quant, f"{c.lr:g}",
               _pm(r.eval_loss, r.eval_loss_std), f"{r.ppl:.2f}"]
      if suite.reference is not None:
        cells.append(_pm(r.delta, r.delta_std, sign=True))
      if suite.target is not None:
        if r.steps_to_target is None:
          cells.append(f"not reached (0/{r.n})")
        else:
          frac = r.steps_to_target / steps
          cells.append(f"{r.steps_to_target:.0f} ({frac:.0%})"
                       + ("" if r.reached == r.n else
                          f", {r.reached}/{r.n} seeds"))
      cells += [f"{r.spikes:.1f}", f"{r.max_grad_norm:.3g}",
                f"{r.skipped:g}", f"{r.wall_s:.0f}"]
      lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

  def plot(self, path: str) -> None:
    """Train loss, held-out loss, gradient norm and spikes per logged
    update: mean over seeds, shaded from the lowest to the highest seed."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = ((axes[0, 0], "metrics", "loss", "train loss", False),
              (axes[0, 1], "evals", "eval_loss", "held-out loss", False),
              (axes[1, 0], "metrics", "grad_norm", "gradient norm", True),
              (axes[1, 1], "metrics", "spikes",
               "spikes clipped (logged update)", False))
    for ax, source, key, label, log in panels:
      for arm in self.suite.arms:
        runs = self.runs(arm.name)
        n = min(len(getattr(r, source)) for r in runs)
        if n == 0:
          continue
        steps = [getattr(runs[0], source)[i]["step"] for i in range(n)]
        ys = np.array([[getattr(r, source)[i].get(key, 0.0)
                        for i in range(n)] for r in runs], np.float64)
        line, = ax.plot(steps, ys.mean(0), label=arm.name)
        if len(runs) > 1:
          ax.fill_between(steps, ys.min(0), ys.max(0), alpha=0.2,
                          color=line.get_color())
      ax.set_xlabel("step")
      ax.set_ylabel(label)
      if log:
        ax.set_yscale("log")
      if key in ("loss", "eval_loss"):
        _zoom_to_late_steps(ax)
    axes[0, 1].legend(fontsize=8)
    fig.suptitle(f"{self.suite.title} ({len(self.suite.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

  def to_json(self) -> dict:
    return {"suite": self.suite.name, "title": self.suite.title,
            "seeds": list(self.suite.seeds),
            "configs": {a.name: json.loads(a.config.to_json())
                        for a in self.suite.arms},
            "summary": [dataclasses.asdict(s) for s in self.summary()],
            "runs": [dataclasses.asdict(r) for r in self.records]}

  def save(self, out_dir: str, command: str | None = None) -> dict[str, str]:
    """Writes ``results.md`` (table, command, settings), ``results.json``
    and ``curves.png``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in (
      ("md", "results.md"), ("json", "results.json"),
      ("png", "curves.png"))}
    c = self.suite.arms[0].config
    md = [f"# {self.suite.title}", ""]
    if command:
      md += [f"`{command}`", ""]
    md += [f"{len(self.suite.seeds)} seeds ({', '.join(map(str, self.suite.seeds))}); "
           f"{c.steps} steps of {c.batch_size}x{c.seq_len} tokens on "
           f"{c.data!r}; model {c.model}"
           + (f" (width {c.hidden_size}, {c.num_layers} layers)"
              if c.hidden_size else "") + ". Held-out loss: mean ± sample "
           "std over seeds.", "", self.table(), ""]
    if self.suite.note:
      md += [self.suite.note, ""]
    md += ["![curves](curves.png)", ""]
    with open(paths["md"], "w") as f:
      f.write("\n".join(md))
    with open(paths["json"], "w") as f:
      json.dump(self.to_json(), f, indent=1)
    self.plot(paths["png"])
    return paths


def _zoom_to_late_steps(ax, frac: float = 0.2) -> None:
  """Y-limits that show the curves after the first ``frac`` of the steps,
  where the arms differ (the first steps span most of the loss range)."""
  lo, hi = math.inf, -math.inf
  for line in ax.get_lines():
    x, y = np.asarray(line.get_xdata(), float), np.asarray(
      line.get_ydata(), float)
    late = y[x >= frac * x.max()] if x.size else y
    if late.size:
      lo, hi = min(lo, late.min()), max(hi, late.max())
  if math.isfinite(lo) and hi > lo:
    pad = 0.05 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)


def _pm(mean: float, sd: float, sign: bool = False) -> str:
  m = f"{mean:+.4f}" if sign else f"{mean:.4f}"
  return m if math.isnan(sd) else f"{m} ± {sd:.4f}"


# ---------------------------------------------------------------------------
# the built-in, CPU-sized suites
# ---------------------------------------------------------------------------

def stable_spam_suite() -> Suite:
  """Stable-SPAM's 4-bit setting (spec §3.3, arXiv 2502.17055), scaled
  down: Adam in float and INT4 QAT, SPAM INT4, Stable-SPAM INT4 and FP4.

  Every arm has the official INT4/FP4 run's settings (LLaMA-350M, lr 4e-4,
  warmup 2000 of 20K steps, no clipping); Stable-SPAM adds γ 0.7/0.9/0.999,
  ΔT 500, total_T = steps; SPAM its official θ 5000, ΔT 500, N 150. The
  Adam arms use the same lr (the paper compares at one lr).
  """
  base = TrainConfig(model="llama_350m", vocab_size=32000, lr=4e-4,
                     warmup_steps=2000, steps=20_000, weight_decay=0.0)
  arms = {
    "adam_bf16": base.replace(optimizer="adamw", quant="none"),
    "adam_int4": base.replace(optimizer="adamw", quant="int4"),
    "spam_int4": base.replace(optimizer="spam", quant="int4",
                              reset_interval=500, reset_warmup_steps=150,
                              spike_grace_steps=20, spike_threshold=5000.0),
    "stable_spam_int4": base.replace(
      optimizer="stable_spam", quant="int4", gamma1=0.7, gamma2=0.9,
      gamma3=0.999, reset_interval=500),
    "stable_spam_fp4": base.replace(
      optimizer="stable_spam", quant="fp4", gamma1=0.7, gamma2=0.9,
      gamma3=0.999, reset_interval=500),
  }
  return Suite(
    name="stable_spam", title="Stable-SPAM's 4-bit setting, CPU scale",
    arms=tuple(Arm(k, scale_down(v)) for k, v in arms.items()),
    target="adam_int4", reference="adam_bf16",
    note="Scaled down from the official INT4/FP4 LLaMA-350M runs (spec "
    "§3.3) by `jqlm.train.compare.scale_down`. `adam_bf16` trains in "
    "float32 here (no QAT); the name keeps the paper's label.")


def spam_suite() -> Suite:
  """SPAM vs Adam without quantization (spec §2.5, arXiv 2501.06842),
  scaled down from the official LLaMA-130M run: lr 8e-4, warmup 1000 of
  20K steps; SPAM θ 5000, ΔT 500, N 150. Adam uses the same lr."""
  base = TrainConfig(model="llama_130m", vocab_size=32000, lr=8e-4,
                     warmup_steps=1000, steps=20_000, quant="none")
  arms = {
    "adam": base.replace(optimizer="adamw"),
    "spam": base.replace(optimizer="spam", reset_interval=500,
                         reset_warmup_steps=150, spike_grace_steps=20,
                         spike_threshold=5000.0),
  }
  return Suite(name="spam", title="SPAM vs Adam, CPU scale",
               arms=tuple(Arm(k, scale_down(v)) for k, v in arms.items()),
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
  base = TrainConfig(model="llama_130m", vocab_size=32000, warmup_steps=2000,
                     steps=20_000, quant="none", rank=256,
                     update_proj_gap=200, galore_scale=0.25)
  arms = {
    "adam": base.replace(optimizer="adamw", lr=8e-4),
    "galore": base.replace(optimizer="galore", lr=0.01),
    "q_galore_sr": base.replace(optimizer="q_galore", lr=0.015,
                                stochastic_round=True, state_quant=8),
    "q_galore_rne": base.replace(optimizer="q_galore", lr=0.015,
                                 stochastic_round=False, state_quant=8),
  }
  return Suite(name="q_galore", title="Q-GaLore vs GaLore vs Adam, CPU "
               "scale", arms=tuple(Arm(k, scale_down(v))
                                   for k, v in arms.items()),
               target="galore", reference="galore",
               note="Scaled down from the official LLaMA-130M GaLore and "
               "Q-GaLore runs (spec §4.4, §5.5) by "
               "`jqlm.train.compare.scale_down`. `q_galore_rne` rounds the "
               "int8 weight updates to nearest: small updates are lost.")


SUITES: dict[str, Callable[[], Suite]] = {
  "stable_spam": stable_spam_suite,
  "spam": spam_suite,
  "q_galore": q_galore_suite,
}
"""The built-in CPU-scale suites by name (``jqlm compare <name>``)."""


def load_suite(spec: str) -> Suite:
  """A built-in suite name, or a ``.py`` file whose ``get_suite()`` returns
  a :class:`Suite` (``experiments/suites/`` holds the paper-scale ones)."""
  if spec in SUITES:
    return SUITES[spec]()
  if spec.endswith(".py") and os.path.exists(spec):
    import importlib.util  # noqa: PLC0415

    mod_spec = importlib.util.spec_from_file_location("jqlm_user_suite",
                                                      spec)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    suite = mod.get_suite()
    if not isinstance(suite, Suite):
      raise ValueError(f"{spec}: get_suite() must return a "
                       f"jqlm.train.compare.Suite, got "
                       f"{type(suite).__name__}.")
    return suite
  raise ValueError(f"Unknown suite {spec!r}: not one of {sorted(SUITES)} "
                   "nor an existing .py file defining get_suite().")
