"""Q-GaLore vs GaLore vs Adam at the paper's scale (arXiv 2407.08296,
2403.03507; spec §4.4, §5.5): LLaMA-130M on C4, 20K steps; Q-GaLore with
stochastic rounding (official) and round-to-nearest for its int8 weights.
Adam takes SPAM's 130M lr 8e-4 (the spec gives none for GaLore's full-rank
baseline).

``jqlm compare experiments/suites/q_galore_130m.py --seeds 0``
"""

import os

from jqlm import train
from jqlm.train.compare import Arm, Suite

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                       "configs")


def get_suite() -> Suite:
  galore = train.load_config(os.path.join(CONFIGS, "galore.py:130m"))
  q = train.load_config(os.path.join(CONFIGS, "q_galore.py:130m"))
  adam = galore.replace(optimizer=galore.optimizer.with_kind("adamw",
                                                             lr=8e-4))
  return Suite(name="q_galore_130m",
               title="Q-GaLore vs GaLore vs Adam, LLaMA-130M on C4",
               arms=(Arm("adam", adam), Arm("galore", galore),
                     Arm("q_galore_sr", q),
                     Arm("q_galore_rne", q.replace(
                     optimizer={"stochastic_round": False}))),
               seeds=(0, 1, 2), target="galore", reference="galore")
