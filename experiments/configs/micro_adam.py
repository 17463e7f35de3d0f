"""MicroAdam pre-training of LLaMA on C4 (arXiv 2405.15593;
optimizers_more.md §2.4).

``jqlm train --config experiments/configs/micro_adam.py:130m``

MicroAdam's official runs fine-tune (GLUE with BERT/OPT, Llama-2-7B on
GSM8k: lr 4e-5, window m 10, k 1%, quant_block_size 64); there is no
official pre-training setting. These configs put MicroAdam's official
optimizer settings (m 10, k_init 0.01, 4-bit error feedback per 64, eps
1e-8, top-k blocks of 29056: the H100/H200 value) into the C4 setting of
the other configs, at a common AdamW learning rate for these sizes (1e-3
for 60M-350M, 5e-4 for 1B; not tuned here), warmup 10%, no weight decay. **A jqlm choice, not an official run.** (Its
fine-tuning LR equals Adam's there, which is what the choice relies on.)
"""

from jqlm.train import MicroAdamConfig, TrainConfig, official_c4
from jqlm.train.presets import pick

SIZES = {  # model, lr, steps, grad_accum
  "60m": ("llama_60m", 1e-3, 10_000, 2),
  "130m": ("llama_130m", 1e-3, 20_000, 2),
  "350m": ("llama_350m", 1e-3, 60_000, 4),
  "1b": ("llama_1b", 5e-4, 100_000, 32),
}


def get_config(arg: str = "130m") -> TrainConfig:
  model, lr, steps, accum = pick(SIZES, arg, "micro_adam.py")
  opt = MicroAdamConfig(lr=lr, warmup_steps=steps // 10, window=10,
                        k_init=0.01, quant_block_size=64, block_size=29056)
  return official_c4(preset=model, steps=steps, grad_accum=accum,
                     optimizer=opt, workdir=f"runs/micro_adam_{arg}")
