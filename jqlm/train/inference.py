"""Using a trained run: restore it, evaluate it, sample from it."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlm import models
from jqlm.train import state as jstate
from jqlm.train.checkpoint import Checkpointer, CheckpointError, has_checkpoints
from jqlm.train.config import read_config
from jqlm.train.data import eval_rows
from jqlm.train.loop import data_for, restore
from jqlm.train.step import eval_loss, float_params


def load_run(path: str):
  """Restores a finished or interrupted run for evaluation or sampling.

  Args:
    path: the run's work dir (holding ``config.json``, nested or the flat
      form of jqlm 0.1), or its ``checkpoints`` directory.

  Returns:
    ``(cfg, setup, state, tokenizer, eval_data)``.

  Raises:
    FileNotFoundError: no ``config.json`` in ``path`` or its parent.
    ValueError: a ``config.json`` that is not a valid config.
    CheckpointError: the run has no checkpoint yet (checked before the
      model is built), or none that restores.
  """
  path = os.path.abspath(path)
  if not os.path.exists(os.path.join(path, "config.json")):
    parent = os.path.dirname(path)
    if os.path.exists(os.path.join(parent, "config.json")):
      path = parent
    else:
      raise FileNotFoundError(f"No config.json in {path!r} or its parent: "
                              "pass a jqlm train work dir.")
  cfg = read_config(os.path.join(path, "config.json"))
  cfg = cfg.replace(run={"workdir": path})
  ckpts = os.path.join(path, "checkpoints")
  if not has_checkpoints(ckpts):
    raise CheckpointError(
      f"The run in {path!r} has no checkpoint yet ({ckpts!r} holds none): "
      f"it saves one every run.ckpt_every={cfg.run.ckpt_every} steps and "
      "at its end. Train it further (jqlm train --resume), or pass another "
      "run's work dir.")
  mesh = models.make_mesh(devices=jax.devices()[:1])
  s = jstate.setup(cfg, mesh)
  state, _, _ = restore(cfg, s, Checkpointer(os.path.join(path,
                                                          "checkpoints")))
  tok, _, eval_data = data_for(cfg)
  return cfg, s, state, tok, eval_data


def evaluate(path: str, batches: int | None = None) -> dict:
  """Held-out loss and perplexity of a run's newest checkpoint.

  Raises:
    ValueError: ``batches`` below 1.
  """
  if batches is not None and (isinstance(batches, bool) or not isinstance(
      batches, int) or batches < 1):
    raise ValueError(f"batches={batches!r}: evaluate needs at least one "
                     "batch (or None for the run's eval_batches).")
  cfg, s, state, _, eval_data = load_run(path)
  fn = jax.jit(functools.partial(eval_loss, graphdef=s.graphdef,
                                 nnx_state=s.nnx_state))
  losses = [float(fn(state.model_params, jnp.asarray(rows))) for rows in
            eval_rows(cfg.data, eval_data, batches or cfg.run.eval_batches)]
  loss = float(np.mean(losses))
  return {"step": int(state.step), "eval_loss": loss,
          "eval_ppl": math.exp(loss)}


def sample(path: str, prompt: str, max_new_tokens: int = 64, *,
           seed: int = 0, temperature: float = 0.8,
           top_k: int | None = 40) -> str:
  """Continues ``prompt`` with a run's newest checkpoint.

  Raises:
    ValueError: ``max_new_tokens`` below 1, a negative or non-finite
      ``temperature``, or ``top_k`` below 1 (checked before the run is
      loaded).
  """
  ints, reals = (int, np.integer), (int, float, np.integer, np.floating)
  if isinstance(max_new_tokens, bool) or not isinstance(
      max_new_tokens, ints) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int "
                     ">= 1.")
  if isinstance(temperature, bool) or not (isinstance(
      temperature, reals) and math.isfinite(temperature)
      and temperature >= 0):
    raise ValueError(f"temperature={temperature!r} must be a finite number "
                     ">= 0 (0 for greedy decoding).")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(
      top_k, ints) or top_k < 1):
    raise ValueError(f"top_k={top_k!r} must be an int >= 1, or None for no "
                     "top-k filtering.")
  _, s, state, tok, _ = load_run(path)
  nnx_state = jax.tree.map(lambda x: x, s.nnx_state)
  nnx.replace_by_pure_dict(nnx_state, float_params(state.model_params))
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
