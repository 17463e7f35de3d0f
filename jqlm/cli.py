"""The ``jqlm`` command line.

Sub-commands:

* ``jqlm demo``: quantize random data in every format and print a table of
  storage bits and errors.
* ``jqlm bench optim|quant|memory|matmul|generate|train``: benchmark tables
  (see :mod:`jqlm.bench`).
* ``jqlm train --config <preset or file.py> --set key=value ...``: train
  (:func:`jqlm.train.run`); ``--resume`` continues from the newest checkpoint.
* ``jqlm compare <suite or file.py>``: several optimizer / precision arms
  on the same data, seeds and token budget; a markdown table and plots
  (:mod:`jqlm.train.compare`).
* ``jqlm eval --checkpoint <workdir>``: held-out loss and perplexity.
* ``jqlm generate --checkpoint <workdir> --prompt TEXT``: sample.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
  from jqlm.demo import format_table, quant_error_table  # noqa: PLC0415

  rows = quant_error_table(
    rows=args.rows, cols=args.cols, seed=args.seed, outliers=args.outliers
  )
  print(
    f"jqlm quantizers on a ({args.rows}, {args.cols}) float32 Gaussian"
    + (f" with {args.outliers} large outliers" if args.outliers else "")
    + f", seed {args.seed}"
  )
  print(format_table(rows))
  return 0


def _bench_shapes(bench, which: str):
  """The (K, N) shapes of ``jqlm bench matmul --shapes``."""
  if which == "all":
    return None  # bench.kernel_shapes(): LLaMA-7B and LLaMA-3-8B
  if which == "8b":
    return bench.kernel_shapes({"8B": "llama3_8b"})
  return {"tiny 256x512": (256, 512), "tiny 512x256": (512, 256)}


def _int_list(text: str, flag: str) -> tuple[int, ...]:
  """Comma-separated positive ints, or a ValueError naming ``flag``."""
  try:
    out = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    out = ()
  if not out or min(out) < 1:
    raise ValueError(f"{flag} expects comma-separated positive integers "
                     f"such as 1,16,256; got {text!r}.")
  return out


def _bench_out(args: argparse.Namespace, text: str, rows) -> int:
  """Prints a benchmark table and writes its rows as JSON with ``--json``
  (and the table as markdown beside it)."""
  import dataclasses  # noqa: PLC0415
  import json  # noqa: PLC0415

  print(text)
  if args.json:
    out = [r._asdict() if hasattr(r, "_asdict") else dataclasses.asdict(r)
           for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"argv": sys.argv[1:], "rows": out}, f, indent=1)
    with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
      f.write("```\n" + text + "\n```\n")
  return 0


def _check_out_file(path: str | None, flag: str,
                    overwrite: bool = False) -> None:
  """Refuses, before any benchmark runs, a ``path`` that cannot be written
  as a file (a directory, under a file, or ending in ``.md``: the table is
  written beside it as ``.md``), and one whose JSON or markdown already
  exists unless ``overwrite`` (FileExistsError: nothing is replaced)."""
  if path is None:
    return
  if os.path.isdir(path):
    raise ValueError(f"{flag} {path!r} is a directory; pass a file path "
                     "such as results/bench.json.")
  if os.path.splitext(path)[1].lower() == ".md":
    raise ValueError(f"{flag} {path!r} ends in .md, the name of the "
                     "markdown table written beside it; pass a .json path "
                     "such as results/bench.json.")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{flag} {path!r}: {parent!r} is a file, not a "
                     "directory. Pass another path.")
  md = os.path.splitext(path)[0] + ".md"
  there = [p for p in (path, md) if os.path.exists(p)]
  if there and not overwrite:
    raise FileExistsError(
      f"{flag} {path!r}: {' and '.join(repr(p) for p in there)} already "
      "exist(s), from an earlier benchmark; nothing was written. Pass "
      "another path, or --overwrite to replace them.")


# The sub-benchmarks each `jqlm bench` option applies to ("memory --step"
# is memory with --step); another option given to a sub-benchmark that
# would ignore it is refused (ValueError naming the option).
_BENCH_APPLIES = {
  "iters": ("optim", "quant", "matmul", "generate", "train"),
  "rounds": ("optim",), "scale": ("optim",), "step": ("memory",),
  "preset": ("memory --step", "generate", "train"),
  "batch": ("memory --step", "train"), "seq_len": ("memory --step", "train"),
  "tune": ("matmul",), "budget": ("matmul --tune",),
  "tiles": ("matmul --tune",), "shapes": ("matmul",), "ms": ("matmul",),
  "interpret": ("matmul",), "caches": ("generate",),
  "batches": ("generate",), "prompt_len": ("generate",),
  "new_tokens": ("generate",), "rank": ("train",), "remat": ("train",),
  "recipes": ("train",),
  "json": ("matmul", "generate", "train"),
  "overwrite": ("matmul", "generate", "train"),
  "case": ("memory --step", "train"), "baseline": ("memory --step",),
}


def _check_bench_flags(args: argparse.Namespace) -> None:
  """A ValueError naming an option that ``jqlm bench WHICH`` would ignore
  (e.g. ``bench optim --json out.json`` writing nothing)."""
  which = "matmul" if args.which == "kernels" else args.which
  modes = {which}
  if which == "memory" and args.step:
    modes.add("memory --step")
  if which == "matmul" and args.tune:
    modes.add("matmul --tune")
  for dest, applies in _BENCH_APPLIES.items():
    if getattr(args, dest) == args.bench_defaults[dest] or modes & set(
        applies):
      continue
    flag = "--" + dest.replace("_", "-")
    raise ValueError(
      f"{flag} applies to bench {' and '.join(applies)} only; bench "
      f"{args.which}{' --step' if 'memory --step' in modes else ''} would "
      f"ignore it. Drop {flag}, or run the sub-benchmark it belongs to.")
  if args.overwrite and not args.json:
    raise ValueError("--overwrite replaces an earlier --json output; it "
                     "needs --json PATH.")


def _select_cases(cases: dict, patterns: list[str]) -> dict:
  """The ``cases`` whose name contains one of ``patterns`` (``--case``,
  case-insensitive); ValueError listing the names when none does."""
  out = {k: v for k, v in cases.items()
         if any(c.lower() in k.lower() for c in patterns)}
  if not out:
    raise ValueError(f"--case {patterns} matches none of {list(cases)}.")
  return out


def _cmd_bench(args: argparse.Namespace) -> int:
  import jax  # noqa: PLC0415

  from jqlm import bench, models  # noqa: PLC0415

  _check_bench_flags(args)
  if args.preset is not None and args.preset not in models.PRESETS:
    raise ValueError(f"--preset {args.preset!r} is not a LLaMA preset; "
                     f"choose one of {sorted(models.PRESETS)}.")
  _check_out_file(args.json, "--json", args.overwrite)

  device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
  on_device = jax.default_backend() in ("gpu", "tpu")
  if args.which == "optim":
    rows = bench.bench_optim(iters=args.iters, scale=args.scale,
                             rounds=args.rounds)
    title = (f"one jitted update, LLaMA-130M shapes (scale {args.scale}), "
             f"ratio vs optax.adamw; {device}, jax {jax.__version__}")
  elif args.which in ("matmul", "kernels"):
    which = args.shapes or ("all" if on_device else "tiny")
    ms = _int_list(args.ms, "--ms") if args.ms else None
    if args.shapes is None and not on_device:
      print("jqlm bench matmul: no GPU/TPU here, so the tiny shapes (the "
            "kernels run only with --interpret); --shapes all for the LLaMA "
            "shapes through XLA.", file=sys.stderr)
    shapes = _bench_shapes(bench, which)
    if ms is None and not on_device:
      ms = (1, 16, 256)
    if args.tune:
      rows, path = bench.tune_matmul(
        shapes, **({"ms": ms} if ms else {}), iters=args.iters,
        interpret=args.interpret, path=args.tiles, budget_s=args.budget)
      text = bench.format_tune_rows(
        rows, f"tile candidates per kernel and shape class (* = fastest, "
        f"summed over the shapes; written to {path}); {device}, jax "
        f"{jax.__version__}")
    else:
      rows = bench.bench_matmul(**({"ms": ms} if ms else {}), shapes=shapes,
                                iters=args.iters, interpret=args.interpret)
      text = bench.format_matmul_rows(
        rows, f"low-bit matmuls through jqlm.ops (xbf16 = bf16 dot time / "
        f"time, xdeq = XLA dequantize-then-dot time / time, %roof = "
        f"roofline time / time); {device}, jax {jax.__version__}")
    return _bench_out(args, text, rows)
  elif args.which == "generate":
    preset = args.preset or ("llama3_8b" if on_device else "llama_tiny")
    batches = _int_list(args.batches, "--batches")
    rows = bench.bench_generate(preset, batches=batches,
                                prompt_len=args.prompt_len,
                                new_tokens=args.new_tokens,
                                iters=args.iters,
                                caches=tuple(args.caches.split(",")))
    text = bench.format_generate_rows(
      rows, f"greedy decode of {preset} with random weights, prompt "
      f"{args.prompt_len}, {args.new_tokens} new tokens (x bf16 = tokens/s "
      f"/ bf16 weights' with the same cache and batch); {device}, jax "
      f"{jax.__version__}")
    return _bench_out(args, text, rows)
  elif args.which == "train":
    from jqlm.train import plan  # noqa: PLC0415

    preset = args.preset or ("llama_1b" if on_device else "llama_tiny")
    peaks = bench.device_peaks()
    cases = plan.recipe_cases(preset) if args.recipes else None
    if args.case:
      if cases is None:
        raise ValueError("--case selects rows of bench train --recipes "
                         "(or memory --step); add --recipes.")
      first, *rest = cases.items()
      cases = dict([first, *_select_cases(dict(rest), args.case).items()])
    rows = plan.train_throughput(
      preset, batch_size=args.batch, seq_len=args.seq_len,
      steps=args.iters, rank=args.rank, remat=args.remat, cases=cases,
      peak_flops=None if peaks is None else peaks["bf16"])
    text = plan.format_throughput(
      rows, f"train step of {preset}, bf16, batch {args.batch} x "
      f"{args.seq_len}{', remat' if args.remat else ''} (MFU = (6N + "
      f"attention) FLOPs per token x tokens/s / bf16 peak; x base = "
      f"tokens/s / the first row's); {device}, jax {jax.__version__}")
    return _bench_out(args, text, rows)
  elif args.which == "memory" and args.step:
    from jqlm.train import plan  # noqa: PLC0415

    cases = plan.STEP_CASES
    if args.case:
      cases = _select_cases(cases, args.case)
    base, rows = plan.step_memory_table(args.preset or "llama_350m",
                                        batch_size=args.batch,
                                        seq_len=args.seq_len, cases=cases,
                                        baseline=args.baseline)
    print(f"compiled peak of one train step (memory_analysis: arguments + "
          f"temporaries + outputs - aliased), {args.preset or 'llama_350m'}, "
          f"float32, batch "
          f"{args.batch} x {args.seq_len}, remat; {device}, jax "
          f"{jax.__version__}")
    print(plan.format_step_memory([r for r in (base, *rows) if r], base))
    return 0
  elif args.which == "memory":
    reports = bench.bench_memory()
    print(f"params + optimizer state of the official LLaMA configs (spec "
          f"§6), jax.eval_shape; jax {jax.__version__}")
    for unit in ("GiB", "GB"):
      print()
      print(bench.format_memory(reports, unit))
    q7 = reports["Q-GaLore (int8 W, int4 P, 8-bit)"].get("7B")
    if q7 is not None:
      print("\nLLaMA-7B, Q-GaLore rank 1024, by part:")
      print(q7.table("GiB"))
    return 0
  else:
    rows = bench.bench_quant(iters=args.iters)
    title = (f"jitted quantize->dequantize of 4096x4096 float32, ratio vs a "
             f"bf16 cast; {device}, jax {jax.__version__}")
  print(bench.format_rows(rows, title))
  return 0


def _cmd_train(args: argparse.Namespace) -> int:
  from jqlm import train  # noqa: PLC0415

  sets = list(args.set or [])
  if args.init_from:
    sets.append(f"run.init_from={args.init_from}")
  cfg = train.apply_overrides(train.load_config(args.config), sets)
  train.distributed_init(cfg)
  m, d = cfg.model, cfg.data
  how = (f"{m.recipe} recipe" + (f" [{m.recipe_options}]"
                                  if m.recipe_options else "")
         if m.recipe != "none" else f"{m.quant} QAT")
  if m.lora_rank:
    how += f", LoRA r{m.lora_rank}" + (
      f" on an {m.lora_base} base" if m.lora_base != "none" else "")
  if cfg.run.init_from:
    how += f", from {cfg.run.init_from}"
  print(f"jqlm train: {m.preset} ({how}), "
        f"{cfg.optimizer.kind.value}, {cfg.run.steps} steps of "
        f"{d.batch_size}x{d.seq_len} tokens on {d.source!r}; work dir "
        f"{cfg.run.workdir}")
  res = train.run(cfg, resume=args.resume, progress=not args.no_progress,
                  allow_change=args.allow_change)
  if res.complete_at is not None:
    print(f"jqlm train: the run in {cfg.run.workdir} is complete at step "
          f"{res.complete_at} (run.steps={cfg.run.steps}); nothing to do. "
          "Raise run.steps (--set run.steps=N) to train further.")
    return 0
  if res.metrics:
    first, last = res.metrics[0], res.metrics[-1]
    print(f"loss {first['loss']:.3f} (step {first['step']}) -> "
          f"{last['loss']:.3f} (step {last['step']})")
  if res.evals:
    e = res.evals[-1]
    print(f"held-out loss {e['eval_loss']:.3f}, perplexity "
          f"{e['eval_ppl']:.1f} (step {e['step']})")
  print(f"wrote {cfg.run.workdir}/metrics.jsonl, curves.png, checkpoints/"
        + (f"; {res.skipped} non-finite steps skipped" if res.skipped
           else ""))
  return 0


def _cmd_compare(args: argparse.Namespace) -> int:
  import dataclasses  # noqa: PLC0415
  import shlex  # noqa: PLC0415

  from jqlm.train import compare, config  # noqa: PLC0415

  if args.list or not args.suite:
    for name, make in compare.SUITES.items():
      s = make()
      c = s.arms[0].config
      print(f"{name}: {s.title}; arms {', '.join(a.name for a in s.arms)}; "
            f"{len(s.seeds)} seeds x {c.run.steps} steps"
            + (f", from one pretraining run of "
               f"{s.pretrain.config.run.steps} steps" if s.pretrain
               else ""))
    return 0
  suite = compare.load_suite(args.suite)
  if args.steps is not None:
    suite = suite.with_steps(args.steps)
  if args.seeds is not None:
    try:
      seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
      raise ValueError(f"--seeds expects comma-separated integers such as "
                       f"0,1,2; got {args.seeds!r}.") from None
    suite = suite.with_seeds(seeds)
  if args.set:
    suite = dataclasses.replace(suite, arms=tuple(
      compare.Arm(a.name, config.apply_overrides(a.config, args.set))
      for a in suite.arms))
  if args.arms:
    suite = suite.select([x.strip() for x in args.arms.split(",")])
  changed = any(x is not None for x in (args.steps, args.seeds, args.set,
                                        args.arms))
  # other settings go to another directory: nothing of an earlier
  # comparison is replaced (unless --overwrite)
  out = args.out or (f"runs/compare/{suite.name}-{compare.settings_tag(suite)}"
                     if changed else f"runs/compare/{suite.name}")
  c = suite.arms[0].config
  print(f"jqlm compare {suite.name}: {len(suite.arms)} arms x "
        f"{len(suite.seeds)} seeds, {c.run.steps} steps of "
        f"{c.data.batch_size}x{c.data.seq_len} tokens; output {out}")
  result = compare.run_suite(suite, out, reuse=not args.fresh,
                             overwrite=args.overwrite or args.fresh)
  command = "jqlm " + " ".join(shlex.quote(a) for a in args.argv)
  paths = result.save(out, command=command,
                      overwrite=args.overwrite or args.fresh)
  print()
  print(result.table())
  print(f"\nwrote {paths['md']}, {paths['json']}, {paths['png']}")
  return 0


def _cmd_eval(args: argparse.Namespace) -> int:
  from jqlm import train  # noqa: PLC0415

  r = train.evaluate(args.checkpoint, args.batches)
  print(f"step {r['step']}: held-out loss {r['eval_loss']:.4f}, perplexity "
        f"{r['eval_ppl']:.2f}")
  return 0


def _cmd_generate(args: argparse.Namespace) -> int:
  from jqlm import train  # noqa: PLC0415

  print(train.sample(args.checkpoint, args.prompt, args.max_new_tokens,
                     seed=args.seed, temperature=args.temperature,
                     top_k=args.top_k or None))
  return 0


def _int_type(low: int):
  """An argparse type: an int ``>= low`` (else a usage error naming the
  value)."""

  def parse(text: str) -> int:
    try:
      v = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
        f"{text!r} is not an integer") from None
    if v < low:
      raise argparse.ArgumentTypeError(f"{v} must be >= {low}")
    return v

  return parse


_positive_int = _int_type(1)
_non_negative_int = _int_type(0)


def _float_type(low: float, strict: bool):
  """An argparse type: a finite float ``> low`` (``strict``) or ``>= low``."""

  def parse(text: str) -> float:
    try:
      v = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or (v <= low if strict else v < low):
      raise argparse.ArgumentTypeError(
        f"{text} must be a finite number {'>' if strict else '>='} {low:g}")
    return v

  return parse


_positive_float = _float_type(0.0, strict=True)
_non_negative_float = _float_type(0.0, strict=False)

_CACHE_DTYPES = ("bfloat16", "float16", "float32", "int8")


def _cache_dtypes(text: str) -> str:
  """An argparse type: comma-separated KV-cache dtypes."""
  names = [v.strip() for v in text.split(",") if v.strip()]
  bad = [n for n in names if n not in _CACHE_DTYPES]
  if not names or bad:
    raise argparse.ArgumentTypeError(
      f"{text!r}: expected comma-separated KV-cache dtypes among "
      f"{', '.join(_CACHE_DTYPES)}")
  return ",".join(names)


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser whose usage errors are one line on stderr (what was
  wrong and where the help is), exit 2, like jqlm's other errors."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} "
              "--help)\n")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
    prog="jqlm",
    description="jqlm: low-bit LLM training research in JAX.",
  )
  parser.add_argument("--debug", action="store_true",
                      help="show tracebacks of errors (or JQLM_DEBUG=1)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  demo = sub.add_parser(
    "demo",
    help="print a table of quantization formats and their errors",
    description="Quantize random data in every jqlm format and print the "
    "storage bits per element, MSE, max error and SQNR.",
  )
  demo.add_argument("--rows", type=_positive_int, default=256,
                    help="matrix rows")
  demo.add_argument("--cols", type=_positive_int, default=1024,
                    help="matrix columns")
  demo.add_argument("--seed", type=int, default=0, help="PRNG seed")
  demo.add_argument(
    "--outliers",
    type=int,
    default=8,
    help="number of large (20 sigma) outliers planted in the data",
  )
  demo.set_defaults(func=_cmd_demo)
  bench = sub.add_parser(
    "bench",
    help="benchmark tables (optimizer updates, quantizers)",
    description="Print a benchmark table whose baseline is measured in the "
    "same run.",
  )
  bench.add_argument("which", choices=["optim", "quant", "memory", "matmul",
                                      "kernels", "generate", "train"],
                     help="kernels is an alias of matmul")
  bench.add_argument("--iters", type=_positive_int, default=5,
                     help="timed iterations per round (median kept)")
  bench.add_argument("--rounds", type=_positive_int, default=5,
                     help="round-robin rounds over the cases; ratios are "
                     "per round against the same round's baseline, median "
                     "reported (optim only)")
  bench.add_argument(
    "--scale", type=_positive_float, default=1.0,
    help="width scale of the LLaMA-130M shapes (optim only; 1.0 = full)")
  bench.add_argument(
    "--step", action="store_true",
    help="memory only: compile the train step from abstract inputs for "
    "this backend and print its peak by part, against a minimal optax "
    "AdamW step (jqlm.train.plan)")
  bench.add_argument("--preset", default=None,
                     help="memory --step (default llama_350m), generate "
                     "(default llama3_8b on a GPU/TPU, llama_tiny on CPU) and "
                     "train (llama_1b / llama_tiny): the model preset")
  bench.add_argument("--batch", type=_positive_int, default=1,
                     help="memory --step, train: sequences per step")
  bench.add_argument("--seq-len", type=_positive_int, default=256,
                     help="memory --step, train: tokens per sequence")
  bench.add_argument("--tune", action="store_true",
                     help="matmul: time the kernels' candidate tiles and "
                     "write the fastest to the tile table the dispatcher "
                     "reads (jqlm_kernels.tiles; --tiles or $JQLM_TILES)")
  bench.add_argument("--budget", type=_positive_float, default=None,
                     help="matmul --tune: stop trying candidates after this "
                     "many seconds")
  bench.add_argument("--caches", type=_cache_dtypes, default="bfloat16,int8",
                     help="generate: comma-separated KV-cache dtypes")
  bench.add_argument("--tiles", default=None,
                     help="matmul --tune: the tile table to write")
  bench.add_argument("--shapes", choices=("all", "8b", "tiny"), default=None,
                     help="matmul: LLaMA-7B and LLaMA-3-8B linears (all, the "
                     "default on a GPU/TPU), LLaMA-3-8B only, or two tiny "
                     "shapes (the default on CPU, where the kernel rows "
                     "cannot run)")
  bench.add_argument("--ms", default=None,
                     help="matmul: comma-separated M (rows of x), e.g. "
                     "1,16,256")
  bench.add_argument("--interpret", action="store_true",
                     help="matmul: run the Pallas kernels in the interpreter "
                     "(CPU; correctness, not speed)")
  bench.add_argument("--batches", default="1,8",
                     help="generate: comma-separated batch sizes")
  bench.add_argument("--prompt-len", type=_positive_int, default=128,
                     help="generate: prompt tokens")
  bench.add_argument("--new-tokens", type=_positive_int, default=128,
                     help="generate: decoded tokens")
  bench.add_argument("--rank", type=_positive_int, default=None,
                     help="train: the Q-GaLore rank (small presets need one "
                     "below their narrowest linear)")
  bench.add_argument("--remat", action="store_true",
                     help="train: rematerialize each block")
  bench.add_argument("--json", default=None,
                     help="matmul, generate, train: also write the rows as "
                     "JSON here (and the table as markdown beside it); an "
                     "existing file is refused unless --overwrite")
  bench.add_argument("--overwrite", action="store_true",
                     help="with --json: replace the JSON and markdown of an "
                     "earlier benchmark (by default nothing is replaced)")
  bench.add_argument("--recipes", action="store_true",
                     help="train: one row per low-precision training "
                     "recipe (model.recipe) after the bf16 AdamW baseline")
  bench.add_argument("--case", action="append", default=[],
                     help="memory --step, train --recipes: only the cases "
                     "whose name contains this (repeatable; e.g. "
                     "'layer-wise', 'fp8_rowwise'); train keeps its "
                     "baseline row")
  bench.add_argument(
    "--baseline", choices=("unrolled", "same", "none"), default="unrolled",
    help="memory --step: the minimal optax AdamW step on the unrolled "
    "model (default, the tightest), on the preset's own layer layout, or "
    "none (LLaMA-7B's unrolled baseline compiles for minutes)")
  bench.set_defaults(func=_cmd_bench, bench_defaults={
    dest: bench.get_default(dest) for dest in _BENCH_APPLIES})
  tr = sub.add_parser(
    "train", help="train a model (jqlm.train.run)",
    description="Train per a config: a preset name (default, demo) or a "
    ".py file whose get_config() returns a jqlm.train.TrainConfig; "
    "--set section.field=value overrides fields (coerced to their types), "
    "e.g. --set optimizer.lr=1e-3 --set model.num_layers=4 --set "
    "run.steps=300; --set optimizer=KIND switches the optimizer to that "
    "kind's defaults.")
  tr.add_argument("--config", default="default",
                  help="preset name or path to a config .py / config.json")
  tr.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                  help="override a config field, e.g. optimizer.lr=1e-3 "
                  "(repeatable; applied in order)")
  tr.add_argument("--allow-change", action="append", default=[],
                  metavar="SECTION.FIELD",
                  help="with --resume: a hyper-parameter (e.g. "
                  "optimizer.lr) that may differ from the saved config "
                  "(repeatable; see jqlm.train.resume)")
  tr.add_argument("--resume", action="store_true",
                  help="continue from the newest checkpoint of the work dir")
  tr.add_argument("--init-from", metavar="DIR",
                  help="start from pretrained weights: a Hugging Face LLaMA "
                  "directory or a jqlm run's work dir (= --set "
                  "run.init_from=DIR; fine-tune with any optimizer, recipe "
                  "or model.lora_* setting)")
  tr.add_argument("--no-progress", action="store_true",
                  help="no progress bar")
  tr.set_defaults(func=_cmd_train)
  cmp = sub.add_parser(
    "compare", help="train several arms and tabulate (jqlm.train.compare)",
    description="Train a suite's optimizer/precision arms on the same data, "
    "seeds and token budget; write results.md (table), results.json and "
    "curves.png (loss, gradient norm, spikes). SUITE is a built-in name "
    "(--list) or a .py file whose get_suite() returns a Suite "
    "(experiments/suites/ holds the paper-scale ones).")
  cmp.add_argument("suite", nargs="?", help="suite name or file.py")
  cmp.add_argument("--list", action="store_true", help="list the suites")
  cmp.add_argument("--out", default=None,
                   help="output dir (default runs/compare/<suite>)")
  cmp.add_argument("--seeds", default=None,
                   help="comma-separated seeds (default the suite's)")
  cmp.add_argument("--steps", type=_positive_int, default=None,
                   help="run every arm for this many steps (LR warmup in proportion)")
  cmp.add_argument("--arms", default=None,
                   help="comma-separated subset of the arms")
  cmp.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a config field of every arm (repeatable)")
  cmp.add_argument("--fresh", action="store_true",
                   help="retrain runs that already finished (replaces them; "
                   "implies --overwrite)")
  cmp.add_argument("--overwrite", action="store_true",
                   help="replace runs in the output directory that hold "
                   "another config (by default nothing is replaced)")
  cmp.set_defaults(func=_cmd_compare)
  ev = sub.add_parser("eval", help="held-out loss of a run's checkpoint")
  ev.add_argument("--checkpoint", required=True,
                  help="the run's work dir (or its checkpoints dir)")
  ev.add_argument("--batches", type=_positive_int, default=None,
                  help="eval batches (default the run's eval_batches)")
  ev.set_defaults(func=_cmd_eval)
  gen = sub.add_parser("generate", help="sample from a run's checkpoint")
  gen.add_argument("--checkpoint", required=True,
                   help="the run's work dir (or its checkpoints dir)")
  gen.add_argument("--prompt", required=True)
  gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
  gen.add_argument("--temperature", type=_non_negative_float, default=0.8,
                   help="0 for greedy decoding")
  gen.add_argument("--top-k", type=_non_negative_int, default=40,
                   help="0 for no top-k filtering")
  gen.add_argument("--seed", type=int, default=0)
  gen.set_defaults(func=_cmd_generate)
  for p in sub.choices.values():  # `jqlm train --debug` as well
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks of errors (or JQLM_DEBUG=1)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 0
  debug = args.debug or os.environ.get("JQLM_DEBUG", "") not in ("", "0")
  try:
    return args.func(args)
  except KeyboardInterrupt:
    print(f"jqlm {args.command}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 - one line per error (JQLM_DEBUG)
    if debug:
      raise
    print(f"jqlm {args.command}: error: {_describe(e)}", file=sys.stderr)
    return _exit_code(e)


# Errors of the user's input (exit 2); every other error is a runtime one
# (exit 1). Both print one message without a traceback unless --debug.
_USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError,
                 NotADirectoryError, IsADirectoryError)


def _exit_code(e: BaseException) -> int:
  return 2 if isinstance(e, _USAGE_ERRORS) else 1


def _describe(e: BaseException) -> str:
  """The error's message; its type too when the message alone does not say
  what went wrong (errors jqlm did not anticipate)."""
  msg = str(e).strip() or type(e).__name__
  anticipated = isinstance(e, _USAGE_ERRORS) or type(e).__module__.startswith(
    "jqlm")
  if not anticipated:
    msg = f"{type(e).__name__}: {msg} (run with --debug or JQLM_DEBUG=1 for " \
      "the traceback)"
  return msg


if __name__ == "__main__":
  sys.exit(main())
