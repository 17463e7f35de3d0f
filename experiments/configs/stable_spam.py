"""Stable-SPAM pre-training of LLaMA on C4 (arXiv 2502.17055; spec §3.3).

``jqlm train --config experiments/configs/stable_spam.py:int4``

Official settings (StableSPAM repo scripts): batch 512 x 256 tokens, wd 0,
no clipping, total_T 20000, cosine to 0.1x.

* ``int4`` (``INT4_scripts/350-stablespam-int4.sh``): LLaMA-350M, lr 4e-4,
  warmup 2000, 20K steps, γ 0.7/0.9/0.999, ΔT 500; Stable-SPAM's INT4 QAT
  recipe (weights asymmetric uint4 in groups of 256, activations int4 with
  top-2 outliers kept; spec §3.4).
* ``fp4``: the same with the E1M2 FP4 recipe.
* ``bf16`` (``scripts_BF16/stablespam.sh``): LLaMA-130M, lr 8e-4, warmup
  2000, 20K steps, γ 0.85/0.99999/0.999, ΔT 1000; the repo log reaches eval
  loss 3.1045, ppl 22.30.
"""

from jqlm.train import StableSpamConfig, TrainConfig, official_c4
from jqlm.train.presets import pick

SETTINGS = {  # model, quant, lr, gamma1, gamma2, gamma3, ΔT, grad_accum
  "int4": ("llama_350m", "int4", 4e-4, 0.7, 0.9, 0.999, 500, 4),
  "fp4": ("llama_350m", "fp4", 4e-4, 0.7, 0.9, 0.999, 500, 4),
  "bf16": ("llama_130m", "none", 8e-4, 0.85, 0.99999, 0.999, 1000, 2),
}


def get_config(arg: str = "int4") -> TrainConfig:
  model, q, lr, g1, g2, g3, dt, accum = pick(SETTINGS, arg, "stable_spam.py")
  return official_c4(
    preset=model, steps=20_000, grad_accum=accum, quant=q,
    optimizer=StableSpamConfig(lr=lr, warmup_steps=2_000, gamma1=g1,
                               gamma2=g2, gamma3=g3, reset_interval=dt,
                               total_steps_scale=True),
    workdir=f"runs/stable_spam_{arg}")
