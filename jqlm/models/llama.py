r"""LLaMA in Flax NNX, as the official SPAM / Stable-SPAM / GaLore / Q-GaLore
code builds it (``peft_pretraining/modeling_llama.py``; spec §6).

.. math::
   h = x + \mathrm{Attn}(\mathrm{RMSNorm}(x)), \qquad
   y = h + W_{down}\big(\mathrm{silu}(W_{gate} \bar h) \odot W_{up}\bar h\big),
   \quad \bar h = \mathrm{RMSNorm}(h)

* RMSNorm computed in float32 (``x / sqrt(mean(x^2) + eps)``, cast back,
  times the weight), eps 1e-6 in the official configs;
* RoPE with the Hugging Face "rotate half" layout, base 10000, and the
  context-extension variants of transformers' ``rope_type``: linear
  position scaling, dynamic NTK, YaRN and Llama 3.1's frequency-dependent
  scaling (:class:`RopeScaling`);
* grouped-query attention (``num_kv_heads``) through
  ``jax.nn.dot_product_attention``, causal;
* SwiGLU MLP, no biases, untied LM head by default, init N(0, 0.02) for every
  linear and the embedding;
* separate compute (``dtype``) and parameter (``param_dtype``) dtypes;
* optional per-block rematerialisation (``remat=True``).

Module paths are ``embed``, ``layers.<i>.{attn_norm,attn.{q,k,v,o},
mlp_norm,mlp.{gate,up,down}}``, ``final_norm`` and ``lm_head``; the block
linears (:data:`jqlm.models.BLOCK_LINEARS`, :func:`block_linear_mask`,
:func:`linear_shapes`) are the set that QAT, GaLore and Q-GaLore act on.

References:
  Touvron et al., `LLaMA <https://arxiv.org/abs/2302.13971>`_, 2023.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlm.models.layers import (
  BLOCK_LINEARS,
  QLinear,
  QuantPolicy,
  block_linear_mask,
  check_rule_fits,
  kernel_value,
  module_path,
)


def _dtype(value, name: str) -> jnp.dtype:
  """``value`` as a floating dtype, or a ValueError naming the field."""
  try:
    dt = None if value is None else jnp.dtype(value)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"LlamaConfig.{name} must be a floating dtype "
                     f"(float32, bfloat16, float16), got {value!r}.")
  return dt


class RopeType(enum.Enum):
  """How RoPE's frequencies are scaled for context extension (transformers'
  ``rope_type``)."""

  LINEAR = "linear"
  DYNAMIC = "dynamic"
  YARN = "yarn"
  LLAMA3 = "llama3"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  r"""RoPE scaling beyond the plain :math:`\theta_i = b^{-2i/d}`, computed
  exactly as transformers' ``ROPE_INIT_FUNCTIONS`` do (float32,
  ``modeling_rope_utils.py``), so that HF checkpoints of Llama 3.1-3.3 and
  of YaRN / dynamic-NTK fine-tunes load with equal logits.

  * ``LINEAR`` (Chen et al. 2023, arXiv 2306.15595): :math:`\theta_i /
    s` with :math:`s` = ``factor``.
  * ``LLAMA3`` (Llama 3.1, arXiv 2407.21783; Meta's ``apply_scaling``):
    with :math:`\lambda_i = 2\pi/\theta_i`, :math:`L` =
    ``original_max_position_embeddings``, wavelengths above :math:`L /`
    ``low_freq_factor`` are divided by ``factor``, those below :math:`L /`
    ``high_freq_factor`` kept, and the band between interpolated with
    :math:`\gamma = (L/\lambda_i - l)/(h - l)`:
    :math:`(1-\gamma)\theta_i/s + \gamma\theta_i`.
  * ``YARN`` (Peng et al. 2023, arXiv 2309.00071): a ramp between
    interpolated (:math:`\theta_i/s`) and extrapolated frequencies over
    the dims between the correction dims of ``beta_fast`` and
    ``beta_slow`` rotations in :math:`L` positions, and cos / sin scaled
    by ``attention_factor`` (default :math:`0.1 \ln s + 1`, or the
    ``mscale`` / ``mscale_all_dim`` ratio).
  * ``DYNAMIC`` (dynamic NTK, bloc97 / emozilla): for a call whose largest
    position is :math:`p` and :math:`n = \max(p + 1, M)` (:math:`M` =
    ``original_max_position_embeddings``, HF's ``max_position_embeddings``;
    default ``LlamaConfig.max_seq_len``), the base becomes :math:`b (s n / M
    - s + 1)^{d/(d-2)}`. The point is to run past :math:`M`, so give the
    model a larger ``max_seq_len``. transformers keeps the frequencies of
    its longest call so far and resets them below :math:`M`; here every
    call uses its own length, which is what a fresh HF model computes for
    that call (the two differ only for a shorter call above :math:`M`
    after a longer one). A KV cache holds keys rotated at the frequencies
    of the call that wrote them, as in transformers.

  Attributes:
    type: a :class:`RopeType` (or its name).
    factor: the scale :math:`s` (> 0; YaRN: ``None`` takes
      ``max_seq_len / original_max_position_embeddings``).
    original_max_position_embeddings: :math:`L`, the pretraining context
      (LLAMA3 and YARN; DYNAMIC's :math:`M`).
    low_freq_factor, high_freq_factor: LLAMA3's band edges (1 and 4 in
      Llama 3.1).
    beta_fast, beta_slow: YaRN's rotation counts (32 and 1).
    attention_factor, mscale, mscale_all_dim: YaRN's cos / sin scale, or
      the DeepSeek-style ratio it is derived from.
    truncate: YaRN floors / ceils the correction range (transformers'
      default).
  """

  type: RopeType | str
  factor: float | None = 1.0
  original_max_position_embeddings: int | None = None
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True

  def __post_init__(self):
    try:
      kind = RopeType(self.type.value if isinstance(self.type, RopeType)
                      else self.type)
    except ValueError:
      raise ValueError(
        f"RopeScaling.type must be one of "
        f"{[t.value for t in RopeType]}, got {self.type!r}.") from None
    object.__setattr__(self, "type", kind)
    if self.factor is None and kind is not RopeType.YARN:
      raise ValueError(f"RopeScaling({kind.value}) needs a factor.")
    if self.factor is not None and not (
        isinstance(self.factor, (int, float)) and math.isfinite(self.factor)
        and self.factor > 0):
      raise ValueError(f"RopeScaling.factor must be a finite number > 0, "
                       f"got {self.factor!r}.")
    if kind in (RopeType.LLAMA3, RopeType.YARN):
      L = self.original_max_position_embeddings
      if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(
          f"RopeScaling({kind.value}) needs original_max_position_embeddings"
          f" (the pretraining context, e.g. 8192 for Llama 3.1), got "
          f"{L!r}.")
    if kind is RopeType.LLAMA3 and not (
        0 < self.low_freq_factor < self.high_freq_factor):
      raise ValueError(
        "RopeScaling(llama3) needs 0 < low_freq_factor < high_freq_factor, "
        f"got {self.low_freq_factor} and {self.high_freq_factor}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """A frozen LLaMA configuration (hashable; a valid static argument).

  Attributes:
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads: the
      usual sizes.
    num_kv_heads: key/value heads for grouped-query attention (default
      ``num_heads``: multi-head attention).
    head_dim: per-head size (default ``hidden_size // num_heads``).
    max_seq_len: the longest sequence (RoPE tables, KV caches).
    rope_base: RoPE base :math:`\\theta` (10000).
    rope_scaling: a :class:`RopeScaling` (Llama 3.1's ``llama3``, YaRN,
      dynamic NTK, linear), or a number: the linear position scaling
      factor (positions are divided by it; 1.0 disables it).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: share the embedding with the LM head.
    init_std: std of the normal init of linears and the embedding.
    dtype: compute dtype; param_dtype: storage dtype of the params.
    remat: rematerialise each block in the backward pass.
    quant: a :class:`jqlm.models.QuantPolicy` for the linears, or None.
    scan_layers: store the blocks as one stacked block (every param gets a
      leading ``layers`` axis of size ``num_layers``) and run them with
      ``lax.scan``, as MaxText's ``scan_layers`` does: the compiled program
      holds one block, whatever the depth (LLaMA-7B's train step compiles
      in seconds instead of minutes), and the train step can update the
      layers one at a time (:mod:`jqlm.train.step`). The math, the init
      and the HF layout are those of the unrolled model
      (:func:`stack_layers` / :func:`unstack_layers` convert params). On by
      default for the official presets (60M to 7B, LLaMA-2/3), off for
      ``llama_tiny`` and a bare ``LlamaConfig``: the compiled step is
      smaller at every size measured (docs/benchmarks.md).
  """

  vocab_size: int = 32000
  hidden_size: int = 512
  intermediate_size: int = 1376
  num_layers: int = 8
  num_heads: int = 8
  num_kv_heads: int | None = None
  head_dim: int | None = None
  max_seq_len: int = 1024
  rope_base: float = 10000.0
  rope_scaling: float | RopeScaling = 1.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  quant: QuantPolicy | None = None
  scan_layers: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "max_seq_len"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got "
                         f"{v!r}.")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
          f"num_heads={self.num_heads} must divide hidden_size="
          f"{self.hidden_size} (or set head_dim explicitly).")
      object.__setattr__(self, "head_dim",
                         self.hidden_size // self.num_heads)
    elif isinstance(self.head_dim, bool) or not isinstance(
        self.head_dim, (int, np.integer)) or self.head_dim < 1:
      raise ValueError(f"LlamaConfig.head_dim must be a positive int or None "
                       f"(hidden_size // num_heads), got {self.head_dim!r}.")
    else:
      object.__setattr__(self, "head_dim", int(self.head_dim))
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if isinstance(self.num_kv_heads, bool) or not isinstance(
        self.num_kv_heads, int):
      raise ValueError(f"LlamaConfig.num_kv_heads must be a positive int or "
                       f"None (= num_heads), got {self.num_kv_heads!r}.")
    if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_kv_heads={self.num_kv_heads} must divide num_heads="
        f"{self.num_heads} (grouped-query attention shares each kv head "
        "among num_heads // num_kv_heads query heads).")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")
    scalings = () if isinstance(self.rope_scaling, RopeScaling) else (
      ("rope_scaling", 0.0),)
    for name, low in (("rope_base", 0.0), *scalings,
                      ("norm_eps", None), ("init_std", None)):
      v = getattr(self, name)
      ok = (isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, bool)
            and math.isfinite(v) and (v > low if low is not None else v >= 0))
      if not ok:
        raise ValueError(f"LlamaConfig.{name} must be a finite number "
                         f"{'> 0' if low is not None else '>= 0'}, got "
                         f"{v!r}.")
    object.__setattr__(self, "dtype", _dtype(self.dtype, "dtype"))
    object.__setattr__(self, "param_dtype",
                       _dtype(self.param_dtype, "param_dtype"))
    if self.quant is not None and not isinstance(self.quant, QuantPolicy):
      raise ValueError(f"LlamaConfig.quant must be a QuantPolicy or None, "
                       f"got {self.quant!r}.")
    if self.quant is not None:  # a misfit fails here, not at compile time
      for path, d_in, d_out in self.linears:
        check_rule_fits(self.quant.rule_for(path), path, d_in, d_out)

  @property
  def linears(self) -> tuple[tuple[str, int, int], ...]:
    """``(path, in_features, out_features)`` of every block linear, in the
    model's order, with the paths the quant policies match
    (``layers.3.attn.q``); no model is built."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    qd, kvd = self.num_heads * hd, self.num_kv_heads * hd
    shapes = (("attn.q", d, qd), ("attn.k", d, kvd), ("attn.v", d, kvd),
              ("attn.o", qd, d), ("mlp.gate", d, f), ("mlp.up", d, f),
              ("mlp.down", f, d))
    return tuple((f"layers.{i}.{name}", a, b)
                 for i in range(self.num_layers) for name, a, b in shapes)

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)

  @property
  def num_params(self) -> int:
    """Parameter count (embeddings, head and norms included)."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    block = attn + 3 * d * f + 2 * d
    embed = self.vocab_size * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return embed + self.num_layers * block + d + head


def _official(hidden, inter, heads, layers, **kw) -> LlamaConfig:
  kw.setdefault("scan_layers", True)
  return LlamaConfig(vocab_size=32000, hidden_size=hidden,
                     intermediate_size=inter, num_heads=heads,
                     num_layers=layers, **kw)


def llama_60m(**kw) -> LlamaConfig:
  """Official LLaMA-60M (spec §6): 58.1M params."""
  return _official(512, 1376, 8, 8, **kw)


def llama_130m(**kw) -> LlamaConfig:
  """Official LLaMA-130M (spec §6): 134.1M params."""
  return _official(768, 2048, 12, 12, **kw)


def llama_350m(**kw) -> LlamaConfig:
  """Official LLaMA-350M (spec §6): 368.0M params."""
  return _official(1024, 2736, 16, 24, **kw)


def llama_1b(**kw) -> LlamaConfig:
  """Official LLaMA-1B (spec §6): 1339.1M params."""
  return _official(2048, 5461, 32, 24, **kw)


def llama_7b(**kw) -> LlamaConfig:
  """Official LLaMA-7B (spec §6): 6738.4M params, max length 2048."""
  kw.setdefault("max_seq_len", 2048)
  return _official(4096, 11008, 32, 32, **kw)


def llama2_7b(**kw) -> LlamaConfig:
  """LLaMA-2-7B shapes (rms eps 1e-5, max length 4096)."""
  kw = {"max_seq_len": 4096, "norm_eps": 1e-5, **kw}
  return _official(4096, 11008, 32, 32, **kw)


def llama3_8b(**kw) -> LlamaConfig:
  """LLaMA-3-8B shapes: vocab 128256, GQA with 8 kv heads, RoPE base
  500000, max length 8192."""
  kw = {"max_seq_len": 8192, "norm_eps": 1e-5, "rope_base": 500000.0,
        "num_kv_heads": 8, "scan_layers": True, **kw}
  return LlamaConfig(vocab_size=128256, hidden_size=4096,
                     intermediate_size=14336, num_heads=32, num_layers=32,
                     **kw)


def _llama3_rope(factor: float) -> RopeScaling:
  return RopeScaling(type=RopeType.LLAMA3, factor=factor,
                     low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)


def _llama3x(hidden, inter, heads, layers, factor, **kw) -> LlamaConfig:
  kw = {"max_seq_len": 131072, "norm_eps": 1e-5, "rope_base": 500000.0,
        "num_kv_heads": 8, "scan_layers": True,
        "rope_scaling": _llama3_rope(factor), **kw}
  return LlamaConfig(vocab_size=128256, hidden_size=hidden,
                     intermediate_size=inter, num_heads=heads,
                     num_layers=layers, **kw)


def llama3_1_8b(**kw) -> LlamaConfig:
  """Llama-3.1-8B (and 3.3's shapes at 8B): LLaMA-3-8B with the ``llama3``
  RoPE (factor 8 over an 8192-token pretraining context, max length
  131072); 8.03B params, untied head."""
  return _llama3x(4096, 14336, 32, 32, 8.0, **kw)


def llama3_2_1b(**kw) -> LlamaConfig:
  """Llama-3.2-1B: 16 layers of width 2048 (32 heads of 64, 8 kv heads),
  ``llama3`` RoPE with factor 32, tied embeddings; 1.24B params."""
  return _llama3x(2048, 8192, 32, 16, 32.0, tie_embeddings=True, **kw)


def llama3_2_3b(**kw) -> LlamaConfig:
  """Llama-3.2-3B: 28 layers of width 3072 (24 heads of 128, 8 kv heads),
  ``llama3`` RoPE with factor 32, tied embeddings; 3.21B params."""
  return _llama3x(3072, 8192, 24, 28, 32.0, tie_embeddings=True, **kw)


def llama_tiny(**kw) -> LlamaConfig:
  """A test-sized config: 2 layers, width 64, 4 heads (2 kv heads)."""
  kw = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "max_seq_len": 128, **kw}
  return LlamaConfig(**kw)


PRESETS = {"llama_60m": llama_60m, "llama_130m": llama_130m,
           "llama_350m": llama_350m, "llama_1b": llama_1b,
           "llama_7b": llama_7b, "llama2_7b": llama2_7b,
           "llama3_8b": llama3_8b, "llama3_1_8b": llama3_1_8b,
           "llama3_2_1b": llama3_2_1b, "llama3_2_3b": llama3_2_3b,
           "llama_tiny": llama_tiny}


# ---------------------------------------------------------------------------
# RoPE


def rope_frequencies(head_dim: int, base: float) -> jax.Array:
  """:math:`\\theta_i = \\text{base}^{-2i/d}`, ``i < d/2`` (float32)."""
  return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                         / head_dim))


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def scaled_rope_frequencies(head_dim: int, base: float,
                            scaling: float | RopeScaling = 1.0, *,
                            max_seq_len: int | None = None,
                            seq_len: jax.Array | int | None = None
                            ) -> tuple[jax.Array, float]:
  """RoPE's inverse frequencies under ``scaling`` (:class:`RopeScaling`),
  and the factor cos / sin are multiplied by (YaRN's attention factor; 1
  otherwise), in float32 as transformers computes them.

  A number is linear scaling (applied to the positions by
  :func:`apply_rope`, so the frequencies returned here are plain).
  ``max_seq_len`` is the model's (YaRN's default factor, dynamic NTK's
  :math:`M`); ``seq_len`` is the call's length (dynamic NTK; may be
  traced).
  """
  inv = rope_frequencies(head_dim, base)
  if not isinstance(scaling, RopeScaling):
    return inv, 1.0
  kind, dim = scaling.type, head_dim
  if kind is RopeType.LINEAR:
    return inv / jnp.float32(scaling.factor), 1.0
  if kind is RopeType.LLAMA3:
    s, L = scaling.factor, scaling.original_max_position_embeddings
    lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    inv_llama = jnp.where(wavelen > L / lo, inv / s, inv)
    smooth = (L / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_llama / s + smooth * inv_llama
    medium = ~(wavelen < L / hi) & ~(wavelen > L / lo)
    return jnp.where(medium, smoothed, inv_llama), 1.0
  if kind is RopeType.DYNAMIC:
    m = scaling.original_max_position_embeddings or max_seq_len
    if m is None:
      raise ValueError("Dynamic NTK RoPE needs original_max_position_"
                       "embeddings or max_seq_len.")
    n = m if seq_len is None else jnp.maximum(
      jnp.asarray(seq_len, jnp.float32), jnp.float32(m))
    s = scaling.factor
    new_base = base * ((s * n / m) - (s - 1)) ** (dim / (dim - 2))
    exps = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (jnp.asarray(new_base, jnp.float32) ** exps), 1.0
  # YaRN
  L = scaling.original_max_position_embeddings
  s = scaling.factor
  if s is None:
    if max_seq_len is None:
      raise ValueError("YaRN without a factor needs max_seq_len.")
    s = max_seq_len / L
  att = scaling.attention_factor
  if att is None:
    if scaling.mscale and scaling.mscale_all_dim:
      att = _yarn_mscale(s, scaling.mscale) / _yarn_mscale(
        s, scaling.mscale_all_dim)
    else:
      att = _yarn_mscale(s)

  def corr_dim(rot):
    return (dim * math.log(L / (rot * 2 * math.pi))) / (2 * math.log(base))

  low, high = corr_dim(scaling.beta_fast), corr_dim(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  extra, inter = 1.0 / pos_freqs, 1.0 / (s * pos_freqs)
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low)
                  / (high - low), 0, 1)
  keep = 1 - ramp  # the extrapolated share
  return inter * (1 - keep) + extra * keep, float(att)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, *,
               base: float, scaling: float | RopeScaling = 1.0,
               max_seq_len: int | None = None) -> jax.Array:
  """Rotary embedding in the "rotate half" layout of Hugging Face LLaMA:
  :math:`x \\cos(p\\theta) + \\mathrm{rot}(x) \\sin(p\\theta)` with
  :math:`\\mathrm{rot}([a, b]) = [-b, a]` and :math:`p` = position /
  ``scaling`` for a numeric (linear) ``scaling``; a :class:`RopeScaling`
  changes :math:`\\theta` (:func:`scaled_rope_frequencies`; dynamic NTK
  takes the call's length from its largest position). Computed in float32,
  returned in the input dtype."""
  hd = x_BxTxNxH.shape[-1]
  pos = positions_BxT.astype(jnp.float32)
  if isinstance(scaling, RopeScaling):
    seq_len = (jnp.max(positions_BxT) + 1
               if scaling.type is RopeType.DYNAMIC else None)
    freqs, att = scaled_rope_frequencies(hd, base, scaling,
                                         max_seq_len=max_seq_len,
                                         seq_len=seq_len)
  else:
    freqs, att = rope_frequencies(hd, base), 1.0
    pos = pos / jnp.float32(scaling)
  ang_BxTxH2 = pos[:, :, None] * freqs[None, None, :]
  ang = jnp.concatenate([ang_BxTxH2, ang_BxTxH2], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  if att != 1.0:
    cos, sin = cos * jnp.float32(att), sin * jnp.float32(att)
  x = x_BxTxNxH.astype(jnp.float32)
  x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
  rot = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rot * sin).astype(x_BxTxNxH.dtype)


# ---------------------------------------------------------------------------
# KV cache


class LayerCache(NamedTuple):
  """One layer's keys and values ``(B, S, K, H)``; int8 caches also hold
  per-(token, head) float32 scales ``(B, S, K, 1)``."""

  k: jax.Array
  v: jax.Array
  k_scale: jax.Array | None = None
  v_scale: jax.Array | None = None


class KVCache(NamedTuple):
  """A KV cache: per-layer :class:`LayerCache` and the filled length (for
  a ``scan_layers`` model, one :class:`LayerCache` whose arrays have a
  leading layer axis)."""

  layers: tuple[LayerCache, ...] | LayerCache
  length: jax.Array


def init_cache(cfg: LlamaConfig, batch: int, max_len: int | None = None,
               dtype=jnp.bfloat16) -> KVCache:
  """An empty cache for ``batch`` sequences of up to ``max_len`` tokens.

  ``dtype`` is the storage: ``bfloat16`` (default), ``float32``, or
  ``int8`` (symmetric per token and head, scales in float32; halves the
  bf16 cache's memory).
  """
  max_len = cfg.max_seq_len if max_len is None else max_len
  for name, v in (("batch", batch), ("max_len", max_len)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"init_cache: {name} must be a positive int, got "
                       f"{v!r}.")
  dtype = jnp.dtype(dtype)
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  if dtype == jnp.int8:
    z = jnp.zeros(shape, jnp.int8)
    s = jnp.zeros(shape[:-1] + (1,), jnp.float32)
    layer = LayerCache(z, z, s, s)
  elif jnp.issubdtype(dtype, jnp.floating):
    z = jnp.zeros(shape, dtype)
    layer = LayerCache(z, z)
  else:
    raise ValueError(f"KV cache dtype must be floating or int8, got {dtype}.")
  if cfg.scan_layers:  # one stacked LayerCache, scanned with the blocks
    stacked = jax.tree.map(
      lambda x: jnp.zeros((cfg.num_layers,) + x.shape, x.dtype), layer)
    return KVCache(stacked, jnp.zeros((), jnp.int32))
  return KVCache(tuple(layer for _ in range(cfg.num_layers)),
                 jnp.zeros((), jnp.int32))


def _int8_vec(x):
  """Symmetric int8 per last-axis vector: (codes, scale)."""
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
  safe = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x32 / safe), -127, 127).astype(jnp.int8), scale


def _cache_write(c: LayerCache, k, v, start) -> LayerCache:
  def put(buf, new):
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                               start, axis=1)
  if c.k_scale is None:
    return LayerCache(put(c.k, k), put(c.v, v))
  kq, ks = _int8_vec(k)
  vq, vs = _int8_vec(v)
  return LayerCache(put(c.k, kq), put(c.v, vq), put(c.k_scale, ks),
                    put(c.v_scale, vs))


def _cache_read(c: LayerCache, dtype):
  if c.k_scale is None:
    return c.k.astype(dtype), c.v.astype(dtype)
  return ((c.k.astype(jnp.float32) * c.k_scale).astype(dtype),
          (c.v.astype(jnp.float32) * c.v_scale).astype(dtype))


# ---------------------------------------------------------------------------
# Modules


def _attention(q, k, v, **kw):
  # jax.nn.dot_product_attention calls promote_types(bf16, f32) internally,
  # which strict dtype promotion rejects; its math is dtype-explicit.
  with jax.numpy_dtype_promotion("standard"):
    return jax.nn.dot_product_attention(q, k, v, **kw)


class RMSNorm(nnx.Module):
  """:math:`w \\odot x / \\sqrt{\\mathrm{mean}(x^2) + \\epsilon}`, in
  float32 (HF ``LlamaRMSNorm``: normalize in f32, cast, then scale)."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + jnp.float32(self.eps))).astype(self.dtype)
    w = self.weight[...].astype(self.dtype)
    return w.reshape((1,) * (y.ndim - 1) + w.shape) * y


def _linear_kwargs(cfg: LlamaConfig, rngs: nnx.Rngs) -> dict:
  return dict(policy=cfg.quant, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
              init_std=cfg.init_std, rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE."""

  def __init__(self, cfg: LlamaConfig, *, path: str, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    common = _linear_kwargs(cfg, rngs)
    self.q = QLinear(d, cfg.num_heads * hd, path=f"{path}.q",
                     axes=("embed", "heads"), **common)
    self.k = QLinear(d, cfg.num_kv_heads * hd, path=f"{path}.k",
                     axes=("embed", "kv_heads"), **common)
    self.v = QLinear(d, cfg.num_kv_heads * hd, path=f"{path}.v",
                     axes=("embed", "kv_heads"), **common)
    self.o = QLinear(cfg.num_heads * hd, d, path=f"{path}.o",
                     axes=("heads", "embed"), **common)
    self.cfg = cfg

  def __call__(self, x_BxTxD, positions_BxT, cache: LayerCache | None = None,
               start=None, *, key=None):
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    q = self.q(x_BxTxD, key=_fold(key, 0)).reshape(b, t, cfg.num_heads,
                                                     cfg.head_dim)
    k = self.k(x_BxTxD, key=_fold(key, 1)).reshape(b, t, cfg.num_kv_heads,
                                                     cfg.head_dim)
    v = self.v(x_BxTxD, key=_fold(key, 2)).reshape(b, t, cfg.num_kv_heads,
                                                     cfg.head_dim)
    rope = dict(base=cfg.rope_base, scaling=cfg.rope_scaling,
                max_seq_len=cfg.max_seq_len)
    q = apply_rope(q, positions_BxT, **rope)
    k = apply_rope(k, positions_BxT, **rope)
    if cache is None:
      out = _attention(q, k, v, is_causal=True)
      new_cache = None
    else:
      new_cache = _cache_write(cache, k, v, start)
      k_all, v_all = _cache_read(new_cache, cfg.dtype)
      s = k_all.shape[1]
      key_pos = jnp.arange(s, dtype=jnp.int32)
      # query at absolute position p sees keys 0..p (and none unwritten)
      mask = key_pos[None, None, :] <= positions_BxT[:, :, None]
      out = _attention(q, k_all, v_all, mask=mask[:, None, :, :])
    out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
    return self.o(out, key=_fold(key, 3)), new_cache


class MLP(nnx.Module):
  """SwiGLU: :math:`W_{down}(\\mathrm{silu}(x W_{gate}) \\odot x W_{up})`."""

  def __init__(self, cfg: LlamaConfig, *, path: str, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    common = _linear_kwargs(cfg, rngs)
    self.gate = QLinear(d, f, path=f"{path}.gate", axes=("embed", "mlp"),
                        **common)
    self.up = QLinear(d, f, path=f"{path}.up", axes=("embed", "mlp"),
                      **common)
    self.down = QLinear(f, d, path=f"{path}.down", axes=("mlp", "embed"),
                        **common)

  def __call__(self, x, *, key=None):
    h = jax.nn.silu(self.gate(x, key=_fold(key, 0))) * self.up(
      x, key=_fold(key, 1))
    return self.down(h, key=_fold(key, 2))


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: LlamaConfig, *, path: str, rngs: nnx.Rngs):
    norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.hidden_size, **norm)
    self.attn = Attention(cfg, path=f"{path}.attn", rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, **norm)
    self.mlp = MLP(cfg, path=f"{path}.mlp", rngs=rngs)

  def __call__(self, x, positions, cache=None, start=None, *, key=None):
    """``key`` (a low-precision recipe's randomness) folds in 0 for the
    attention and 1 for the MLP, then each linear its index."""
    h, cache = self.attn(self.attn_norm(x), positions, cache, start,
                         key=_fold(key, 0))
    x = x + h
    return x + self.mlp(self.mlp_norm(x), key=_fold(key, 1)), cache


class Llama(nnx.Module):
  """The LLaMA decoder.

  ``model(tokens)`` returns float32 logits ``(B, T, V)``;
  ``model(tokens, cache=c, positions=p)`` also returns the updated
  :class:`KVCache` (see :func:`jqlm.models.generate`).

  Examples:
    >>> from flax import nnx
    >>> from jqlm.models import Llama, llama_tiny
    >>> model = Llama(llama_tiny(), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 256)
  """

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = jax.nn.initializers.normal(cfg.init_std)
    self.embed = nnx.Param(
      init(rngs.params(), (cfg.vocab_size, cfg.hidden_size),
           cfg.param_dtype), axes=("vocab", "embed"))
    blocks = [Block(cfg, path=f"layers.{i}", rngs=rngs)
              for i in range(cfg.num_layers)]
    self.layers = _stack_blocks(blocks) if cfg.scan_layers else nnx.List(
      blocks)
    self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps,
                              dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(
        init(rngs.params(), (cfg.hidden_size, cfg.vocab_size),
             cfg.param_dtype), axes=("embed", "vocab"))

  def embed_tokens(self, tokens_BxT: jax.Array) -> jax.Array:
    """The token embeddings ``(B, T, D)`` in the compute dtype."""
    emb = kernel_value(self.embed, self.cfg.dtype)
    return jnp.take(emb, tokens_BxT, axis=0)

  def head(self, x_BxTxD: jax.Array) -> jax.Array:
    """Final RMSNorm and LM head: float32 logits ``(B, T, V)``."""
    cfg = self.cfg
    x = self.final_norm(x_BxTxD)
    if cfg.tie_embeddings:
      head = kernel_value(self.embed, cfg.dtype).T
    else:
      head = kernel_value(self.lm_head, cfg.dtype)
    return jnp.einsum("btd,dv->btv", x, head,
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens_BxT: jax.Array, *,
               positions: jax.Array | None = None,
               cache: KVCache | None = None,
               key: jax.Array | None = None):
    """Logits (and the updated cache when ``cache`` is given).

    ``key`` feeds the random numbers of a low-precision training recipe
    (:func:`jqlm.models.training_recipe`): layer ``i`` folds in ``i``, the
    same in the scanned and the unrolled model. Recipes that round the
    gradients stochastically need it to be differentiated."""
    cfg = self.cfg
    if tokens_BxT.ndim != 2:
      raise ValueError(f"Llama expects token ids of shape (batch, length), "
                       f"got {tuple(tokens_BxT.shape)}.")
    b, t = tokens_BxT.shape
    if t > cfg.max_seq_len:
      raise ValueError(
        f"{t} tokens exceed the model's max_seq_len={cfg.max_seq_len} (its "
        "rotary table); shorten the sequence or build the model with a "
        "larger max_seq_len.")
    check_token_ids(tokens_BxT, cfg.vocab_size)
    start = None if cache is None else cache.length
    if positions is None:
      base = jnp.zeros((), jnp.int32) if start is None else start
      positions = base + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32),
                                          (b, t))
    x = self.embed_tokens(tokens_BxT)
    if cfg.scan_layers:
      x, new_layers = scan_blocks(self.layers, x, positions,
                                  None if cache is None else cache.layers,
                                  start, remat=cfg.remat and cache is None,
                                  key=key)
    else:
      new_layers = []
      for i, block in enumerate(self.layers):
        layer_cache = None if cache is None else cache.layers[i]
        lkey = _fold(key, i)
        if cfg.remat and cache is None:
          x, _ = nnx.remat(lambda blk, x_, p_, k_: blk(x_, p_, key=k_))(
            block, x, positions, lkey)
        else:
          x, layer_cache = block(x, positions, layer_cache, start, key=lkey)
        new_layers.append(layer_cache)
      new_layers = tuple(new_layers)
    logits = self.head(x)
    if cache is None:
      return logits
    return logits, KVCache(new_layers, cache.length + t)


# ---------------------------------------------------------------------------
# Scanned layers


def _fold(key, i):
  return None if key is None else jax.random.fold_in(key, i)


def _linear_rules(block: Block) -> list:
  return [(p, m.rule) for p, m in nnx.iter_modules(block)
          if isinstance(m, QLinear)]


def _stack_blocks(blocks: list[Block]) -> Block:
  """One :class:`Block` whose params are the blocks' params stacked along a
  new leading axis (logical name ``layers``). The blocks are built as the
  unrolled model builds them (same keys, same order), so the scanned and
  the unrolled model start from the same weights."""
  template = blocks[0]
  rules = [[r for _, r in _linear_rules(b)] for b in blocks]
  for i, r in enumerate(rules):
    if r != rules[0]:
      diff = [".".join(map(str, name)) for (name, a), b in zip(
        _linear_rules(blocks[i]), rules[0], strict=True) if a != b]
      raise ValueError(
        f"scan_layers=True needs one quantization rule per linear for every "
        f"layer, but layer {i}'s rules differ from layer 0's (for "
        f"{', '.join(diff)}: a per-layer policy, such as NVFP4's "
        "high-precision first/last blocks): the scanned stack runs one "
        "block program for "
        "all layers. Use scan_layers=False (--set model.scan_layers=false) "
        "for per-layer policies.")
  values = [nnx.state(b, nnx.Variable) for b in blocks]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *values)
  nnx.update(template, stacked)
  for _, v in nnx.iter_graph(template):
    if isinstance(v, nnx.Variable):
      axes = v.get_metadata().get("axes")
      v.set_metadata("axes", ("layers",) + tuple(
        axes if axes is not None else (None,) * (v.get_value().ndim - 1)))
  return template


def scan_blocks(stack: Block, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                cache: LayerCache | None = None, start=None, *,
                remat: bool = False, key: jax.Array | None = None):
  """Runs a stacked block (``scan_layers``) over ``x`` with ``lax.scan``:
  layer ``i`` sees slice ``i`` of every param (and of the cache). Returns
  ``(x, stacked cache or None)``. ``remat`` rematerialises each layer in
  the backward pass (only the layer inputs are saved). ``key``: layer
  ``i`` gets ``fold_in(key, i)``, as in the unrolled model."""
  graphdef, state = nnx.split(stack)
  n = jax.tree.leaves(state)[0].shape[0]

  def body(x, xs):
    layer_state, layer_cache, i = xs
    block = nnx.merge(graphdef, layer_state)
    x, layer_cache = block(x, positions_BxT, layer_cache, start,
                           key=None if key is None else
                           jax.random.fold_in(key, i))
    return x, layer_cache

  if remat:
    body = jax.checkpoint(body)
  return jax.lax.scan(body, x_BxTxD, (state, cache, jnp.arange(n)))


def stack_layers(params: dict) -> dict:
  """Unrolled params (``params["layers"][i]``, a pure dict as
  ``nnx.to_pure_dict`` gives) -> the ``scan_layers`` layout (one subtree
  whose leaves have a leading layer axis). Other entries are unchanged;
  quantized leaves stack leaf by leaf."""
  layers = params["layers"]
  if not all(isinstance(k, int) or str(k).isdigit() for k in layers):
    raise ValueError(f"stack_layers: layer keys must be 0..n-1, got "
                     f"{sorted(map(str, layers))} (params['layers'] of an "
                     "unrolled model: nnx.to_pure_dict of Llama with "
                     "scan_layers=False).")
  keys = sorted(layers, key=int)
  if [int(k) for k in keys] != list(range(len(keys))):
    raise ValueError(f"stack_layers: layer keys must be 0..n-1, got {keys}.")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[layers[k] for k in keys])
  return {**params, "layers": stacked}


def unstack_layers(params: dict) -> dict:
  """The inverse of :func:`stack_layers`: ``params["layers"][i]`` for every
  layer ``i`` of a ``scan_layers`` params dict."""
  stacked = params["layers"]
  leaves = jax.tree.leaves(stacked)
  if not leaves:
    raise ValueError("unstack_layers: params['layers'] has no arrays.")
  n = leaves[0].shape[0]
  return {**params, "layers": {
    i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}}


def linear_shapes(cfg: LlamaConfig,
                  patterns: Sequence[str] = BLOCK_LINEARS
                  ) -> dict[str, tuple[int, int]]:
  """The kernel shape ``(in, out)`` of every linear of ``Llama(cfg)`` whose
  module path matches ``patterns`` (default the block linears), keyed by
  path (``"layers.0.attn.q"``), in the params pytree's order (layers by
  index, names sorted). Computed by ``nnx.eval_shape``: nothing is
  allocated."""
  cfg = cfg.replace(scan_layers=False)  # per-layer shapes and paths
  model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mask = block_linear_mask(params, patterns)
  out = {}
  for (kp, leaf), on in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(mask), strict=True):
    if on:
      out[module_path(kp)] = tuple(leaf.shape)
  return out


def check_token_ids(tokens, vocab_size: int) -> None:
  """Raises ValueError for token ids outside ``[0, vocab_size)`` (whose
  embedding lookup would silently clamp or give NaN logits). Runs where the
  ids are concrete (eager calls, :func:`jqlm.models.generate`, the data
  loaders); under ``jit`` the ids are traced and the check is skipped."""
  try:
    ids = np.asarray(tokens)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"token ids must be integers, got {ids.dtype}.")
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(
      f"token ids must be in [0, vocab_size={vocab_size}), got ids in "
      f"[{int(ids.min())}, {int(ids.max())}]. Use the tokenizer the model "
      "was trained with, or a model with a larger vocab_size.")


def param_count(model: Llama) -> int:
  """Number of parameters of a (float) model."""
  state = nnx.state(model, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))


__all__ = [
  "Attention", "Block", "KVCache", "LayerCache", "Llama", "LlamaConfig",
  "MLP", "PRESETS", "RMSNorm", "apply_rope", "init_cache", "llama2_7b",
  "llama3_8b", "llama_130m", "llama_1b", "llama_350m", "llama_60m",
  "llama_7b", "llama_tiny", "linear_shapes", "param_count",
  "rope_frequencies", "scaled_rope_frequencies", "RopeScaling",
  "RopeType", "llama3_1_8b", "llama3_2_1b", "llama3_2_3b", "scan_blocks",
  "stack_layers", "unstack_layers",
]
