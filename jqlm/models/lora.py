r"""LoRA and QLoRA adapters on a :class:`jqlm.models.Llama`.

.. math::
   y = x W + \frac{\alpha}{r}\, (x A) B, \qquad A \in \mathbb{R}^{d
   \times r},\ B \in \mathbb{R}^{r \times f},\ B_0 = 0

on the linears whose paths match ``LoraConfig.patterns`` (the block
linears by default, as QLoRA adapts every linear). ``W`` stays frozen and
may be float (LoRA) or quantized (QLoRA: an NF4 / int4 / int8 kernel from
:func:`jqlm.models.quantize_model` or ``load_hf_llama(quant=...)``, run
through the dequantizing kernel path, :func:`jqlm.ops.qmatmul`).

* :func:`add_lora` adds ``lora_a`` / ``lora_b`` (:class:`LoraParam`, a
  :class:`flax.nnx.Param`) to each matching :class:`QLinear`; a
  ``scan_layers`` stack gets stacked adapters.
* :func:`trainable_mask` (the adapters), :func:`freeze_base` (an
  ``optax.partition`` whose frozen part is ``set_to_zero``: no state) and
  :func:`lora_plus` (LoRA+'s larger learning rate for ``B``) build the
  optimizer; ``jqlm train`` with ``model.lora_rank > 0`` differentiates
  and updates the adapters only.
* :func:`merge_lora` folds the adapters into the kernels
  (:math:`W + \frac{\alpha}{r} A B`, dequantizing a quantized base), and
  :func:`save_peft_adapters` / :func:`load_peft_adapters` write and read
  PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``),
  which ``peft.PeftModel.from_pretrained`` loads on the HF model.

Init as PEFT's default: :math:`A \sim U(-1/\sqrt{d}, 1/\sqrt{d})` (torch's
``kaiming_uniform_(a=sqrt(5))`` on the ``(r, d)`` weight), :math:`B = 0`.
``rslora`` scales by :math:`\alpha / \sqrt{r}` (Kalajdzievski 2023).

Deviations from PEFT: no LoRA dropout (the adapters see the same input as
the base), no bias adapters, one rank and alpha for every adapted linear.

References:
  Hu et al., `LoRA <https://arxiv.org/abs/2106.09685>`_, 2021;
  Dettmers et al., `QLoRA <https://arxiv.org/abs/2305.14314>`_, 2023;
  Hayou et al., `LoRA+ <https://arxiv.org/abs/2402.12354>`_, 2024.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jqlm.models.layers import BLOCK_LINEARS, QLinear, is_quantized, matches

# jqlm linear name -> HF module name
_HF_MODULES = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
               "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj",
               "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
               "mlp.down": "mlp.down_proj"}


class LoraParam(nnx.Param):
  """A LoRA adapter matrix (``lora_a`` or ``lora_b`` of a QLinear)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """Low-rank adapters.

  Attributes:
    rank: :math:`r` (> 0).
    alpha: :math:`\\alpha`; the adapter's output is scaled by
      :math:`\\alpha / r` (``rslora``: :math:`\\alpha / \\sqrt{r}`).
    patterns: ``fnmatch`` patterns of the adapted linears' paths
      (``layers.*.attn.q``); default every block linear.
    rslora: rank-stabilised scaling.
    lr_ratio: LoRA+'s :math:`\\lambda = \\eta_B / \\eta_A` (1: plain LoRA;
      the LoRA+ paper recommends 16 for decoder fine-tuning).
  """

  rank: int = 8
  alpha: float = 16.0
  patterns: tuple[str, ...] = BLOCK_LINEARS
  rslora: bool = False
  lr_ratio: float = 1.0

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or (
        self.rank < 1):
      raise ValueError(f"LoraConfig.rank must be a positive int, got "
                       f"{self.rank!r}.")
    for name in ("alpha", "lr_ratio"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
          math.isfinite(v) and v > 0):
        raise ValueError(f"LoraConfig.{name} must be a finite number > 0, "
                         f"got {v!r}.")
    if isinstance(self.patterns, str) or not self.patterns:
      raise ValueError(f"LoraConfig.patterns must be a non-empty sequence "
                       f"of fnmatch patterns, got {self.patterns!r}.")
    object.__setattr__(self, "patterns", tuple(self.patterns))

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _adapted(model: nnx.Module) -> list[QLinear]:
  return [m for _, m in nnx.iter_modules(model)
          if isinstance(m, QLinear) and getattr(m, "lora_a", None) is not None]


def _kernel_shape(w) -> tuple[int, ...]:
  """A kernel's shape with the stacked layer axis of a ``scan_layers``
  model: a stacked (vmapped) QArray / PackedQArray keeps one layer's
  logical shape as its static ``shape``, its arrays carry the layer
  axis."""
  if not is_quantized(w):
    return tuple(w.shape)
  data = getattr(w, "codes", None)
  data = w.packed if data is None else data
  return (*tuple(data.shape[:-2]), *tuple(w.shape)[-2:])


def _dequantize(w, lead: int) -> jax.Array:
  fn = lambda q: q.dequantize(jnp.float32)  # noqa: E731
  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn(w)


