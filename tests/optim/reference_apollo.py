"""A plain-numpy float64 transcription of the official APOLLO ``AdamW``
(spec ``optimizers_more.md`` §1.2-1.4; ``zhuhanqing/APOLLO`` @ ``76b3472``,
``apollo_torch/apollo.py`` and ``random_projector.py``).

Written in the official *torch* layout (weights (out, in)) with per-param
state dicts, independently of jqlm, so the tests also check jqlm's Flax
(in, out) translation. The random projections are injected: the official
``stable_randn`` / ``next_seed`` chain is replaced by ``draw_proj(name,
shape)``, called exactly when the official projector draws (``P is None or
iter % gap == 0`` with ``iter`` the pre-increment step), with the shape it
draws: ``(rank, n)`` ("right", m >= n) or ``(m, rank)`` ("left", m < n).
"""

from __future__ import annotations

import math

import numpy as np


class NumpyApolloAdamW:
  """``APOLLOAdamW`` over two groups: the names in ``apollo`` form the
  low-rank group (rank, update_proj_gap, scale, scale_type, proj random,
  proj_type std); the others the regular group (plain HF-style AdamW).

  ``lr`` is a float or a function of the 0-based step (the official
  ``LambdaLR`` sets ``group["lr"]`` before each step). ``limited`` records
  ``(name, step)`` whenever the norm-growth limiter scaled an update down.
  """

  def __init__(self, lr, rank, gap, scale, scale_type, apollo,
               betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
               scale_front=False, disable_nl=False):
    self.lr = lr if callable(lr) else (lambda _: lr)
    self.rank, self.gap, self.scale = rank, gap, scale
    self.scale_type, self.apollo = scale_type, set(apollo)
    self.betas, self.eps, self.wd = betas, eps, weight_decay
    self.scale_front, self.disable_nl = scale_front, disable_nl
    self.state = {}
    self.limited = []
    self.draws = []  # (name, step index) of every projection draw

  def _project(self, name, st, grad, draw_proj):
    """``GradientProjector.project`` for proj_type 'std'."""
    m, n = grad.shape
    it = st["step"]
    if st.get("P") is None or it % self.gap == 0:
      shape = (self.rank, n) if m >= n else (m, self.rank)
      p = np.asarray(draw_proj(name, shape), np.float64)
      assert p.shape == shape, (name, p.shape, shape)
      st["P"] = p
      self.draws.append((name, it))
    p = st["P"]
    return grad @ p.T if m >= n else p.T @ grad

  def step(self, params, grads, draw_proj):
    """One ``optimizer.step()``: updates ``params`` (a dict of float64
    torch-layout arrays) in place."""
    b1, b2 = self.betas
    for name, p in params.items():
      grad = grads[name]
      st = self.state.setdefault(name, {"step": 0})
      lr = self.lr(st["step"])
      low_rank = name in self.apollo
      if low_rank:
        norm_dim = 0 if grad.shape[0] < grad.shape[1] else 1
        r = self._project(name, st, grad, draw_proj)
      else:
        r = grad
      if "exp_avg" not in st:
        st["exp_avg"] = np.zeros_like(r)
        st["exp_avg_sq"] = np.zeros_like(r)
      st["step"] += 1
      k = st["step"]
      st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * r
      st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * r * r
      denom = np.sqrt(st["exp_avg_sq"]) + self.eps
      step_size = lr * math.sqrt(1 - b2**k) / (1 - b1**k)
      norm_grad = st["exp_avg"] / denom
      if low_rank:
        if self.scale_type == "channel":
          factor = (np.linalg.norm(norm_grad, axis=norm_dim)
                    / (np.linalg.norm(r, axis=norm_dim) + 1e-8))
          if norm_dim == 1:
            factor = factor[:, None]  # one per row: (m, 1)
          # norm_dim == 0: shape (n,), broadcast over the rows
        elif self.scale_type == "tensor":
          factor = np.linalg.norm(norm_grad) / (np.linalg.norm(r) + 1e-8)
        else:
          raise ValueError(self.scale_type)
        scaled = grad * factor  # the raw full-rank gradient
        if self.scale_front:
          scaled = scaled * np.sqrt(self.scale)
        if not self.disable_nl:
          if "scaled_grad" in st:
            sg_norm = np.linalg.norm(scaled)
            limiter = max(sg_norm / (st["scaled_grad"] + 1e-8), 1.01) / 1.01
            if limiter > 1:
              self.limited.append((name, k))
            scaled = scaled / limiter
            st["scaled_grad"] = sg_norm / limiter
          else:
            st["scaled_grad"] = np.linalg.norm(scaled)
        norm_grad = scaled
        if not self.scale_front:
          norm_grad = norm_grad * np.sqrt(self.scale)
      p -= step_size * norm_grad
      if self.wd > 0.0:
        p -= lr * self.wd * p
