"""Benchmarks behind ``jqlm bench``: each prints a table whose baseline is
measured in the same run (never a timed test).

* ``jqlm bench optim``: one jitted optimizer update on LLaMA-130M-shaped
  params (spec §6) for SPAM, Stable-SPAM and the stochastic-rounding apply,
  against ``optax.adamw``.
* ``jqlm bench quant``: jitted quantize -> dequantize round trips per format,
  against a bf16 cast round trip.
* ``jqlm bench memory``: params + optimizer-state bytes of the official
  LLaMA configs per training recipe (``jax.eval_shape``, no allocation).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jqlm import optim, quant


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


def time_fn(fn: Callable, *args, iters: int = 10, warmup: int = 2) -> float:
  """Median wall time (s) of ``fn(*args)``; ``fn`` returns its next args.

  The outputs are fed back as the next inputs, so donated buffers are reused
  as in a training loop.
  """
  return _median_time(fn, args, iters, warmup)[0]


def llama_param_shapes(
  vocab: int = 32000, hidden: int = 768, intermediate: int = 2048,
  layers: int = 12,
) -> dict[str, tuple[int, ...]]:
  """Flax-layout (in, out) shapes of the official LLaMA configs (spec §6);
  the defaults are LLaMA-130M (134.1M params)."""
  shapes = {"embed": (vocab, hidden), "final_norm": (hidden,),
            "lm_head": (hidden, vocab)}
  for i in range(layers):
    for name in ("q", "k", "v", "o"):
      shapes[f"layer{i}.attn.{name}"] = (hidden, hidden)
    shapes[f"layer{i}.mlp.gate"] = (hidden, intermediate)
    shapes[f"layer{i}.mlp.up"] = (hidden, intermediate)
    shapes[f"layer{i}.mlp.down"] = (intermediate, hidden)
    shapes[f"layer{i}.attn_norm"] = (hidden,)
    shapes[f"layer{i}.mlp_norm"] = (hidden,)
  return shapes


def _make_tree(shapes, dtype, key):
  keys = jax.random.split(key, len(shapes))
  return {
    name: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
    for k, (name, shape) in zip(keys, shapes.items(), strict=True)
  }


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
    scale: shrink factor for the widths (1.0 = LLaMA-130M), for quick runs.
    dtype: params/gradient dtype of the optimizer rows (the SR rows always
      use bf16 params, as the official pure-bf16 runs do).
    rounds: round-robin repetitions (median time and median per-round
      ratio reported).
  """
  shapes = llama_param_shapes(
    vocab=max(int(32000 * scale), 8), hidden=max(int(768 * scale), 8),
    intermediate=max(int(2048 * scale), 8),
    layers=12 if scale >= 1 else max(int(12 * scale), 1))
  kp, kg, kg2 = jax.random.split(jax.random.key(0), 3)
  params = _make_tree(shapes, dtype, kp)
  grads = _make_tree(shapes, dtype, kg)
  grads2 = _make_tree(shapes, dtype, kg2)
  lr = 1e-3

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


# Official LLaMA configs (spec §6): (hidden, intermediate, layers), and the
# GaLore / Q-GaLore ranks of the official scripts (spec §4.4, §5.5).
LLAMA_CONFIGS = {
  "60M": (512, 1376, 8, 128),
  "130M": (768, 2048, 12, 256),
  "350M": (1024, 2736, 24, 256),
  "1B": (2048, 5461, 24, 1024),
  "7B": (4096, 11008, 32, 1024),
}


def memory_recipes(rank: int) -> dict[str, tuple[Callable, object]]:
  """name -> (optimizer, params dtype or "int8") of the compared recipes."""
  key = jax.random.key(0)
  return {
    "AdamW, f32 params and states": (optax.adamw(1e-3), jnp.float32),
    "pure bf16 (AdamW, bf16 states)": (optim.adamw(1e-3), jnp.bfloat16),
    "AdamW 8-bit states, bf16 params": (optim.adamw(1e-3, state_quant=8),
                                        jnp.bfloat16),
    "AdamW 4-bit states, bf16 params": (optim.adamw(1e-3, state_quant=4),
                                        jnp.bfloat16),
    "GaLore, bf16": (optim.galore(1e-2, rank), jnp.bfloat16),
    "Q-GaLore (int8 W, int4 P, 8-bit)": (
      optim.q_galore(1e-2, rank, key=key), "int8"),
  }


def bench_memory(configs=tuple(LLAMA_CONFIGS)):
  """{recipe: {config: MemoryReport}} for the official LLaMA configs."""
  out: dict[str, dict[str, optim.MemoryReport]] = {}
  for cname in configs:
    hidden, inter, layers, rank = LLAMA_CONFIGS[cname]
    shapes = llama_param_shapes(32000, hidden, inter, layers)
    for rname, (tx, dtype) in memory_recipes(rank).items():
      pdt = jnp.bfloat16 if dtype == "int8" else dtype
      params = {k: jax.ShapeDtypeStruct(v, pdt) for k, v in shapes.items()}
      if dtype == "int8":
        params = jax.eval_shape(optim.quantize_weights, params)
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


