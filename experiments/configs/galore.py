"""GaLore pre-training of LLaMA on C4 (arXiv 2403.03507; spec §4.4).

``jqlm train --config experiments/configs/galore.py:130m``

Official settings (``scripts/benchmark_c4/``): batch 512 x 256 tokens,
GaLore scale 0.25, projection gap 200, lr 0.01, wd 0, pure bf16, no
clipping, warmup 10% of the steps, cosine to 0.1x. Paper Table 2 (C4
validation ppl): 34.88 / 25.36 / 18.95 / 15.64 for 60M / 130M / 350M / 1B.

* ``60m``: rank 128, 10K steps; ``130m``: rank 256, 20K; ``350m``: rank
  256, 60K; ``1b``: rank 1024 (the script's; the paper's table says 512),
  100K.
* ``7b``: rank 1024, 150K steps, lr 0.005, gap 500, gradient clipping 1.0.
"""

from jqlm.train import GaLoreConfig, TrainConfig, official_c4
from jqlm.train.presets import pick

SIZES = {  # model, rank, steps, lr, gap, clip, grad_accum
  "60m": ("llama_60m", 128, 10_000, 0.01, 200, 0.0, 2),
  "130m": ("llama_130m", 256, 20_000, 0.01, 200, 0.0, 2),
  "350m": ("llama_350m", 256, 60_000, 0.01, 200, 0.0, 4),
  "1b": ("llama_1b", 1024, 100_000, 0.01, 200, 0.0, 32),
  "7b": ("llama_7b", 1024, 150_000, 0.005, 500, 1.0, 64),
}


def get_config(arg: str = "130m") -> TrainConfig:
  model, rank, steps, lr, gap, clip, accum = pick(SIZES, arg, "galore.py")
  return official_c4(
    preset=model, steps=steps, grad_accum=accum,
    optimizer=GaLoreConfig(lr=lr, warmup_steps=steps // 10, rank=rank,
                           update_proj_gap=gap, scale=0.25, grad_clip=clip),
    workdir=f"runs/galore_{arg}")
