"""Reading SPAM / Stable-SPAM diagnostics out of any optimizer state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jqlm.optim import _base
from jqlm.optim.spam import SpamState, flagged_spikes
from jqlm.optim.spikes import AdaClipState, ClipSpikesState, ResetMomentumState
from jqlm.optim.stable_spam import StableSpamState

_SPIKE_STATES = (SpamState, StableSpamState, ClipSpikesState, AdaClipState)
_WARMUP_STATES = (SpamState, ResetMomentumState)


class SpikeDiagnostics(NamedTuple):
  """Gradient-spike diagnostics of the last update.

  Attributes:
    spike_count: int32 number of elements clipped in the last update (SPAM,
      ``clip_spikes``: ``g^2 > theta v``; Stable-SPAM, ``ada_clip``: ``|g|``
      above the adaptive threshold), summed over every spike-aware transform
      in the state.
    warmup_factor: the post-reset warmup factor applied in the last update by
      SPAM or ``reset_momentum`` (their product if there are several; 1.0
      when there is none; Stable-SPAM has no post-reset warmup).
  """

  spike_count: jax.Array
  warmup_factor: jax.Array


def spike_diagnostics(opt_state) -> SpikeDiagnostics:
  """Summarises the spike-aware states found anywhere in ``opt_state``.

  Walks the state pytree, so it sees through ``optax.chain``,
  ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``, ``masked`` and
  ``partition``. Usable under jit. SPAM's count with float moments is taken
  here, by one pass over its second moments (``SpamState``), so call it when
  the value is logged rather than inside every training step.

  Example::

    diag = spike_diagnostics(opt_state)
    print(int(diag.spike_count), float(diag.warmup_factor))
  """
  kinds = _SPIKE_STATES + _WARMUP_STATES
  nodes = [n for n in jax.tree.leaves(
    opt_state, is_leaf=lambda x: isinstance(x, kinds)) if isinstance(n, kinds)]
  total = jnp.zeros((), jnp.int32)
  factor = jnp.ones((), jnp.float32)
  for node in nodes:
    if isinstance(node, _SPIKE_STATES):
      total = total + _base.tree_sum(node.spike_count).astype(jnp.int32)
    if isinstance(node, SpamState):  # float moments: flags in nu's sign bits
      total = total + flagged_spikes(node.nu)
    if isinstance(node, _WARMUP_STATES):
      factor = factor * node.warmup_factor
  return SpikeDiagnostics(spike_count=total, warmup_factor=factor)
