r"""The optimizer factory and the LR schedule of a run, from its
:class:`~jqlm.train.config.OptimizerConfig` alone (plus the run's length).

GaLore and Q-GaLore project, and Q-GaLore holds in int8, the block linears
that the model defines (:func:`jqlm.models.block_linear_mask`).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import optax

from jqlm import models, optim
from jqlm.train.config import (
  AdamWConfig,
  ApolloConfig,
  ApolloMiniConfig,
  GaLoreConfig,
  MicroAdamConfig,
  MuonConfig,
  NaturalGaLoreConfig,
  OptimizerConfig,
  QGaLoreConfig,
  ScheduleKind,
  SpamConfig,
  StableSpamConfig,
)

# allow_empty: a scanned model's optimizer also runs on the params outside
# the layer stack (embeddings, norms, head), which hold no block linear
_BLOCK_LINEARS = functools.partial(models.block_linear_mask, allow_empty=True)


def _muon_dims(params):
  """Muon on the block linears, AdamW on the rest."""
  return optim.muon_dimension_numbers(params, _BLOCK_LINEARS)


def lr_schedule(opt: OptimizerConfig, steps: int) -> optax.Schedule:
  r"""The official schedule (spec §1): :math:`\lambda(s) = s / W` for
  :math:`s < W`, then :math:`r + (1 - r)\frac12(1 + \cos(\pi (s - W) /
  (S - W)))` with :math:`r` = ``min_lr_ratio`` and :math:`S` = ``steps``;
  or linear warmup then constant. Evaluated at the update count, as the
  official ``LambdaLR`` (the first update has lr 0 when W > 0)."""
  base, w, total = opt.lr, opt.warmup_steps, steps
  r = opt.min_lr_ratio

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    warm = s / max(w, 1) if w > 0 else jnp.float32(1.0)
    if opt.schedule is ScheduleKind.CONSTANT:
      after = jnp.float32(1.0)
    else:
      frac = jnp.clip((s - w) / max(total - w, 1), 0.0, 1.0)
      after = r + (1 - r) * 0.5 * (1 + jnp.cos(jnp.float32(math.pi) * frac))
    return jnp.float32(base) * jnp.where(s < w, warm, after)

  return schedule


def build_optimizer(opt: OptimizerConfig, steps: int, *, seed: int = 0
                    ) -> optax.GradientTransformation:
  """The optimizer of ``opt`` for a run of ``steps`` updates, with
  ``opt.component_clip`` in front when set. Q-GaLore's stochastic rounding
  of its int8 weights takes its key from the train step
  (:func:`jqlm.optim.apply_quantized_updates`), not from this optimizer;
  the optimizers that draw random numbers themselves (APOLLO's projections,
  SPAM's sparse masks) take theirs from ``seed`` (the run's)."""
  tx = _build(opt, steps, seed)
  if opt.component_clip > 0:
    tx = optax.chain(optim.clip_by_component_norm(opt.component_clip), tx)
  return tx


def _build(opt: OptimizerConfig, steps: int, seed: int
           ) -> optax.GradientTransformation:
  """The optimizer of ``opt`` (one ``match`` over the config's class)."""
  lr = lr_schedule(opt, steps)
  match opt:
    case MicroAdamConfig():
      return optim.micro_adam(
        lr, block_size=opt.block_size,
        quant_block_size=opt.quant_block_size, window=opt.window,
        k_init=opt.k_init, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay)
    case NaturalGaLoreConfig():
      return optim.natural_galore(
        lr, opt.rank, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay, mask=_BLOCK_LINEARS,
        update_proj_gap=opt.update_proj_gap, scale=opt.scale,
        history=opt.history, damping=opt.damping)
    case ApolloMiniConfig():
      return optim.apollo_mini(
        lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay, mask=_BLOCK_LINEARS, key=seed,
        update_proj_gap=opt.update_proj_gap, scale=opt.scale,
        scale_front=opt.scale_front, disable_nl=opt.disable_nl)
    case ApolloConfig():
      return optim.apollo(
        lr, opt.rank, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay, mask=_BLOCK_LINEARS, key=seed,
        update_proj_gap=opt.update_proj_gap, scale=opt.scale,
        scale_front=opt.scale_front, disable_nl=opt.disable_nl)
    case MuonConfig():
      kw = dict(
        beta=opt.beta, nesterov=opt.nesterov, ns_steps=opt.ns_steps,
        weight_decay=opt.weight_decay, adam_b1=opt.b1, adam_b2=opt.b2,
        eps=opt.eps, adam_weight_decay=opt.weight_decay,
        consistent_rms=opt.consistent_rms or None,
        muon_weight_dimension_numbers=_muon_dims)
      if opt.state.bits == 8:
        return optim.muon_8bit(lr, **kw)
      return optax.contrib.muon(lr, **kw)
    case QGaLoreConfig():
      return optim.q_galore(
        lr, opt.rank, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay, mask=_BLOCK_LINEARS,
        update_proj_gap=opt.update_proj_gap, scale=opt.scale,
        proj_bits=opt.proj_bits, proj_group_size=opt.proj_group_size,
        weight_bits=opt.weight_bits,
        weight_group_size=opt.weight_group_size,
        stochastic_round=opt.stochastic_round, state_quant=opt.state.bits)
    case GaLoreConfig():
      return optim.galore(
        lr, opt.rank, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay, mask=_BLOCK_LINEARS,
        update_proj_gap=opt.update_proj_gap, scale=opt.scale,
        state_quant=opt.state.bits)
    case StableSpamConfig():
      return optim.stable_spam(
        lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay, gamma1=opt.gamma1, gamma2=opt.gamma2,
        gamma3=opt.gamma3, reset_interval=opt.reset_interval,
        total_steps=steps if opt.total_steps_scale else None,
        state_quant=opt.state.bits)
    case SpamConfig():
      return optim.spam(
        lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay, spike_threshold=opt.spike_threshold,
        reset_interval=opt.reset_interval,
        warmup_steps=opt.reset_warmup_steps,
        grace_steps=opt.spike_grace_steps, state_quant=opt.state.bits,
        sparse_momentum=None if opt.density == 1.0 else opt.density,
        sparse_mask=_BLOCK_LINEARS, sparse_key=seed)
    case AdamWConfig():
      return optim.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                         weight_decay=opt.weight_decay,
                         state_quant=opt.state.bits)
  raise TypeError(f"No optimizer for config {type(opt).__name__}.")
