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

On a ``scan_layers`` model the optimizer state is a :class:`LayeredState`
and step 3 runs group by group: a ``fori_loop`` over the layers updates
each layer's params and state in place, and the head and the embedding
have their own updates, each under its own guard (one layer's update
scratch at a time). :func:`layerwise_train_step` goes further and updates
each layer inside the backward pass (``run.layerwise_update``).

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

from jqlm import models, ops, optim, quant


class TrainState(NamedTuple):
  """What a checkpoint holds besides the data position.

  Attributes:
    step: updates done (int32).
    params: the model params as a plain pytree (QArray leaves for int8
      weights).
    opt_state: the optimizer state.
    rng: the run's PRNG key, split once per step: one half becomes the
      next state's ``rng``, the other is the step's key.
    frozen: params that are not trained (a LoRA run's base model:
      ``model.lora_rank``), with ``params`` holding the rest; both are the
      params pytree with ``None`` where the other holds a leaf
      (:func:`split_trainable`). ``None`` when every param trains. The
      train step differentiates ``params`` only: no gradient, optimizer
      state or update of the frozen params exists.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  frozen: Any = None

  @property
  def model_params(self):
    """Every param of the model (``params`` with ``frozen`` merged in)."""
    return merge_params(self.params, self.frozen)


def _is_none(x) -> bool:
  return x is None


def split_trainable(params, mask) -> tuple[Any, Any]:
  """``(trainable, frozen)``: ``params`` with ``None`` where ``mask`` is
  False, and with ``None`` where it is True (``mask``: a pytree of bools
  matching ``params``, one per quantized node)."""
  leafy = lambda x: models.is_quantized(x) or x is None  # noqa: E731
  train = jax.tree.map(lambda p, m: p if m else None, params, mask,
                       is_leaf=leafy)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, mask,
                        is_leaf=leafy)
  return train, frozen


def merge_params(params, frozen):
  """The inverse of :func:`split_trainable` (``frozen=None``: ``params``)."""
  if frozen is None:
    return params
  return jax.tree.map(lambda p, f: f if p is None else p, params, frozen,
                      is_leaf=lambda x: x is None or models.is_quantized(x))


def cross_entropy(logits_BxTxV, targets_BxT) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
    logits_BxTxV.astype(jnp.float32), targets_BxT).mean()


def _merged(graphdef, nnx_state, params):
  """The model with ``params`` (a pure dict, possibly partial: entries it
  lacks keep ``nnx_state``'s abstract values)."""
  state = jax.tree.map(lambda x: x, nnx_state)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def loss_fn(params, graphdef, nnx_state, tokens_BxL, key=None):
  """Mean next-token cross-entropy; ``key`` feeds a low-precision
  training recipe's random numbers (:func:`model_key`)."""
  model = _merged(graphdef, nnx_state, params)
  return cross_entropy(model(tokens_BxL[:, :-1], key=key),
                       tokens_BxL[:, 1:])


def model_key(step_key: jax.Array) -> jax.Array:
  """The model's key of a step (a recipe's stochastic rounding and random
  Hadamard signs): ``fold_in(step_key, 0x6D6F64)``, which leaves the
  optimizer's and the weight rounding's keys (``split(step_key)``) as they
  were. Micro-batch ``j`` of an accumulated step folds in ``j``; layer
  ``i`` folds in ``i`` inside the model."""
  return jax.random.fold_in(step_key, 0x6D6F64)


def _sum_squares(tree) -> jax.Array:
  leaves = [jnp.sum(jnp.square(x.astype(jnp.float32)))
            for x in jax.tree.leaves(tree)]
  return sum(leaves[1:], leaves[0]) if leaves else jnp.zeros((), jnp.float32)


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(_sum_squares(tree))


def _has_qarray(params) -> bool:
  return any(isinstance(x, quant.QArray) for x in jax.tree.leaves(
    params, is_leaf=lambda x: isinstance(x, quant.QArray)))


# ---------------------------------------------------------------------------
# scanned layer stacks: the optimizer runs layer by layer


class LayeredState(NamedTuple):
  """The optimizer state of a ``scan_layers`` model.

  The optimizer runs on each layer as on a model with that one layer: its
  state for layer ``i`` is ``tx.init({"layers": params["layers"][i]})``
  (slice ``i`` of every leaf), and the states of all layers are stacked
  along a leading axis like the params. The params outside the stack form
  two groups with their own states, ``tx.init(group)``: ``"head"`` (the
  final norm and the LM head, whose gradients exist first) and
  ``"embed"`` (the embedding, whose gradient exists last), so that each
  is updated while the other's gradient does not exist (the layer-wise
  step) or its scratch is freed (one group's update at a time). Per-leaf optimizers
  (every jqlm optimizer and optax's per-leaf transforms) compute exactly
  what they compute on the whole tree; the update then holds one layer's
  scratch at a time. Transforms that couple leaves (a global-norm clip
  inside ``tx``) would see one layer at a time: clip in the train step
  (``optimizer.grad_clip``) instead.

  Attributes:
    layers: the stacked per-layer states.
    rest: ``{"head": state, "embed": state}``, the states of the params
      outside the stack (:func:`rest_groups`).
  """

  layers: Any
  rest: Any


def split_layers(params) -> tuple[Any, dict]:
  """``(params["layers"], the other entries)`` of a scanned model's
  params."""
  return params["layers"], {k: v for k, v in params.items() if k != "layers"}


def rest_groups(rest: dict) -> dict[str, dict]:
  """The params outside a scanned stack by update group: ``"head"`` (every
  entry but the embedding: final norm and LM head) and ``"embed"``."""
  return {"head": {k: v for k, v in rest.items() if k != "embed"},
          "embed": {"embed": rest["embed"]}}


def is_stacked(params) -> bool:
  """Whether ``params`` (a pure dict) are a ``scan_layers`` model's: its
  ``layers`` entry is keyed by module names, not layer indices."""
  layers = params.get("layers") if isinstance(params, dict) else None
  return isinstance(layers, dict) and any(isinstance(k, str) for k in layers)


def _map_layers(fn, *trees):
  """``fn`` on each layer's slice of stacked ``trees`` (``lax.map``: one
  layer at a time), outputs stacked."""
  return jax.lax.map(lambda xs: fn(*xs), trees)


def init_opt_state(tx: optax.GradientTransformation, params, *,
                   layered: bool):
  """``tx.init(params)``, or for a scanned model (``layered``) the
  :class:`LayeredState`."""
  with jax.numpy_dtype_promotion("standard"):
    if not layered:
      return tx.init(params)
    layers, rest = split_layers(params)
    return LayeredState(
      layers=_map_layers(lambda p: tx.init({"layers": p}), layers),
      rest={g: tx.init(t) for g, t in rest_groups(rest).items()})


def _take(tree, i):
  return jax.tree.map(
    lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _put(tree, new, i):
  return jax.tree.map(
    lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y.astype(x.dtype), i,
                                                     0), tree, new)


def _update_apply(tx, params, grads, opt_state, *, key, round_key):
  """``tx.update`` then the update applied (QArray weights re-quantized:
  stochastically with ``round_key``, or to nearest when it is None)."""
  # standard promotion: optax's own transforms mix Python scalars and
  # int32 counts (jqlm's are strict-clean, and tested so on their own)
  with jax.numpy_dtype_promotion("standard"):
    updates, opt_state = optax.with_extra_args_support(tx).update(
      grads, opt_state, params, key=key)
  if _has_qarray(params):
    params = optim.apply_quantized_updates(params, updates, key=round_key)
  else:
    with jax.numpy_dtype_promotion("standard"):
      params = optax.apply_updates(params, updates)
  return params, opt_state


def _layer_keys(key, i):
  return None if key is None else jax.random.fold_in(key, i)


def _fence(tree, i):
  """``tree``, materialised: a conditional is a fusion boundary (its
  never-taken branch keeps XLA from removing it; ``i >= 0`` always)."""
  return jax.lax.cond(i >= 0, lambda t: t,
                      lambda t: jax.tree.map(jnp.zeros_like, t), tree)


def _update_layer(tx, p_all, s_all, g_i, i, *, key, round_key, p_i=None):
  """Layer ``i``'s update, written into the stacked params and state in
  place (``dynamic_update_slice`` on the loop carry).

  Layer ``i``'s old state is first copied out (:func:`_fence`, one layer's
  bytes). Otherwise XLA fuses the read of the old state into the params'
  update and, unable to order that read before the state's in-place
  write, copies the whole stacked state every iteration (+2.4 GB for
  float AdamW on LLaMA-350M). ``p_i``, layer ``i``'s params already copied
  out, serves the same purpose for a caller that also reads them (the
  layer-wise backward)."""
  p_i, s_i = _update_apply(
    tx, {"layers": _take(p_all, i) if p_i is None else p_i},
    {"layers": g_i}, _fence(_take(s_all, i), i), key=_layer_keys(key, i),
    round_key=_layer_keys(round_key, i))
  return _put(p_all, p_i["layers"], i), _put(s_all, s_i, i)


def _num_layers(layers) -> int:
  return jax.tree.leaves(layers)[0].shape[0]


def _update_group(tx, params, grads, state, ok, *, key, round_key):
  """One group's guarded update: ``(params, state, done)``. ``done`` is
  ``ok`` as a value of the conditional, which XLA cannot see through, so
  that a later update conditioned on it runs after this one (their
  scratch then never coexists)."""
  return jax.lax.cond(
    ok, lambda o: (*_update_apply(tx, *o, key=key, round_key=round_key),
                   jnp.ones((), bool)),
    lambda o: (o[0], o[2], jnp.zeros((), bool)), (params, grads, state))


def _group_keys(key, round_key, j):
  return _layer_keys(key, j), _layer_keys(round_key, j)


def _update_layered(tx, params, grads, opt_state: LayeredState, ok, *, key,
                    round_key):
  """The update of a scanned model: a loop over the layers (each reads its
  slice of params, gradients and state and writes its params and state
  back in place), and the head and embedding groups. Layer ``i`` draws its
  randomness from ``fold_in(key, i)``, the head from ``fold_in(key, L)``,
  the embedding from ``fold_in(key, L + 1)``.

  Each group's update runs under its own ``lax.cond(ok, ...)`` (the
  NaN/Inf guard) rather than the whole update under one: a conditional's
  operands live until it ends, so one guard around everything would keep
  every layer's gradient alive during the other groups' updates."""
  layers, rest = split_layers(params)
  g_layers, g_rest = split_layers(grads)
  n = _num_layers(layers)
  groups, g_groups = rest_groups(rest), rest_groups(g_rest)
  new_rest, new_state = {}, {}

  def body(i, carry):
    p_all, s_all, ok_c = carry
    p_all, s_all = jax.lax.cond(
      ok, lambda o: _update_layer(tx, *o, _take(g_layers, i), i, key=key,
                                  round_key=round_key),
      lambda o: o, (p_all, s_all))
    return p_all, s_all, ok_c & (i >= 0)

  def update_rest(ok_g):
    for j, g in enumerate(("head", "embed")):
      k, rk = _group_keys(key, round_key, n + j)
      new_rest[g], new_state[g], ok_g = _update_group(
        tx, groups[g], g_groups[g], opt_state.rest[g], ok_g, key=k,
        round_key=rk)

  # Which goes first decides the peak. Float moments update in place, so
  # the head and embedding go first and their gradients are freed before
  # the layer loop (what XLA schedules when the two are independent).
  # Block-quantized moments are updated in chunks into fresh buffers (the
  # update and the new codes), so they go after the loop, when the layers'
  # gradients are dead: their guard then comes out of the loop (``ok``
  # and'ed with ``i >= 0``, which XLA cannot fold; a plain pass-through it
  # forwards). Measured on LLaMA-350M: -0.14 GB (float AdamW) and -0.4 GB
  # (8-bit AdamW, Q-GaLore) against the other order.
  rest_after = any(
    isinstance(x, optim.QuantizedMoment) for x in jax.tree.leaves(
      opt_state.rest, is_leaf=lambda x: isinstance(x, optim.QuantizedMoment)))
  if not rest_after:
    update_rest(ok)
  layers, s_layers, ok_rest = jax.lax.fori_loop(
    0, n, body, (layers, opt_state.layers, ok))
  if rest_after:
    update_rest(ok_rest)
  rest = {**new_rest["head"], **new_rest["embed"]}
  return {**rest, "layers": layers}, LayeredState(layers=s_layers,
                                                  rest=new_state)


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
  mkey = model_key(step_key)
  frozen = state.frozen
  vg = jax.value_and_grad(
    lambda d, mb, k: loss_fn(merge_params(join(d), frozen), graphdef,
                             nnx_state, mb, k))

  def body(carry, xs):
    mb, j = xs
    loss_sum, g_sum = carry
    loss, g = vg(diff_params, mb, jax.random.fold_in(mkey, j))
    return (loss_sum + loss, jax.tree.map(jnp.add, g_sum, g)), None

  if grad_accum == 1:  # no accumulator: one gradient buffer per param
    loss, grads = vg(diff_params, tokens_BxL, mkey)
  else:
    zeros = jax.tree.map(jnp.zeros_like, diff_params)
    (loss, grads), _ = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), zeros),
      (micro, jnp.arange(grad_accum)))
    inv = jnp.float32(1.0 / grad_accum)
    loss = loss * inv
    grads = jax.tree.map(lambda g: (g * inv.astype(g.dtype)), grads)
  gnorm = _global_norm(grads)
  if grad_clip > 0:
    coef = jnp.minimum(jnp.float32(grad_clip) / (gnorm + 1e-6), 1.0)
    grads = jax.tree.map(lambda g: g * coef.astype(g.dtype), grads)
  opt_key, round_key = jax.random.split(step_key)
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)

  rkey = round_key if stochastic_round else None

  def apply(operand):
    params, opt_state, grads = operand
    return _update_apply(tx, params, grads, opt_state, key=opt_key,
                         round_key=rkey)

  if isinstance(state.opt_state, LayeredState):  # guarded group by group
    params, opt_state = _update_layered(
      tx, state.params, grads, state.opt_state, ok, key=opt_key,
      round_key=rkey)
  else:
    # lax.cond, not jnp.where over the trees: the skipped branch passes the
    # donated params and state through, so the old and the new state never
    # coexist (the select kept both alive: +2.9 GB on LLaMA-350M).
    params, opt_state = jax.lax.cond(
      ok, apply, lambda operand: operand[:2],
      (state.params, state.opt_state, grads))
  new_state = TrainState(
    step=state.step + ok.astype(jnp.int32), params=params,
    opt_state=opt_state, rng=rng, frozen=state.frozen)
  metrics = {"loss": loss, "grad_norm": gnorm,
             "skipped": (~ok).astype(jnp.float32)}
  return new_state, metrics


