"""A plain-numpy transcription of Natural GaLore's official ``SubSpaceAdamW``
with ``GaLoreProjectorTensor`` (spec §3; ``selfsupervised-ai/Natural-GaLore
@ e23336d``).

Written from the spec, independently of jqlm, in the official *torch*
layout (weights ``(out, in)``), with per-param state dicts and a Python list
as the gradient history, as the official code keeps them. The factors come
from a numpy SVD with tensorly's ``svd_flip`` rule (each column's largest-|.|
entry positive), which is the fixed point of tensorly's HOOI for a matrix.
"""

from __future__ import annotations

import math

import numpy as np


def svd_flip_columns(x):
  """tensorly ``svd_flip`` (``u_based_decision``) on one factor: every
  column's largest-|.| entry (the first on a tie) made positive."""
  rows = np.argmax(np.abs(x), axis=0)
  signs = np.sign(x[rows, np.arange(x.shape[1])])
  return x * signs[None, :]


def tucker_factors(g, rank, svd_dtype=np.float64):
  """The two Tucker factors of a torch-layout (m, n) gradient: (U_r (m, r),
  V_r (n, r)), cast back to the grad dtype (``get_orthogonal_matrix``).
  The official code runs tensorly in float32; parity tests use float64."""
  u, _, vh = np.linalg.svd(g.astype(svd_dtype), full_matrices=False)
  return (svd_flip_columns(u[:, :rank]).astype(g.dtype),
          svd_flip_columns(vh[:rank].T).astype(g.dtype))


def natural_gradient_transform(low_rank_grad, grad_history, history_size,
                               lambda_damping=1e-3):
  """``_natural_gradient_transform``: pushes vec(R) into ``grad_history``
  (a list, oldest first, mutated) and returns (lambda I + G G^T)^-1 vec(R)
  by Woodbury, reshaped like ``low_rank_grad``."""
  vec = low_rank_grad.reshape(-1)
  if len(grad_history) >= history_size:
    grad_history.pop(0)
  grad_history.append(vec.copy())
  big_g = np.stack(grad_history, axis=1)  # (k, s)
  lam_inv = 1.0 / lambda_damping
  s = lam_inv * (big_g.T @ big_g)
  s[np.diag_indices_from(s)] += 1.0
  gtg = big_g.T @ vec
  chol = np.linalg.cholesky(s)  # S = L L^T
  temp = np.linalg.solve(chol.T, np.linalg.solve(chol, gtg))
  ng = lam_inv * vec - lam_inv**2 * (big_g @ temp)
  return ng.reshape(low_rank_grad.shape)


class NumpyNaturalGaLore:
  """``SubSpaceAdamW`` on torch-layout params (a dict name -> array, updated
  in place). Params named in ``projected`` form the low-rank group
  (``proj_type='natural_galore'``, or ``'galore'`` when ``natural=False``);
  the others are the regular group (plain HF-style AdamW)."""

  def __init__(self, lr, rank, gap, scale, projected, history=20,
               betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
               lambda_damping=1e-3, natural=True, svd_dtype=np.float64):
    self.lr, self.rank, self.gap, self.scale = lr, rank, gap, scale
    self.projected, self.history = set(projected), history
    self.betas, self.eps, self.wd = betas, eps, weight_decay
    self.lam, self.natural, self.svd_dtype = (lambda_damping, natural,
                                              svd_dtype)
    self.state = {}
    self.factor_computations = 0

  def step(self, params, grads):
    b1, b2 = self.betas
    for name, p in params.items():
      g = grads[name]
      st = self.state.setdefault(name, {"step": 0})
      if name in self.projected:
        # GaLoreProjectorTensor.project(grad, iter=step)
        if "factors" not in st or st["step"] % self.gap == 0:
          st["factors"] = tucker_factors(g, self.rank, self.svd_dtype)
          self.factor_computations += 1
        u_r, v_r = st["factors"]
        g = u_r.T @ g @ v_r  # multi_mode_dot(..., transpose=True)
        if self.natural:
          g = natural_gradient_transform(
            g, st.setdefault("grad_history", []), self.history, self.lam)
      if "exp_avg" not in st:
        st["exp_avg"], st["exp_avg_sq"] = np.zeros_like(g), np.zeros_like(g)
      st["step"] += 1
      k = st["step"]
      st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
      st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
      denom = np.sqrt(st["exp_avg_sq"]) + self.eps
      step_size = self.lr * math.sqrt(1 - b2**k) / (1 - b1**k)
      norm_grad = st["exp_avg"] / denom
      if name in self.projected:
        u_r, v_r = st["factors"]
        norm_grad = (u_r @ norm_grad @ v_r.T) * self.scale  # project_back
      p -= step_size * norm_grad
      if self.wd > 0.0:
        p -= self.lr * self.wd * p
