"""The training loop: thin glue around the pure step.

``run(cfg)`` opens the work dir, builds the mesh, the model and optimizer
(:func:`jqlm.train.setup`), the data (tokenizer trained and cached), the
sharded state and the jitted functions, then loops: one step, metrics to
``metrics.jsonl`` and a progress bar every ``log_every`` steps, held-out
loss and perplexity every ``eval_every``, checkpoints every ``ckpt_every``
and at the end, and a PNG of the loss and gradient-norm curves.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jqlm import data as jdata
from jqlm import models, quant
from jqlm.data import pipeline as jpipeline
from jqlm.data import tokenizer as jtokenizer
from jqlm.train import resume as jresume
from jqlm.train import state as jstate
from jqlm.train.checkpoint import Checkpointer, CheckpointError, has_checkpoints
from jqlm.train.config import NanPolicy, TrainConfig
from jqlm.train.data import eval_rows, prepare_data
from jqlm.train.metrics import MetricsLog, plot_curves, quant_error
from jqlm.train.optimizer import lr_schedule
from jqlm.train.plan import step_function
from jqlm.train.step import (
  TrainState,
  eval_loss,
  operand_stats,
  step_diagnostics,
)

_log = logging.getLogger("jqlm")


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient under ``nan_policy="stop"``."""


@dataclasses.dataclass
class RunResult:
  """What :func:`run` returns: the per-log-step metrics, eval records, the
  final state and the number of skipped (non-finite) steps."""

  metrics: list[dict]
  evals: list[dict]
  state: TrainState
  skipped: int
  complete_at: int | None = None  # a resumed run that had already finished


def distributed_init(cfg: TrainConfig) -> None:
  """``jax.distributed.initialize`` for a multi-process run.

  Uses ``run.coordinator`` / ``num_processes`` / ``process_id`` when
  ``num_processes > 1``, else the ``JAX_COORDINATOR_ADDRESS`` environment
  variables when set; a single-process run does nothing. Call it before
  anything touches a jax device.
  """
  r = cfg.run
  if r.num_processes > 1:
    jax.distributed.initialize(coordinator_address=r.coordinator,
                               num_processes=r.num_processes,
                               process_id=r.process_id)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()


def data_for(cfg: TrainConfig):
  """:func:`prepare_data` for a run's config (cache in ``workdir/cache``
  unless ``data.cache_dir`` is set)."""
  return prepare_data(cfg.data, vocab_size=cfg.model.vocab_size,
                      seed=cfg.run.seed,
                      cache_dir=os.path.join(cfg.run.workdir, "cache"),
                      eval_batches=cfg.run.eval_batches)


def _check_inputs(cfg: TrainConfig, resume: bool, allow_change) -> None:
  """The checks that need no model, data or device, made before anything
  is written: ``allow_change`` without ``resume`` or naming no field, a
  local data source or tokenizer that does not exist, a local tokenizer
  that is not one, a hub source or tokenizer while offline, a vocabulary too
  small for a trained tokenizer, a work dir that is a file, and a resume
  with no checkpoint to resume from."""
  if allow_change and not resume:
    raise ValueError(
      f"--allow-change {' '.join(allow_change)} applies to a resumed run "
      "only; add --resume (resume=True), or drop it.")
  jresume.check_allow(cfg, allow_change)
  d, w = cfg.data, cfg.run.workdir
  if jpipeline.missing_local_path(d.source):
    raise FileNotFoundError(
      f"data.source={d.source!r}: no such file or directory. Check the "
      "path (hub datasets are named like 'allenai/c4'; 'stdlib' is the "
      "embedded corpus).")
  if d.tokenizer is not None and jtokenizer.missing_local_tokenizer(
      d.tokenizer):
    raise FileNotFoundError(
      f"data.tokenizer={d.tokenizer!r}: no such tokenizer.json. Check the "
      "path, or leave data.tokenizer unset to train one on the data.")
  if d.tokenizer is not None:
    try:  # a file that is not a tokenizer.json, a hub name offline
      jtokenizer.check_tokenizer(d.tokenizer)
    except (ValueError, RuntimeError) as e:
      raise type(e)(f"data.tokenizer={d.tokenizer!r}: {e}") from None
  jpipeline.check_online(d.source)
  if d.tokenizer is None and cfg.model.vocab_size < jtokenizer.MIN_VOCAB_SIZE:
    raise ValueError(
      f"model.vocab_size={cfg.model.vocab_size}: a tokenizer trained on the "
      f"data (data.tokenizer unset) needs at least "
      f"{jtokenizer.MIN_VOCAB_SIZE} tokens (256 bytes + special tokens). "
      "Raise model.vocab_size, or set data.tokenizer.")
  if os.path.exists(w) and not os.path.isdir(w):
    raise NotADirectoryError(
      f"run.workdir={w!r} is a file, not a directory. Choose another "
      "run.workdir.")
  ckpts = os.path.join(w, "checkpoints")
  if resume and not has_checkpoints(ckpts):
    raise CheckpointError(
      f"No checkpoint in {os.path.abspath(ckpts)!r} to resume from "
      f"(run.workdir={w!r}). Drop --resume to start a new run, or set "
      "run.workdir to the run to continue.")