def layerwise_train_step(state: TrainState, tokens_BxL: jax.Array, *,
                         graphdef, nnx_state,
                         tx: optax.GradientTransformation,
                         stochastic_round: bool = True,
                         norm_pass: bool = False, grad_clip: float = 0.0
                         ) -> tuple[TrainState, dict[str, jax.Array]]:
  r"""One update of a ``scan_layers`` model in which each layer is updated
  as soon as its gradient exists (``run.layerwise_update``): GaLore's and
  Q-GaLore's per-layer weight update (Zhao et al. 2024, §4.2; Zhang et al.
  2024), whose official code applies the optimizer to each weight from a
  backward hook so that the full gradient never exists.

  1. Forward: embeddings, then ``lax.scan`` over the layers keeping each
     layer's input (the only activations saved: ``(L, B, T, D)``), then the
     head and the loss; the head's VJP gives the head's and final norm's
     gradients and :math:`\partial\ell / \partial x_L`, and the head
     group (:func:`rest_groups`) is updated at once.
  2. Backward, layer by layer from the last (``fori_loop``): layer
     :math:`i`'s forward is recomputed from its saved input, its VJP gives
     its params' gradient and :math:`\partial\ell / \partial x_{i}`, and
     the optimizer updates that layer's params and state in place (as
     :func:`train_step` does for a scanned model, same keys). Only one
     layer's gradient exists at a time.
  3. The embedding's gradient (plus the head's part when tied), then its
     update.

  The result equals :func:`train_step`'s on the same scanned model (same
  params and state, up to float rounding of the backward pass; tested).

  Non-finite values (a deviation from :func:`train_step`, which needs every
  gradient first): a non-finite loss skips the whole step, as there
  (nothing changes, ``skipped = 1``). With a finite loss, a layer (or the
  head or embedding) whose gradient is not finite keeps its params and
  state, the others are updated, and ``skipped_layers`` counts the groups
  left unchanged. ``grad_norm`` is the global norm of all gradients,
  summed as they come.

  ``norm_pass=True`` (``run.layerwise_norm_pass``) first runs a backward
  pass that only sums the squared gradients (one layer's at a time, none
  kept), then the updating pass: :func:`train_step`'s exact policy (a
  non-finite loss or global norm changes nothing) and global-norm clipping
  (``grad_clip``, torch's ``clip_grad_norm_``), at the cost of a second
  backward pass; the peak stays that of the layer-wise step. Without it,
  ``grad_clip`` must be 0. Gradient accumulation needs every gradient;
  :class:`jqlm.train.TrainConfig` rejects it with this step.
  """
  if grad_clip > 0 and not norm_pass:
    raise ValueError(
      f"layerwise_train_step: grad_clip={grad_clip} needs the global "
      "gradient norm before the first update; pass norm_pass=True (a "
      "backward pass that computes it first) or grad_clip=0.")
  if not isinstance(state.opt_state, LayeredState):
    raise ValueError(
      "layerwise_train_step needs a scan_layers model and its LayeredState "
      f"optimizer state, got {type(state.opt_state).__name__}. Build the "
      "model with scan_layers=True (init_opt_state(..., layered=True)).")
  rng, step_key = jax.random.split(state.rng)
  opt_key, round_key = jax.random.split(step_key)
  mkey = model_key(step_key)
  rkey = round_key if stochastic_round else None
  inputs, targets = tokens_BxL[:, :-1], tokens_BxL[:, 1:]
  b, t = inputs.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  layers, rest = split_layers(state.params)
  n = _num_layers(layers)
  block_gd, block_state = nnx.split(
    nnx.merge(graphdef, nnx_state).layers)

  def block(layer_params, x, i):  # layer i's key as in Llama.__call__
    st = jax.tree.map(lambda v: v, block_state)
    nnx.replace_by_pure_dict(st, layer_params)
    return nnx.merge(block_gd, st)(x, positions,
                                   key=jax.random.fold_in(mkey, i))[0]

  groups = rest_groups(rest)
  tied = nnx.merge(graphdef, nnx_state).cfg.tie_embeddings
  x0, embed_vjp = jax.vjp(
    lambda e: _merged(graphdef, nnx_state, e).embed_tokens(inputs),
    groups["embed"])

  def forward(x, xs):
    layer_params, i = xs
    return block(layer_params, x, i), x

  x_last, inputs_L = jax.lax.scan(forward, x0, (layers, jnp.arange(n)))

  def head_loss(h, e, x):  # the embedding enters only when tied
    logits = _merged(graphdef, nnx_state, {**h, **e}).head(x)
    return cross_entropy(logits, targets)

  loss, head_vjp = jax.vjp(head_loss, groups["head"],
                           groups["embed"] if tied else {}, x_last)
  finite_loss = jnp.isfinite(loss)

  def layer_vjp(p_i, i, dx):
    diff, join = ops.split_taps(p_i)
    _, vjp = jax.vjp(lambda d, x: block(join(d), x, i), diff, inputs_L[i])
    return vjp(dx)

  def embed_grad(dx, g_embed_head):
    (g_embed,) = embed_vjp(dx)
    if tied:
      g_embed = jax.tree.map(jnp.add, g_embed, g_embed_head)
    return g_embed

  coef = None
  if norm_pass:
    # the global norm first, one layer's gradient at a time (none kept)
    # The params ride through the pass, each layer written back (through a
    # fence, so that XLA cannot drop the write and forward the loop's
    # input): read by one loop and updated in place by the next, XLA would
    # otherwise copy them (+0.5 GB on LLaMA-350M).
    def norm_sweep(layers):
      g_head, g_embed_head, dx = head_vjp(jnp.ones((), loss.dtype))

      def body(j, carry):
        layers, dx, sq = carry
        i = n - 1 - j
        p_i = _fence(_take(layers, i), i)
        layers = _put(layers, p_i, i)
        g_i, dx = layer_vjp(p_i, i, dx)
        return layers, dx, sq + _sum_squares(g_i)

      layers, dx, sq = jax.lax.fori_loop(
        0, n, body, (layers, dx, _sum_squares(g_head)))
      return layers, sq + _sum_squares(embed_grad(dx, g_embed_head))

    layers, sq_all = jax.lax.cond(
      finite_loss, norm_sweep,
      lambda layers: (layers, jnp.full((), jnp.nan, jnp.float32)), layers)
    gnorm = jnp.sqrt(sq_all)
    ok = finite_loss & jnp.isfinite(gnorm)
    if grad_clip > 0:
      coef = jnp.minimum(jnp.float32(grad_clip) / (gnorm + 1e-6), 1.0)
  else:
    ok = finite_loss

  def scaled(g):
    return g if coef is None else jax.tree.map(
      lambda x: x * coef.astype(x.dtype), g)

  def guard(sq):  # per group; with the norm pass every group is finite
    return jnp.ones((), bool) if norm_pass else jnp.isfinite(sq)

  def backward(operand):
    layers, s_layers, s_rest, rest = operand
    groups = rest_groups(rest)
    g_head, g_embed_head, dx = head_vjp(jnp.ones((), loss.dtype))
    # the head's update first: its gradient is freed before the layers'
    sq_h = _sum_squares(g_head)
    k, rk = _group_keys(opt_key, rkey, n)
    head, s_head, done = _update_group(
      tx, groups["head"], scaled(g_head), s_rest["head"], guard(sq_h),
      key=k, round_key=rk)

    def body(j, carry):
      layers, s_layers, dx, sq, bad = carry
      i = n - 1 - j
      # layer i's params copied out once: read by its VJP and its update,
      # they are then written in place without a copy of the whole stack
      p_i = _fence(_take(layers, i), i)
      g_i, dx = layer_vjp(p_i, i, dx)
      sq_i = _sum_squares(g_i)
      ok_i = guard(sq_i)
      layers, s_layers = jax.lax.cond(
        ok_i, lambda o: _update_layer(tx, *o, scaled(g_i), i, key=opt_key,
                                      round_key=rkey, p_i=p_i),
        lambda o: o, (layers, s_layers))
      return (layers, s_layers, dx, sq + sq_i,
              bad + (~ok_i).astype(jnp.int32))

    # ``done`` (an output of the head's conditional) starts the skip count:
    # the loop depends on the head's update, which therefore runs first
    layers, s_layers, dx, sq, bad = jax.lax.fori_loop(
      0, n, body, (layers, s_layers, dx, sq_h, (~done).astype(jnp.int32)))
    g_embed = embed_grad(dx, g_embed_head)
    sq_e = _sum_squares(g_embed)
    k, rk = _group_keys(opt_key, rkey, n + 1)
    embed, s_embed, done = _update_group(
      tx, groups["embed"], scaled(g_embed), s_rest["embed"], guard(sq_e),
      key=k, round_key=rk)
    return (layers, s_layers, {"head": s_head, "embed": s_embed},
            {**head, **embed}, jnp.sqrt(sq + sq_e),
            bad + (~done).astype(jnp.int32))

  def skip(operand):
    return (*operand, jnp.full((), jnp.nan, jnp.float32),
            jnp.zeros((), jnp.int32))

  layers, s_layers, s_rest, rest, gnorm_swept, bad = jax.lax.cond(
    ok, backward, skip,
    (layers, state.opt_state.layers, state.opt_state.rest, rest))
  new_state = TrainState(
    step=state.step + ok.astype(jnp.int32),
    params={**rest, "layers": layers},
    opt_state=LayeredState(layers=s_layers, rest=s_rest), rng=rng)
  metrics = {"loss": loss,
             "grad_norm": gnorm if norm_pass else gnorm_swept,
             "skipped": (~ok).astype(jnp.float32),
             "skipped_layers": bad.astype(jnp.float32)}
  return new_state, metrics


