"""jqlm_kernels: low-bit matmul kernels (Pallas, jax-triton) for jqlm.

Installed under the import name ``jqlm_kernels`` (never a top-level
``kernels``, which is an unrelated PyPI package). Kernels import jax (and
jax_triton, guarded) only, never ``jqlm``: every kernel file carries its own
plain-jnp ``_reference`` and a ``can_use(...)`` capability gate.
"""

from jqlm_kernels.common import (
  backend,
  cdiv,
  gpu_compute_capability,
  round_up,
  triton_available,
)

__all__ = [
  "backend",
  "cdiv",
  "gpu_compute_capability",
  "round_up",
  "triton_available",
]