def _open_workdir(cfg: TrainConfig, resume: bool) -> Checkpointer:
  """The run's checkpointer; refuses a fresh run into a work dir holding
  checkpoints before anything is written, then saves ``config.json`` (a
  resume rewrites it only after its restore succeeded)."""
  os.makedirs(cfg.run.workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(cfg.run.workdir, "checkpoints"),
                      keep=cfg.run.keep_checkpoints)
  if not resume and (done := ckpt.steps()):
    ckpt.close()  # the earlier run's config.json stays as it was
    raise ValueError(
      f"{cfg.run.workdir} already holds checkpoints (steps {done}) of an "
      "earlier run. Resume it (resume=True, jqlm train --resume), or use "
      "another workdir, or delete that one.")
  if not resume and jax.process_index() == 0:
    jresume.write_config(cfg.run.workdir, cfg)
  return ckpt


def _mesh(cfg: TrainConfig) -> Mesh:
  r = cfg.run
  devices = jax.devices()
  if r.mesh_devices is not None:
    if r.mesh_devices > len(devices):
      raise ValueError(
        f"run.mesh_devices={r.mesh_devices} exceeds the {len(devices)} "
        f"devices here ({devices[0].platform}). Use at most "
        f"{len(devices)}, or unset it to use them all.")
    devices = devices[:r.mesh_devices]
  try:
    mesh = models.make_mesh(r.mesh_data, r.mesh_fsdp, r.mesh_tensor,
                            devices=devices)
  except ValueError as e:
    raise ValueError(f"run.mesh_data={r.mesh_data}, run.mesh_fsdp="
                     f"{r.mesh_fsdp}, run.mesh_tensor={r.mesh_tensor}: "
                     f"{e}") from None
  if cfg.data.batch_size % mesh.shape["data"]:
    raise ValueError(
      f"data.batch_size={cfg.data.batch_size} must be divisible by the "
      f"data-parallel mesh size {mesh.shape['data']} ({len(devices)} "
      f"devices, fsdp {r.mesh_fsdp}, tensor {r.mesh_tensor}). Use a "
      "multiple, or set run.mesh_data / run.mesh_devices.")
  return mesh


