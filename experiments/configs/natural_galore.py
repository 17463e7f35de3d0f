"""Natural GaLore pre-training of LLaMA on C4 (arXiv 2410.16029;
optimizers_more.md §3.3).

``jqlm train --config experiments/configs/natural_galore.py:130m``

Official settings (``selfsupervised-ai/Natural-GaLore``
``code/scripts/benchmark_c4/*.sh``): batch 512 x 256 tokens, lr 0.01,
scale 0.25, projection gap 200, history of 20 projected gradients, damping
λ 1e-3, cosine to 0.1x. (The official runs use Lightning's bf16-mixed:
float32 params and states; jqlm's C4 setting is pure bf16.)

* ``60m``: rank 128, 10K steps, warmup 1K, wd 0.01.
* ``130m``: rank 256, 20K, warmup 2K; ``350m``: rank 256, 60K, warmup 6K;
  ``1b``: rank 1024 (the script's; the paper's table says 512), 100K,
  warmup 10K; wd 0.

Paper (validation log perplexity): 3.53 / 3.22 / 2.93 / 2.80 for 60M /
130M / 350M / 1B, against GaLore's 3.56 / 3.24 / 2.95 / 2.90.
"""

from jqlm.train import NaturalGaLoreConfig, TrainConfig, official_c4
from jqlm.train.presets import pick

SIZES = {  # model, rank, steps, warmup, wd, grad_accum
  "60m": ("llama_60m", 128, 10_000, 1_000, 0.01, 2),
  "130m": ("llama_130m", 256, 20_000, 2_000, 0.0, 2),
  "350m": ("llama_350m", 256, 60_000, 6_000, 0.0, 4),
  "1b": ("llama_1b", 1024, 100_000, 10_000, 0.0, 32),
}


def get_config(arg: str = "130m") -> TrainConfig:
  model, rank, steps, warmup, wd, accum = pick(SIZES, arg,
                                               "natural_galore.py")
  opt = NaturalGaLoreConfig(lr=0.01, warmup_steps=warmup, weight_decay=wd,
                            rank=rank, update_proj_gap=200, scale=0.25,
                            history=20, damping=1e-3)
  return official_c4(preset=model, steps=steps, grad_accum=accum,
                     optimizer=opt, workdir=f"runs/natural_galore_{arg}")
