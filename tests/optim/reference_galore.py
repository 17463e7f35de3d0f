"""Plain-numpy transcriptions of GaLore-AdamW, the Q-GaLore projector and
quantizers, and block-wise state quantization (spec §4, §5).

Written in the official *torch* layout (weights (out, in)), independently of
jqlm, so the tests also check jqlm's Flax-layout (in, out) translation.
"""

from __future__ import annotations

import math

import numpy as np


def svd_proj(g, rank):
  """Official ``std`` projector on a torch (m, n) grad: (P, side, vec)."""
  u, _, vh = np.linalg.svd(g.astype(np.float32), full_matrices=False)
  m, n = g.shape
  if m >= n:
    return vh[:rank].astype(g.dtype), "right", vh[0]
  return u[:, :rank].astype(g.dtype), "left", u[:, 0]


class NumpyGaLoreAdamW:
  """GaLoreAdamW (spec §4.2) on torch-layout params; ``projected`` names the
  params with a projector. ``proj_override(name, g, t)`` may return the P to
  use at a refresh (to share one SVD with the implementation under test)."""

  def __init__(self, lr, rank, gap, scale, projected, betas=(0.9, 0.999),
               eps=1e-6, weight_decay=0.0):
    self.lr, self.rank, self.gap, self.scale = lr, rank, gap, scale
    self.projected, self.betas, self.eps, self.wd = (set(projected), betas,
                                                     eps, weight_decay)
    self.state = {}

  def step(self, params, grads, proj_override=None):
    b1, b2 = self.betas
    for name, p in params.items():
      g = grads[name]
      st = self.state.setdefault(name, dict(step=0, P=None))
      if name in self.projected:
        if st["P"] is None or st["step"] % self.gap == 0:
          P, _, _ = svd_proj(g, self.rank)
          if proj_override is not None:
            P = proj_override(name, P)
          st["P"] = P
        P = st["P"]
        r = g @ P.T if g.shape[0] >= g.shape[1] else P.T @ g
      else:
        r = g
      if "m" not in st:
        st["m"], st["v"] = np.zeros_like(r), np.zeros_like(r)
      st["step"] += 1
      k = st["step"]
      st["m"] = b1 * st["m"] + (1 - b1) * r
      st["v"] = b2 * st["v"] + (1 - b2) * r * r
      u = st["m"] / (np.sqrt(st["v"]) + self.eps)
      ss = self.lr * math.sqrt(1 - b2**k) / (1 - b1**k)
      if name in self.projected:
        P = st["P"]
        u = (u @ P if g.shape[0] >= g.shape[1] else P @ u) * self.scale
      p -= ss * u
      if self.wd > 0:
        p -= self.lr * self.wd * p


class NumpyLazyProjector:
  """Q-GaLore's adaptive refresh schedule (spec §5.1) for one projector;
  ``vecs`` supplies the top singular vector of each SVD."""

  def __init__(self, gap, cos_threshold=0.4, gamma=2, queue_size=5):
    self.gap, self.thr, self.gamma, self.qs = gap, cos_threshold, gamma, \
      queue_size
    self.queue, self.past = [], None

  def maybe_svd(self, it, vec):
    """Called with iter = t - 1; returns True if an SVD ran."""
    if not (self.past is None or it % self.gap == 0):
      return False
    if self.past is not None:
      if len(self.queue) == self.qs:
        self.queue.pop(0)
      cos = float(np.dot(self.past, vec) / max(
        np.linalg.norm(self.past) * np.linalg.norm(vec), 1e-8))
      self.queue.append(cos)
      if len(self.queue) == self.qs and np.mean(self.queue) >= self.thr:
        self.gap = int(self.gap * self.gamma)
    self.past = vec
    return True


def qgalore_quantize(w, bits=4, group=256):
  """Q-GaLore ``_quantize`` (spec §5.2) on a torch-layout tensor."""
  x = w.reshape(-1, group).astype(np.float32)
  qmax = 2**bits - 1
  scale = np.maximum(x.max(1, keepdims=True) - x.min(1, keepdims=True),
                     1e-5) / qmax
  zero = np.clip(-np.round(x.min(1, keepdims=True) / scale), 0, qmax)
  q = np.clip(np.round(x / scale) + zero, 0, qmax)
  return q, scale, zero, (scale * (q - zero)).reshape(w.shape)


def block_quantize(x, table, block):
  """Block-wise absmax code quantization (bitsandbytes ``bucketize`` path):
  returns the dequantized array."""
  flat = x.reshape(-1).astype(np.float32)
  n = flat.size
  nb = -(-n // block)
  flat = np.pad(flat, (0, nb * block - n)).reshape(nb, block)
  absmax = np.abs(flat).max(1, keepdims=True)
  xn = flat / np.where(absmax > 0, absmax, 1)
  bounds = (table[:-1] + table[1:]) / 2
  idx = np.searchsorted(bounds, xn, side="left")
  return (table[idx] * absmax).reshape(-1)[:n].reshape(x.shape)


def np_adam(params, grads_seq, lr, b1=0.9, b2=0.999, eps=1e-8):
  """Torch-style Adam with decay-free updates, float64."""
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  out = {k: p.copy() for k, p in params.items()}
  for t, g in enumerate(grads_seq, 1):
    for k in out:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      out[k] -= lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
  return out
