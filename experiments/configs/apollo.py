"""APOLLO and APOLLO-Mini pre-training of LLaMA on C4 (arXiv 2412.05270;
optimizers_more.md §1.5).

``jqlm train --config experiments/configs/apollo.py:130m``
``jqlm train --config experiments/configs/apollo.py:mini_130m``

Official settings (``zhuhanqing/APOLLO`` ``scripts/pretrain_c4/*.sh``):
batch 512 x 256 tokens, lr 0.01, projection gap 200, random projections,
wd 0, pure bf16, no clipping, warmup 10% of the steps, cosine to 0.1x; the
attention and MLP linears in APOLLO, AdamW (eps 1e-6) on the rest.

* APOLLO (channel-wise scaling, scale 1): ``60m`` rank 128, 10K steps;
  ``130m`` rank 192, 20K; ``350m`` rank 256, 60K; ``1b`` rank 256, 100K;
  ``7b`` rank 256, 150K.
* APOLLO-Mini (rank 1, tensor-wise): ``mini_60m`` scale 128 with
  ``scale_front``; ``mini_130m`` scale 192 with ``scale_front``;
  ``mini_350m``, ``mini_1b``, ``mini_7b`` scale 128, not front.

The scale is applied as its square root (√128 = 11.3), as the official
code does. The projections draw from ``run.seed`` (the official torch
generator cannot be reproduced).
"""

from jqlm.train import ApolloConfig, ApolloMiniConfig, TrainConfig, official_c4
from jqlm.train.presets import pick

_SCHED = {  # model, steps, grad_accum on one 80 GB GPU
  "60m": ("llama_60m", 10_000, 2),
  "130m": ("llama_130m", 20_000, 2),
  "350m": ("llama_350m", 60_000, 4),
  "1b": ("llama_1b", 100_000, 32),
  "7b": ("llama_7b", 150_000, 64),
}
_RANK = {"60m": 128, "130m": 192, "350m": 256, "1b": 256, "7b": 256}
_MINI = {"60m": (128.0, True), "130m": (192.0, True), "350m": (128.0, False),
         "1b": (128.0, False), "7b": (128.0, False)}
SIZES = {**{k: (k, False) for k in _SCHED},
         **{f"mini_{k}": (k, True) for k in _SCHED}}


def get_config(arg: str = "130m") -> TrainConfig:
  size, mini = pick(SIZES, arg, "apollo.py")
  model, steps, accum = _SCHED[size]
  sched = dict(lr=0.01, warmup_steps=steps // 10, update_proj_gap=200)
  if mini:
    scale, front = _MINI[size]
    opt = ApolloMiniConfig(scale=scale, scale_front=front, **sched)
  else:
    opt = ApolloConfig(rank=_RANK[size], scale=1.0, **sched)
  return official_c4(preset=model, steps=steps, grad_accum=accum,
                     optimizer=opt, workdir=f"runs/apollo_{arg}")