def step_diagnostics(state: TrainState) -> dict[str, jax.Array]:
  """The last update's ``spikes`` and ``warmup_factor`` (float32), from
  :func:`jqlm.optim.spike_diagnostics` of the optimizer state.

  Separate from :func:`train_step` so that the loop pays for the count (a
  pass over SPAM's second moments) only on the steps it logs.
  """
  opt_state = state.opt_state
  if isinstance(opt_state, LayeredState):
    # per-layer states are stacked: sum their spikes; the warmup factor
    # is the same in every group (one count), read from the rest's state
    lay = optim.spike_diagnostics(opt_state.layers)
    head = optim.spike_diagnostics(opt_state.rest["head"])
    embed = optim.spike_diagnostics(opt_state.rest["embed"])
    spikes = jnp.sum(lay.spike_count) + head.spike_count + embed.spike_count
    return {"spikes": spikes.astype(jnp.float32),
            "warmup_factor": embed.warmup_factor.astype(jnp.float32)}
  diag = optim.spike_diagnostics(opt_state)
  return {"spikes": diag.spike_count.astype(jnp.float32),
          "warmup_factor": diag.warmup_factor.astype(jnp.float32)}


def float_params(params):
  """``params`` with QArray weights dequantized to float32 (a scanned
  stack layer by layer, ``jax.vmap``)."""
  if is_stacked(params):
    layers, rest = split_layers(params)
    return {**optim.dequantize_params(rest),
            "layers": jax.vmap(optim.dequantize_params)(layers)}
  return optim.dequantize_params(params)


