"""Plain-numpy transcription of the official MicroAdam (spec §2).

Written from ../shared/spec/optimizers_more.md §2.1-§2.5 with the structure
of the official code, independently of jqlm's implementation: the driver
``micro_adam.py`` @ 4c98e6e (``_initialize_parameter_state``,
``update_step``: per-param state dicts, flattened buffers, a ring buffer
with a write ``index``, ``block_split``) and CPU restatements of the CUDA
kernels @ 42e1394 (``asymm_block_quant``, ``asymm_block_quant_inv``,
``copy_values``, ``zerorize_block_components``, ``compute_microadam_update``
with its ``my_pow``), element by element but vectorised.

Precision: ``precision="float64"`` runs everything (kernels, the grad
buffer, V and min/max, params) in float64. ``precision="bfloat16"`` is the
official one: kernel arithmetic in float32, the grad buffer ``p.grad``, V,
min/max and the params in bf16 (rounded with ``ml_dtypes``, round to nearest
even, as CUDA's ``__float2bfloat16`` and torch do); a bf16 ``+=`` is the
float sum rounded to bf16, and ``a * b + c`` in a float32 kernel is an FMA
(nvcc's default contraction). Top-k breaks ties towards the lower index (the
official ``torch.topk(sorted=False)`` leaves them unspecified).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def block_split(model_size, block_size):
  """``tools.py``: (number of full blocks, start of the last short block)."""
  if model_size < block_size:
    return 1, model_size
  blocks_count = int(model_size / block_size)
  start_index_last_block = model_size - model_size % block_size
  return blocks_count, start_index_last_block


def div_inc(a, b):
  return a // b + (1 if a % b > 0 else 0)


class NumpyMicroAdam:
  """``MicroAdam(params, m, lr, quant_block_size, k_init, alpha, betas,
  weight_decay, eps)`` with the GPU's ``d_block_size`` passed in."""

  def __init__(self, m, lr, quant_block_size, d_block_size, k_init=0.01,
               alpha=0.0, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8,
               precision="float64"):
    assert (0 <= alpha < 1) or alpha == -2
    assert alpha != -2, "densify with the quantisation error: not restated"
    self.m = m
    self.lr = lr
    self.quant_block_size = int(quant_block_size)
    self.k_init = k_init
    self.alpha = alpha
    self.weight_decay = weight_decay
    self.beta1, self.beta2 = betas
    self.eps = eps
    self.d_block_size = d_block_size
    self.densify_update_using_ef = self.alpha > 0
    if precision == "float64":
      self.kdt = self.buf = self.store = np.dtype(np.float64)
    elif precision == "bfloat16":
      self.kdt, self.buf, self.store = np.dtype(np.float32), BF16, BF16
    elif precision == "float32":  # spec §2.2's fp32 port: q is clamped
      self.kdt = self.buf = np.dtype(np.float32)
      self.store = BF16
    else:
      raise ValueError(precision)
    self.steps = 0
    self.state = {}

  # ------------------------------------------------------------------ state

  def _initialize_parameter_state(self, name, p):
    st = self.state[name] = {}
    d = st["d"] = p.size
    st["d_block_size"] = d if d < self.d_block_size else self.d_block_size
    st["topk_full_blocks_count"], st["d_index_topk"] = block_split(
      d, st["d_block_size"])
    st["k_block_size_many"] = int(math.ceil(st["d_block_size"] * self.k_init))
    st["k_block_size_few"] = int(math.ceil((d - st["d_index_topk"])
                                           * self.k_init))
    st["k_index"] = st["topk_full_blocks_count"] * st["k_block_size_many"]
    st["k"] = (st["k_block_size_many"] * st["topk_full_blocks_count"]
               + st["k_block_size_few"])
    st["index"] = 0
    st["I"] = np.zeros((self.m, st["k"]), np.int16)
    st["V"] = np.zeros((self.m, st["k"]), self.store)
    st["quant_full_blocks_count"], st["d_index_quant"] = block_split(
      d, self.quant_block_size)
    st["error"] = np.zeros(int(math.ceil(d / 2)), np.uint8)
    st["min_vals"] = np.zeros(st["quant_full_blocks_count"] + 1, self.store)
    st["max_vals"] = np.zeros(st["quant_full_blocks_count"] + 1, self.store)

  # ---------------------------------------------------------------- kernels

  def _my_pow(self, base, exp):
    """``utils.h``: repeated squaring in the kernel's float type."""
    result = self.kdt.type(1.0)
    base = self.kdt.type(base)
    while exp > 0:
      if exp & 1:
        result = self.kdt.type(result * base)
        exp -= 1
      base = self.kdt.type(base * base)
      exp >>= 1
    return result

  def _fma(self, a, b, c):
    """``a * b + c`` as nvcc compiles it (``-fmad=true``, the default: one
    rounding) in float32 kernels; plain in float64 (no wider type here)."""
    if self.kdt == np.float32:
      return (np.asarray(a, np.float64) * np.asarray(b, np.float64)
              + np.asarray(c, np.float64)).astype(np.float32)
    return a * b + c

  def _block_params(self, d, xmin, xmax):
    """Per element: its quant block's min and step ``u = (M - m) / 15``."""
    blk = np.arange(d) // self.quant_block_size
    mn = xmin.astype(self.kdt)[blk]
    mx = xmax.astype(self.kdt)[blk]
    return mn, (mx - mn) / self.kdt.type(15.0)

  def asymm_block_quant_inv(self, d, xq, xmin, xmax, x, alpha):
    """``x += alpha * Q^-1(xq)``: high nibble = even element; the term is
    rounded to the buffer's dtype, then added (bf16 ``+=``)."""
    i = np.arange(d)
    byte = xq[i // 2]
    q = np.where(i % 2 == 0, byte >> 4, byte & 0x0F).astype(self.kdt)
    mn, u = self._block_params(d, xmin, xmax)
    term = (self._fma(q, u, mn) * self.kdt.type(alpha)).astype(self.buf)
    x[:] = (x.astype(self.kdt) + term.astype(self.kdt)).astype(self.buf)

  def asymm_block_quant(self, d, xq, xmin, xmax, x):
    """``xq = Q(x)``: ``floor((x - m)/u + 0.5)``, clamped to [0, 15] (spec
    §2.2, for ports whose x is finer than min/max); 0 where u = 0."""
    mn, u = self._block_params(d, xmin, xmax)
    with np.errstate(invalid="ignore", divide="ignore"):
      q = np.floor((x.astype(self.kdt) - mn) / u + self.kdt.type(0.5))
    q = np.clip(np.where(u > 0, q, 0), 0, 15).astype(np.uint8)
    half_d = d >> 1
    xq[:half_d] = (q[0:2 * half_d:2] << 4) | q[1:2 * half_d:2]
    if d & 1:
      xq[half_d] = q[d - 1] << 4

  @staticmethod
  def _topk(mag, k):
    """``torch.topk(mag, k, sorted=False).indices`` along the last axis.
    torch leaves the order of equal values unspecified; this takes the
    lower index first (a stable sort), the rule of ``jax.lax.top_k``, so
    that ties (frequent among bf16 values) select the same set."""
    return np.argsort(-mag, axis=-1, kind="stable")[..., :k]

  @staticmethod
  def _offsets(st):
    """Block start of each of the k entries (``Bid * d_block_size``)."""
    k_id = np.arange(st["k"])
    return (k_id // st["k_block_size_many"]) * st["d_block_size"]

  def copy_values(self, st, indices, vec, out):
    """``out = vec[indices]`` with block-relative indices (d2k)."""
    out[:] = vec[indices.astype(np.int64) + self._offsets(st)].astype(
      out.dtype)

  def zerorize_block_components(self, st, vec, indices):
    vec[indices.astype(np.int64) + self._offsets(st)] = 0

  def compute_microadam_update(self, t, st, out):
    d, m, k = st["d"], self.m, st["k"]
    d_block_size, k_block_size = st["d_block_size"], st["k_block_size_many"]
    kdt = self.kdt.type
    b1, b2, eps = kdt(self.beta1), kdt(self.beta2), kdt(self.eps)
    # float c1 = (1. - beta1) / (1. - my_pow(beta1, t)): double math, float
    c1 = kdt((1.0 - float(b1)) / (1.0 - float(self._my_pow(b1, t))))
    c2 = kdt((1.0 - float(b2)) / (1.0 - float(self._my_pow(b2, t))))
    indices, values = st["I"], st["V"]
    for blk in range(div_inc(d, d_block_size)):
      d_block_start = blk * d_block_size
      d_block_end = min(d, d_block_start + d_block_size)
      k_block_start = blk * k_block_size
      k_block_end = min(k, k_block_start + k_block_size)
      mem_m = np.zeros(d_block_size, self.kdt)
      mem_v = np.zeros(d_block_size, self.kdt)
      for row in range(min(t, m)):
        exp = (t - 1 - row) % m
        beta1_exp, beta2_exp = self._my_pow(b1, exp), self._my_pow(b2, exp)
        cols = np.arange(k_block_start, min(k_block_end, d_block_end))
        i = indices[row, cols].astype(np.int64)
        fval = values[row, cols].astype(self.kdt)
        # (a row's indices are distinct: no two threads hit one i)
        mem_m[i] = self._fma(beta1_exp, fval, mem_m[i])
        mem_v[i] = self._fma(beta2_exp * fval, fval, mem_v[i])
      n = min(d_block_size, d - d_block_start)
      upd = (c1 * mem_m[:n]) / (np.sqrt(c2 * mem_v[:n]) + eps)
      out[d_block_start:d_block_start + n] = upd.astype(self.buf)

  # ------------------------------------------------------------------ step

  def step(self, params, grads, lr=None):
    """One ``optimizer.step()``: ``params`` (name -> array) in place."""
    self.steps += 1
    lr = self.lr if lr is None else lr
    for name, p in params.items():
      self.update_step(name, p, grads[name], lr, self.weight_decay)

  def _update_quantization_statistics(self, st, grad):
    count, d_index_quant, d = (st["quant_full_blocks_count"],
                               st["d_index_quant"], st["d"])
    min_vals, max_vals = st["min_vals"], st["max_vals"]
    if count == 1:
      min_vals[:1] = grad[:d_index_quant].min()
      max_vals[:1] = grad[:d_index_quant].max()
    else:
      blocks = grad[:d_index_quant].reshape(count, self.quant_block_size)
      min_vals[:count] = blocks.min(axis=1).astype(self.store)
      max_vals[:count] = blocks.max(axis=1).astype(self.store)
    if d_index_quant < d:
      min_vals[count] = grad[d_index_quant:].min()
      max_vals[count] = grad[d_index_quant:].max()

  def _param_op(self, p, fn):
    """A torch in-place op on p: computed in opmath, rounded to p's dtype."""
    opmath = np.float32 if p.dtype == BF16 else p.dtype
    p[...] = fn(p.astype(opmath)).astype(p.dtype)

  def update_step(self, name, p, g, lr, wd):
    if name not in self.state:
      self._initialize_parameter_state(name, p)
    st = self.state[name]
    grad = np.asarray(g).reshape(-1).astype(self.buf)  # p.grad (a copy)
    d = st["d"]
    d_block_size = st["d_block_size"]
    full, d_index_topk = st["topk_full_blocks_count"], st["d_index_topk"]
    k_many, k_few = st["k_block_size_many"], st["k_block_size_few"]
    k_index = st["k_index"]
    index, indices, values = st["index"], st["I"], st["V"]
    error, min_vals, max_vals = st["error"], st["min_vals"], st["max_vals"]

    # STEP 4: a = g + Q^-1(e)
    self.asymm_block_quant_inv(d, error, min_vals, max_vals, grad, 1.0)
    # STEP 5 + 9: block-wise top-k of |a| (relative indices)
    mag = np.abs(grad.astype(self.kdt))
    blocks = mag[:d_index_topk].reshape(full, d_block_size)
    top = self._topk(blocks, k_many)
    indices[index, :k_index] = top.astype(np.int16).reshape(-1)
    if k_few > 0:
      tail = mag[d_index_topk:]
      indices[index, k_index:] = self._topk(tail, k_few).astype(np.int16)
    self.copy_values(st, indices[index, :], grad, values[index, :])
    st["index"] = (index + 1) % self.m
    # STEP 6: a[I] = 0 (the old index)
    self.zerorize_block_components(st, grad, indices[index, :])
    # STEP 7 + 8: fresh min/max, e = Q(a)
    self._update_quantization_statistics(st, grad)
    self.asymm_block_quant(d, error, min_vals, max_vals, grad)
    # weight decay, before the step
    if wd > 0:
      self._param_op(p, lambda x: x * (1 - lr * wd))
    # STEPS 10-11
    grad[:] = 0
    self.compute_microadam_update(self.steps, st, grad)
    if self.densify_update_using_ef:
      self.asymm_block_quant_inv(d, error, min_vals, max_vals, grad,
                                 self.alpha)
    u = grad.astype(np.float32 if p.dtype == BF16 else p.dtype)
    self._param_op(p, lambda x: x + (-lr) * u.reshape(p.shape))
    if self.densify_update_using_ef:
      grad[:] = 0
      self.asymm_block_quant_inv(d, error, min_vals, max_vals, grad,
                                 1 - self.alpha)
      self._update_quantization_statistics(st, grad)
      self.asymm_block_quant(d, error, min_vals, max_vals, grad)
