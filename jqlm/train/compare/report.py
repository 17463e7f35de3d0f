"""The report of a comparison: per-arm numbers over seeds, the markdown
table and the plots.

:meth:`SuiteResult.table` reports, per arm, the final held-out loss (mean
± sample std over seeds), perplexity, the difference to the ``reference``
arm paired by seed, the step at which the arm first reaches the
``target`` arm's final loss (linear interpolation between evaluations, per
seed), the spikes clipped, the gradient-norm spikes (:func:`grad_norm_spikes`)
and the non-finite steps skipped. Under low-precision recipes,
:meth:`SuiteResult.operand_table` gives the share of each GEMM operand's
elements clipped and flushed to zero, and ``gap.png`` plots each arm's
held-out loss minus the reference arm's over training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from jqlm.train.compare.suites import Suite
from jqlm.train.config import QGaLoreConfig


@dataclasses.dataclass
class RunRecord:
  """One (arm, seed) run: its logged metrics and evaluations, wall time."""

  arm: str
  seed: int
  metrics: list[dict]
  evals: list[dict]
  wall_s: float
  reused: bool = False


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
  grad_spikes: float = 0.0


def _mean_std(xs) -> tuple[float, float]:
  a = np.asarray(xs, np.float64)
  return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1
                           else float("nan"))


SPIKE_FACTOR = 3.0
SPIKE_WINDOW = 20


def grad_norm_spikes(metrics: list[dict], factor: float = SPIKE_FACTOR,
                     window: int = SPIKE_WINDOW) -> int:
  """The logged updates whose gradient norm exceeds ``factor`` times the
  median of the ``window`` logged norms before it (the first ``window``
  records are not judged: the early norms fall fast). An optimizer-free
  measure of instability: it counts the spikes AdamW takes as they come
  and SPAM clips."""
  norms = [float(m["grad_norm"]) for m in metrics]
  return sum(1 for i in range(window, len(norms))
             if norms[i] > factor * float(np.median(norms[i - window:i])))


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
        wall_s=float(np.mean([r.wall_s for r in runs])),
        grad_spikes=float(np.mean([grad_norm_spikes(r.metrics)
                                   for r in runs]))))
    return out

  def _recipes(self) -> bool:
    return any(a.config.model.recipe != "none" for a in self.suite.arms)

  def operand_stats(self, arm: str) -> dict[str, tuple[float, float]]:
    """``{operand: (clipped, flushed)}``: the fractions the recipe logged
    at evaluations (``operand_clipped`` / ``operand_flushed``), mean over
    evaluations and seeds; operands it does not quantize are absent."""
    acc: dict[str, list[tuple[float, float]]] = {}
    for r in self.runs(arm):
      for e in r.evals:
        for op, c in e.get("operand_clipped", {}).items():
          acc.setdefault(op, []).append((c, e["operand_flushed"][op]))
    return {op: tuple(np.mean(v, axis=0).tolist()) for op, v in acc.items()}

  def operand_table(self) -> str:
    """The markdown table of :meth:`operand_stats`, one row per arm with a
    recipe: each GEMM operand's clipped % / flushed-to-zero %."""
    ops = ("x", "w", "dgrad_dy", "dgrad_w", "wgrad_x", "wgrad_dy")
    head = ["arm", "fwd x", "fwd W", "dgrad dy", "dgrad W", "wgrad x",
            "wgrad dy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in self.suite.arms:
      st = self.operand_stats(arm.name)
      if not st:
        continue
      cells = [arm.name] + [
        f"{100 * st[o][0]:.2f} / {100 * st[o][1]:.2f}" if o in st else "-"
        for o in ops]
      lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

  def table(self) -> str:
    """The markdown results table."""
    suite = self.suite
    steps = suite.arms[0].config.run.steps
    rows = self.summary()
    recipes = self._recipes()
    head = ["arm", "optimizer", "recipe" if recipes else "QAT", "lr",
            "held-out loss", "ppl"]
    if suite.reference is not None:
      head.append(f"Δ vs {suite.reference}")
    if suite.target is not None:
      head.append(f"steps to {suite.target}'s final loss")
    head += ["spikes clipped / logged update",
             f"grad-norm spikes (> {SPIKE_FACTOR:g}x median)",
             "max grad norm", "skipped steps", "s / run"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
      c = suite.arm(r.name).config
      o = c.optimizer
      opt = o.kind.value + ((" SR" if o.stochastic_round else " RNE")
                            if isinstance(o, QGaLoreConfig) else "")
      cells = [r.name, opt, _recipe_label(c) if recipes else c.model.quant,
               f"{o.lr:g}",
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
      cells += [f"{r.spikes:.1f}", f"{r.grad_spikes:.1f}",
                f"{r.max_grad_norm:.3g}",
                f"{r.skipped:g}", f"{r.wall_s:.0f}"]
      lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

  def memory_gib(self) -> dict[str, float]:
    """Arm -> params + optimizer state (GiB) of its method at LLaMA-7B
    (:attr:`Suite.memory`'s ``jqlm bench memory`` rows, by
    ``jax.eval_shape``); empty when the suite compares no memory."""
    if not self.suite.memory:
      return {}
    from jqlm import bench  # noqa: PLC0415

    reports = bench.bench_memory(("7B",), set(self.suite.memory.values()))
    return {arm: reports[row]["7B"].total / 2**30
            for arm, row in self.suite.memory.items()}

  def pareto(self, memory: dict[str, float]) -> list[str]:
    """The arms on the loss-memory Pareto front: no other arm has both
    less memory and a lower mean held-out loss."""
    loss = {r.name: r.eval_loss for r in self.summary()}
    return [a for a in memory if not any(
      memory[b] <= memory[a] and loss[b] <= loss[a]
      and (memory[b], loss[b]) != (memory[a], loss[a]) for b in memory)]

  def step_memory_mib(self) -> dict[str, float]:
    """Arm -> the peak memory (MiB) of its own train step, compiled from
    abstract inputs on one device (:func:`jqlm.train.plan.step_memory`);
    empty unless :attr:`Suite.step_memory`."""
    if not self.suite.step_memory:
      return {}
    from jqlm.train import plan  # noqa: PLC0415

    return {a.name: plan.step_memory(a.config).peak / 2**20
            for a in self.suite.arms}

  def memory_table(self, memory: dict[str, float], *,
                   label: str = "params + state at LLaMA-7B (GiB)") -> str:
    """Markdown: held-out loss against ``memory`` (params + state at
    LLaMA-7B by default), by memory, with the Pareto front marked."""
    rows = {r.name: r for r in self.summary()}
    front = set(self.pareto(memory))
    ref = self.suite.reference
    head = ["arm", label, "held-out loss"]
    if ref is not None:
      head.append(f"Δ vs {ref}")
    head.append("Pareto front")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in sorted(memory, key=memory.get):
      r = rows[arm]
      cells = [arm, f"{memory[arm]:.2f}", _pm(r.eval_loss, r.eval_loss_std)]
      if ref is not None:
        cells.append(_pm(r.delta, r.delta_std, sign=True))
      cells.append("yes" if arm in front else "")
      lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

  def plot_pareto(self, path: str, memory: dict[str, float], *,
                  label: str = "params + optimizer state at LLaMA-7B "
                  "(GiB, bf16 params)") -> None:
    """Held-out loss (mean, bars from the lowest to the highest seed)
    against ``memory`` (params + state at LLaMA-7B by default), the Pareto
    front joined."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, gib in memory.items():
      losses = [r.evals[-1]["eval_loss"] for r in self.runs(arm)
                if r.evals]
      mean = float(np.mean(losses))
      ax.errorbar([gib], [mean], yerr=[[mean - min(losses)],
                                       [max(losses) - mean]],
                  fmt="o", capsize=3)
      ax.annotate(arm, (gib, mean), textcoords="offset points",
                  xytext=(5, 4), fontsize=8)
    front = sorted(self.pareto(memory), key=memory.get)
    loss = {r.name: r.eval_loss for r in self.summary()}
    ax.plot([memory[a] for a in front], [loss[a] for a in front], "k--",
            lw=0.8, label="Pareto front")
    ax.set_xlabel(label)
    ax.set_ylabel("held-out loss (CPU model)")
    ax.legend(fontsize=8)
    ax.set_title(f"{self.suite.title} ({len(self.suite.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

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

  def plot_gap(self, path: str) -> None:
    """Each arm's held-out loss minus the reference arm's at every
    evaluation, paired by seed: mean, shaded from the lowest to the
    highest seed."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ref = self.suite.reference
    base = {r.seed: r.evals for r in self.runs(ref)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in self.suite.arms:
      if arm.name == ref:
        continue
      runs = self.runs(arm.name)
      n = min(min(len(r.evals), len(base[r.seed])) for r in runs)
      if n == 0:
        continue
      steps = [runs[0].evals[i]["step"] for i in range(n)]
      gaps = np.array([[r.evals[i]["eval_loss"]
                        - base[r.seed][i]["eval_loss"] for i in range(n)]
                       for r in runs], np.float64)
      line, = ax.plot(steps, gaps.mean(0), label=arm.name)
      if len(runs) > 1:
        ax.fill_between(steps, gaps.min(0), gaps.max(0), alpha=0.15,
                        color=line.get_color())
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out loss - {ref}'s")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{self.suite.title}: gap to {ref} "
                 f"({len(self.suite.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

  def to_json(self) -> dict:
    s = _settings(self.suite)
    return {"suite": s["suite"], "title": self.suite.title,
            "seeds": s["seeds"], "configs": s["configs"],
            "summary": [dataclasses.asdict(s) for s in self.summary()],
            "runs": [dataclasses.asdict(r) for r in self.records]}

  def save(self, out_dir: str, command: str | None = None, *,
           overwrite: bool = False) -> dict[str, str]:
    """Writes ``results.md`` (table, command, settings), ``results.json``
    and ``curves.png``; returns their paths.

    Raises:
      FileExistsError: ``out_dir`` holds the results of a comparison with
        other settings (suite, seeds or arm configs), unless
        ``overwrite``; nothing is written then. Results of the same
        settings are rewritten.
    """
    if not overwrite and (why := results_clash(out_dir, self.suite)):
      raise FileExistsError(
        f"{why}; nothing was written. Save to another directory, or pass "
        "overwrite=True (jqlm compare --overwrite) to replace them.")
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in (
      ("md", "results.md"), ("json", "results.json"),
      ("png", "curves.png"))}
    c = self.suite.arms[0].config
    m, d = c.model, c.data
    md = [f"# {self.suite.title}", ""]
    if command:
      md += [f"`{command}`", ""]
    md += [f"{len(self.suite.seeds)} seeds ({', '.join(map(str, self.suite.seeds))}); "
           f"{c.run.steps} steps of {d.batch_size}x{d.seq_len} tokens on "
           f"{d.source!r}; model {m.preset}"
           + (f" (width {m.hidden_size}, {m.num_layers} layers)"
              if m.hidden_size else "") + ". Held-out loss: mean ± sample "
           "std over seeds.", "", self.table(), ""]
    if self._recipes():
      md += ["Each GEMM operand's elements clipped at the format's largest "
             "value / flushed to zero (%), on the first held-out batch at "
             "every evaluation (mean over evaluations, linears and seeds; "
             "`-`: not quantized, or the forward's reused):", "",
             self.operand_table(), ""]
    memory = self.memory_gib()
    if memory:
      paths["pareto"] = os.path.join(out_dir, "pareto.png")
      md += ["Held-out loss against the method's params + optimizer state "
             "at LLaMA-7B (`jqlm bench memory`), by memory:", "",
             self.memory_table(memory), "", "![pareto](pareto.png)", ""]
    step_mem = self.step_memory_mib()
    step_label = "compiled train-step peak (MiB)"
    if step_mem:
      paths["step_pareto"] = os.path.join(out_dir, "step_pareto.png")
      md += ["Held-out loss against the peak memory of each arm's own "
             "train step, compiled from abstract inputs on one device "
             "(`jqlm.train.plan.step_memory`), by memory:", "",
             self.memory_table(step_mem, label=step_label), "",
             "![step memory](step_pareto.png)", ""]
    if self.suite.note:
      md += [self.suite.note, ""]
    md += ["![curves](curves.png)", ""]
    if self.suite.reference is not None and len(self.suite.arms) > 1:
      paths["gap"] = os.path.join(out_dir, "gap.png")
      md += ["![gap](gap.png)", ""]
    with open(paths["md"], "w") as f:
      f.write("\n".join(md))
    with open(paths["json"], "w") as f:
      json.dump(self.to_json(), f, indent=1)
    self.plot(paths["png"])
    if "gap" in paths:
      self.plot_gap(paths["gap"])
    if memory:
      self.plot_pareto(paths["pareto"], memory)
    if step_mem:
      self.plot_pareto(paths["step_pareto"], step_mem,
                       label=f"{step_label}, CPU model")
    return paths


def _recipe_label(c) -> str:
  m = c.model
  if m.recipe == "none":
    return "none"
  label = m.recipe + (f" ({m.recipe_options})" if m.recipe_options else "")
  if m.late_high_precision:
    label += f", fwd high prec. last {m.late_high_precision:.0%}"
  return label


def _settings(suite: Suite) -> dict:
  """The settings that ``results.json`` records of a comparison."""
  return {"suite": suite.name, "seeds": list(suite.seeds),
          "configs": {a.name: json.loads(a.config.to_json())
                      for a in suite.arms}}


def results_clash(out_dir: str, suite: Suite) -> str | None:
  """Why saving ``suite``'s results in ``out_dir`` would replace another
  comparison's (its ``results.json`` records other settings, or cannot be
  read), or None (no results yet, or of the same settings)."""
  path = os.path.join(out_dir, "results.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return f"{path} (unreadable results)"
  new = _settings(suite)
  if not isinstance(old, dict) or {k: old.get(k) for k in new} != new:
    return f"{path} (the results of a comparison with other settings)"
  return None


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
