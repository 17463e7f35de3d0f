"""Stable-SPAM's 4-bit comparison at the paper's scale (arXiv 2502.17055,
spec §3.3): LLaMA-350M on C4, 20K steps, every arm at the official INT4
run's settings (lr 4e-4, warmup 2000).

``jqlm compare experiments/suites/stable_spam_350m.py --seeds 0``

``jqlm compare stable_spam`` runs the same arms scaled down to a CPU
(:func:`jqlm.train.compare.scale_down`).
"""

import os

from jqlm import train
from jqlm.train.compare import Arm, Suite

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                       "configs")


def _config(spec: str) -> train.TrainConfig:
  return train.load_config(os.path.join(CONFIGS, spec))


def get_suite() -> Suite:
  int4 = _config("stable_spam.py:int4")
  fp4 = _config("stable_spam.py:fp4")
  spam = _config("spam.py:350m")
  # every arm runs the INT4 run's schedule; each optimizer keeps its own
  # official constants (SPAM's from its 350M config)
  sched = int4.optimizer.schedule_fields()
  adam = int4.replace(optimizer=int4.optimizer.with_kind("adamw"))
  spam_int4 = int4.replace(optimizer=spam.optimizer.replace(**sched))
  arms = (Arm("adam_bf16", adam.replace(model={"quant": "none"})),
          Arm("adam_int4", adam),
          Arm("spam_int4", spam_int4),
          Arm("stable_spam_int4", int4),
          Arm("stable_spam_fp4", fp4))
  return Suite(name="stable_spam_350m",
               title="Stable-SPAM's 4-bit setting, LLaMA-350M on C4",
               arms=arms, seeds=(0, 1, 2), target="adam_int4",
               reference="adam_bf16")
