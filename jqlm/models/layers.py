r"""Quantized linear layers driven by a name-pattern policy.

A :class:`QuantPolicy` is a tuple of :class:`QuantRule`; each rule matches
module paths (``fnmatch`` patterns over dotted paths such as
``"layers.3.attn.q"``) and says how that linear quantizes its weight and its
input activation. The model code is the same for every mode:

* **QAT** (fake quantization with a straight-through gradient):
  :math:`y = \mathrm{fq}_a(x)\,\mathrm{fq}_w(W)` with
  :func:`jqlm.quant.fake_quant` (forward exact, backward identity);
  optionally in a Hadamard-rotated basis (QuEST / HALO style,
  arXiv 2502.05003, 2501.02625): :math:`y = \mathrm{fq}(x H)\,
  \mathrm{fq}(H^\top W)` with :math:`H` the normalized Walsh-Hadamard
  matrix, so :math:`xW = (xH)(H^\top W)` is unchanged before quantization.
* **Real low-bit weights**: the kernel param holds a
  :class:`jqlm.quant.QArray` (int8 for Q-GaLore, from
  :func:`jqlm.optim.quantize_weights`) or a :class:`jqlm.quant.PackedQArray`
  (post-training int4); the forward pass calls :func:`jqlm.ops.qmatmul`
  (a Pallas kernel on GPU/TPU when one serves the format, else
  dequantize-then-dot).

* **Fully quantized training**: a rule's ``recipe`` (a
  :class:`jqlm.quant.Recipe`) runs the layer's three GEMMs, forward,
  dgrad and wgrad, through :func:`jqlm.ops.quantized_dot` with the
  recipe's formats, roundings, Hadamard transforms and masks (FP8, MX,
  NVFP4, Quartet, Quartet-II, HALO, QuEST: ../shared/spec/
  lowp_training.md). The linear then takes a PRNG key per call.

Presets: :func:`stable_spam_int4` and :func:`stable_spam_fp4` (the
Stable-SPAM 4-bit experiments, spec §3.4), :func:`w8a8`, :func:`w4a16` and
:func:`hadamard_w4a4`; :func:`training_recipe` for the low-precision
training recipes with each recipe's layer selection.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jqlm import ops, quant

BLOCK_LINEARS = ("*.attn.q", "*.attn.k", "*.attn.v", "*.attn.o",
                 "*.mlp.gate", "*.mlp.up", "*.mlp.down")
"""The block linears, as ``fnmatch`` patterns over dotted module paths
(``"layers.3.attn.q"``): q, k, v, o, gate, up and down. This is the one
definition of the set of linears the methods act on: the QAT policies
(spec §3.4), GaLore's and Q-GaLore's projected kernels (spec §1, §4, §5),
Q-GaLore's int8 weights, the quantization-error report and the benchmarks'
shapes all use it. Embeddings, the LM head and norms are not in it."""


def is_quantized(x) -> bool:
  """Whether a params leaf is a quantized weight (:class:`jqlm.quant.QArray`
  or :class:`jqlm.quant.PackedQArray`), to be treated as one leaf."""
  return isinstance(x, (quant.QArray, quant.PackedQArray))


def module_path(param_path) -> str:
  """The dotted module path of a param's key path:
  ``("layers", 0, "attn", "q", "kernel")`` (or jax key entries) ->
  ``"layers.0.attn.q"`` (the trailing param name is dropped)."""
  parts = []
  for k in param_path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    parts.append(str(k))
  return ".".join(parts[:-1])


def matches(path: str, patterns: Sequence[str] = BLOCK_LINEARS) -> bool:
  """Whether a dotted module path matches any of ``patterns``."""
  return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def block_linear_mask(params, patterns: Sequence[str] = BLOCK_LINEARS, *,
                      allow_empty: bool = False):
  """A pytree of bools with the structure of ``params`` (a pure dict of
  jqlm's LLaMA, arrays, ``ShapeDtypeStruct`` s or QArray leaves): True for
  the ``kernel`` of every linear whose module path matches ``patterns``
  (default :data:`BLOCK_LINEARS`).

  Pass it as ``mask=`` to :func:`jqlm.optim.galore`,
  :func:`jqlm.optim.q_galore` and :func:`jqlm.optim.quantize_weights`.

  ``allow_empty=True`` returns an all-False mask instead of raising (the
  train step of a ``scan_layers`` model initialises its optimizer on the
  embeddings, norms and head apart from the layers).

  Raises:
    ValueError: no param matches (the message lists the module paths).
  """
  patterns = tuple(patterns)

  def pick(kp, _):
    name = kp[-1]
    name = getattr(name, "key", getattr(name, "name", name))
    return name == "kernel" and matches(module_path(kp), patterns)

  mask = jax.tree_util.tree_map_with_path(pick, params, is_leaf=is_quantized)
  if not allow_empty and not any(jax.tree.leaves(mask)):
    seen = sorted({module_path(kp) for kp, _ in
                   jax.tree_util.tree_flatten_with_path(
                     params, is_leaf=is_quantized)[0]})
    raise ValueError(
      f"No linear kernel matches {list(patterns)}; the params' module paths "
      f"are {seen[:12]}{' ...' if len(seen) > 12 else ''}. Pass patterns "
      "that match them.")
  return mask


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
  """How the linears matching ``patterns`` quantize.

  Attributes:
    patterns: ``fnmatch`` patterns over dotted module paths.
    weight: QAT spec of the kernel (flat groups follow the torch ``(out,
      in)`` order when the spec's ``axis`` is 0; see
      :class:`jqlm.quant.QuantSpec`), or ``None``.
    act: QAT spec of the input activation, or ``None``.
    hadamard: rotate input and kernel by a Walsh-Hadamard matrix before
      quantizing (needs a power-of-two ``in_features``).
    recipe: a low-precision training recipe (a :class:`jqlm.quant.Recipe`
      or a name of :data:`jqlm.quant.RECIPES`) for all three GEMMs of the
      linear; excludes the QAT fields above. A rule with none of the
      fields keeps its linears in high precision.
  """

  patterns: tuple[str, ...] = BLOCK_LINEARS
  weight: quant.QuantSpec | None = None
  act: quant.QuantSpec | None = None
  hadamard: bool = False
  recipe: quant.Recipe | None = None

  def __post_init__(self):
    if isinstance(self.patterns, str):
      object.__setattr__(self, "patterns", (self.patterns,))
    if isinstance(self.recipe, str):
      object.__setattr__(self, "recipe", quant.recipe(self.recipe))
    if self.recipe is not None:
      if not isinstance(self.recipe, quant.Recipe):
        raise ValueError(f"QuantRule.recipe must be a jqlm.quant.Recipe, a "
                         f"recipe name or None, got {self.recipe!r}.")
      if self.weight is not None or self.act is not None or self.hadamard:
        raise ValueError(
          "QuantRule: a recipe quantizes the weight, the activations and "
          "the gradients itself; drop weight/act/hadamard (QAT) or the "
          "recipe.")
    for name in ("weight", "act"):
      v = getattr(self, name)
      if v is not None and not isinstance(v, quant.QuantSpec):
        raise ValueError(f"QuantRule.{name} must be a jqlm.quant.QuantSpec "
                         f"or None, got {v!r}.")
      if v is not None and v.rounding is quant.Rounding.STOCHASTIC:
        raise ValueError(
          f"QuantRule.{name}: stochastic rounding needs a key per forward "
          "pass, which QAT rules do not carry; use rounding='nearest'.")

  def matches(self, path: str) -> bool:
    return matches(path, self.patterns)


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
  """An ordered tuple of rules; the first that matches a path applies."""

  rules: tuple[QuantRule, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))

  def rule_for(self, path: str) -> QuantRule | None:
    for rule in self.rules:
      if rule.matches(path):
        return rule
    return None


def stable_spam_int4() -> QuantPolicy:
  """Stable-SPAM's INT4 recipe (spec §3.4): weights asymmetric min-max
  uint4 in flat groups of 256 of the torch (out, in) weight, scale floor
  1e-5, RTN; activations symmetric int4 in flat groups of 256 with the top-2
  |x| kept exact (the official code's effective settings: its ``--act_*``
  flags are ignored), on q, k, v, o, gate, up and down."""
  return QuantPolicy((QuantRule(
    weight=quant.QuantSpec(format="uint4", granularity="flat_group",
                           group_size=256, axis=0, eps=1e-5),
    act=quant.QuantSpec(format="int4", granularity="flat_group",
                        group_size=256, keep_outliers=2, eps=1e-6)),))


def stable_spam_fp4() -> QuantPolicy:
  """Stable-SPAM's FP4 recipe (spec §3.4): weights and activations in E1M2
  (bias 1), flat groups of 256, top-2 outliers exact, the rest scaled by
  their max onto 1.0 of the grid."""
  fp4 = dict(format="fp4_e1m2", granularity="flat_group", group_size=256,
             keep_outliers=2, code_max=1.0, eps=1e-6)
  return QuantPolicy((QuantRule(
    weight=quant.QuantSpec(**fp4, axis=0), act=quant.QuantSpec(**fp4)),))


def w8a8(patterns: Sequence[str] = BLOCK_LINEARS) -> QuantPolicy:
  """Symmetric int8 weights per output channel and int8 activations per
  token (the usual W8A8 QAT)."""
  return QuantPolicy((QuantRule(
    patterns=tuple(patterns),
    weight=quant.QuantSpec(format="int8", granularity="channel", axis=-1),
    act=quant.QuantSpec(format="int8", granularity="channel", axis=0)),))


def w4a16(patterns: Sequence[str] = BLOCK_LINEARS,
          group_size: int = 128) -> QuantPolicy:
  """Symmetric int4 weights in groups of ``group_size`` input features per
  output; activations unquantized."""
  return QuantPolicy((QuantRule(
    patterns=tuple(patterns),
    weight=quant.QuantSpec(format="int4", granularity="group",
                           group_size=group_size, axis=0)),))


def hadamard_w4a4(patterns: Sequence[str] = BLOCK_LINEARS) -> QuantPolicy:
  """QuEST/HALO-style: rotate by a Walsh-Hadamard matrix, then int4 weights
  per output channel and int4 activations per token."""
  return QuantPolicy((QuantRule(
    patterns=tuple(patterns), hadamard=True,
    weight=quant.QuantSpec(format="int4", granularity="channel", axis=-1),
    act=quant.QuantSpec(format="int4", granularity="channel", axis=0)),))


def _nvfp4_kept(num_layers: int) -> tuple[str, ...]:
  """NVIDIA's NVFP4 recipe keeps about 16% of the linears in BF16, from
  the first and last blocks (arXiv 2509.25149; spec §6.4): here
  ``round(0.16 L)`` blocks, a fifth of them (rounded down) first and the
  rest last (2 and 8 of the paper's 62)."""
  n = round(0.16 * num_layers)
  first = n // 5
  ids = list(range(first)) + list(range(num_layers - (n - first),
                                        num_layers))
  return tuple(f"layers.{i}.*" for i in ids)


def training_recipe(name: str, *, num_layers: int,
                    keep_high_precision: Sequence[str] | None = None,
                    patterns: Sequence[str] = BLOCK_LINEARS,
                    **switches) -> QuantPolicy:
  """The :class:`QuantPolicy` of a low-precision training recipe
  (:func:`jqlm.quant.recipe`) with its default layer selection.

  Every recipe quantizes the block linears (attention q, k, v, o and the
  MLP; ``patterns``); embeddings, norms, attention's BMMs and softmax and
  the LM head stay in high precision (Quartet, Quartet-II and QuEST
  quantize attention and MLP linears only; HALO wraps every linear but
  ``lm_head``; torchao has no built-in exclusion: spec §2-§10). NVFP4
  also keeps the first and last blocks in BF16 (:func:`_nvfp4_kept`).

  Args:
    name: a recipe name (:data:`jqlm.quant.RECIPES`).
    num_layers: the model's blocks (for per-layer defaults).
    keep_high_precision: ``fnmatch`` patterns of linears kept in high
      precision, replacing the recipe's default (``()`` quantizes them
      all; ``["layers.0.*"]`` keeps the first block).
    patterns: the linears the recipe applies to.
    **switches: the recipe's switches (``stochastic_rounding=False``...).

  Per-layer selections (NVFP4's default on a model with 7+ blocks) need
  ``scan_layers=False``.
  """
  r = quant.recipe(name, **switches)
  if keep_high_precision is None:
    keep_high_precision = _nvfp4_kept(num_layers) if name == "nvfp4" else ()
  rules = []
  if keep_high_precision:
    rules.append(QuantRule(patterns=tuple(keep_high_precision)))
  if r.quantized:
    rules.append(QuantRule(patterns=tuple(patterns), recipe=r))
  return QuantPolicy(tuple(rules))


POLICIES = {
  "none": lambda: None,
  "int4": stable_spam_int4,
  "fp4": stable_spam_fp4,
  "w8a8": w8a8,
  "w4a16": w4a16,
  "hadamard": hadamard_w4a4,
}
"""The QAT policies by name (``TrainConfig.model.quant``): each entry
builds a :class:`QuantPolicy` (``None`` for ``"none"``)."""


def _fq_act(x_BxD: jax.Array, spec: quant.QuantSpec) -> jax.Array:
  """Fake-quantizes an activation viewed as (tokens, features): channel
  specs with ``axis=0`` are per token, flat groups run over the row-major
  (tokens, features) view as ``x.view(-1, G)`` does. A ragged tail (e.g.
  decoding one token of width 128 with G = 256) is zero-padded to a whole
  group; zeros change neither the group's max nor its top-k outliers."""
  shape = x_BxD.shape
  x_TxD = x_BxD.reshape(-1, shape[-1])
  if spec.granularity is quant.Granularity.FLAT_GROUP:
    n = x_TxD.size
    pad = -n % spec.group_size
    if pad:
      flat = jnp.pad(x_TxD.reshape(-1), (0, pad))
      return quant.fake_quant(flat, spec)[:n].reshape(shape)
  return quant.fake_quant(x_TxD, spec).reshape(shape)


# Kernel values the forward pass runs through jqlm.ops.qmatmul.
_LOW_BIT = (quant.QArray, quant.PackedQArray, ops.TappedWeight)


def kernel_value(kernel: nnx.Param, dtype) -> jax.Array:
  """A kernel param's value in ``dtype``, dequantizing QArray kernels."""
  w = kernel.get_value()
  if isinstance(w, _LOW_BIT):
    return w.dequantize(dtype)
  return w.astype(dtype)


class RecipeProbe(nnx.Variable):
  """A recipe linear's statistics probe (:func:`recipe_probes`): zeros
  whose gradient is the ``[6, 2]`` clipped / flushed fractions of the
  linear's GEMM operands (``quantized_dot(stats=...)``)."""


def recipe_probes(model: nnx.Module) -> tuple[nnx.Module, int]:
  """A view of ``model`` (sharing its arrays) in which every linear under
  a recipe carries a :class:`RecipeProbe` of zeros (``[6, 2]``, with the
  stacked layers' leading axis under ``scan_layers``), and the number of
  probed linears. ``jax.grad`` of the loss w.r.t. the probes
  (``nnx.DiffState(0, RecipeProbe)``) gives each linear's operand
  statistics; the training model itself is left as it is (its state, and
  so its checkpoints and optimizer, never see a probe)."""
  graphdef, state = nnx.split(model)
  view = nnx.merge(graphdef, state)
  count = 0
  for _, m in nnx.iter_modules(view):
    if isinstance(m, QLinear) and m.rule is not None and (
        m.rule.recipe is not None):
      lead = jnp.shape(m.kernel.get_value())[:-2]
      m.recipe_probe = RecipeProbe(
        jnp.zeros((*lead, *ops.STATS_SHAPE), jnp.float32))
      count += 1
  return view, count


def check_rule_fits(rule: QuantRule | None, path: str, in_features: int,
                    out_features: int) -> None:
  """Raises ValueError, naming the linear, when ``rule`` cannot run on a
  ``in_features -> out_features`` kernel: a recipe's blocks, tiles or
  Hadamard blocks that do not divide its dims (the tokens' count is
  checked per call, and by :class:`jqlm.train.TrainConfig` for a train
  step), or a Hadamard rule on a non-power-of-two ``in_features``.
  :class:`LlamaConfig` runs it over every block linear, so a misfit fails
  when the config is built, not when the step compiles."""
  if rule is None:
    return
  if rule.recipe is not None:
    try:  # the tokens' count is checked per call
      quant.check_shapes(rule.recipe, 1 << 16, in_features, out_features)
    except ValueError as e:
      raise ValueError(
        f"{path} ({in_features} -> {out_features}): {e} Or exclude it: "
        "training_recipe(..., keep_high_precision=[...]).") from None
  if rule.hadamard and in_features & (in_features - 1):
    raise ValueError(
      f"{path}: a Hadamard rule needs a power-of-two in_features, got "
      f"{in_features}. Exclude this linear from the rule's patterns.")


class QLinear(nnx.Module):
  """A bias-free linear ``y = x @ W`` (Flax layout ``W: (in, out)``) that
  quantizes according to the :class:`QuantRule` of its path.

  Args:
    in_features, out_features: sizes.
    path: dotted module path (``"layers.0.attn.q"``) matched by the policy.
    policy: :class:`QuantPolicy` or ``None``.
    axes: logical names of the kernel's two dims.
    dtype: compute dtype; param_dtype: storage dtype.
    init_std: std of the N(0, std) initialisation (0.02 in the official
      code).
    rngs: ``nnx.Rngs`` (keyword-only).
  """

  def __init__(self, in_features: int, out_features: int, *, path: str,
               policy: QuantPolicy | None, axes: tuple[str, str],
               dtype, param_dtype, init_std: float, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(init_std)
    self.kernel = nnx.Param(
      init(rngs.params(), (in_features, out_features), param_dtype),
      axes=axes)
    self.path = path
    self.rule = policy.rule_for(path) if policy is not None else None
    self.dtype = dtype
    check_rule_fits(self.rule, path, in_features, out_features)

  def __call__(self, x_BxD: jax.Array, *,
               key: jax.Array | None = None) -> jax.Array:
    """``x @ W`` per the rule, plus :math:`\\frac{\\alpha}{r} (x A) B`
    when the linear has LoRA adapters (:mod:`jqlm.models.lora`; on the
    unquantized input). ``key`` feeds a recipe's random numbers
    (stochastic rounding, random signs); others ignore it."""
    y = self._base(x_BxD, key=key)
    a = getattr(self, "lora_a", None)
    if a is None:
      return y
    x = x_BxD.astype(self.dtype)
    h_BxR = jnp.einsum("...d,dr->...r", x, a.get_value().astype(self.dtype),
                       preferred_element_type=jnp.float32)
    d_BxF = jnp.einsum("...r,rf->...f", h_BxR.astype(self.dtype),
                       self.lora_b.get_value().astype(self.dtype),
                       preferred_element_type=jnp.float32)
    return (y.astype(jnp.float32)
            + d_BxF * jnp.float32(self.lora_scale)).astype(self.dtype)

  def _base(self, x_BxD: jax.Array, *,
            key: jax.Array | None = None) -> jax.Array:
    rule = self.rule
    if rule is not None and rule.recipe is not None:
      w_DxF = kernel_value(self.kernel, self.dtype)
      probe = getattr(self, "recipe_probe", None)
      return ops.quantized_dot(
        x_BxD.astype(self.dtype), w_DxF, rule.recipe, key=key,
        stats=None if probe is None else probe.get_value()
      ).astype(self.dtype)
    w = self.kernel.get_value()
    if rule is None and isinstance(w, _LOW_BIT):
      # real low-bit weights: the dispatcher picks a Pallas kernel on
      # GPU/TPU and dequantize-then-dot elsewhere
      return ops.qmatmul(x_BxD.astype(self.dtype), w).astype(self.dtype)
    w_DxF = kernel_value(self.kernel, self.dtype)
    x_BxD = x_BxD.astype(self.dtype)
    if rule is not None:
      if rule.hadamard:
        x_BxD = quant.hadamard(x_BxD, axis=-1)
        w_DxF = quant.hadamard(w_DxF, axis=0)
      if rule.act is not None:
        x_BxD = _fq_act(x_BxD, rule.act)
      if rule.weight is not None:
        w_DxF = quant.fake_quant(w_DxF, rule.weight)
    y = jnp.einsum("...d,df->...f", x_BxD, w_DxF,
                   preferred_element_type=jnp.float32)
    return y.astype(self.dtype)
