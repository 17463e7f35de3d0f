"""What a run records: the metrics log, the QAT quantization error and the
loss curves."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jqlm import models, quant


def quant_error(params, mcfg: models.LlamaConfig) -> float | None:
  """Mean relative MSE of the QAT weight quantizers over the block linears
  that the policy quantizes (None without a QAT policy, or when every such
  kernel is already a QArray)."""
  if mcfg.quant is None:
    return None
  is_q = models.is_quantized
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_q)[0]
  mask = jax.tree.leaves(models.block_linear_mask(params))
  errs = []
  for (kp, w), on in zip(flat, mask, strict=True):
    rule = mcfg.quant.rule_for(models.module_path(kp)) if on else None
    if rule is None or rule.weight is None or is_q(w):
      continue
    w32 = jnp.asarray(w, jnp.float32)
    fq = functools.partial(quant.fake_quant, spec=rule.weight)
    # a scan_layers stack (layers, in, out): each layer's kernel on its own
    e = quant.quantization_error(
      w32, jax.vmap(fq)(w32) if w32.ndim == 3 else fq(w32))
    errs.append(float(e.mse) / max(float(jnp.mean(w32 * w32)), 1e-30))
  return float(np.mean(errs)) if errs else None


class MetricsLog:
  """Appends records to ``metrics.jsonl`` (only process 0 writes) and keeps
  them in memory: ``metrics`` (train steps) and ``evals``.

  Args:
    workdir: the run's directory.
    fresh: start a new log (an old one is removed).
    writer: this process writes the file.
    keep_until: resuming from this step: the records of later steps (those
      a killed run logged after its last checkpoint, which the resumed run
      logs again) are dropped from the file, atomically (a temporary file,
      then a rename), and the kept ones are loaded into ``earlier_metrics``
      and ``earlier_evals``, so :meth:`whole` (and the curves drawn from
      it) covers the whole run; ``metrics`` and ``evals`` hold this
      session's records.
  """

  def __init__(self, workdir: str, *, fresh: bool, writer: bool = True,
               keep_until: int | None = None):
    path = os.path.join(workdir, "metrics.jsonl")
    self.path = path if writer else os.devnull
    self.metrics: list[dict] = []
    self.evals: list[dict] = []
    self.earlier_metrics: list[dict] = []
    self.earlier_evals: list[dict] = []
    if fresh and writer and os.path.exists(path):
      os.remove(path)
    if not fresh and keep_until is not None and os.path.exists(path):
      kept = []
      with open(path) as f:
        for line in f:
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut by a kill
          if isinstance(rec, dict) and rec.get("step", 0) <= keep_until:
            kept.append(rec)
      for rec in kept:
        (self.earlier_evals if "eval_loss" in rec
         else self.earlier_metrics).append(rec)
      if writer:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
          f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
    self._f = open(self.path, "a")  # noqa: SIM115 - closed by close()

  def write(self, rec: dict) -> None:
    (self.evals if "eval_loss" in rec else self.metrics).append(rec)
    self._f.write(json.dumps(rec) + "\n")
    self._f.flush()

  def whole(self) -> tuple[list[dict], list[dict]]:
    """``(metrics, evals)`` of the whole run: the earlier sessions' kept
    records, then this session's."""
    return (self.earlier_metrics + self.metrics,
            self.earlier_evals + self.evals)

  def close(self) -> None:
    self._f.close()


def plot_curves(metrics: list[dict], evals: list[dict], path: str) -> None:
  """A PNG of the train / held-out loss and the gradient norm."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
  steps = [m["step"] for m in metrics]
  a.plot(steps, [m["loss"] for m in metrics], label="train")
  if evals:
    a.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals],
           "o-", label="eval")
  a.set_xlabel("step")
  a.set_ylabel("loss")
  a.legend()
  b.plot(steps, [m["grad_norm"] for m in metrics])
  b.set_xlabel("step")
  b.set_ylabel("gradient norm")
  b.set_yscale("log")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


__all__ = ["MetricsLog", "plot_curves", "quant_error"]
