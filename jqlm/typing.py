"""Type aliases and the dimension letters used in shape-suffixed names.

Names in the maths carry their shape as a suffix (``x_BxLxD``, ``w_KxN``):

====== =====================================
letter dimension
====== =====================================
B      batch
L      sequence length
D      model (embedding) width
H      attention heads
K      contraction (input features)
N      output features
F      MLP hidden width
V      vocabulary
G      number of quantization groups
====== =====================================
"""

from __future__ import annotations

from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any
Params = Any
DType = Any
