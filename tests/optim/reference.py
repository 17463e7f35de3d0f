"""Plain-numpy transcriptions of the official optimizers (spec §2, §3).

Written from ../shared/spec/optimizers.md line by line, with the official
code's structure (per-param state dicts, global counters, in-place updates),
independently of jqlm's implementation. Arrays are float64 or float32.
"""

from __future__ import annotations

import math

import numpy as np


class NumpySpam:
  """SPAM, spec §2.1-2.2 (density 1.0)."""

  def __init__(self, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
               warmup_steps=150, threshold=5000.0, delta_t=500,
               grad_accu_steps=20):
    self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
    self.n, self.theta, self.dt, self.a = (warmup_steps, threshold, delta_t,
                                           grad_accu_steps)
    self.total_step = 0
    self.cur = warmup_steps + 1
    self.state = {}

  def warmup(self, c):  # CosineDecay(0.99, N): 1 - dr(c)
    if c < self.n:
      return 1 - 0.99 * (1 + math.cos(math.pi * c / (self.n + 1))) / 2
    return 1.0

  def step(self, params, grads, lr=None):
    lr = self.lr if lr is None else lr
    t = self.total_step + 1
    sc = self.warmup(self.cur)
    b1, b2 = self.betas
    self.spikes = 0  # elements clipped in this step
    for name, p in params.items():
      g = grads[name].copy()
      st = self.state.setdefault(name, dict(step=0, m=np.zeros_like(p),
                                            v=np.zeros_like(p)))
      if t % self.dt == 0:
        st["m"] = np.zeros_like(p)
        st["v"] = np.zeros_like(p)
      st["step"] += 1
      if self.theta != 0 and t >= self.a and (self.dt == 0 or
                                              t % self.dt >= self.a):
        thr = self.theta * st["v"]
        mask = g * g > thr
        self.spikes += int(mask.sum())
        g[mask] = np.sign(g[mask]) * np.sqrt(thr[mask])
      st["m"] = b1 * st["m"] + (1 - b1) * g
      st["v"] = b2 * st["v"] + (1 - b2) * g * g
      k = st["step"]
      step_size = lr * math.sqrt(1 - b2**k) / (1 - b1**k)
      p -= step_size * sc * st["m"] / (np.sqrt(st["v"]) + self.eps)
      if self.wd > 0:
        p -= lr * self.wd * p
    self.total_step += 1
    self.cur += 1
    if (self.total_step + 1) % self.dt == 0:
      self.cur = 0


class NumpySpamDensity:
  """SPAM with sparse momentum, optimizers_more.md §4 (``density`` group).

  The official layout: 1-D moments over the mask's True entries in
  row-major order, the spike clip on that copy, a zero update outside the
  mask, no weight decay on density params (a silent no-op officially), the
  dense group as :class:`NumpySpam`. Masks are injected (the official draws
  are torch's): ``masks`` holds the first ones, ``redraw(name, t)`` gives
  the mask drawn at the end of update ``t`` when ``(t + 1) % dt == 0``.
  The overlap copy of the moments is done (§4.1), though the next update
  resets them.
  """

  def __init__(self, lr, masks, redraw, betas=(0.9, 0.999), eps=1e-6,
               weight_decay=0.0, warmup_steps=150, threshold=5000.0,
               delta_t=500, grad_accu_steps=20):
    self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
    self.n, self.theta, self.dt, self.a = (warmup_steps, threshold, delta_t,
                                           grad_accu_steps)
    self.masks = {k: np.asarray(v, bool).copy() for k, v in masks.items()}
    self.redraw = redraw
    self.total_step = 0
    self.cur = warmup_steps + 1
    self.state = {}

  def warmup(self, c):
    if c < self.n:
      return 1 - 0.99 * (1 + math.cos(math.pi * c / (self.n + 1))) / 2
    return 1.0

  def step(self, params, grads):
    lr, t = self.lr, self.total_step + 1
    sc = self.warmup(self.cur)
    b1, b2 = self.betas
    for name, p in params.items():
      dense = name not in self.masks
      mask = np.ones(p.shape, bool) if dense else self.masks[name]
      g = grads[name][mask].copy()  # 1-D, row-major
      st = self.state.setdefault(name, dict(step=0, m=np.zeros(g.size),
                                            v=np.zeros(g.size)))
      if t % self.dt == 0:
        st["m"], st["v"] = np.zeros(g.size), np.zeros(g.size)
      st["step"] += 1
      if self.theta != 0 and t >= self.a and t % self.dt >= self.a:
        thr = self.theta * st["v"]
        spike = g * g > thr
        g[spike] = np.sign(g[spike]) * np.sqrt(thr[spike])
      st["m"] = b1 * st["m"] + (1 - b1) * g
      st["v"] = b2 * st["v"] + (1 - b2) * g * g
      k = st["step"]
      ss = lr * math.sqrt(1 - b2**k) / (1 - b1**k)
      delta = np.zeros_like(p)
      delta[mask] = st["m"] / (np.sqrt(st["v"]) + self.eps)
      p -= ss * sc * delta
      if self.wd > 0 and dense:
        p -= lr * self.wd * p
    self.total_step += 1
    self.cur += 1
    if (self.total_step + 1) % self.dt == 0:
      self.cur = 0
      for name, old in list(self.masks.items()):
        new = np.asarray(self.redraw(name, self.total_step), bool)
        st = self.state.get(name)
        if st is not None:  # keep the moments on the overlap new & old
          for key in ("m", "v"):
            full = np.zeros(old.shape)
            full[old] = st[key]
            st[key] = np.where(old[new], full[new], 0.0)
        self.masks[name] = new


