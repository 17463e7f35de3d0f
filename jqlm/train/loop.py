"""The training loop: thin glue around the pure step.

``run(cfg)`` builds the data (tokenizer trained and cached in the work
dir), the sharded state, the jitted step, then loops: one step, metrics to
``metrics.jsonl`` and a progress bar every ``log_every`` steps, held-out
loss and perplexity every ``eval_every``, checkpoints every ``ckpt_every``
and at the end, and a PNG of the loss and gradient-norm curves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jqlm import data as jdata
from jqlm import models, quant
from jqlm.train import state as jstate
from jqlm.train.checkpoint import Checkpointer
from jqlm.train.config import NanPolicy, TrainConfig
from jqlm.train.step import (
  TrainState,
  eval_loss,
  lr_schedule,
  step_diagnostics,
  train_step,
)


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


def prepare_data(cfg: TrainConfig):
  """(tokenizer, train PackedData, eval PackedData), cached in
  ``cfg.cache_dir`` (default ``workdir/cache``).

  The held-out data (shuffled with seed 0 whatever ``cfg.seed``, so that
  seeds are compared on the same sequences) is the embedded corpus' eval
  split for ``"stdlib"``,
  ``cfg.eval_split`` of the source when set (C4's ``"validation"``, as the
  official runs), else the last 2% of the training stream.

  Raises:
    ValueError: a token id that the model's embedding cannot hold (checked
      once, when the tokens are made; cached arrays passed the check).
  """
  if cfg.eval_split is not None and (cfg.data == "stdlib" or os.path.exists(
      cfg.data)):
    raise ValueError(
      f"eval_split={cfg.eval_split!r} names a split of a hub dataset, but "
      f"data={cfg.data!r} is local: the held-out data is the corpus' own "
      "eval split ('stdlib') or the stream's last 2% (local files). Unset "
      "eval_split.")
  cache = cfg.cache_dir or os.path.join(cfg.workdir, "cache")
  os.makedirs(cache, exist_ok=True)
  fp = jdata.tokenizer.fingerprint([cfg.data, str(cfg.data_config),
                                    str(cfg.data_max_bytes), cfg.text_field])
  src = dict(text_field=cfg.text_field, config=cfg.data_config,
             cache_dir=os.path.join(cache, "datasets"),
             max_bytes=cfg.data_max_bytes)
  if cfg.tokenizer is not None:
    tok = jdata.load_tokenizer(cfg.tokenizer)
    # no size check here: T5's tokenizer counts 32100 tokens, 100 of them
    # sentinels that never occur in text, and the official models have
    # 32000 rows; tokenize_to_array checks the ids it produces
    where = (os.path.abspath(cfg.tokenizer) if os.path.exists(cfg.tokenizer)
             else cfg.tokenizer)
    fp = jdata.tokenizer.fingerprint([fp, where])
  else:
    tok = jdata.train_tokenizer(jdata.load_texts(cfg.data, **src),
                                cfg.vocab_size, cache_dir=cache,
                                fingerprint=fp)
  eos = jdata.eos_id(tok)
  base = os.path.join(cache, f"tokens-{cfg.vocab_size}-{fp}")
  train = jdata.tokenize_to_array(jdata.load_texts(cfg.data, **src), tok,
                                  eos_id=eos, vocab_size=cfg.vocab_size,
                                  cache_path=base + "-train.npy")
  if cfg.data == "stdlib":
    ev_src = {**src, "max_bytes": None}
    ev = jdata.tokenize_to_array(jdata.load_texts("stdlib", split="eval",
                                                  **ev_src), tok, eos_id=eos,
                                 vocab_size=cfg.vocab_size,
                                 cache_path=base + "-eval.npy")
  elif cfg.eval_split is not None:
    # about 8 bytes of text per token covers the eval batches
    need = 8 * cfg.eval_batches * cfg.batch_size * (cfg.seq_len + 1)
    ev_src = {**src, "max_bytes": need}
    ev = jdata.tokenize_to_array(
      jdata.load_texts(cfg.data, split=cfg.eval_split, **ev_src), tok,
      eos_id=eos, vocab_size=cfg.vocab_size,
      cache_path=f"{base}-{cfg.eval_split}-{need}.npy")
  else:  # hold out the stream's last 2%
    cut = int(len(train) * 0.98)
    train, ev = train[:cut], train[cut:]
  return (tok, jdata.PackedData(train, cfg.seq_len, seed=cfg.seed),
          # one held-out order for every seed: runs that differ only in
          # seed are evaluated on the same sequences
          jdata.PackedData(ev, cfg.seq_len, seed=0))


def _quant_error(params, mcfg: models.LlamaConfig) -> float | None:
  """Mean relative MSE of the QAT weight quantizers over the quantized
  kernels (None without a QAT policy)."""
  if mcfg.quant is None:
    return None
  errs = []
  layers = params["layers"]
  for i in (layers if isinstance(layers, dict) else range(len(layers))):
    for group, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
      for n in names:
        w = layers[i][group][n]["kernel"]
        rule = mcfg.quant.rule_for(f"layers.{i}.{group}.{n}")
        if rule is None or rule.weight is None or isinstance(
            w, quant.QArray):
          continue
        w32 = jnp.asarray(w, jnp.float32)
        e = quant.quantization_error(w32, quant.fake_quant(w32, rule.weight))
        errs.append(float(e.mse) / max(float(jnp.mean(w32 * w32)), 1e-30))
  return float(np.mean(errs)) if errs else None


def _plot(metrics: list[dict], evals: list[dict], path: str) -> None:
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


def distributed_init(cfg: TrainConfig) -> None:
  """``jax.distributed.initialize`` for a multi-process run.

  Uses ``cfg.coordinator`` / ``num_processes`` / ``process_id`` when
  ``num_processes > 1``, else the ``JAX_COORDINATOR_ADDRESS`` environment
  variables when set; a single-process run does nothing. Call it before
  anything touches a jax device.
  """
  if cfg.num_processes > 1:
    if not cfg.coordinator:
      raise ValueError("num_processes > 1 needs coordinator=host:port.")
    jax.distributed.initialize(coordinator_address=cfg.coordinator,
                               num_processes=cfg.num_processes,
                               process_id=cfg.process_id)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()


def _abstract_state(s: jstate.Setup) -> TrainState:
  """The train state's shapes, dtypes and shardings (a restore target)."""
  return jax.tree.map(
    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
    jax.eval_shape(s.init), s.shardings)


