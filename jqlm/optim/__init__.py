"""jqlm.optim: Optax transforms for low-bit and spike-robust LLM training.

* :func:`spam`, :func:`scale_by_spam`: SPAM (arXiv 2501.06842).
* :func:`stable_spam`, :func:`scale_by_stable_spam`: Stable-SPAM
  (arXiv 2502.17055).
* Composable pieces: :func:`clip_spikes`, :func:`reset_momentum`,
  :func:`ada_clip`, :func:`ada_gn`.
* Stochastic rounding of updates: :func:`apply_updates_stochastic`,
  :func:`stochastic_rounding`, :func:`apply_updates`.
* Diagnostics: :func:`spike_diagnostics`.

Default behaviour is the official code's (``../shared/spec/optimizers.md``);
each docstring names its deviations.
"""

from jqlm.optim.diagnostics import SpikeDiagnostics, spike_diagnostics
from jqlm.optim.spam import (
  PostUpdateDecayState,
  SpamState,
  scale_by_learning_rate_post_decay,
  scale_by_spam,
  spam,
  spam_warmup_factor,
)
from jqlm.optim.spikes import (
  AdaClipState,
  AdaGNState,
  ClipSpikesState,
  ResetMomentumState,
  ada_clip,
  ada_gn,
  clip_spikes,
  reset_momentum,
)
from jqlm.optim.stable_spam import (
  ResetMode,
  StableSpamState,
  scale_by_stable_spam,
  stable_spam,
  stable_spam_scale,
)
from jqlm.optim.stochastic import (
  StochasticRoundingState,
  apply_updates,
  apply_updates_stochastic,
  stochastic_rounding,
)

__all__ = [
  "AdaClipState",
  "AdaGNState",
  "ClipSpikesState",
  "PostUpdateDecayState",
  "ResetMode",
  "ResetMomentumState",
  "SpamState",
  "SpikeDiagnostics",
  "StableSpamState",
  "StochasticRoundingState",
  "ada_clip",
  "ada_gn",
  "apply_updates",
  "apply_updates_stochastic",
  "clip_spikes",
  "reset_momentum",
  "scale_by_learning_rate_post_decay",
  "scale_by_spam",
  "scale_by_stable_spam",
  "spam",
  "spam_warmup_factor",
  "spike_diagnostics",
  "stable_spam",
  "stable_spam_scale",
  "stochastic_rounding",
]