def _prepare_data(cfg: TrainConfig):
  """:func:`data_for`; in a multi-process run process 0 trains and caches
  the tokenizer and token streams first and the others then load the
  cache (no racing writers)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    if jax.process_index() == 0:
      data_for(cfg)
    multihost_utils.sync_global_devices("jqlm:prepare_data")
  return data_for(cfg)


def restore(cfg: TrainConfig, s: jstate.Setup, ckpt: Checkpointer):
  """The newest readable checkpoint of the run as ``(state, position,
  step)``, converting one saved by jqlm 0.1 (:func:`jqlm.train.state.
  legacy_target`)."""
  return ckpt.restore(s.restore_target(), legacy=jstate.legacy_target(cfg,
                                                                      s))


@dataclasses.dataclass
class _Compiled:
  step: object
  diagnostics: object
  eval: object
  batch_sharding: NamedSharding
  stats: object = None
  late_step: object = None
  late_eval: object = None
  late_stats: object = None


def _compile(cfg: TrainConfig, s: jstate.Setup, mesh: Mesh) -> _Compiled:
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

  def jit_step(setup):  # the late model's step shares the state's layout
    return jax.jit(step_function(cfg, setup),
                   in_shardings=(s.shardings, batch_sharding),
                   out_shardings=(s.shardings, None), donate_argnums=(0,))

  step = jit_step(s)
  ev, stats = _eval_fns(cfg, s)
  late = late_ev = late_stats = None
  if cfg.late_switch_step() is not None:  # compiled when first called
    s_late = jstate.late_setup(cfg, s)
    late = jit_step(s_late)
    late_ev, late_stats = _eval_fns(cfg, s_late)
  return _Compiled(step, jax.jit(step_diagnostics), ev, batch_sharding,
                   stats, late, late_ev, late_stats)


def _eval_fns(cfg: TrainConfig, s: jstate.Setup):
  """The jitted held-out loss of ``s``'s model, and its operand statistics
  (None without a recipe or with ``run.operand_stats`` off)."""
  graph = dict(graphdef=s.graphdef, nnx_state=s.nnx_state)
  stats = None
  if cfg.model.recipe != "none" and cfg.run.operand_stats:
    stats = jax.jit(functools.partial(operand_stats, **graph))
  return jax.jit(functools.partial(eval_loss, **graph)), stats


def run(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
        stop_after: int | None = None, allow_change=()) -> RunResult:
  """Trains per ``cfg``; see the module docstring.

  Args:
    cfg: the run's configuration (saved to ``workdir/config.json``).
    resume: continue from the newest readable checkpoint in
      ``workdir/checkpoints`` (params, optimizer state, RNG, step and data
      position), reproducing the uninterrupted run exactly.
    progress: show a progress bar.
    stop_after: stop (as if killed) after this many steps, after writing
      that step's checkpoint if one is due; for tests.
    allow_change: with ``resume``, the hyper-parameters (``optimizer.lr``,
      or ``lr``) that may differ from the saved config
      (:mod:`jqlm.train.resume`).

  Raises:
    ResumeConfigError: ``resume`` with a config that changes a fixed field
      or an unallowed hyper-parameter of the saved run (nothing is
      written).
    CheckpointError: ``resume`` with no good checkpoint (with none at
      all, before the model or data is built).
    ValueError, FileNotFoundError, NotADirectoryError: inputs refused
      before anything is written (:func:`_check_inputs`; a mesh that does
      not fit the devices).
    NonFiniteError: a non-finite loss or gradient with
      ``nan_policy="stop"``, or ``max_skip_streak`` skipped steps in a row.
  """
  _check_inputs(cfg, resume, allow_change)
  changes = {}
  if resume:
    saved = jresume.saved_config(cfg.run.workdir)
    if saved is not None:
      changes = jresume.check(saved, cfg, allow_change)
  mesh = _mesh(cfg)  # a mesh that does not fit fails before any write
  ckpt = _open_workdir(cfg, resume)
  s = jstate.setup(cfg, mesh)
  _, train_data, eval_data = _prepare_data(cfg)
  restored = 0
  if resume:
    try:
      state, position, restored = restore(cfg, s, ckpt)
    except BaseException:
      ckpt.close()
      raise
    if jax.process_index() == 0:
      if changes:
        path = jresume.record(cfg.run.workdir, restored, changes)
        _log.warning("jqlm: resuming from step %d with %s (recorded in %s).",
                     restored, ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n)
                                         in changes.items()), path)
      jresume.write_config(cfg.run.workdir, cfg)
    if restored >= cfg.run.steps:
      ckpt.close()
      log = MetricsLog(cfg.run.workdir, fresh=False, writer=False,
                       keep_until=restored)
      _log.warning("jqlm: the run in %s is complete at step %d "
                   "(run.steps=%d); raise run.steps to train further.",
                   cfg.run.workdir, restored, cfg.run.steps)
      metrics, evals = log.whole()
      log.close()
      return RunResult(metrics=metrics, evals=evals, state=state,
                       skipped=0, complete_at=restored)
  else:
    base = (jstate.pretrained_params(cfg, s, mesh)
            if cfg.run.init_from else None)
    state, position = jstate.init_state(s, base), jdata.DataPosition()
  fns = _compile(cfg, s, mesh)
  pid, pcount = jax.process_index(), jax.process_count()

  def device_batch(rows):
    return jax.make_array_from_process_local_data(fns.batch_sharding, rows)

  eval_batches = [device_batch(rows) for rows in eval_rows(
    cfg.data, eval_data, cfg.run.eval_batches, mesh.shape["data"], pid,
    pcount)]
  log = MetricsLog(cfg.run.workdir, fresh=not resume, writer=pid == 0,
                   keep_until=restored if resume else None)
  try:
    state, skipped = _loop(cfg, s, fns, state, position, train_data,
                           eval_batches, device_batch, ckpt, log,
                           progress=progress and pid == 0,
                           stop_after=stop_after)
  finally:
    ckpt.close()
    log.close()
  if pid == 0 and log.metrics:  # the whole run's curves, resumed or not
    plot_curves(*log.whole(),
                os.path.join(cfg.run.workdir, "curves.png"))
  return RunResult(metrics=log.metrics, evals=log.evals, state=state,
                   skipped=skipped)


def _loop(cfg, s, fns, state, position, train_data, eval_batches,
          device_batch, ckpt, log, *, progress, stop_after):
  """Steps until ``run.steps`` (or ``stop_after``); returns the final state
  and the number of skipped steps."""
  r, batch, seq = cfg.run, cfg.data.batch_size, cfg.data.seq_len
  schedule = lr_schedule(cfg.optimizer, r.steps)
  pid, pcount = jax.process_index(), jax.process_count()
  step = int(state.step)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # noqa: PLC0415
    bar = tqdm(total=r.steps, initial=step, desc="train", unit="step",
               disable=None)  # shown on a terminal, silent in logs
  t_last, tokens_since = time.perf_counter(), 0
  skipped = streak = 0
  late_at = cfg.late_switch_step()
  while step < r.steps:
    rows, position = train_data.batch(position, batch, process_index=pid,
                                      process_count=pcount)
    is_late = late_at is not None and step >= late_at
    step_fn = fns.late_step if is_late else fns.step
    state, m = step_fn(state, device_batch(rows))
    tokens_since += batch * seq
    if float(m["skipped"]) > 0:  # params and optimizer state unchanged
      skipped, streak = skipped + 1, streak + 1
      _check_non_finite(cfg, step, m, streak)
      continue
    streak = 0
    step += 1
    if step % r.log_every == 0 or step == r.steps:
      now = time.perf_counter()
      diag = fns.diagnostics(state)
      rec = {"step": step, "loss": float(m["loss"]),
             "grad_norm": float(m["grad_norm"]),
             "lr": float(schedule(step - 1)),
             "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
             "spikes": float(diag["spikes"]),
             "warmup_factor": float(diag["warmup_factor"]),
             "skipped_total": skipped}
      if cfg.model.recipe != "none":
        rec["recipe"] = cfg.model.recipe
        if cfg.model.recipe_options:
          rec["recipe_options"] = cfg.model.recipe_options
        if is_late:
          rec["forward_high_precision"] = True
      qe = quant_error(state.model_params, s.mcfg)
      if qe is not None:
        rec["quant_rel_mse"] = qe
      t_last, tokens_since = now, 0
      log.write(rec)
      if bar is not None:
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
    if step % r.eval_every == 0 or step == r.steps:
      late_now = late_at is not None and step >= late_at
      ev, stats = ((fns.late_eval, fns.late_stats) if late_now
                   else (fns.eval, fns.stats))
      el = float(np.mean([float(ev(state.model_params, b))
                          for b in eval_batches]))
      rec = {"step": step, "eval_loss": el, "eval_ppl": math.exp(el)}
      if stats is not None:
        rec.update(_operand_record(cfg, stats(
          state.model_params, eval_batches[0],
          jax.random.fold_in(jax.random.key(r.seed), step)), late_now))
      log.write(rec)
    if step % r.ckpt_every == 0 or step == r.steps:
      ckpt.save(step, state, position)
    if bar is not None:
      bar.update(1)
    if stop_after is not None and step >= stop_after:
      break
  if bar is not None:
    bar.close()
  return state, skipped


def _operand_record(cfg: TrainConfig, stats, late: bool) -> dict:
  """The eval record's operand statistics (:func:`jqlm.train.step.
  operand_stats` on the first held-out batch): ``operand_clipped`` and
  ``operand_flushed``, each ``{operand: fraction}`` over the operands the
  recipe quantizes (those it reuses from the forward or keeps in high
  precision are left out)."""
  if stats is None:
    return {}
  r = quant.recipe(cfg.model.recipe, **cfg.model.recipe_switches(late=late))
  stats = np.asarray(stats)
  names = [(i, n) for i, n in enumerate(quant.recipes.OPERANDS)
           if getattr(r, n) is not None]
  return {"operand_clipped": {n: float(stats[i, 0]) for i, n in names},
          "operand_flushed": {n: float(stats[i, 1]) for i, n in names}}


def _check_non_finite(cfg: TrainConfig, step: int, m: dict,
                      streak: int) -> None:
  """Raises per the NaN policy after a skipped step."""
  if cfg.run.nan_policy is NanPolicy.STOP:
    raise NonFiniteError(
      f"Non-finite loss or gradient at step {step + 1} (loss "
      f"{float(m['loss'])}, grad norm {float(m['grad_norm'])}). The "
      "update was not applied; the last checkpoint is intact. Lower "
      "optimizer.lr, set optimizer.grad_clip, or set run.nan_policy=skip.")
  if streak >= cfg.run.max_skip_streak:
    raise NonFiniteError(
      f"{streak} consecutive non-finite steps were skipped at step "
      f"{step}: training is not progressing. Lower optimizer.lr or set "
      "optimizer.grad_clip.")
