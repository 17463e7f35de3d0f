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
  them in memory: ``metrics`` (train steps) and ``evals``."""

  def __init__(self, workdir: str, *, fresh: bool, writer: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl") if writer \
      else os.devnull
    if fresh and writer and os.path.exists(self.path):
      os.remove(self.path)
    self._f = open(self.path, "a")  # noqa: SIM115 - closed by close()
    self.metrics: list[dict] = []
    self.evals: list[dict] = []

  def write(self, rec: dict) -> None:
    (self.evals if "eval_loss" in rec else self.metrics).append(rec)
    self._f.write(json.dumps(rec) + "\n")
    self._f.flush()

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
