"""Comparison runs: several optimizer / precision arms on the same data,
seeds and token budget, summarised as a markdown table and plots.

* :mod:`~jqlm.train.compare.suites`: :class:`Arm`, :class:`Suite`,
  :func:`scale_down`, :func:`rescale_steps` and the built-in CPU-scale
  :data:`SUITES`;
* :mod:`~jqlm.train.compare.runner`: :func:`run_suite`;
* :mod:`~jqlm.train.compare.report`: :class:`SuiteResult` (table, plots,
  ``results.md``), :func:`crossing_step`.

Example::

  suite = compare.SUITES["spam"]().with_steps(100).with_seeds((0,))
  result = compare.run_suite(suite, "runs/compare/spam")
  print(result.table())
"""

from jqlm.train.compare.report import (
  ArmSummary,
  RunRecord,
  SuiteResult,
  crossing_step,
  grad_norm_spikes,
)
from jqlm.train.compare.runner import run_suite, settings_tag
from jqlm.train.compare.suites import (
  CPU_DATA,
  CPU_MODEL,
  LATE_FRACTION,
  LOWP_STEPS,
  MEMORY_ROWS,
  MEMORY_STEPS,
  SUITES,
  Arm,
  Suite,
  load_suite,
  lowp_optim_suite,
  lowp_suite,
  memory_efficient_suite,
  q_galore_suite,
  rescale_steps,
  scale_down,
  spam_suite,
  stable_spam_suite,
)

__all__ = [
  "CPU_DATA", "CPU_MODEL", "LATE_FRACTION", "LOWP_STEPS",
  "MEMORY_ROWS", "MEMORY_STEPS", "SUITES", "Arm", "ArmSummary", "RunRecord",
  "Suite", "SuiteResult", "crossing_step", "grad_norm_spikes", "load_suite",
  "lowp_optim_suite", "lowp_suite", "memory_efficient_suite",
  "q_galore_suite",
  "rescale_steps", "run_suite", "scale_down", "settings_tag",
  "spam_suite",
  "stable_spam_suite",
]
