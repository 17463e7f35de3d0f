"""Benchmarks behind ``jqlm bench``: each prints a table whose baseline is
measured in the same run (never a timed test).

* ``jqlm bench optim``: one jitted optimizer update on LLaMA-130M-shaped
  params (spec §6) for SPAM, Stable-SPAM and the stochastic-rounding apply,
  against ``optax.adamw``.
* ``jqlm bench quant``: jitted quantize -> dequantize round trips per format,
  against a bf16 cast round trip.
* ``jqlm bench memory``: params + optimizer-state bytes of the official
  LLaMA configs per training recipe (``jax.eval_shape``, no allocation).
* ``jqlm bench matmul``: low-bit matmuls through :mod:`jqlm.ops` at the
  LLaMA-7B and LLaMA-3-8B linear shapes; ``--tune`` times the kernels'
  candidate tiles and writes the table the dispatcher reads
  (:mod:`jqlm_kernels.tiles`).
* ``jqlm bench generate``: decode tokens/s of a LLaMA with random weights,
  bf16 vs int8 vs int4 (prepared) weights, each with a bf16 and an int8 KV
  cache.

Every shape comes from the model: :data:`jqlm.models.PRESETS` built under
``nnx.eval_shape`` (:func:`param_structs`), and the block linears through
:func:`jqlm.models.linear_shapes`. No shape table is copied here.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jqlm import models, ops, optim, quant


def _median_time(fn: Callable, args: tuple, iters: int, warmup: int = 2):
  """(median wall time of ``fn(*args)``, the last outputs)."""
  for _ in range(warmup):
    args = fn(*args)
  jax.block_until_ready(args)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    args = fn(*args)
    jax.block_until_ready(args)
    times.append(time.perf_counter() - t0)
  return statistics.median(times), args


def _wall(fn: Callable[[], object], iters: int) -> float:
  """Median wall time (s) of ``fn()`` (no args fed back), one warm-up."""
  return time_fn(lambda: (jax.block_until_ready(fn()), ())[1], iters=iters,
                 warmup=1)


def time_fn(fn: Callable, *args, iters: int = 10, warmup: int = 2) -> float:
  """Median wall time (s) of ``fn(*args)``; ``fn`` returns its next args.

  The outputs are fed back as the next inputs, so donated buffers are reused
  as in a training loop.
  """
  return _median_time(fn, args, iters, warmup)[0]


def _config(cfg: models.LlamaConfig | str) -> models.LlamaConfig:
  if isinstance(cfg, models.LlamaConfig):
    return cfg
  if cfg not in models.PRESETS:
    raise ValueError(f"Unknown LLaMA preset {cfg!r}; the presets are "
                     f"{sorted(models.PRESETS)}.")
  return models.PRESETS[cfg]()


def param_structs(cfg: models.LlamaConfig | str, dtype=None):
  """The params of ``Llama(cfg)`` as a pure dict of
  ``jax.ShapeDtypeStruct`` (``nnx.eval_shape``: nothing is allocated), in
  ``dtype`` (default the config's ``param_dtype``).

  The layers are unrolled (``params["layers"][i]``) whatever the preset's
  ``scan_layers``: these are the params a whole-tree optax transform sees
  (GaLore projects 2-D kernels).

  Args:
    cfg: a :class:`jqlm.models.LlamaConfig` or a name in
      :data:`jqlm.models.PRESETS` (``"llama_130m"``: 134.1M params, spec §6).
    dtype: the params' dtype, or None.
  """
  cfg = _config(cfg).replace(scan_layers=False)
  model = nnx.eval_shape(lambda: models.Llama(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if dtype is None:
    return params
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), params)


def scaled_config(cfg: models.LlamaConfig, scale: float
                  ) -> models.LlamaConfig:
  """``cfg`` with vocab, widths (and, below 1, layers) times ``scale``, for
  quick runs; ``scale=1`` returns ``cfg``. Heads scale too, so the head
  dim stays even and divides the width."""
  if scale <= 0:
    raise ValueError(f"scale must be > 0, got {scale}.")
  if scale == 1:
    return cfg
  heads = max(1, round(cfg.num_heads * scale))
  kv = heads if cfg.num_kv_heads == cfg.num_heads else math.gcd(
    heads, max(1, round(cfg.num_kv_heads * scale)))
  head_dim = max(2, 2 * round(cfg.hidden_size * scale / heads / 2))
  return cfg.replace(
    vocab_size=max(int(cfg.vocab_size * scale), 8),
    hidden_size=heads * head_dim, num_heads=heads, num_kv_heads=kv,
    head_dim=head_dim,
    intermediate_size=max(int(cfg.intermediate_size * scale), 8),
    num_layers=cfg.num_layers if scale >= 1 else max(
      int(cfg.num_layers * scale), 1))


def _random_tree(structs, dtype, key):
  """N(0, 0.02) arrays in ``dtype`` with the shapes of ``structs``."""
  leaves, treedef = jax.tree.flatten(structs)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
    (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)
    for k, s in zip(keys, leaves, strict=True)])


def _interleaved(cases: dict[str, tuple[Callable, tuple]], iters: int,
                 rounds: int, baseline: str) -> list[tuple[str, float, float]]:
  """Times every case once per round, round-robin.

  On a shared VM the memory bandwidth drifts between seconds, so each case's
  ratio is taken against the baseline *of the same round*; the table reports
  the median time and the median of the per-round ratios.
  """
  state = {name: args for name, (_, args) in cases.items()}
  times = {name: [] for name in cases}
  for _ in range(rounds):
    for name, (fn, _) in cases.items():
      t, state[name] = _median_time(fn, state[name], iters)
      times[name].append(t)
  return [
    (name, statistics.median(ts),
     statistics.median(t / b for t, b in zip(ts, times[baseline],
                                             strict=True)))
    for name, ts in times.items()
  ]


def bench_optim(
  iters: int = 5, scale: float = 1.0, dtype=jnp.float32, rounds: int = 3
) -> list[tuple[str, float, float]]:
  """Times one jitted update per optimizer; returns (name, s, x adamw).

  Args:
    iters: timed iterations per round (median kept).
    scale: shrink factor for the widths (1.0 = LLaMA-130M), for quick runs
      (:func:`scaled_config`).
    dtype: params/gradient dtype of the optimizer rows (the SR rows always
      use bf16 params, as the official pure-bf16 runs do).
    rounds: round-robin repetitions (median time and median per-round
      ratio reported).
  """
  shapes = param_structs(scaled_config(models.llama_130m(), scale))
  kp, kg, kg2 = jax.random.split(jax.random.key(0), 3)
  params = _random_tree(shapes, dtype, kp)
  grads = _random_tree(shapes, dtype, kg)
  grads2 = _random_tree(shapes, dtype, kg2)
  lr = 1e-3
  blocks = models.block_linear_mask

  def rank(r):  # the official 130M rank, shrunk with the widths
    return max(1, round(r * scale))

  def opt_step(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    # Two gradient draws alternate, so that statistics such as AdaClip's
    # running max|g| see varying gradients, as in training. They are swapped
    # in Python: returning an undonated input from jit would copy it.
    def run(p, s, g, g_next):
      return (*step(p, s, g), g_next, g)

    return run

  def fresh(tree):
    return jax.tree.map(jnp.copy, tree)

  with jax.numpy_dtype_promotion("standard"):
    txs = {
      "optax.adamw (baseline)": optax.adamw(lr, eps=1e-8, weight_decay=0.0),
      "jqlm spam": optim.spam(lr),
      "jqlm spam, track_spikes=False": optim.spam(lr, track_spikes=False),
      "jqlm stable_spam": optim.stable_spam(lr, total_steps=20_000),
      "jqlm adamw 8-bit states": optim.adamw(lr, state_quant=8),
      "quantize_state(optax.adam, 8)": optim.quantize_state(
        optax.adam(lr), 8),
      "jqlm spam, sparse momentum 0.25": optim.spam(
        lr, sparse_momentum=0.25, sparse_mask=blocks),
      "clip_by_component_norm + optax.adamw": optax.chain(
        optim.clip_by_component_norm(1.0),
        optax.adamw(lr, eps=1e-8, weight_decay=0.0)),
      f"jqlm natural_galore (r {rank(256)}, s 20)": optim.natural_galore(
        lr, rank(256), mask=blocks),
      f"jqlm apollo (r {rank(192)})": optim.apollo(lr, rank(192), mask=blocks,
                                                   key=0),
      "jqlm apollo_mini": optim.apollo_mini(lr, mask=blocks, key=0),
      "jqlm micro_adam (m 10, k 1%)": optim.micro_adam(
        lr, block_size=optim.H100_BLOCK_SIZE, quant_block_size=64),
      "optax muon (block linears)": optax.contrib.muon(
        lr, muon_weight_dimension_numbers=_muon_block_linears),
      "jqlm muon_8bit (block linears)": optim.muon_8bit(
        lr, muon_weight_dimension_numbers=_muon_block_linears),
    }
    cases = {}
    for name, tx in txs.items():
      p = fresh(params)
      cases[name] = (opt_step(tx), (p, tx.init(p), grads, grads2))

    # Applying updates to bf16 params: round-to-nearest vs stochastic.
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    g16, g16b = (jax.tree.map(lambda a: a.astype(jnp.bfloat16), g)
                 for g in (grads, grads2))
    u32 = jax.tree.map(lambda a: (1e-3 * a).astype(jnp.float32), grads)

    rne_jit = jax.jit(optax.apply_updates, donate_argnums=(0,))

    @functools.partial(jax.jit, donate_argnums=(0,))
    def sr_jit(p, u, key):
      key, sub = jax.random.split(key)
      return optim.apply_updates_stochastic(p, u, key=sub), key

    def rne(p, u):
      return rne_jit(p, u), u

    def sr(p, u, key):
      p, key = sr_jit(p, u, key)
      return p, u, key

    cases["bf16 apply_updates (RNE)"] = (rne, (fresh(p16), u32))
    cases["bf16 apply_updates_stochastic"] = (
      sr, (fresh(p16), u32, jax.random.key(1)))
    for name, tx in {
      "adamw, bf16 params (RNE apply)": optax.adamw(lr, eps=1e-8,
                                                    weight_decay=0.0),
      "adamw + stochastic_rounding, bf16": optax.chain(
        optax.adamw(lr, eps=1e-8, weight_decay=0.0),
        optim.stochastic_rounding(jax.random.key(2))),
    }.items():
      p = fresh(p16)
      cases[name] = (opt_step(tx), (p, tx.init(p), g16, g16b))
    return _interleaved(cases, iters, rounds, "optax.adamw (baseline)")


def format_rows(rows, title: str, unit_ms: bool = True) -> str:
  head = f"{'case':<36} {'ms' if unit_ms else 's':>9} {'ratio':>7}"
  lines = [title, head, "-" * len(head)]
  for name, t, r in rows:
    lines.append(f"{name:<36} {t * 1e3:>9.1f} {r:>7.2f}")
  return "\n".join(lines)


QUANT_SPECS = {
  "int8 channel": quant.QuantSpec(format="int8", granularity="channel"),
  "int4 group128": quant.QuantSpec(format="int4", granularity="group",
                                   group_size=128),
  "uint4 flat256 (Q-GaLore)": quant.QuantSpec(
    format="uint4", granularity="flat_group", group_size=256, eps=1e-5),
  "int4 flat256 top2": quant.QuantSpec(
    format="int4", granularity="flat_group", group_size=256, keep_outliers=2),
  "fp8_e4m3 tensor": quant.QuantSpec(format="fp8_e4m3"),
  "nf4 group64": quant.QuantSpec(format="nf4", granularity="group",
                                 group_size=64),
  "mxfp4": quant.QuantSpec(format="mxfp4"),
  "int8 channel SR": quant.QuantSpec(format="int8", granularity="channel",
                                     rounding="stochastic"),
}


def bench_quant(rows: int = 4096, cols: int = 4096, iters: int = 10):
  """Times jitted quantize -> dequantize per format; returns table rows."""
  x = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
  key = jax.random.key(1)

  @functools.partial(jax.jit, static_argnums=2)
  def roundtrip(a, k, spec):
    k = k if spec.rounding is quant.Rounding.STOCHASTIC else None
    return quant.quantize(a, spec, key=k).dequantize()

  cast = jax.jit(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32))

  def timed(fn):  # block on the result inside the timed call, keep x
    return time_fn(lambda a: (jax.block_until_ready(fn(a)), a)[1:], x,
                   iters=iters)

  t_base = timed(cast)
  out = [("bf16 cast round trip (baseline)", t_base, 1.0)]
  for name, spec in QUANT_SPECS.items():
    t = timed(lambda a, s=spec: roundtrip(a, key, s))
    out.append((name, t, t / t_base))
  return out


# The official LLaMA configs (spec §6) by their short name: the preset
# (shapes come from the model) and the GaLore / Q-GaLore rank of the
# official scripts (spec §4.4, §5.5).
LLAMA_CONFIGS = {
  "60M": ("llama_60m", 128),
  "130M": ("llama_130m", 256),
  "350M": ("llama_350m", 256),
  "1B": ("llama_1b", 1024),
  "7B": ("llama_7b", 1024),
}


def _q_galore(rank: int) -> optax.GradientTransformation:
  """Real-mode Q-GaLore on the block linears (the stochastic-rounding key
  belongs to the caller's ``apply_quantized_updates``, not to the state)."""
  return optim.q_galore(1e-2, rank, mask=models.block_linear_mask)


# APOLLO's rank in the official scripts (optimizers_more.md §1.5), by
# LLaMA config; APOLLO-Mini is rank 1 everywhere.
APOLLO_RANKS = {"60M": 128, "130M": 192, "350M": 256, "1B": 256, "7B": 256}


def _muon_block_linears(params):
  return optim.muon_dimension_numbers(params, models.block_linear_mask)


def memory_recipes(rank: int, apollo_rank: int = 256
                   ) -> dict[str, tuple[Callable, object]]:
  """name -> (optimizer, params dtype or "int8") of the compared recipes.
  GaLore, Q-GaLore, Natural GaLore, APOLLO and Muon act on the block
  linears (:func:`jqlm.models.block_linear_mask`; AdamW on the rest),
  MicroAdam and AdamW on every param."""
  blocks = models.block_linear_mask
  return {
    "AdamW, f32 params and states": (optax.adamw(1e-3), jnp.float32),
    "pure bf16 (AdamW, bf16 states)": (optim.adamw(1e-3), jnp.bfloat16),
    "AdamW 8-bit states, bf16 params": (optim.adamw(1e-3, state_quant=8),
                                        jnp.bfloat16),
    "AdamW 4-bit states, bf16 params": (optim.adamw(1e-3, state_quant=4),
                                        jnp.bfloat16),
    "GaLore, bf16": (optim.galore(1e-2, rank, mask=models.block_linear_mask),
                     jnp.bfloat16),
    "Q-GaLore (int8 W, int4 P, 8-bit)": (_q_galore(rank), "int8"),
    "optax.adam + quantize_state(8), bf16": (
      optim.quantize_state(optax.adam(1e-3), 8), jnp.bfloat16),
    "Natural GaLore (s=20), bf16": (
      optim.natural_galore(1e-2, rank, mask=blocks), jnp.bfloat16),
    "APOLLO (official rank), bf16": (
      optim.apollo(1e-2, apollo_rank, mask=blocks, key=0), jnp.bfloat16),
    "APOLLO-Mini, bf16": (optim.apollo_mini(1e-2, mask=blocks, key=0),
                          jnp.bfloat16),
    "MicroAdam (m=10, k=1%), bf16": (
      optim.micro_adam(1e-3, block_size=optim.H100_BLOCK_SIZE,
                       quant_block_size=64), jnp.bfloat16),
    "Muon, bf16": (optax.contrib.muon(
      1e-3, muon_weight_dimension_numbers=_muon_block_linears),
                   jnp.bfloat16),
    "8-bit Muon, bf16": (optim.muon_8bit(
      1e-3, muon_weight_dimension_numbers=_muon_block_linears),
                         jnp.bfloat16),
  }


def bench_memory(configs=tuple(LLAMA_CONFIGS), recipes=None):
  """{recipe: {config: MemoryReport}} for the official LLaMA configs
  (names of :data:`LLAMA_CONFIGS`) and the ``recipes`` (names of
  :func:`memory_recipes`; default all); params from :func:`param_structs`,
  the int8 ones (Q-GaLore) are the block linears."""
  unknown = [c for c in configs if c not in LLAMA_CONFIGS]
  if unknown:
    raise ValueError(f"Unknown configs {unknown}; choose from "
                     f"{list(LLAMA_CONFIGS)}.")
  names = list(memory_recipes(8))
  bad = [r for r in (recipes or ()) if r not in names]
  if bad:
    raise ValueError(f"Unknown memory recipes {bad}; choose from {names}.")
  out: dict[str, dict[str, optim.MemoryReport]] = {}
  for cname in configs:
    preset, rank = LLAMA_CONFIGS[cname]
    for rname, (tx, dtype) in memory_recipes(
        rank, APOLLO_RANKS[cname]).items():
      if recipes is not None and rname not in recipes:
        continue
      pdt = jnp.bfloat16 if dtype == "int8" else dtype
      params = param_structs(preset, pdt)
      if dtype == "int8":
        params = jax.eval_shape(
          lambda p: optim.quantize_weights(p, models.block_linear_mask),
          params)
      with jax.numpy_dtype_promotion("standard"):
        out.setdefault(rname, {})[cname] = optim.memory_report(tx, params)
  return out


def format_memory(reports, unit: str = "GiB") -> str:
  """Params + state per recipe and config, in ``unit``."""
  div = {"GiB": 2**30, "GB": 1e9}[unit]
  configs = list(next(iter(reports.values())))
  head = f"{'recipe (params + state, ' + unit + ')':<40}" + "".join(
    f"{c:>9}" for c in configs)
  lines = [head, "-" * len(head)]
  for rname, per in reports.items():
    lines.append(f"{rname:<40}" + "".join(
      f"{per[c].total / div:>9.2f}" for c in configs))
  return "\n".join(lines)


# The models whose linear shapes bench_matmul times, by a short tag.
KERNEL_PRESETS = {"7B": "llama_7b", "L3-8B": "llama3_8b"}


def _block_order(path: str) -> int:
  """Position of the first :data:`jqlm.models.BLOCK_LINEARS` pattern that
  matches ``path`` (q, k, v, o, gate, up, down)."""
  return next(i for i, pat in enumerate(models.BLOCK_LINEARS)
              if fnmatch.fnmatchcase(path, pat))


@functools.cache
def _kernel_shapes(presets: tuple[tuple[str, str], ...]):
  out, seen = {}, set()
  for tag, preset in presets:
    by_shape: dict[tuple[int, int], list[str]] = {}
    layer0 = [(p, sh) for p, sh in
              models.linear_shapes(_config(preset)).items()
              if p.startswith("layers.0.")]  # every block has these shapes
    for path, shape in sorted(layer0, key=lambda x: _block_order(x[0])):
      by_shape.setdefault(shape, []).append(path.rsplit(".", 1)[-1])
    for (k, n), names in by_shape.items():
      if (k, n) not in seen:
        seen.add((k, n))
        out[f"{tag} {'/'.join(names)} {k}x{n}"] = (k, n)
  return out


def kernel_shapes(presets: dict[str, str] | None = None
                  ) -> dict[str, tuple[int, int]]:
  """``{"7B q/k/v/o 4096x4096": (K, N), ...}``: the distinct (K, N) of the
  block linears (:func:`jqlm.models.linear_shapes`, Flax layout
  ``(in, out)``) of each model of ``presets`` (tag -> name in
  :data:`jqlm.models.PRESETS`; default :data:`KERNEL_PRESETS`), a shape
  listed once, under the first model that has it."""
  presets = KERNEL_PRESETS if presets is None else presets
  return dict(_kernel_shapes(tuple(presets.items())))


KERNEL_MS = (1, 4, 16, 64, 256, 1024, 4096)


# Dense peaks (FLOP/s for bf16, int8 / fp8; bytes/s of HBM) by device kind,
# from the vendors' data sheets (H100 / H200 SXM). Unknown devices (CPUs)
# get no roofline column.
DEVICE_PEAKS = {
  "H100": {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12, "bw": 3.35e12},
  "H200": {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12, "bw": 4.8e12},
}


class MatmulRow(NamedTuple):
  """One row of :func:`bench_matmul`."""

  case: str
  m: int
  k: int
  n: int
  seconds: float
  tflops: float
  gbps: float
  roofline: float | None  # fraction of the device's roofline time
  vs_bf16: float  # bf16 dot time / this time
  vs_dequant: float | None  # XLA dequantize-then-dot time / this time


def device_peaks(kind: str | None = None) -> dict[str, float] | None:
  """:data:`DEVICE_PEAKS` of the first device (or ``kind``), if known."""
  kind = jax.devices()[0].device_kind if kind is None else kind
  for name, peaks in DEVICE_PEAKS.items():
    if name in kind:
      return peaks
  return None


def _matmul_cases(m, k, n, weights, on_device, interpret):
  """name -> (jitted fn of x, compute class, weight bytes, dequant case)."""
  w16, q8, q4, qf8 = weights
  b16, b8 = 2 * k * n, k * n + 4 * n
  b4 = k * n // 2 + 4 * (k // 128) * n
  cases = {
    "bf16 dot (XLA)": (lambda x: x @ w16, "bf16", b16, None),
    "W8A16 dequant+dot (XLA)": (
      lambda x: ops.qmatmul(x, q8, impl="xla"), "bf16", b8, None),
    "W4A16 dequant+dot (XLA)": (
      lambda x: ops.qmatmul(x, q4, impl="xla"), "bf16", b4, None),
    "W8A8 int8 dot (XLA)": (
      lambda x: ops.qmatmul_w8a8(x, q8, impl="xla"), "int8", b8, None),
    "FP8 e4m3 dot (XLA)": (
      lambda x: ops.qmatmul_fp8(x, qf8, impl="xla"), "fp8", b8, None),
  }
  if not on_device:
    return cases
  x2 = jnp.zeros((m, k), jnp.bfloat16)
  kernels = {
    "W8A16 Pallas": (ops.qmatmul, q8, "pallas", "bf16", b8,
                     "W8A16 dequant+dot (XLA)"),
    "W4A16 Pallas": (ops.qmatmul, q4, "pallas", "bf16", b4,
                     "W4A16 dequant+dot (XLA)"),
    "W4A16 Triton": (ops.qmatmul, q4, "triton", "bf16", b4,
                     "W4A16 dequant+dot (XLA)"),
    "W8A8 Pallas": (ops.qmatmul_w8a8, q8, "pallas", "int8", b8, None),
    "FP8 Pallas": (ops.qmatmul_fp8, qf8, "pallas", "fp8", b8, None),
  }
  for name, (fn, q, impl, cls, nbytes, deq) in kernels.items():
    f = functools.partial(fn, qweight=q, impl=impl, interpret=interpret)
    try:  # a kernel that cannot serve this shape / device is left out
      jax.eval_shape(f, x2)
    except (NotImplementedError, ImportError):
      continue
    cases[name] = (f, cls, nbytes, deq)
  return cases


def bench_matmul(ms=KERNEL_MS, shapes=None, iters: int = 20,
                 interpret: bool = False, progress: bool = True
                 ) -> list[MatmulRow]:
  """Low-bit matmuls against XLA's bf16 dot and XLA's own
  dequantize-then-dot, all through :mod:`jqlm.ops` (what the models call).

  Per shape and M: time, TFLOP/s (``2 M K N / t``), GB/s (activations,
  weights with their scales, and the output), the fraction of the device's
  roofline time (``max(flops / peak, bytes / bandwidth) / t``, with the
  peak of the case's compute type; known devices only), and the speed-ups.
  Weights are int8 per channel, int4 in groups of 128, and e4m3 per
  channel; activations bf16. On CPU only the XLA rows run (the kernels
  need a GPU or TPU; ``interpret=True`` runs the Pallas kernels in the
  interpreter, which is for correctness, not speed).

  ``shapes`` maps a row name to ``(K, N)``; default :func:`kernel_shapes`
  (the LLaMA-7B and LLaMA-3-8B block linears). ``progress`` prints a line
  per shape on stderr.
  """
  shapes = kernel_shapes() if shapes is None else shapes
  on_device = jax.default_backend() in ("gpu", "tpu") or interpret
  peaks = device_peaks()
  rows = []
  key = jax.random.key(0)
  for i, (name, (k, n)) in enumerate(shapes.items()):
    if progress:
      print(f"[{i + 1}/{len(shapes)}] {name}: M in {tuple(ms)}",
            file=sys.stderr, flush=True)
    w = jax.random.normal(key, (k, n), jnp.float32) * 0.02
    weights = (
      w.astype(jnp.bfloat16),
      quant.quantize(w, quant.QuantSpec(format="int8", granularity="channel")),
      ops.prepare(quant.quantize(w, quant.QuantSpec(
        format="int4", granularity="group", group_size=128, axis=0))),
      quant.quantize(w, quant.QuantSpec(format="fp8_e4m3",
                                        granularity="channel")),
    )
    for m in ms:
      x = jax.random.normal(key, (m, k), jnp.bfloat16)
      cases = _matmul_cases(m, k, n, weights, on_device, interpret)
      times = {}
      for cname, (fn, *_rest) in cases.items():
        f = jax.jit(fn)
        times[cname] = time_fn(
          lambda a, f=f: (jax.block_until_ready(f(a)), a)[1:], x, iters=iters)
      base = times["bf16 dot (XLA)"]
      flops = 2.0 * m * k * n
      for cname, (_, cls, wbytes, deq) in cases.items():
        t = times[cname]
        nbytes = wbytes + 2 * m * k + 2 * m * n
        roof = None
        if peaks is not None:
          roof = max(flops / peaks[cls], nbytes / peaks["bw"]) / t
        rows.append(MatmulRow(
          f"{name} {cname}", m, k, n, t, flops / t / 1e12, nbytes / t / 1e9,
          roof, base / t, times[deq] / t if deq is not None else None))
  return rows


def format_matmul_rows(rows: list[MatmulRow], title: str) -> str:
  """The :func:`bench_matmul` table (markdown-friendly columns)."""
  head = (f"{'case':<44} {'M':>5} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} "
          f"{'%roof':>6} {'xbf16':>6} {'xdeq':>6}")
  lines = [title, head, "-" * len(head)]
  for r in rows:
    roof = "-" if r.roofline is None else f"{100 * r.roofline:.0f}"
    deq = "-" if r.vs_dequant is None else f"{r.vs_dequant:.2f}"
    lines.append(
      f"{r.case:<44} {r.m:>5} {r.seconds * 1e3:>9.3f} {r.tflops:>8.2f} "
      f"{r.gbps:>8.1f} {roof:>6} {r.vs_bf16:>6.2f} {deq:>6}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# tile tuning


def _tile_candidates(kind: str, platform: str, cls: str):
  """Candidate tiles around the default of ``kind`` (halved and doubled
  along each axis, and the default's warps / stages varied on GPU)."""
  from jqlm_kernels import tiles  # noqa: PLC0415

  base = tiles.DEFAULTS[(kind, platform, cls)]
  out = {base}
  for f in ("block_m", "block_n", "block_k"):
    for mult in (0.5, 2):
      v = int(getattr(base, f) * mult)
      if v >= 8:
        out.add(base._replace(**{f: v}))
  if platform == "gpu":
    for w, st in ((4, 2), (4, 4), (8, 3), (8, 4)):
      out.add(base._replace(num_warps=w, num_stages=st))
  return sorted(out)


class TuneRow(NamedTuple):
  """One tile candidate timed by :func:`tune_matmul`."""

  kernel: str
  shape_class: str
  m: int
  k: int
  n: int
  tiles: tuple
  seconds: float
  best: bool


def tune_matmul(shapes=None, ms=(1, 64, 1024), iters: int = 10,
                interpret: bool = False, save: bool = True,
                path: str | None = None, budget_s: float | None = None
                ) -> tuple[list[TuneRow], str | None]:
  """Times each kernel's candidate tiles (:func:`_tile_candidates`) per
  shape class on the current device, keeps the fastest per (kernel, class)
  summed over ``shapes``, and writes them to the tile table the dispatcher
  reads (:func:`jqlm_kernels.tiles.save`, keyed by device kind). Returns the
  rows and the path written (None without ``save``).

  On CPU it needs ``interpret=True`` and measures the interpreter (a smoke
  test of the tuner, not of the tiles). ``budget_s`` stops trying new
  candidates after that many seconds (what was measured is kept; the
  table says which classes were reached).
  """
  from jqlm_kernels import common as kcommon  # noqa: PLC0415
  from jqlm_kernels import tiles, w8a8, wxa16  # noqa: PLC0415

  backend = jax.default_backend()
  platform = backend if backend in ("gpu", "tpu") else "gpu"
  if backend not in ("gpu", "tpu") and not interpret:
    raise ValueError("tune_matmul measures kernels on a GPU or TPU; on CPU "
                     "pass interpret=True (a smoke test of the tuner).")
  device = jax.devices()[0].device_kind
  shapes = kernel_shapes() if shapes is None else shapes
  key = jax.random.key(0)
  totals: dict[tuple[str, str, tuple], float] = {}
  rows = []
  t_start = time.perf_counter()
  for (k, n) in shapes.values():
    w = jax.random.normal(key, (k, n), jnp.float32) * 0.02
    q4 = ops.kernel_weight(ops.prepare(quant.quantize(w, quant.QuantSpec(
      format="int4", granularity="group", group_size=128, axis=0))))
    q8 = quant.quantize(w, quant.QuantSpec(format="int8",
                                           granularity="channel"))
    for m in ms:
      cls = tiles.shape_class(m)
      x = jax.random.normal(key, (m, k), jnp.bfloat16)
      xq, xs = w8a8.quantize_rows(x)
      for kind in ("wxa16", "w8a8"):
        for t in _tile_candidates(kind, platform, cls):
          if budget_s is not None and time.perf_counter() - t_start > budget_s:
            break
          mp = kcommon.round_up(m, t.block_m)
          xp = jnp.pad(x, ((0, mp - m), (0, 0)))
          if kind == "wxa16":
            if wxa16.why_not(mp, k, n, bits=4, group_size=128,
                             block_m=t.block_m, block_n=t.block_n,
                             block_k=t.block_k, platform=platform):
              continue
            fn = functools.partial(
              wxa16.wxa16_matmul, w=q4.w, scale=q4.scale, bits=4,
              group_size=128, block_m=t.block_m, block_n=t.block_n,
              block_k=t.block_k, platform=platform, num_warps=t.num_warps,
              num_stages=t.num_stages, interpret=interpret)
            args = (xp,)
          else:
            if kcommon.scaled_why_not(mp, k, n, block_m=t.block_m,
                                      block_n=t.block_n, block_k=t.block_k,
                                      platform=platform):
              continue
            fn = functools.partial(
              w8a8.w8a8_matmul, wq=q8.codes, ws=q8.scale.reshape(1, n),
              block_m=t.block_m, block_n=t.block_n, block_k=t.block_k,
              platform=platform, num_warps=t.num_warps,
              num_stages=t.num_stages, interpret=interpret)
            args = (jnp.pad(xq, ((0, mp - m), (0, 0))),
                    jnp.pad(xs, ((0, mp - m), (0, 0))))
          f = jax.jit(fn)
          try:
            secs = time_fn(lambda *a, f=f: (jax.block_until_ready(f(*a)),
                                            *a)[1:], *args, iters=iters,
                           warmup=1)
          except Exception:  # noqa: BLE001  (a tile that fails to compile)
            continue
          totals[(kind, cls, tuple(t))] = totals.get(
            (kind, cls, tuple(t)), 0.0) + secs
          rows.append(TuneRow(kind, cls, m, k, n, tuple(t), secs, False))
  # a candidate competes only if it served every (shape, M) of its class
  # that any candidate served (a tile that fits fewer shapes would win on
  # a smaller sum)
  counts: dict[tuple[str, str, tuple], int] = {}
  for r in rows:
    counts[(r.kernel, r.shape_class, r.tiles)] = counts.get(
      (r.kernel, r.shape_class, r.tiles), 0) + 1
  full = {}
  for (kind, cls, _), c in counts.items():
    full[(kind, cls)] = max(full.get((kind, cls), 0), c)
  best: dict[tuple[str, str], tuple] = {}
  for (kind, cls, t), secs in totals.items():
    if counts[(kind, cls, t)] < full[(kind, cls)]:
      continue
    if (kind, cls) not in best or secs < totals[(kind, cls, best[
        (kind, cls)])]:
      best[(kind, cls)] = t
  rows = [r._replace(best=best.get((r.kernel, r.shape_class)) == r.tiles)
          for r in rows]
  written = None
  if save and best:
    table = {tiles.key(kind, platform, cls, device): tiles.Tiles(*t)
             for (kind, cls), t in best.items()}
    written = tiles.save(table, path)
  return rows, written


def format_tune_rows(rows: list[TuneRow], title: str) -> str:
  """The :func:`tune_matmul` table, fastest tiles marked ``*``."""
  head = (f"{'kernel':<7} {'class':<7} {'M':>5} {'K':>6} {'N':>6} "
          f"{'tiles (bm, bn, bk, warps, stages)':<36} {'ms':>9}")
  lines = [title, head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r.kernel:<7} {r.shape_class:<7} {r.m:>5} {r.k:>6} "
                 f"{r.n:>6} {str(r.tiles):<36} {r.seconds * 1e3:>9.3f}"
                 f"{' *' if r.best else ''}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# decode throughput


class GenerateRow(NamedTuple):
  """One row of :func:`bench_generate`."""

  weights: str
  cache: str
  batch: int
  prefill_s: float  # the prompt through the model, filling the cache
  decode_s: float  # new_tokens greedy decode steps
  tokens_per_s: float  # batch * new_tokens / decode_s
  vs_bf16: float  # this tokens/s / the bf16-weight, same-cache tokens/s
  weight_bytes: int


GENERATE_WEIGHTS = {
  "bf16": None,
  "int8 channel": quant.QuantSpec(format="int8", granularity="channel"),
  "int4 g128 (prepared)": quant.QuantSpec(format="int4", granularity="group",
                                          group_size=128, axis=0),
}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _prefill(graphdef, state, prompt_BxP, cache_len_dtype):
  cache_len, cache_dtype = cache_len_dtype
  model = nnx.merge(graphdef, state)
  cache = models.init_cache(model.cfg, prompt_BxP.shape[0], cache_len,
                            jnp.dtype(cache_dtype))
  logits, cache = model(prompt_BxP, cache=cache)
  return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=(0, 4))
def _decode(graphdef, state, tok_B, cache, n):
  """``n`` greedy decode steps from a filled cache (one jitted scan)."""
  model = nnx.merge(graphdef, state)

  def body(carry, _):
    tok, cache = carry
    logits, cache = model(tok[:, None], cache=cache)
    return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache), None

  (tok, _), _ = jax.lax.scan(body, (tok_B, cache), None, length=n)
  return tok


def bench_generate(preset: str = "llama_tiny", *, batches=(1, 8),
                   prompt_len: int = 128, new_tokens: int = 128,
                   iters: int = 3, weights=None,
                   caches=("bfloat16", "int8")) -> list[GenerateRow]:
  """Decode tokens/s of ``preset`` with random weights (bf16 params and
  compute), per weight format (:data:`GENERATE_WEIGHTS`, quantized by
  :func:`jqlm.models.quantize_model`, so prepared for the kernels) and KV
  cache dtype, at each batch size; the ratio is against bf16 weights with
  the same cache and batch, measured in the same run.

  The prompt is prefilled once per case (timed on its own); the decode
  time is ``new_tokens`` greedy steps from that cache in one jitted scan,
  the model as :func:`jqlm.models.generate` runs it (median of
  ``iters``). Group sizes that do not divide a small preset's narrow
  layers are reduced to one that does (the row name says which).
  """
  cfg = _config(preset).replace(dtype="bfloat16", param_dtype="bfloat16",
                                max_seq_len=max(_config(preset).max_seq_len,
                                                prompt_len + new_tokens))
  weights = GENERATE_WEIGHTS if weights is None else weights
  base_model = models.Llama(cfg, rngs=nnx.Rngs(0))
  ks = [k for k, _ in models.linear_shapes(cfg).values()]
  rows = []
  for wname, spec in weights.items():
    if spec is not None and spec.granularity is quant.Granularity.GROUP \
        and math.gcd(spec.group_size, *ks) != spec.group_size:
      g = math.gcd(spec.group_size, *ks)  # a small preset's narrow layers
      spec = spec.replace(group_size=g)
      wname = wname.replace(f"g{128}", f"g{g}")
    model = base_model if spec is None else models.quantize_model(
      base_model, spec)
    graphdef, state = nnx.split(model)
    wbytes = models.weight_bytes(model)
    for cache in caches:
      for b in batches:
        prompt = jax.random.randint(jax.random.key(b), (b, prompt_len), 0,
                                    cfg.vocab_size, jnp.int32)
        meta = (prompt_len + new_tokens, cache)
        pre = functools.partial(_prefill, graphdef, state, prompt, meta)
        t_pre = _wall(pre, iters)
        tok, filled = pre()
        t_dec = _wall(functools.partial(
          _decode, graphdef, state, tok, filled, new_tokens), iters)
        rows.append(GenerateRow(wname, cache, b, t_pre, t_dec,
                                b * new_tokens / t_dec, 1.0, wbytes))
  first = next(iter(weights))
  base = {(r.cache, r.batch): r.tokens_per_s for r in rows
          if r.weights == first}
  return [r._replace(vs_bf16=r.tokens_per_s / base[(r.cache, r.batch)])
          for r in rows]


def format_generate_rows(rows: list[GenerateRow], title: str) -> str:
  """The :func:`bench_generate` table."""
  head = (f"{'weights':<22} {'KV cache':<9} {'B':>3} {'weights MB':>10} "
          f"{'prefill ms':>10} {'decode ms':>9} {'decode tok/s':>12} "
          f"{'x bf16':>7}")
  lines = [title, head, "-" * len(head)]
  for r in rows:
    lines.append(
      f"{r.weights:<22} {r.cache:<9} {r.batch:>3} {r.weight_bytes / 1e6:>10.1f}"
      f" {r.prefill_s * 1e3:>10.1f} {r.decode_s * 1e3:>9.1f} "
      f"{r.tokens_per_s:>12.1f} {r.vs_bf16:>7.2f}")
  return "\n".join(lines)
