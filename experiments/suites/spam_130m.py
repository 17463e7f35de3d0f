"""SPAM vs Adam at the paper's scale (arXiv 2501.06842, spec §2.5):
LLaMA-130M on C4, 20K steps, lr 8e-4 for both.

``jqlm compare experiments/suites/spam_130m.py --seeds 0``
"""

import os

from jqlm import train
from jqlm.train.compare import Arm, Suite

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                       "configs")


def get_suite() -> Suite:
  spam = train.load_config(os.path.join(CONFIGS, "spam.py:130m"))
  adam = spam.replace(optimizer=spam.optimizer.with_kind("adamw"))
  return Suite(name="spam_130m", title="SPAM vs Adam, LLaMA-130M on C4",
               arms=(Arm("adam", adam), Arm("spam", spam)), seeds=(0, 1, 2),
               target="adam", reference="adam")