# K, N of the LLaMA-7B and LLaMA-3-8B linears (Flax layout (in, out))
KERNEL_SHAPES = {
  "7B qkvo 4096x4096": (4096, 4096),
  "7B up 4096x11008": (4096, 11008),
  "7B down 11008x4096": (11008, 4096),
  "L3-8B up 4096x14336": (4096, 14336),
  "L3-8B kv 4096x1024": (4096, 1024),
}
KERNEL_MS = (1, 4, 16, 64, 256, 1024, 4096)


def bench_kernels(ms=KERNEL_MS, shapes=None, iters: int = 20,
                  interpret: bool = False):
  """Low-bit matmuls vs the bf16 dot: rows ``(case, M, K, N, s, ratio)``.

  Cases: XLA bf16 dot (baseline), W8A16 and W4A16 (group 128) Pallas
  kernels, W8A8 Pallas (per-token activation quantization included), XLA
  int8 dot, and XLA fp8 e4m3 dot. On CPU only the XLA rows run (the Pallas
  kernels need a GPU or TPU; ``interpret=True`` runs them in the
  interpreter, which is for correctness, not speed).
  """
  from jqlm_kernels import wxa16  # noqa: PLC0415

  shapes = KERNEL_SHAPES if shapes is None else shapes
  on_device = jax.default_backend() in ("gpu", "tpu") or interpret
  rows = []
  key = jax.random.key(0)
  for name, (k, n) in shapes.items():
    w = jax.random.normal(key, (k, n), jnp.float32) * 0.02
    w16 = w.astype(jnp.bfloat16)
    q8 = quant.quantize(w, quant.QuantSpec(format="int8",
                                           granularity="channel"))
    q4 = quant.quantize(w, quant.QuantSpec(format="int4", granularity="group",
                                           group_size=128, axis=0))
    s4 = q4.scale.reshape(-1, n)
    p4 = wxa16.pack_int4(q4.codes, 128)
    for m in ms:
      x = jax.random.normal(key, (m, k), jnp.bfloat16)
      cases = _kernel_cases(m, k, n, w, w16, q8, p4, s4, on_device,
                            interpret)
      times = {}
      for cname, fn in cases.items():
        times[cname] = time_fn(lambda a, f=fn: (jax.block_until_ready(f(a)),
                                                a)[1:], x, iters=iters)
      base = times["bf16 dot (XLA, baseline)"]
      for cname, t in times.items():
        rows.append((f"{name} {cname}", m, k, n, t, base / t))
  return rows


def _bf16_dot(a, b):
  return a @ b


def _int8_xla(a, codes, ws):
  from jqlm_kernels import w8a8  # noqa: PLC0415

  aq, xs = w8a8.quantize_rows(a)
  acc = jax.lax.dot(aq, codes, preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * xs * ws).astype(jnp.bfloat16)


def _fp8_xla(a, w8):
  return jax.lax.dot(a.astype(jnp.float8_e4m3fn), w8,
                     preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _kernel_cases(m, k, n, w, w16, q8, p4, s4, on_device, interpret):
  """name -> jitted function of the activations."""
  from jqlm_kernels import w8a8, wxa16  # noqa: PLC0415

  ws8 = q8.scale.reshape(1, n)
  cases = {
    "bf16 dot (XLA, baseline)": jax.jit(functools.partial(_bf16_dot,
                                                          b=w16)),
    "int8 dot (XLA)": jax.jit(functools.partial(_int8_xla, codes=q8.codes,
                                                ws=ws8)),
    "fp8 e4m3 dot (XLA)": jax.jit(functools.partial(
      _fp8_xla, w8=w.astype(jnp.float8_e4m3fn))),
  }
  if not on_device:
    return cases
  bm = 16 if m >= 16 else m
  blocks = dict(block_m=bm, block_n=128, block_k=128)
  if wxa16.can_use(m, k, n, bits=8, group_size=k, **blocks):
    cases["W8A16 Pallas"] = jax.jit(functools.partial(
      wxa16.wxa16_matmul, w=q8.codes, scale=ws8, bits=8, group_size=k,
      interpret=interpret, **blocks))
  if wxa16.can_use(m, k, n, bits=4, group_size=128, **blocks):
    cases["W4A16 Pallas"] = jax.jit(functools.partial(
      wxa16.wxa16_matmul, w=p4, scale=s4, bits=4, group_size=128,
      interpret=interpret, **blocks))
  if w8a8.can_use(m, k, n, **blocks):
    def w8a8_case(a):
      return w8a8.w8a8_matmul(*w8a8.quantize_rows(a), q8.codes, ws8,
                              interpret=interpret, **blocks)
    cases["W8A8 Pallas"] = jax.jit(w8a8_case)
  return cases


def format_kernel_rows(rows, title: str) -> str:
  head = (f"{'case':<48} {'M':>5} {'ms':>9} {'speedup':>8}")
  lines = [title, head, "-" * len(head)]
  for name, m, _, _, t, r in rows:
    lines.append(f"{name:<48} {m:>5} {t * 1e3:>9.3f} {r:>8.2f}")
  return "\n".join(lines)
