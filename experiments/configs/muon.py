"""Muon and 8-bit Muon pre-training of LLaMA on C4 (optax.contrib.muon;
8-bit Muon: arXiv 2509.23106; optimizers_more.md §6).

``jqlm train --config experiments/configs/muon.py:8bit_130m``

8-bit Muon has no public code and no C4 LLaMA recipe (its paper trains a
1.6B model on FineWeb). These configs are jqlm's: Muon (momentum 0.95,
Nesterov, 5 Newton-Schulz steps, Moonlight's update RMS 0.2 so that one
AdamW-like lr serves both groups) on the attention and MLP kernels, AdamW
on the embeddings, head and norms, in the C4 setting of the other configs
at a common AdamW learning rate (1e-3 up to 350M, 5e-4 for 1B; not tuned
here), warmup 10%, cosine to 0.1x, no weight decay. ``8bit_*`` stores the
momentum (and the AdamW moments) as linear int8 codes with one absmax per
2048 elements, the paper's scheme.
"""

from jqlm.train import MuonConfig, TrainConfig, official_c4
from jqlm.train.presets import pick

_SIZES = {  # model, lr, steps, grad_accum
  "60m": ("llama_60m", 1e-3, 10_000, 2),
  "130m": ("llama_130m", 1e-3, 20_000, 2),
  "350m": ("llama_350m", 1e-3, 60_000, 4),
  "1b": ("llama_1b", 5e-4, 100_000, 32),
}
SIZES = {**{k: (k, "float") for k in _SIZES},
         **{f"8bit_{k}": (k, "8bit") for k in _SIZES}}


def get_config(arg: str = "130m") -> TrainConfig:
  size, state = pick(SIZES, arg, "muon.py")
  model, lr, steps, accum = _SIZES[size]
  opt = MuonConfig(lr=lr, warmup_steps=steps // 10, state=state)
  return official_c4(preset=model, steps=steps, grad_accum=accum,
                     optimizer=opt, workdir=f"runs/muon_{arg}")