class NumpyStableSpam:
  """Stable-SPAM, spec §3.1-3.2, reset-step aliasing included."""

  def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
               gamma1=0.7, gamma2=0.9, gamma3=0.999, total_t=None,
               eta_min=0.5, update_proj_gap=1000):
    self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
    self.g1, self.g2, self.g3 = gamma1, gamma2, gamma3
    self.total_t, self.eta_min, self.dt = total_t, eta_min, update_proj_gap
    self.total_steps = 0
    self.state = {}

  def scale(self, t):
    if self.total_t is None:
      return 1.0
    return self.eta_min + (1 - self.eta_min) * (
      1 + math.cos(math.pi * t / (self.total_t + 1))) / 2

  def step(self, params, grads, lr=None):
    lr = self.lr if lr is None else lr
    self.total_steps += 1
    t = self.total_steps
    sc = self.scale(t)
    for name, p in params.items():
      g = grads[name].copy()
      st = self.state.setdefault(name, dict(
        step=0, m=np.zeros_like(p), v=np.zeros_like(p), m_max=0.0, m_n=0.0,
        v_n=0.0))
      p *= 1 - lr * self.wd
      m_ref, v_ref = st["m"], st["v"]  # Python binds the state tensors here
      st["step"] += 1
      k = st["step"]
      # AdaClip
      gmax = np.abs(g).max()
      st["m_max"] = self.g3 * st["m_max"] + (1 - self.g3) * gmax
      t_hat = st["m_max"] / (1 - self.g3**k)
      mask = np.abs(g) > t_hat
      g[mask] = g[mask] / gmax * t_hat
      # AdaGN
      n = np.linalg.norm(g)
      g1 = self.g1 * sc
      st["m_n"] = g1 * st["m_n"] + (1 - g1) * n
      st["v_n"] = self.g2 * st["v_n"] + (1 - self.g2) * n**2
      c = (st["m_n"] / (1 - g1**k)) / (
        np.sqrt(st["v_n"] / (1 - self.g2**k)) + self.eps)
      if n > 0:
        g = g / n * c
      # MoRet, with the aliasing of the official code
      if self.dt != 0 and t % self.dt == 0:
        st["m"] = np.zeros_like(p)
        st["v"] = np.zeros_like(p)
        st["step"] = 1
        k = 1
      b1 = self.betas[0] * sc
      b2 = self.betas[1]
      bc1, bc2 = 1 - b1**k, 1 - b2**k
      m_ref *= b1
      m_ref += (1 - b1) * g
      v_ref *= b2
      v_ref += (1 - b2) * g * g
      p -= (lr / bc1) * m_ref / (np.sqrt(v_ref) / math.sqrt(bc2) + self.eps)