def _eval_rows(cfg: TrainConfig, eval_data, n_batches: int,
               data_parallel: int = 1, pid: int = 0, pcount: int = 1):
  """The fixed held-out batches (the first sequences in epoch-0 order):
  ``n_batches`` batches of ``batch_size`` rows, each split into
  ``grad_accum`` micro-batches as training is (so evaluation fits where
  training does); each at most the held-out data and a multiple of
  ``data_parallel``."""
  n_eval = min(cfg.batch_size // cfg.grad_accum, eval_data.num_sequences)
  n_eval -= n_eval % data_parallel
  if n_eval < 1:
    raise ValueError(f"The held-out data has {eval_data.num_sequences} "
                     "sequences, too few for one eval batch; use shorter "
                     "seq_len or more data.")
  pos = jdata.DataPosition()
  for _ in range(n_batches * cfg.grad_accum):
    rows, pos = eval_data.batch(pos, n_eval, process_index=pid,
                                process_count=pcount)
    yield rows


def run(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
        stop_after: int | None = None) -> RunResult:
  """Trains per ``cfg``; see the module docstring.

  Args:
    cfg: the run's configuration (saved to ``workdir/config.json``).
    resume: continue from the newest readable checkpoint in
      ``workdir/checkpoints`` (params, optimizer state, RNG, step and data
      position), reproducing the uninterrupted run exactly.
    progress: show a progress bar.
    stop_after: stop (as if killed) after this many steps, after writing
      that step's checkpoint if one is due; for tests.

  Raises:
    NonFiniteError: a non-finite loss or gradient with
      ``nan_policy="stop"``.
  """
  os.makedirs(cfg.workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"),
                      keep=cfg.keep_checkpoints)
  if not resume and (done := ckpt.steps()):
    # before anything is written: the earlier run's config.json stays
    ckpt.close()
    raise ValueError(
      f"{cfg.workdir} already holds checkpoints (steps {done}) of an "
      "earlier run. Resume it (resume=True, jqlm train --resume), or use "
      "another workdir, or delete that one.")
  if jax.process_index() == 0:
    with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
      f.write(cfg.to_json())
  devices = jax.devices()
  if cfg.mesh_devices is not None:
    devices = devices[:cfg.mesh_devices]
  mesh = models.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor,
                          devices=devices)
  if cfg.batch_size % mesh.shape["data"]:
    raise ValueError(
      f"batch_size={cfg.batch_size} must be divisible by the data-parallel "
      f"mesh size {mesh.shape['data']} ({len(devices)} devices, fsdp "
      f"{cfg.mesh_fsdp}, tensor {cfg.mesh_tensor}). Use a multiple, or set "
      "mesh_data / mesh_devices.")
  if jax.process_count() > 1:
    # process 0 trains and caches the tokenizer and token streams; the
    # others then load the cache (no racing writers)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    if jax.process_index() == 0:
      prepare_data(cfg)
    multihost_utils.sync_global_devices("jqlm:prepare_data")
  _, train_data, eval_data = prepare_data(cfg)
  s = jstate.setup(cfg, mesh)
  position = jdata.DataPosition()
  if resume:
    state, position, _ = ckpt.restore(_abstract_state(s))
  else:
    state = jstate.init_state(s)
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  step_fn = jax.jit(
    functools.partial(train_step, graphdef=s.graphdef, nnx_state=s.nnx_state,
                      tx=s.tx, grad_accum=cfg.grad_accum,
                      grad_clip=cfg.grad_clip),
    in_shardings=(s.shardings, batch_sharding),
    out_shardings=(s.shardings, None), donate_argnums=(0,))
  diag_fn = jax.jit(step_diagnostics)
  eval_fn = jax.jit(functools.partial(eval_loss, graphdef=s.graphdef,
                                      nnx_state=s.nnx_state))
  schedule = lr_schedule(cfg)
  pid, pcount = jax.process_index(), jax.process_count()

  def device_batch(rows):
    return jax.make_array_from_process_local_data(batch_sharding, rows)

  eval_batches = [device_batch(rows) for rows in _eval_rows(
    cfg, eval_data, cfg.eval_batches, mesh.shape["data"], pid, pcount)]

  metrics_path = os.path.join(cfg.workdir, "metrics.jsonl")
  if pid != 0:  # one writer per run
    metrics_path = os.devnull
  start = int(state.step)
  if not resume and pid == 0 and os.path.exists(metrics_path):
    os.remove(metrics_path)
  metrics: list[dict] = []
  evals: list[dict] = []
  skipped = 0
  bar = None
  if progress and pid == 0:
    from tqdm.auto import tqdm  # noqa: PLC0415
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
               disable=None)  # shown on a terminal, silent in logs
  t_last, tokens_since = time.perf_counter(), 0
  step, streak = start, 0
  with open(metrics_path, "a") as log:
    while step < cfg.steps:
      rows, position = train_data.batch(position, cfg.batch_size,
                                        process_index=pid,
                                        process_count=pcount)
      state, m = step_fn(state, device_batch(rows))
      tokens_since += cfg.batch_size * cfg.seq_len
      if float(m["skipped"]) > 0:
        if cfg.nan_policy is NanPolicy.STOP:
          ckpt.close()
          raise NonFiniteError(
            f"Non-finite loss or gradient at step {step + 1} (loss "
            f"{float(m['loss'])}, grad norm {float(m['grad_norm'])}). The "
            "update was not applied; the last checkpoint is intact. Lower "
            "the learning rate, enable grad_clip, or set nan_policy=skip.")
        skipped += 1  # params and optimizer state were left unchanged
        streak += 1
        if streak >= cfg.max_skip_streak:
          ckpt.close()
          raise NonFiniteError(
            f"{streak} consecutive non-finite steps were skipped at step "
            f"{step}: training is not progressing. Lower the learning rate "
            "or enable grad_clip.")
        continue
      streak = 0
      step += 1
      if step % cfg.log_every == 0 or step == cfg.steps:
        now = time.perf_counter()
        diag = diag_fn(state)
        rec = {"step": step, "loss": float(m["loss"]),
               "grad_norm": float(m["grad_norm"]),
               "lr": float(schedule(step - 1)),
               "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
               "spikes": float(diag["spikes"]),
               "warmup_factor": float(diag["warmup_factor"]),
               "skipped_total": skipped}
        qe = _quant_error(state.params, s.mcfg)
        if qe is not None:
          rec["quant_rel_mse"] = qe
        t_last, tokens_since = now, 0
        metrics.append(rec)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if bar is not None:
          bar.set_postfix(loss=f"{rec['loss']:.3f}")
      if step % cfg.eval_every == 0 or step == cfg.steps:
        losses = [float(eval_fn(state.params, b)) for b in eval_batches]
        el = float(np.mean(losses))
        rec = {"step": step, "eval_loss": el, "eval_ppl": math.exp(el)}
        evals.append(rec)
        log.write(json.dumps(rec) + "\n")
        log.flush()
      if step % cfg.ckpt_every == 0 or step == cfg.steps:
        ckpt.save(step, state, position)
      if bar is not None:
        bar.update(1)
      if stop_after is not None and step >= stop_after:
        break
  ckpt.close()
  if bar is not None:
    bar.close()
  if pid == 0 and metrics:
    _plot(metrics, evals, os.path.join(cfg.workdir, "curves.png"))
  return RunResult(metrics=metrics, evals=evals, state=state,
                   skipped=skipped)