def add_lora(model: nnx.Module, cfg: LoraConfig, *,
             rngs: nnx.Rngs) -> nnx.Module:
  """Adds adapters to ``model``'s matching linears, in place, and returns
  it. Float or quantized kernels; a ``scan_layers`` stack's kernels
  ``(L, d, f)`` get stacked adapters ``(L, d, r)`` / ``(L, r, f)``.

  Raises:
    ValueError: ``cfg`` not a LoraConfig, a linear that already has
      adapters, or no linear matching ``cfg.patterns``.
  """
  if not isinstance(cfg, LoraConfig):
    raise ValueError(f"add_lora needs a LoraConfig, got {cfg!r}.")
  hits = 0
  for _, m in nnx.iter_modules(model):
    if not isinstance(m, QLinear) or not matches(m.path, cfg.patterns):
      continue
    if getattr(m, "lora_a", None) is not None:
      raise ValueError(f"{m.path} already has LoRA adapters; merge_lora "
                       "first to stack another set.")
    w = m.kernel.get_value()
    shape = _kernel_shape(w)
    *lead, d, f = shape
    axes = m.kernel.get_metadata().get("axes") or (None,) * len(shape)
    *lead_axes, ax_in, ax_out = axes
    dtype = m.kernel.get_value().dtype if not is_quantized(w) else (
      m.dtype)
    bound = 1.0 / math.sqrt(d)
    a = jax.random.uniform(rngs.params(), (*lead, d, cfg.rank), jnp.float32,
                           -bound, bound).astype(dtype)
    m.lora_a = LoraParam(a, axes=(*lead_axes, ax_in, None))
    m.lora_b = LoraParam(jnp.zeros((*lead, cfg.rank, f), dtype),
                         axes=(*lead_axes, None, ax_out))
    m.lora_scale = cfg.scale
    hits += 1
  if not hits:
    raise ValueError(f"add_lora: no linear matches {cfg.patterns!r}; the "
                     "paths look like 'layers.0.attn.q'.")
  return model


def is_lora_path(path: Sequence[Any]) -> bool:
  """Whether a param path (``("layers", 0, "attn", "q", "lora_a")``) is an
  adapter's."""
  return bool(path) and str(path[-1]) in ("lora_a", "lora_b")


def trainable_mask(params) -> Any:
  """``True`` on the adapters of a pure params pytree, ``False`` elsewhere
  (a quantized kernel is one ``False`` node)."""
  from jqlm.models.sharding import key_path  # noqa: PLC0415
  return jax.tree_util.tree_map_with_path(
    lambda kp, _: is_lora_path(key_path(kp)), params, is_leaf=is_quantized)


def freeze_base(tx: optax.GradientTransformation, params
                ) -> optax.GradientTransformation:
  """``tx`` on the adapters and zero updates (no state) for the rest: an
  ``optax.partition`` labelled by :func:`trainable_mask`."""
  labels = jax.tree.map(lambda t: "lora" if t else "frozen",
                        trainable_mask(params))
  return optax.partition({"lora": tx, "frozen": optax.set_to_zero()},
                         labels)


