"""SPAM pre-training of LLaMA on C4 (arXiv 2501.06842; spec §2.5).

``jqlm train --config experiments/configs/spam.py:130m``

Official settings (SPAM-Optimizer README and scripts): batch 512 x 256
tokens, wd 0, pure bf16, no clipping, θ 5000, ΔT 500, N 150, grace 20,
density 1.0, cosine to 0.1x. The 130M run's wandb summary: eval loss 3.1595,
ppl 23.56.

* ``130m``: lr 8e-4, 20K steps, warmup 1000.
* ``350m``: lr 4e-4, 60K steps, warmup 1000.
* ``1b``: lr 2e-3 from the official 1B script, which is broken (spec §2.5)
  and gives no step count; steps and warmup here are GaLore's 1B schedule
  (100K, warmup 10K). Not an official run.

There is no official 60M SPAM setting (a 60M run at lr 4e-3 diverged).
"""

from jqlm.train import SpamConfig, TrainConfig, official_c4
from jqlm.train.presets import pick

SIZES = {  # model, lr, steps, warmup, grad_accum on one 80 GB GPU
  "130m": ("llama_130m", 8e-4, 20_000, 1_000, 2),
  "350m": ("llama_350m", 4e-4, 60_000, 1_000, 4),
  "1b": ("llama_1b", 2e-3, 100_000, 10_000, 32),
}


def get_config(arg: str = "130m") -> TrainConfig:
  model, lr, steps, warmup, accum = pick(SIZES, arg, "spam.py")
  return official_c4(
    preset=model, steps=steps, grad_accum=accum,
    optimizer=SpamConfig(lr=lr, warmup_steps=warmup, spike_threshold=5000.0,
                         reset_interval=500, reset_warmup_steps=150,
                         spike_grace_steps=20),
    workdir=f"runs/spam_{arg}")
