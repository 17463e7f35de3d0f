"""Named configurations: the README's demo and the official C4 setting that
``experiments/configs`` builds on."""

from __future__ import annotations

from jqlm.train.config import (
  DataConfig,
  ModelConfig,
  OptimizerConfig,
  RunConfig,
  ScheduleKind,
  StableSpamConfig,
  TrainConfig,
)


def pick(table: dict, arg: str | None, what: str):
  """``table[arg]`` for a config file's ``get_config(arg)``; a clear error
  naming the choices when ``arg`` is missing or unknown."""
  if arg not in table:
    raise ValueError(f"{what}: choose one of {sorted(table)} (as "
                     f"file.py:{next(iter(table))}), got {arg!r}.")
  return table[arg]


def official_c4(*, preset: str, steps: int, optimizer: OptimizerConfig,
                quant: str = "none", grad_accum: int = 1,
                workdir: str | None = None) -> TrainConfig:
  """The setting every official run shares (spec §1, §6), as a base for
  ``experiments/configs``: LLaMA with the T5 tokenizer's 32000 tokens,
  C4 ``en`` streamed from the hub, 512 sequences of 256 tokens per update,
  pure bf16 (no float32 master weights), evaluated on about 10M tokens of
  C4 validation every 1000 updates. The optimizer config carries the run's
  lr, warmup, cosine-to-0.1x schedule, weight decay and clipping.

  Deviations (documented in ``experiments/README.md``): sequences are
  packed from the token stream (the official code truncates and pads each
  document to 256 tokens and masks the pads); the training text is read
  once up to a byte budget of about 5 bytes per token of the run
  (``data.max_bytes``) and tokenized into a cached array.

  Args:
    preset: a name of :data:`jqlm.models.PRESETS`.
    steps: updates.
    optimizer: the optimizer's config.
    quant: the QAT policy.
    grad_accum: micro-batches per update (choose for the memory at hand;
      the update is the same).
    workdir: default ``runs/<preset>_<optimizer kind>``.
  """
  if optimizer.schedule is not ScheduleKind.COSINE or (
      optimizer.min_lr_ratio != 0.1):
    raise ValueError("official_c4: the official runs decay by cosine to "
                     "0.1x (spec §1); keep schedule='cosine', "
                     "min_lr_ratio=0.1.")
  return TrainConfig(
    model=ModelConfig(preset=preset, vocab_size=32000, quant=quant,
                      dtype="bfloat16", param_dtype="bfloat16"),
    data=DataConfig(source="allenai/c4", source_config="en",
                    tokenizer="t5-base", eval_split="validation",
                    max_bytes=5 * steps * 512 * 257, seq_len=256,
                    batch_size=512, grad_accum=grad_accum),
    optimizer=optimizer,
    run=RunConfig(steps=steps, eval_every=1000, eval_batches=77,
                  log_every=50, ckpt_every=1000, keep_checkpoints=2,
                  workdir=workdir or f"runs/{preset}_{optimizer.kind.value}"))


def demo_config() -> TrainConfig:
  """The README's run: a small LLaMA (4 layers, width 128) with Stable-SPAM
  and INT4 QAT on the embedded corpus; a few minutes on 2 CPU cores."""
  return TrainConfig(
    model=ModelConfig(preset="llama_tiny", hidden_size=128,
                      intermediate_size=256, num_layers=4, num_heads=4,
                      num_kv_heads=4, quant="int4", vocab_size=2048),
    data=DataConfig(seq_len=128, batch_size=16),
    optimizer=StableSpamConfig(lr=3e-3, warmup_steps=15),
    run=RunConfig(steps=150, eval_every=50, ckpt_every=50,
                  workdir="runs/demo"))


CONFIGS = {"default": TrainConfig, "demo": demo_config}
"""The named configs of ``jqlm train --config NAME``."""
