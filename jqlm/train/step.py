r"""The pure train and eval steps, the optimizer factory and LR schedules.

``train_step(state, batch)`` (with ``graphdef``, ``tx`` and the config bound
by :func:`make_train_step`):

1. splits the batch into ``grad_accum`` micro-batches and sums
   ``jax.value_and_grad`` of the mean next-token cross-entropy over them
   (``lax.scan``). Q-GaLore's int8 weights stay int8 in the forward pass
   (:func:`jqlm.ops.qmatmul`); their gradients come back through zero
   :class:`jqlm.ops.TappedWeight` taps as the gradients of the dequantized
   weights;
2. optionally clips the global gradient norm (torch's
   ``clip_grad_norm_``: coefficient ``c / (norm + 1e-6)`` capped at 1,
   spec §1);
3. applies the optimizer: ``optax.apply_updates``, or for int8 QArray params
   :func:`jqlm.optim.apply_quantized_updates` with the key carried in the
   optimizer state (stochastic re-quantization);
4. if the loss or gradient norm is not finite, keeps params and optimizer
   state unchanged and reports ``skipped = 1`` (the loop then counts it or
   stops, per :class:`NanPolicy`).

The spike diagnostics are read from the state by :func:`step_diagnostics`,
which the loop calls on the steps it logs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jqlm import ops, optim, quant
from jqlm.train.config import OptimizerKind, ScheduleKind, TrainConfig


class TrainState(NamedTuple):
  """What a checkpoint holds besides the data position.

  Attributes:
    step: updates done (int32).
    params: the model params as a plain pytree (QArray leaves for int8
      weights).
    opt_state: the optimizer state.
    rng: the run's PRNG key, split every step.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  r"""The official schedule (spec §1): :math:`\lambda(s) = s / W` for
  :math:`s < W`, then :math:`r + (1 - r)\frac12(1 + \cos(\pi (s - W) /
  (S - W)))` with :math:`r` = ``min_lr_ratio``; or linear warmup then
  constant. Evaluated at the update count, as the official ``LambdaLR``
  (the first update has lr 0 when W > 0)."""
  base, w, total = cfg.lr, cfg.warmup_steps, cfg.steps
  r = cfg.min_lr_ratio

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    warm = s / max(w, 1) if w > 0 else jnp.float32(1.0)
    if cfg.schedule is ScheduleKind.CONSTANT:
      after = jnp.float32(1.0)
    else:
      frac = jnp.clip((s - w) / max(total - w, 1), 0.0, 1.0)
      after = r + (1 - r) * 0.5 * (1 + jnp.cos(jnp.float32(math.pi) * frac))
    return jnp.float32(base) * jnp.where(s < w, warm, after)

  return schedule


def build_optimizer(cfg: TrainConfig, key: jax.Array
                    ) -> optax.GradientTransformation:
  """The optimizer of ``cfg`` (one ``match`` over :class:`OptimizerKind`)."""
  lr = lr_schedule(cfg)
  sq = cfg.state_quant or None
  reset = cfg.reset_interval
  match cfg.optimizer:
    case OptimizerKind.ADAMW:
      return optim.adamw(lr, weight_decay=cfg.weight_decay, state_quant=sq)
    case OptimizerKind.SPAM:
      kw = _given(reset_interval=reset, warmup_steps=cfg.reset_warmup_steps,
                  grace_steps=cfg.spike_grace_steps,
                  spike_threshold=cfg.spike_threshold)
      return optim.spam(lr, weight_decay=cfg.weight_decay, state_quant=sq,
                        **kw)
    case OptimizerKind.STABLE_SPAM:
      kw = _given(reset_interval=reset, gamma1=cfg.gamma1,
                  gamma2=cfg.gamma2, gamma3=cfg.gamma3)
      return optim.stable_spam(
        lr, weight_decay=cfg.weight_decay, state_quant=sq,
        total_steps=cfg.steps if cfg.total_steps_scale else None, **kw)
    case OptimizerKind.GALORE:
      return optim.galore(lr, cfg.rank, weight_decay=cfg.weight_decay,
                          update_proj_gap=cfg.update_proj_gap,
                          scale=cfg.galore_scale, state_quant=sq)
    case OptimizerKind.Q_GALORE:
      return optim.q_galore(
        lr, cfg.rank, weight_decay=cfg.weight_decay, key=key,
        update_proj_gap=cfg.update_proj_gap, scale=cfg.galore_scale,
        stochastic_round=cfg.stochastic_round,
        state_quant=8 if sq is None else sq,
        proj_group_size=_proj_group(cfg))
  raise ValueError(f"Unknown optimizer {cfg.optimizer}.")  # pragma: no cover


def _given(**kw) -> dict:
  """The keyword arguments that are not None (None = optimizer default)."""
  return {k: v for k, v in kw.items() if v is not None}


def _proj_group(cfg: TrainConfig) -> int:
  """256 (the official group) unless the model is too small for it."""
  return 256 if cfg.rank * 64 % 256 == 0 else 64


def cross_entropy(logits_BxTxV, targets_BxT) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
    logits_BxTxV.astype(jnp.float32), targets_BxT).mean()


def _loss_fn(float_params, graphdef, nnx_state, tokens_BxL):
  state = jax.tree.map(lambda x: x, nnx_state)
  nnx.replace_by_pure_dict(state, float_params)
  model = nnx.merge(graphdef, state)
  return cross_entropy(model(tokens_BxL[:, :-1]), tokens_BxL[:, 1:])


def _global_norm(tree) -> jax.Array:
  leaves = [jnp.sum(jnp.square(x.astype(jnp.float32)))
            for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(leaves[1:], leaves[0]))


def _has_qarray(params) -> bool:
  return any(isinstance(x, quant.QArray) for x in jax.tree.leaves(
    params, is_leaf=lambda x: isinstance(x, quant.QArray)))


def train_step(state: TrainState, tokens_BxL: jax.Array, *, graphdef,
               nnx_state, tx: optax.GradientTransformation, grad_accum: int,
               grad_clip: float) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update; see the module docstring. Returns the new state and
  float32 metrics ``loss``, ``grad_norm``, ``skipped``."""
  rng, _ = jax.random.split(state.rng)
  diff_params, join = ops.split_taps(state.params)
  b = tokens_BxL.shape[0]
  micro = tokens_BxL.reshape(grad_accum, b // grad_accum, -1)
  vg = jax.value_and_grad(
    lambda d, mb: _loss_fn(join(d), graphdef, nnx_state, mb))

  def body(carry, mb):
    loss_sum, g_sum = carry
    loss, g = vg(diff_params, mb)
    return (loss_sum + loss, jax.tree.map(jnp.add, g_sum, g)), None

  zeros = jax.tree.map(jnp.zeros_like, diff_params)
  (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                  micro)
  inv = jnp.float32(1.0 / grad_accum)
  loss = loss * inv
  grads = jax.tree.map(lambda g: (g * inv.astype(g.dtype)), grads)
  gnorm = _global_norm(grads)
  if grad_clip > 0:
    coef = jnp.minimum(jnp.float32(grad_clip) / (gnorm + 1e-6), 1.0)
    grads = jax.tree.map(lambda g: g * coef.astype(g.dtype), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if _has_qarray(state.params):
    params = optim.apply_quantized_updates(
      state.params, updates, key=optim.rounding_key(opt_state))
  else:
    with jax.numpy_dtype_promotion("standard"):
      params = optax.apply_updates(state.params, updates)
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(
    ok, new, old))
  new_state = TrainState(
    step=state.step + ok.astype(jnp.int32),
    params=keep(params, state.params),
    opt_state=keep(opt_state, state.opt_state),
    rng=rng)
  metrics = {"loss": loss, "grad_norm": gnorm,
             "skipped": (~ok).astype(jnp.float32)}
  return new_state, metrics


def step_diagnostics(state: TrainState) -> dict[str, jax.Array]:
  """The last update's ``spikes`` and ``warmup_factor`` (float32), from
  :func:`jqlm.optim.spike_diagnostics` of the optimizer state.

  Separate from :func:`train_step` so that the loop pays for the count (a
  pass over SPAM's second moments) only on the steps it logs.
  """
  diag = optim.spike_diagnostics(state.opt_state)
  return {"spikes": diag.spike_count.astype(jnp.float32),
          "warmup_factor": diag.warmup_factor.astype(jnp.float32)}


def eval_loss(params, tokens_BxL, *, graphdef, nnx_state) -> jax.Array:
  """Mean next-token cross-entropy of a batch at ``params``."""
  return _loss_fn(optim.dequantize_params(params), graphdef, nnx_state,
                  tokens_BxL)