def eval_loss(params, tokens_BxL, *, graphdef, nnx_state) -> jax.Array:
  """Mean next-token cross-entropy of a batch at ``params``."""
  return loss_fn(float_params(params), graphdef, nnx_state, tokens_BxL)


def operand_stats(params, tokens_BxL, key, *, graphdef,
                  nnx_state) -> jax.Array | None:
  """The clipped and flushed fractions of every GEMM operand of the
  recipe linears on one batch, ``[6, 2]`` float32 (rows: the operands of
  :data:`jqlm.quant.recipes.OPERANDS`; columns: clipped, flushed; the
  mean over the linears), or ``None`` for a model without a recipe.

  One forward and backward of the loss with :func:`jqlm.models.
  recipe_probes` attached: the probes' gradients are the statistics the
  recipe's quantizers saw (``quantized_dot(stats=...)``), backward
  operands included; the params are not updated. ``key`` plays the
  model key's role (stochastic rounding, random signs)."""
  model = _merged(graphdef, nnx_state, float_params(params))
  view, count = models.recipe_probes(model)
  if count == 0:
    return None
  gdef, probes, rest = nnx.split(view, models.RecipeProbe, ...)

  def loss(probes):
    m = nnx.merge(gdef, probes, rest)
    return cross_entropy(m(tokens_BxL[:, :-1], key=key), tokens_BxL[:, 1:])

  grads = jax.grad(loss)(probes)
  rows = [g.reshape(-1, *ops.STATS_SHAPE) for g in jax.tree.leaves(grads)]
  return jnp.concatenate(rows).mean(axis=0)
