"""Plain-numpy transcriptions of the reference quantizers (for parity).

Each function restates, in numpy, the formula of the spec section it names
(../shared/spec/optimizers.md), independently of jqlm's implementation.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np


def uint_minmax_flat(w: np.ndarray, bits: int, group: int, eps=1e-5):
  """Q-GaLore ``_quantize`` / Stable-SPAM INT4 weights (spec §3.4, §5.2).

  Returns (q, scale, zero, dequant) over row-major groups of ``group``.
  """
  w = w.astype(np.float32).reshape(-1, group)
  qmax = 2**bits - 1
  mx, mn = w.max(axis=1, keepdims=True), w.min(axis=1, keepdims=True)
  scale = np.maximum(mx - mn, np.float32(eps)) / np.float32(qmax)
  zero = np.clip(-np.round(mn / scale), 0, qmax)
  q = np.clip(np.round(w / scale) + zero, 0, qmax)
  return q, scale, zero, (scale * (q - zero))


def int_act_topk(x: np.ndarray, bits: int, group: int, topk: int):
  """Stable-SPAM activation quantizer (spec §3.4): symmetric, top-k exact."""
  x = x.astype(np.float32).reshape(-1, group).copy()
  idx = np.argsort(-np.abs(x), axis=1, kind="stable")[:, :topk]
  rows = np.arange(x.shape[0])[:, None]
  keep = x[rows, idx].copy()
  x[rows, idx] = 0.0
  qmax = 2 ** (bits - 1) - 1
  scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), np.float32(1e-6))
  q = np.clip(np.round(x * np.float32(qmax) / scale), -(2 ** (bits - 1)), qmax)
  out = q * scale / np.float32(qmax)
  out[rows, idx] = keep
  return out


def fp4_e1m2_stable_spam(x: np.ndarray, group=256, topk=2, e=1, m=2, b=1):
  """Transcription of Stable-SPAM ``fp4_fake_quantize`` (spec §3.4)."""
  x = x.astype(np.float32).reshape(-1, group).copy()
  rows = np.arange(x.shape[0])[:, None]
  idx = np.argsort(-np.abs(x), axis=1, kind="stable")[:, :topk]
  keep = x[rows, idx].copy()
  x[rows, idx] = 0.0
  alpha = np.maximum(np.abs(x).max(axis=1), np.float32(1e-6))
  q_max = alpha
  xc = np.clip(x, -q_max[:, None], q_max[:, None])
  alpha_hat = alpha * np.float32(2.0 ** (-b))
  b_hat = (2**e - np.log2(q_max) + np.log2(np.float32(2 - 2 ** (-m))) - 1)
  log_v = np.floor(np.log2(np.abs(xc) + 1e-8) + b_hat[:, None])
  v = np.power(np.float32(2), np.maximum(log_v - m, 1 - m))
  out = alpha_hat[:, None] * v * np.round(xc / (alpha_hat[:, None] * v) + 1e-12)
  out[rows, idx] = keep
  return out.astype(np.float32)


def mx_quantize(x: np.ndarray, fmt: str, block=32):
  """OCP MX v1.0 block quantization along the last axis (dequantized)."""
  x = x.astype(np.float32).reshape(-1, block)
  amax = np.abs(x).max(axis=1, keepdims=True)
  emax = {"mxfp8": 8, "mxfp4": 2, "mxint8": 0}[fmt]
  with np.errstate(divide="ignore"):
    e = np.where(amax > 0, np.floor(np.log2(amax)) - emax, -125)
  scale = np.exp2(np.clip(e, -125, 127)).astype(np.float32)
  y = x / scale
  if fmt == "mxint8":
    codes = np.clip(np.round(y * 64), -128, 127)
    return codes / 64 * scale
  dt, fmax = (
    (ml_dtypes.float8_e4m3fn, 448.0) if fmt == "mxfp8"
    else (ml_dtypes.float4_e2m1fn, 6.0)
  )
  codes = np.clip(y, -fmax, fmax).astype(dt).astype(np.float32)
  return codes * scale
