"""jqlm.optim: Optax transforms for low-bit and spike-robust LLM training.

* :func:`spam`, :func:`scale_by_spam`: SPAM (arXiv 2501.06842).
* :func:`stable_spam`, :func:`scale_by_stable_spam`: Stable-SPAM
  (arXiv 2502.17055).
* Composable pieces: :func:`clip_spikes`, :func:`reset_momentum`,
  :func:`ada_clip`, :func:`ada_gn`.
* Stochastic rounding of updates: :func:`apply_updates_stochastic`,
  :func:`stochastic_rounding`, :func:`apply_updates`.
* Diagnostics: :func:`spike_diagnostics`.
* Adam/AdamW with HF- or torch-style epsilon and 8-bit / 4-bit block-wise
  states: :func:`adamw`, :func:`scale_by_adam`, :class:`StateQuant`.
* GaLore (arXiv 2403.03507) and Q-GaLore (arXiv 2407.08296):
  :func:`galore`, :func:`scale_by_galore`, :func:`q_galore`,
  :func:`scale_by_q_galore`, and the int8-weight helpers
  :func:`quantize_weights`, :func:`dequantize_params`,
  :func:`apply_quantized_updates` (the caller passes the rounding key).
* Low-bit states for any optax transform: :func:`quantize_state`
  (8-bit Muon: :func:`muon_8bit`).
* Component-wise gradient norm clipping: :func:`clip_by_component_norm`.
* APOLLO and APOLLO-Mini (arXiv 2412.05270): :func:`apollo`,
  :func:`apollo_mini`, :func:`scale_by_apollo`.
* Natural GaLore (arXiv 2410.16029): :func:`natural_galore`,
  :func:`scale_by_natural_galore`, :func:`natural_gradient`.
* MicroAdam (arXiv 2405.15593): :func:`micro_adam`,
  :func:`scale_by_micro_adam`.
* Memory accounting without allocation: :func:`memory_report`.

Default behaviour is the official code's (``../shared/spec/optimizers.md``);
each docstring names its deviations.
"""

from jqlm.optim._lr import (
  PostUpdateDecayState,
  PreUpdateDecayState,
  scale_by_learning_rate_post_decay,
  scale_by_learning_rate_pre_decay,
)
from jqlm.optim.adam import EpsStyle, ScaleByAdamState, adamw, scale_by_adam
from jqlm.optim.apollo import (
  ApolloState,
  ScaleType,
  apollo,
  apollo_mini,
  scale_by_apollo,
)
from jqlm.optim.component_clip import (
  clip_by_component_norm,
  component_names,
)
from jqlm.optim.diagnostics import SpikeDiagnostics, spike_diagnostics
from jqlm.optim.galore import (
  GaLoreState,
  ProjectorState,
  ProjType,
  galore,
  projector_gaps,
  scale_by_galore,
)
from jqlm.optim.memory import MemoryReport, memory_report
from jqlm.optim.micro_adam import (
  A100_BLOCK_SIZE,
  H100_BLOCK_SIZE,
  MicroAdamState,
  micro_adam,
  scale_by_micro_adam,
)
from jqlm.optim.natural_galore import (
  NaturalGradientState,
  natural_galore,
  natural_gradient,
  scale_by_natural_galore,
)
from jqlm.optim.qgalore import (
  apply_quantized_updates,
  dequantize_params,
  q_galore,
  quantize_weights,
  scale_by_q_galore,
)
from jqlm.optim.qstate import QuantizedMoment, StateCode, StateQuant
from jqlm.optim.quantize_state import (
  muon_8bit,
  muon_dimension_numbers,
  quantize_state,
)
from jqlm.optim.spam import (
  SpamState,
  scale_by_spam,
  spam,
  spam_second_moment,
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
  "EpsStyle",
  "GaLoreState",
  "MemoryReport",
  "ProjType",
  "ProjectorState",
  "QuantizedMoment",
  "ScaleByAdamState",
  "StateCode",
  "StateQuant",
  "adamw",
  "ApolloState",
  "ScaleType",
  "apollo",
  "apollo_mini",
  "scale_by_apollo",
  "clip_by_component_norm",
  "component_names",
  "apply_quantized_updates",
  "dequantize_params",
  "galore",
  "memory_report",
  "A100_BLOCK_SIZE",
  "H100_BLOCK_SIZE",
  "MicroAdamState",
  "PreUpdateDecayState",
  "micro_adam",
  "scale_by_learning_rate_pre_decay",
  "scale_by_micro_adam",
  "NaturalGradientState",
  "natural_galore",
  "natural_gradient",
  "scale_by_natural_galore",
  "muon_8bit",
  "muon_dimension_numbers",
  "quantize_state",
  "projector_gaps",
  "q_galore",
  "quantize_weights",
  "scale_by_adam",
  "scale_by_galore",
  "scale_by_q_galore",
  "AdaClipState",
  "AdaGNState",
  "ClipSpikesState",
  "PostUpdateDecayState",
  "ResetMode",
  "ResetMomentumState",
  "SpamState",
  "spam_second_moment",
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