def lora_plus(tx: optax.GradientTransformation, lr_ratio: float
              ) -> optax.GradientTransformation:
  """LoRA+ (Hayou et al. 2024): ``B``'s updates scaled by ``lr_ratio``
  (:math:`\\eta_B = \\lambda \\eta_A`). Scaling the final update is exactly
  a per-group learning rate for optimizers whose step is proportional to
  it (SGD, Adam, AdamW with decoupled weight decay ``lr * wd * p``, as in
  the official code's torch param groups)."""
  if lr_ratio == 1.0:
    return tx
  from jqlm.models.sharding import key_path  # noqa: PLC0415

  def scale(updates):
    return jax.tree_util.tree_map_with_path(
      lambda kp, u: u * jnp.asarray(lr_ratio, u.dtype)
      if key_path(kp)[-1:] == ("lora_b",) else u, updates)

  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    return scale(updates), state

  return optax.GradientTransformation(tx.init, update)


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` with every adapter folded into its kernel,
  :math:`W \\leftarrow W + \\frac{\\alpha}{r} A B` (a quantized kernel is
  dequantized: the merged kernel is float, in the compute dtype), and the
  adapters removed."""
  out = nnx.clone(model)
  for m in _adapted(out):
    w = m.kernel.get_value()
    a, b = m.lora_a.get_value(), m.lora_b.get_value()
    dtype = m.dtype if is_quantized(w) else w.dtype
    lead = a.ndim - 2
    w32 = (_dequantize(w, lead) if is_quantized(w)
           else w.astype(jnp.float32))
    delta = jnp.einsum("...dr,...rf->...df", a.astype(jnp.float32),
                       b.astype(jnp.float32)) * jnp.float32(m.lora_scale)
    m.kernel = nnx.Param((w32 + delta).astype(dtype),
                         **m.kernel.get_metadata())
    del m.lora_a, m.lora_b, m.lora_scale
  return out


def _hf_prefix(path: str) -> tuple[int, str]:
  """``layers.3.attn.q`` -> ``(3, "self_attn.q_proj")``."""
  _, i, rest = path.split(".", 2)
  return int(i), _HF_MODULES[rest]


def save_peft_adapters(model: nnx.Module, path: str, *,
                       base_model: str | None = None) -> None:
  """Writes the adapters in PEFT's format: ``adapter_config.json`` and
  ``adapter_model.safetensors`` with ``base_model.model.model.layers.{i}.
  {module}.lora_{A,B}.weight`` (torch layout: ``A (r, d)``, ``B (f, r)``).

  Raises:
    ValueError: no adapters, or adapters with different ranks / scales.
  """
  from jqlm.models.hf import gather_to_host, safetensors_io  # noqa: PLC0415

  _, save_file = safetensors_io()
  adapted = _adapted(model)
  if not adapted:
    raise ValueError("save_peft_adapters: the model has no LoRA adapters "
                     "(add_lora).")
  ranks = {int(m.lora_a.get_value().shape[-1]) for m in adapted}
  scales = {float(m.lora_scale) for m in adapted}
  if len(ranks) != 1 or len(scales) != 1:
    raise ValueError(f"PEFT's format holds one rank and alpha; the adapters "
                     f"have ranks {sorted(ranks)} and scales "
                     f"{sorted(scales)}.")
  (r,), (scale,) = ranks, scales
  cfg = model.cfg
  tensors, modules = {}, set()
  for m in adapted:
    a, b = m.lora_a.get_value(), m.lora_b.get_value()
    stacked = a.ndim == 3
    for i in range(cfg.num_layers if stacked else 1):
      if stacked:
        layer, module = i, _HF_MODULES[m.path.split(".", 2)[2]]
        ai, bi = a[i], b[i]
      else:
        (layer, module), ai, bi = _hf_prefix(m.path), a, b
      modules.add(module.split(".")[1])
      pre = f"base_model.model.model.layers.{layer}.{module}"
      tensors[f"{pre}.lora_A.weight"] = np.ascontiguousarray(
        gather_to_host(ai.astype(jnp.float32)).T)
      tensors[f"{pre}.lora_B.weight"] = np.ascontiguousarray(
        gather_to_host(bi.astype(jnp.float32)).T)
  if jax.process_index():
    return
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
            metadata={"format": "pt"})
  conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
          "lora_alpha": scale * r, "use_rslora": False, "lora_dropout": 0.0,
          "bias": "none", "target_modules": sorted(modules),
          "base_model_name_or_path": base_model, "inference_mode": True,
          "fan_in_fan_out": False, "init_lora_weights": True}
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump(conf, f, indent=2)


def load_peft_adapters(model: nnx.Module, path: str) -> nnx.Module:
  """``model`` (unrolled) with the PEFT adapters of ``path`` added (in
  place; as :func:`add_lora` with the adapter config's rank, alpha and
  target modules, then the weights read).

  Raises:
    ValueError: not a LoRA adapter, a target module jqlm's LLaMA lacks, or
      a shape that disagrees with the model.
  """
  from jqlm.models.hf import safetensors_io  # noqa: PLC0415

  safe_open, _ = safetensors_io()
  with open(os.path.join(path, "adapter_config.json")) as f:
    conf = json.load(f)
  if conf.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{path}: peft_type {conf.get('peft_type')!r}; only "
                     "LORA adapters load.")
  if model.cfg.scan_layers:
    raise ValueError("load_peft_adapters needs an unrolled model "
                     "(scan_layers=False).")
  names = {v.split(".")[1]: k for k, v in _HF_MODULES.items()}
  targets = conf["target_modules"]
  targets = [targets] if isinstance(targets, str) else targets
  unknown = [t for t in targets if t not in names]
  if unknown:
    raise ValueError(f"{path}: target modules {unknown} are not LLaMA "
                     f"linears ({sorted(names)}).")
  r, alpha = int(conf["r"]), float(conf["lora_alpha"])
  cfg = LoraConfig(rank=r, alpha=alpha, rslora=bool(conf.get("use_rslora")),
                   patterns=tuple(f"layers.*.{names[t]}" for t in targets))
  add_lora(model, cfg, rngs=nnx.Rngs(0))
  with safe_open(os.path.join(path, "adapter_model.safetensors"),
                 framework="numpy") as st:
    for m in _adapted(model):
      layer, module = _hf_prefix(m.path)
      pre = f"base_model.model.model.layers.{layer}.{module}"
      for attr, name in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
        key = f"{pre}.{name}.weight"
        if key not in st.keys():
          raise ValueError(f"{path}: {key} is missing.")
        arr = st.get_tensor(key).astype(np.float32).T
        var = getattr(m, attr)
        if arr.shape != tuple(var.get_value().shape):
          raise ValueError(f"{key} has shape {arr.shape[::-1]}, the model "
                           f"implies {tuple(var.get_value().shape)[::-1]}.")
        var.set_value(jnp.asarray(arr).astype(var.get_value().dtype))
  return model


__all__ = ["LoraConfig", "LoraParam", "add_lora", "freeze_base",
           "is_lora_path", "load_peft_adapters", "lora_plus", "merge_lora",
           "save_peft_adapters", "trainable_mask"]