def load_run(path: str):
  """Restores a finished or interrupted run for evaluation or sampling.

  Args:
    path: the run's work dir (holding ``config.json``), or its
      ``checkpoints`` directory.

  Returns:
    ``(cfg, setup, state, tokenizer, eval_data)``.
  """
  path = os.path.abspath(path)
  if not os.path.exists(os.path.join(path, "config.json")):
    parent = os.path.dirname(path)
    if os.path.exists(os.path.join(parent, "config.json")):
      path = parent
    else:
      raise FileNotFoundError(f"No config.json in {path!r} or its parent: "
                              "pass a jqlm train work dir.")
  with open(os.path.join(path, "config.json")) as f:
    cfg = TrainConfig.from_json(f.read()).replace(workdir=path)
  mesh = models.make_mesh(devices=jax.devices()[:1])
  s = jstate.setup(cfg, mesh)
  state, _, _ = Checkpointer(os.path.join(path, "checkpoints")).restore(
    _abstract_state(s))
  tok, _, eval_data = prepare_data(cfg)
  return cfg, s, state, tok, eval_data


def evaluate(path: str, batches: int | None = None) -> dict:
  """Held-out loss and perplexity of a run's newest checkpoint."""
  cfg, s, state, _, eval_data = load_run(path)
  fn = jax.jit(functools.partial(eval_loss, graphdef=s.graphdef,
                                 nnx_state=s.nnx_state))
  losses = [float(fn(state.params, jnp.asarray(rows))) for rows in
            _eval_rows(cfg, eval_data, batches or cfg.eval_batches)]
  loss = float(np.mean(losses))
  return {"step": int(state.step), "eval_loss": loss,
          "eval_ppl": math.exp(loss)}


def sample(path: str, prompt: str, max_new_tokens: int = 64, *,
           seed: int = 0, temperature: float = 0.8,
           top_k: int | None = 40) -> str:
  """Continues ``prompt`` with a run's newest checkpoint."""
  from flax import nnx  # noqa: PLC0415

  from jqlm import optim  # noqa: PLC0415

  cfg, s, state, tok, _ = load_run(path)
  nnx_state = jax.tree.map(lambda x: x, s.nnx_state)
  nnx.replace_by_pure_dict(nnx_state, optim.dequantize_params(state.params))
  model = nnx.merge(s.graphdef, nnx_state)
  ids = tok.encode(prompt).ids or [0]
  room = model.cfg.max_seq_len - len(ids)
  if room < 1:
    raise ValueError(f"The prompt has {len(ids)} tokens; the model's "
                     f"max_seq_len is {model.cfg.max_seq_len}.")
  out = models.generate(model, jnp.asarray([ids], jnp.int32),
                        min(max_new_tokens, room), key=jax.random.key(seed),
                        temperature=temperature, top_k=top_k)
  return tok.decode([int(t) for t in out[0]])
