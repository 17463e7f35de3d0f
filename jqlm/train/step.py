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
3. applies the optimizer, passing it the step's key as the optax extra
   argument ``key`` (transforms that draw random numbers take it; the
   others ignore it), then ``optax.apply_updates``, or for int8 QArray
   params :func:`jqlm.optim.apply_quantized_updates` (stochastic
   re-quantization with the step's key when ``stochastic_round``, else
   round-to-nearest);
4. if the loss or gradient norm is not finite, keeps params and optimizer
   state unchanged (step 3 runs under ``lax.cond``, whose skipped branch
   passes the donated buffers through: the guard costs no second copy of
   the state) and reports ``skipped = 1`` (the loop then counts it or
   stops, per :class:`NanPolicy`).

Randomness: ``TrainState.rng`` is split once per step into the next
state's key and the step's key; every random draw of the step comes from
the step's key (Q-GaLore's stochastic re-quantization, and any transform
that takes ``key``).

The spike diagnostics are read from the state by :func:`step_diagnostics`,
which the loop calls on the steps it logs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jqlm import ops, optim, quant


class TrainState(NamedTuple):
  """What a checkpoint holds besides the data position.

  Attributes:
    step: updates done (int32).
    params: the model params as a plain pytree (QArray leaves for int8
      weights).
    opt_state: the optimizer state.
    rng: the run's PRNG key, split once per step: one half becomes the
      next state's ``rng``, the other is the step's key.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def cross_entropy(logits_BxTxV, targets_BxT) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
    logits_BxTxV.astype(jnp.float32), targets_BxT).mean()


def loss_fn(float_params, graphdef, nnx_state, tokens_BxL):
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
               grad_clip: float, stochastic_round: bool = True
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update; see the module docstring. Returns the new state and
  float32 metrics ``loss``, ``grad_norm``, ``skipped``.

  Args:
    state: the train state (donate it).
    tokens_BxL: ``batch_size`` sequences of ``seq_len + 1`` tokens.
    graphdef, nnx_state: the model's graph and abstract state.
    tx: the optimizer.
    grad_accum: micro-batches per update (a divisor of the batch).
    grad_clip: global-norm clipping threshold (0: none).
    stochastic_round: round QArray (int8) weight updates stochastically
      with the step's key (else to nearest).
  """
  rng, step_key = jax.random.split(state.rng)
  diff_params, join = ops.split_taps(state.params)
  b = tokens_BxL.shape[0]
  micro = tokens_BxL.reshape(grad_accum, b // grad_accum, -1)
  vg = jax.value_and_grad(
    lambda d, mb: loss_fn(join(d), graphdef, nnx_state, mb))

  def body(carry, mb):
    loss_sum, g_sum = carry
    loss, g = vg(diff_params, mb)
    return (loss_sum + loss, jax.tree.map(jnp.add, g_sum, g)), None

  if grad_accum == 1:  # no accumulator: one gradient buffer per param
    loss, grads = vg(diff_params, tokens_BxL)
  else:
    zeros = jax.tree.map(jnp.zeros_like, diff_params)
    (loss, grads), _ = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), zeros), micro)
    inv = jnp.float32(1.0 / grad_accum)
    loss = loss * inv
    grads = jax.tree.map(lambda g: (g * inv.astype(g.dtype)), grads)
  gnorm = _global_norm(grads)
  if grad_clip > 0:
    coef = jnp.minimum(jnp.float32(grad_clip) / (gnorm + 1e-6), 1.0)
    grads = jax.tree.map(lambda g: g * coef.astype(g.dtype), grads)
  opt_key, round_key = jax.random.split(step_key)
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)

  def apply(operand):
    params, opt_state, grads = operand
    updates, opt_state = optax.with_extra_args_support(tx).update(
      grads, opt_state, params, key=opt_key)
    if _has_qarray(params):
      params = optim.apply_quantized_updates(
        params, updates, key=round_key if stochastic_round else None)
    else:
      with jax.numpy_dtype_promotion("standard"):
        params = optax.apply_updates(params, updates)
    return params, opt_state

  # lax.cond, not jnp.where over the trees: the skipped branch passes the
  # donated params and state through, so the old and the new state never
  # coexist (the select kept both alive: +2.9 GB on LLaMA-350M).
  params, opt_state = jax.lax.cond(
    ok, apply, lambda operand: operand[:2],
    (state.params, state.opt_state, grads))
  new_state = TrainState(
    step=state.step + ok.astype(jnp.int32), params=params,
    opt_state=opt_state, rng=rng)
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
  return loss_fn(optim.dequantize_params(params), graphdef, nnx_state,
                  tokens_BxL)
