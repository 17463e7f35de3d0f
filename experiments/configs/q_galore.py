"""Q-GaLore pre-training of LLaMA on C4 (arXiv 2407.08296; spec §5.5).

``jqlm train --config experiments/configs/q_galore.py:7b``

Official settings (``scripts/pretrain_c4/``): batch 512 x 256 tokens,
GaLore scale 0.25, projection gap 200, wd 0, pure bf16, ``--weight_quant
--stochastic_round --proj_quant`` (int8 weights updated by stochastic
rounding, int4 projections, 8-bit Adam states), warmup 10%, cosine to 0.1x,
no clipping up to 1B.

* ``60m``: lr 0.015, rank 128, 10K steps; ``130m``: 0.015, 256, 20K;
  ``350m``: 0.01, 256, 60K; ``1b``: 0.01, 1024, 100K.
* ``7b``: lr 0.004, rank 1024, 150K steps, gap 500, clipping 1.0: the
  "LLaMA-7B in 16 GB" run (``jqlm bench memory``: 10.66 GiB of params and
  optimizer state).

``--set optimizer.stochastic_round=false`` gives the round-to-nearest ablation.
"""

from jqlm.train import QGaLoreConfig, TrainConfig, official_c4
from jqlm.train.presets import pick

SIZES = {  # model, lr, rank, steps, gap, clip, grad_accum
  "60m": ("llama_60m", 0.015, 128, 10_000, 200, 0.0, 2),
  "130m": ("llama_130m", 0.015, 256, 20_000, 200, 0.0, 2),
  "350m": ("llama_350m", 0.01, 256, 60_000, 200, 0.0, 4),
  "1b": ("llama_1b", 0.01, 1024, 100_000, 200, 0.0, 32),
  "7b": ("llama_7b", 0.004, 1024, 150_000, 500, 1.0, 64),
}


def get_config(arg: str = "130m") -> TrainConfig:
  model, lr, rank, steps, gap, clip, accum = pick(SIZES, arg, "q_galore.py")
  return official_c4(
    preset=model, steps=steps, grad_accum=accum,
    optimizer=QGaLoreConfig(lr=lr, warmup_steps=steps // 10, rank=rank,
                            update_proj_gap=gap, scale=0.25, grad_clip=clip,
                            stochastic_round=True, state="8bit"),
    workdir=f"runs/q_galore_{arg}")
