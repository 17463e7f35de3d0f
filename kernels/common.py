"""Backend detection and block-size arithmetic shared by the kernels."""

from __future__ import annotations

import functools

import jax


def backend() -> str:
  """The default JAX backend: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
  return jax.default_backend()


def gpu_compute_capability() -> tuple[int, int] | None:
  """``(major, minor)`` of the first GPU, or ``None`` off-GPU."""
  if backend() != "gpu":
    return None
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if not cc:
    return None
  major, _, minor = str(cc).partition(".")
  return int(major), int(minor or 0)


@functools.cache
def triton_available() -> bool:
  """Whether ``jax_triton`` imports (it raises ImportError without a GPU)."""
  try:
    import jax_triton  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True


def cdiv(a: int, b: int) -> int:
  """Ceiling division of non-negative ints."""
  if b <= 0:
    raise ValueError(f"cdiv: divisor must be positive, got {b}.")
  return -(-a // b)


def round_up(a: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``a``."""
  return cdiv(a, multiple) * multiple
