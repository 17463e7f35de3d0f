r"""Component-wise gradient norm clipping (Yang & Ma, EMNLP 2022).

Each component :math:`c` of the gradient (a tensor, or a group of tensors)
is clipped against its own L2 norm, not the global one:

.. math:: g_c \leftarrow g_c \cdot \min\!\Big(1,\ \frac{\tau}{\|g_c\|_2 +
          10^{-6}}\Big)

as the official ``GradValueClipTrainer.training_step`` does with
``torch.nn.utils.clip_grad_norm_(param, max_clip_value)`` for every named
parameter (``yangalan123/FineTuningStability`` @ a75412a,
``CustomToolBox/GroupGradClip/GradClipTrainer.py:306-327``;
../shared/spec/optimizers_more.md §5). The official runs replace the
global clip by it (``max_grad_norm = -1``): chain it in front of the
optimizer instead of ``optax.clip_by_global_norm``, not with it.

Components: by default every param tensor is one (the official rule; for
jqlm's LLaMA every linear's kernel, each norm scale and the embedding).
``components=`` groups tensors instead: a list of regular expressions
searched in each param's path (``jax.tree_util.keystr``, e.g.
``"['layers'][0]['attn']['q']['kernel']"``); the tensors whose paths give
the same match (``re.search(pattern, path).group(0)``) for the first
pattern that matches form one component, clipped against their joint
norm; a tensor no pattern matches stays its own component. E.g.
``[r"\['layers'\]\[\d+\]\['(attn|mlp)'\]"]`` clips each layer's attention
and MLP as two components. A callable ``path -> name | None`` may be given
instead (``None``: its own component).

``optax.clip_by_block_rms`` differs (RMS, not the L2 norm) and
``optax.clip_by_global_norm`` is global.

References:
  Yang & Ma, `Improving Stability of Fine-Tuning Pretrained Language Models
  via Component-Wise Gradient Norm Clipping
  <https://arxiv.org/abs/2210.10325>`_, EMNLP 2022.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jqlm.optim import _base

EPS = 1e-6
"""``clip_grad_norm_``'s constant in the clip coefficient."""


def _grouper(components) -> Callable[[str], str | None]:
  if components is None:
    return lambda path: None
  if callable(components):
    return components
  if isinstance(components, str):
    components = [components]
  try:
    patterns = [re.compile(p) for p in components]
  except (TypeError, re.error) as e:
    raise ValueError(
      f"clip_by_component_norm: components must be None, a callable path "
      f"-> name, or a list of regular expressions; got {components!r} "
      f"({e}).") from e

  def group(path: str) -> str | None:
    for i, pat in enumerate(patterns):
      if (m := pat.search(path)) is not None:
        return f"{i}:{m.group(0)}"
    return None

  return group


def _component_keys(tree, group) -> list[str]:
  """Each leaf's component (flatten order): its path, or ``group <name>``
  for the leaves ``group`` puts together."""
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path)
    name = group(key)
    out.append(key if name is None else f"group {name}")
  return out


def component_names(tree, components=None) -> list[str]:
  """The component of each leaf of ``tree`` (flatten order): the group
  name :func:`clip_by_component_norm` clips it with."""
  return _component_keys(tree, _grouper(components))


def clip_by_component_norm(
  max_norm: float,
  *,
  components: Sequence[str] | str | Callable[[str], str | None] | None = None,
) -> optax.GradientTransformation:
  r"""Clips each component's gradient to L2 norm ``max_norm`` (see the
  module docstring).

  Args:
    max_norm: :math:`\tau`, the same for every component (the official
      sweep: 0.01, 0.05, 0.1, 0.5, 1, 5).
    components: ``None`` (each tensor), a list of regular expressions over
      the param paths, or a callable ``path -> name | None``.

  Returns:
    A stateless ``optax.GradientTransformation`` (``optax.EmptyState``);
    updates keep their dtypes (the norm is computed in float32, float64
    for float64 leaves).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jqlm.optim import clip_by_component_norm
    >>> opt = optax.chain(clip_by_component_norm(1.0), optax.adamw(1e-3))
    >>> g = {"a": jnp.full((4,), 3.0), "b": jnp.full((4,), 0.1)}
    >>> u, _ = clip_by_component_norm(1.0).update(g, optax.EmptyState())
    >>> round(float(jnp.linalg.norm(u["a"])), 4), round(float(u["b"][0]), 4)
    (1.0, 0.1)
  """
  _base.check("max_norm", max_norm, lambda v: v >= 0, ">= 0")
  group = _grouper(components)

  def update_fn(updates, state, params=None):
    del params
    flat, treedef = jax.tree.flatten(updates)
    keys = _component_keys(updates, group)
    sq: dict = {}
    for k, g in zip(keys, flat, strict=True):
      cdt = _base.compute_dtype(g.dtype)
      s = jnp.sum(jnp.square(g.astype(cdt)))
      sq[k] = s if k not in sq else sq[k] + s.astype(sq[k].dtype)
    out = []
    for k, g in zip(keys, flat, strict=True):
      cdt = sq[k].dtype
      norm = jnp.sqrt(sq[k])
      coef = _base.hp(max_norm, cdt) / (norm + _base.hp(EPS, cdt))
      out.append((g.astype(cdt) * jnp.minimum(coef, 1)).astype(g.dtype))
    return treedef.unflatten(out), state

  return optax.GradientTransformation(
    lambda params: optax.EmptyState(), update_fn)
