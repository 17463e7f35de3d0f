"""Running a comparison: every (arm, seed) trained with
:func:`jqlm.train.run` on one shared tokenizer and token cache; finished
runs are reused, so an interrupted comparison continues where it stopped.

Example::

  suite = compare.SUITES["spam"]().with_steps(100).with_seeds((0,))
  result = compare.run_suite(suite, "runs/compare/spam")
  print(result.table())
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable

from jqlm.train.compare.report import RunRecord, SuiteResult, results_clash
from jqlm.train.compare.suites import Suite
from jqlm.train.config import TrainConfig
from jqlm.train.data import tokenizer_path


def _finished(arm: str, cfg: TrainConfig) -> RunRecord | None:
  """The record of a finished run in ``cfg.run.workdir`` with this exact
  config, or None."""
  try:
    workdir = cfg.run.workdir
    with open(os.path.join(workdir, "config.json")) as f:
      same = TrainConfig.from_json(f.read()) == cfg
    with open(os.path.join(workdir, "run.json")) as f:
      info = json.load(f)
    metrics, evals = _read_metrics(os.path.join(workdir, "metrics.jsonl"))
  except (OSError, ValueError, TypeError):
    return None
  if not (same and evals and evals[-1]["step"] == cfg.run.steps):
    return None
  return RunRecord(arm=arm, seed=cfg.run.seed, metrics=metrics, evals=evals,
                   wall_s=float(info["wall_s"]), reused=True)


def _train(arm: str, cfg: TrainConfig) -> RunRecord:
  """Trains ``cfg`` in a fresh ``cfg.run.workdir`` (whatever it held is
  removed) and records its wall time in ``run.json``."""
  from jqlm.train.loop import run  # noqa: PLC0415

  shutil.rmtree(cfg.run.workdir, ignore_errors=True)
  t0 = time.perf_counter()
  res = run(cfg, progress=False)
  wall = time.perf_counter() - t0
  with open(os.path.join(cfg.run.workdir, "run.json"), "w") as f:
    json.dump({"wall_s": wall, "skipped": res.skipped}, f)
  return RunRecord(arm=arm, seed=cfg.run.seed, metrics=res.metrics,
                   evals=res.evals, wall_s=wall)


def _read_metrics(path: str) -> tuple[list[dict], list[dict]]:
  metrics, evals = [], []
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      (evals if "eval_loss" in rec else metrics).append(rec)
  return metrics, evals


def _config_in(workdir: str) -> TrainConfig | None:
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      return TrainConfig.from_json(f.read())
  except (OSError, ValueError, TypeError):
    return None


def settings_tag(suite: Suite) -> str:
  """8 hex digits naming a suite's settings (every arm's config and the
  seeds): comparisons with other settings go to other directories."""
  settings = {"seeds": list(suite.seeds), "arms": [
    [a.name, a.config.to_dict()] for a in suite.arms]}
  if suite.pretrain is not None:
    settings["pretrain"] = suite.pretrain.config.to_dict()
  blob = json.dumps(settings, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_suite(suite: Suite, out_dir: str, *, reuse: bool = True,
              overwrite: bool = False,
              log: Callable[[str], None] | None = print) -> SuiteResult:
  """Trains every arm of ``suite`` with every seed under ``out_dir``.

  Runs go to ``out_dir/<arm>/seed<k>``; the tokenizer and token arrays are
  built once in ``out_dir/cache``. With ``reuse``, a run whose directory
  holds a finished run of the identical config is read back instead of
  trained again (so an interrupted comparison continues where it
  stopped); an unfinished run of the identical config is trained anew.

  Nothing else is deleted: a run directory that holds a run of another
  config (a comparison with other settings in the same ``out_dir``) or no
  readable ``config.json``, a finished run when ``reuse`` is off, or
  ``results.json`` of other settings (which :meth:`SuiteResult.save`
  would replace) raises FileExistsError before anything is trained,
  unless ``overwrite``.

  Raises:
    FileExistsError: runs that would be replaced, without ``overwrite``
      (the message lists them and the ways out).

  Returns:
    A :class:`SuiteResult`; also written as ``results.md``,
    ``results.json`` and ``curves.png`` in ``out_dir`` by
    :meth:`SuiteResult.save`.
  """
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise NotADirectoryError(f"The output directory {out_dir!r} is a file. "
                             "Pass another --out (out_dir).")
  os.makedirs(out_dir, exist_ok=True)
  cache = os.path.join(out_dir, "cache")
  start = {}
  if suite.pretrain is not None:
    pre = suite.pretrain.config.replace(
      run={"workdir": os.path.join(out_dir, "pretrain")},
      data={"cache_dir": cache})
    start = {"run": {"init_from": pre.run.workdir},
             "data": {"tokenizer": tokenizer_path(
               pre.data, vocab_size=pre.model.vocab_size, cache_dir=cache)}}
  plan = [(seed, arm, arm.config.replace(
    run={"seed": seed,
         "workdir": os.path.join(out_dir, arm.name, f"seed{seed}"),
         **start.get("run", {})},
    data={"cache_dir": cache, **start.get("data", {})}))
    for seed in suite.seeds for arm in suite.arms]
  if not overwrite:
    clash = []
    if (why := results_clash(out_dir, suite)) is not None:
      clash.append(why)
    for _, arm, cfg in plan:
      old = _config_in(cfg.run.workdir)
      if old is None:
        if os.path.isdir(cfg.run.workdir) and os.listdir(cfg.run.workdir):
          clash.append(f"{cfg.run.workdir} (no readable config.json: not a "
                       "run of this comparison)")
        continue
      if old != cfg:
        clash.append(f"{cfg.run.workdir} (another config)")
      elif not reuse and _finished(arm.name, cfg) is not None:
        clash.append(f"{cfg.run.workdir} (finished)")
    if clash:
      raise FileExistsError(
        f"{len(clash)} runs in {out_dir} would be replaced: "
        f"{'; '.join(clash[:3])}{' ...' if len(clash) > 3 else ''}. Nothing "
        "was deleted. Write to another directory (--out), or pass "
        "--overwrite to replace them.")
  if suite.pretrain is not None:  # trained once, or reused
    old = _config_in(pre.run.workdir)
    if old is not None and old != pre and not overwrite:
      raise FileExistsError(
        f"{pre.run.workdir} holds a pretraining run of another config. "
        "Nothing was deleted. Write to another directory (--out), or pass "
        "--overwrite to replace it.")
    rec = _finished("pretrain", pre) or _train("pretrain", pre)
    if log is not None:
      log(f"[pretrain] held-out loss {rec.evals[-1]['eval_loss']:.4f} on "
          f"{pre.data.source} ({'reused' if rec.reused else 'trained'}, "
          f"{rec.wall_s:.0f} s)")
  records = []
  total = len(plan)
  for seed, arm, cfg in plan:
    rec = _finished(arm.name, cfg) if reuse else None
    if rec is None:
      # an unfinished run of this config, or one overwrite allows
      rec = _train(arm.name, cfg)
    records.append(rec)
    if log is not None:
      ev = rec.evals[-1]["eval_loss"] if rec.evals else float("nan")
      log(f"[{len(records)}/{total}] {arm.name} seed {seed}: held-out "
          f"loss {ev:.4f} ({'reused' if rec.reused else 'trained'}, "
          f"{rec.wall_s:.0f} s)")
  return SuiteResult(suite=suite, records=records)
