"""A plain-numpy transcription of ../shared/spec/lowp_training.md, the oracle
of jqlm's recipes (``jqlm.quant.recipe``, ``jqlm.ops.quantized_dot``).

Written from the spec, not from jqlm: no jqlm import, its own element
rounding (E4M3/E5M2 by exponent and step, the FP4 grid with its three tie
rules and three SR variants), scales and Hadamard matrices. Arithmetic the
spec states in fp32 (scale formulas, ``fp32(t * s)``) runs in float32; the
GEMMs run in float64 on the dequantized operands (spec §0). ml_dtypes
serves bf16 rounding only.

Random numbers are inputs: ``noise[name]`` holds ``u`` (one uniform per
element) and ``u_scale`` (EDEN: one per 16-group) of operand ``name`` in
its ``[other, contraction]`` layout, and ``signs_dgrad``/``signs_wgrad``
the backward's sign vectors, so the oracle replays one call exactly
(``jqlm.ops.quantized_dot_noise``). The six layouts: x [N, K], w = Wᵀ
[M, K], dgrad_dy = dy [N, M], dgrad_w = W [K, M], wgrad_x = xᵀ [K, N],
wgrad_dy = dyᵀ [M, N]. Every GEMM is A·Bᵀ of two such layouts.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
TE_SIGNS = np.array([1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1,
                     -1], np.float64)
QUEST_ALPHA = {1: 0.7978845587140913, 2: 1.4935346200015913,
               3: 2.051068354131873, 4: 2.513930578568423,
               8: 3.884938678807525}
FMT = {"e4m3": (3, -6, 448.0), "e5m2": (2, -14, 57344.0)}  # mbits, emin, max


def bf16(v):
  return np.asarray(v, F32).astype(ml_dtypes.bfloat16).astype(np.float64)


# -- elements (§1.1, §1.2) ---------------------------------------------------


def _float_step(a, fmt):
  mbits, emin, _ = FMT[fmt]
  e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
  return 2.0 ** (np.maximum(e, emin) - mbits)


def round_fp8(v, fmt):
  """RNE onto E4M3/E5M2, saturating (§1.1)."""
  v = np.asarray(v, np.float64)
  a = np.minimum(np.abs(v), FMT[fmt][2])
  step = _float_step(a, fmt)
  q = np.minimum(np.round(a / step) * step, FMT[fmt][2])  # half to even
  return np.sign(v) * q


def sr_fp8(v, fmt, u):
  """Exact SR between the two format neighbours; values on the grid stay."""
  v = np.asarray(v, np.float64)
  a = np.minimum(np.abs(v), FMT[fmt][2])
  step = _float_step(a, fmt)
  lo = np.floor(a / step) * step
  q = np.where(u < (a - lo) / step, lo + step, lo)
  return np.sign(v) * np.minimum(q, FMT[fmt][2])


def round_fp4(v, tie):
  """Round to nearest onto E2M1 with tie rule even / away / zero (§1.1)."""
  v = np.asarray(v, np.float64)
  a = np.minimum(np.abs(v), 6.0)
  d = np.abs(a[..., None] - FP4)
  best = d.min(-1, keepdims=True)
  cand = d == best  # one or two grid points
  idx = np.arange(8)
  if tie == "even":
    pick = np.where(cand & (idx % 2 == 0), idx, -1).max(-1)
    pick = np.where(cand.sum(-1) == 1, np.argmax(cand, -1), pick)
  elif tie == "away":
    pick = np.where(cand, idx, -1).max(-1)
  else:
    pick = np.where(cand, idx, 99).min(-1)
  return np.sign(v) * FP4[pick]


def _fp4_step(a):
  return np.where(a < 2, 0.5, np.where(a < 4, 1.0, 2.0))


def sr_fp4(v, u, variant):
  """SR onto E2M1, magnitudes capped at 6 (§1.2): the ``te`` and
  ``exact`` variants (NVFP4's and Quartet's gradients)."""
  v = np.asarray(v, np.float64)
  a = np.minimum(np.abs(v), 6.0)
  if variant == "te":
    r = np.floor(u * 256) / 256
    t = a + r * _fp4_step(a)
    st = _fp4_step(t)
    return np.sign(v) * np.minimum(np.floor(t / st) * st, 6.0)
  # "exact" (the only other variant the recipes' oracle needs)
  lo = FP4[np.searchsorted(FP4, a, side="right") - 1]
  hi = FP4[np.minimum(np.searchsorted(FP4, a, side="left"), 7)]
  gap = np.where(hi > lo, hi - lo, 1.0)
  q = np.where(u < (a - lo) / gap, hi, lo)
  return np.sign(v) * np.where(hi == lo, a, q)


# -- Hadamard (§1.3) ---------------------------------------------------------


def sylvester(n, dtype="float32"):
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  h = h / np.sqrt(n)
  return bf16(h) if dtype == "bfloat16" else h


def block_rotate(v, b, signs=None, side="pre", dtype="float32",
                 transpose=False):
  """Each b-chunk c of v's rows becomes c·T (or c·Tᵀ), T = diag(s)·H (pre)
  or H·diag(s) (post)."""
  t = sylvester(b, dtype)
  if signs is not None:
    s = np.asarray(signs, np.float64)
    t = s[:, None] * t if side == "pre" else t * s[None, :]
  if transpose:
    t = t.T
  r, c = v.shape
  return (v.reshape(r, c // b, b) @ t).reshape(r, c)


def _groups(v, b, tile=False):
  r, c = v.shape
  if tile:
    return v.reshape(r // b, b, c // b, b).transpose(0, 2, 1, 3).reshape(
      r // b, c // b, b * b)
  return v.reshape(r, c // b, b)


def _ungroup(g, shape, b, tile=False):
  r, c = shape
  if tile:
    return g.reshape(r // b, c // b, b, b).transpose(0, 2, 1, 3).reshape(r, c)
  return g.reshape(r, c)


# -- operand quantizers, each on an [other, contraction] array --------------


def q_torchao(t, fmt, axis_wise=False, pow2=False):
  """§2/§3: s = fp32(max_fmt / max(amax, 1e-12)), q = RNE(sat(fp32(t)·s))."""
  t = np.asarray(t, F32)
  amax = np.abs(t).max(axis=1, keepdims=True) if axis_wise else np.abs(
    t).max()
  s = F32(FMT[fmt][2] / np.maximum(np.float64(amax), 1e-12))
  s = np.asarray(s, F32)
  if pow2:
    s = (2.0 ** np.floor(np.log2(s))).astype(F32)
  return round_fp8((t * s).astype(F32), fmt) / s.astype(np.float64)


def q_mx(t, elem, rule, block=32, tie="even"):
  """§4/§5: E8M0 FLOOR or RCEIL scales on 32-blocks."""
  g = _groups(np.asarray(t, F32), block)
  amax = np.abs(g).max(-1, keepdims=True).astype(np.float64)
  emax, mmax = {"e4m3": (8, 448.0), "e2m1": (2, 6.0)}[elem]
  with np.errstate(divide="ignore"):
    if rule == "floor":
      e = np.where(amax > 0, np.floor(np.log2(amax)), -127) - emax
    else:
      d = (amax.astype(F32) * F32(1 / mmax)).astype(np.float64)
      e = np.where(d > 0, np.ceil(np.log2(d)), -127)
  e = np.clip(e, -127, 127)
  x = g / 2.0 ** e
  q = round_fp8(x, elem) if elem == "e4m3" else round_fp4(x, tie)
  return _ungroup(q * 2.0 ** e, t.shape, block)


def q_nvfp4_te(t, u=None, tile=False):
  """§6.2: TE's two-level NVFP4 (RNE ties to even, or SR 'te')."""
  t = np.asarray(t, F32)
  g = _groups(t, 16, tile)
  a_b = np.abs(g).max(-1, keepdims=True)
  big = np.abs(t).max()
  s_enc = F32(1.0) if big == 0 else F32(min(F32(2688.0) / big,
                                            np.finfo(F32).max))
  s_b = round_fp8((a_b * F32(s_enc * F32(1 / 6))).astype(F32), "e4m3")
  s_b = s_b.astype(F32)
  with np.errstate(divide="ignore"):
    enc = np.where(s_b > 0, F32(1) / (s_b * F32(F32(1) / s_enc)), 0).astype(
      F32)
  y = np.clip((g * enc).astype(F32), -6, 6)
  if u is None:
    q = round_fp4(y, "even")
  else:
    q = sr_fp4(y, _groups(u, 16, tile), "te")
  return _ungroup(q * s_b * (np.float64(big) / 2688.0), t.shape, 16, tile)


def _two_level_q2(t, gmax, val_max):
  g = _groups(np.asarray(t, F32), 16)
  a_b = np.abs(g).max(-1, keepdims=True)
  big = np.abs(g).max()
  s_dec = F32(1) if big == 0 else F32(F32(big / F32(gmax)) / F32(val_max))
  s_b = round_fp8(((a_b / F32(val_max)).astype(F32) / s_dec).astype(F32),
                  "e4m3").astype(F32)
  s_b = np.where(s_b == 0, F32(1), s_b)
  inv = (s_b * s_dec).astype(F32)
  return g, (g / inv).astype(F32), s_b, s_dec, inv


def q_nvfp4_q2(t, gmax=447.99):
  """§8.1: Quartet-II forward NVFP4, RTN with ties away."""
  g, y, _, _, inv = _two_level_q2(t, gmax, 6.0)
  return _ungroup(round_fp4(y, "away") * inv, t.shape, 16)


def q_eden(t, u_scale, chunk):
  """§8.2 steps 2-7 (after the rotation)."""
  val_max = 6.0 / ((17 / 16) * 0.93)
  g, y, s_b, s_dec, _ = _two_level_q2(t, 255.99, val_max)
  q = round_fp4(y, "away")
  r, nb, _ = g.shape
  per = chunk // 16
  ys = y.reshape(r, nb // per, chunk).astype(np.float64)
  qs = q.reshape(r, nb // per, chunk)
  num, den = (ys * ys).sum(-1, keepdims=True), (ys * qs).sum(-1,
                                                            keepdims=True)
  c = np.where(den == 0, 1.0, num / np.where(den == 0, 1.0, den))
  scale = (s_b.reshape(r, nb // per, per) * c).reshape(r, nb, 1)
  scale = sr_fp8(np.asarray(scale, F32).astype(np.float64), "e4m3",
                 np.asarray(u_scale).reshape(r, nb, 1))
  return _ungroup(q * scale * np.float64(s_dec), t.shape, 16)


def q_quartet_fwd(t):
  """§7.1 steps 2-5 (after the H32 rotation): value and clip mask."""
  g = _groups(np.asarray(t, F32), 32).astype(np.float64)
  sigma = np.sqrt(np.maximum((g * g).mean(-1, keepdims=True)
                             - g.mean(-1, keepdims=True) ** 2, 0))
  s = 2.0 ** np.floor(np.log2(0.48707976 * sigma + 1e-8))
  y = g / s
  return (_ungroup(round_fp4(y, "zero") * s, t.shape, 32),
          _ungroup(np.abs(y) < 6, t.shape, 32))


def q_quartet_bwd(t, u):
  """§7.2 Qg steps 2-3 (after the rotation): 4/3-scaled, SR exact."""
  g = _groups(np.asarray(t, F32), 32).astype(np.float64)
  amax = np.abs(g).max(-1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    s = 2.0 ** (np.floor(np.log2(amax)) - 2) / 0.75
    q = np.where(amax > 0, sr_fp4(g / s, _groups(u, 32), "exact") * s, 0)
  return _ungroup(q, t.shape, 32)


def q_quest(t, bits):
  """§10 steps 2-4 (after the rotation): value and trust mask."""
  v = np.asarray(t, np.float64)
  alpha, levels = QUEST_ALPHA[bits], 2.0 ** bits - 1
  rms = np.sqrt((v * v).mean(1, keepdims=True))
  s = alpha * rms + 1e-8
  step = 2 * s / levels
  vq = np.round(np.clip(v, -s, s) / step + 0.5) * step - step / 2
  return vq, np.abs(vq - v) <= (alpha / levels) * rms


def q_halo(t, elem, eager=False):
  """§9: per-tensor bf16 scale over a bf16 tensor."""
  v = bf16(t).astype(F32)
  m = 448.0 if elem == "e4m3" else 127.0
  c = bf16(F32(np.abs(v).max()) / F32(m)).astype(F32)
  y = (v / c).astype(F32) if c > 0 else v
  if eager:
    y = bf16(y)
  q = round_fp8(y, "e4m3") if elem == "e4m3" else np.round(y)
  return q * np.float64(c)


# -- the three GEMMs per recipe ----------------------------------------------


def _mm(a, b):  # A·Bᵀ of [other, contraction] layouts
  return np.asarray(a, np.float64) @ np.asarray(b, np.float64).T


def run(name, x, w, dy, noise, **sw):
  """(y, dx, dW) of recipe ``name`` in float64, per the spec section."""
  x, w, dy = (np.asarray(a, F32) for a in (x, w, dy))
  wt, xt, dyt = w.T, x.T, dy.T
  u = {k: (getattr(v, "u", None) if v is not None else None)
       for k, v in noise.items() if k in ("x", "w", "dgrad_dy", "dgrad_w",
                                          "wgrad_x", "wgrad_dy")}
  u = {k: None if v is None else np.asarray(v, np.float64)
       for k, v in u.items()}
  if name == "fp8_tensorwise":  # §2
    qx, qw, qdy = (q_torchao(a, f) for a, f in ((x, "e4m3"), (wt, "e4m3"),
                                                (dy, "e5m2")))
    return _mm(qx, qw), _mm(qdy, qw.T), _mm(qx.T, qdy.T)
  if name == "fp8_rowwise":  # §3
    q = lambda a: q_torchao(a, "e4m3", True, sw.get("pow2", True))  # noqa
    return _mm(q(x), q(wt)), _mm(q(dy), q(w)), _mm(q(xt), q(dyt))
  if name in ("mxfp8", "mxfp4"):  # §4, §5
    elem = "e4m3" if name == "mxfp8" else "e2m1"
    rule = sw.get("scale", "rceil" if name == "mxfp8" else "floor")
    q = lambda a: q_mx(a, elem, rule)  # noqa: E731
    return _mm(q(x), q(wt)), _mm(q(dy), q(w)), _mm(q(xt), q(dyt))
  if name == "nvfp4":  # §6
    sr = sw.get("stochastic_rounding", True)
    rht = sw.get("hadamard", True)
    w2d = sw.get("weight_2d", True)
    qx = q_nvfp4_te(x)
    qw = q_nvfp4_te(wt, tile=w2d)
    qdy = q_nvfp4_te(dy, u["dgrad_dy"] if sr else None)
    qwd = qw.T if w2d else q_nvfp4_te(w)
    rot = (lambda a: block_rotate(a, 16, TE_SIGNS, "pre", "bfloat16")
           ) if rht else (lambda a: a)
    qxt = q_nvfp4_te(rot(xt))
    qdyt = q_nvfp4_te(rot(dyt), u["wgrad_dy"] if sr else None)
    return _mm(qx, qw), _mm(qdy, qwd), _mm(qxt, qdyt)
  if name == "quartet":  # §7
    xr, wr = block_rotate(x, 32), block_rotate(wt, 32)
    (qx, mx), (qw, mw) = q_quartet_fwd(xr), q_quartet_fwd(wr)
    side = "pre" if sw.get("signs") == "random" else "post"  # Q2's fix
    s = noise["signs_dgrad"]
    s = None if s is None else np.asarray(s)
    rot = lambda a: block_rotate(a, 32, s, side)  # noqa: E731
    gx = _mm(q_quartet_bwd(rot(dy), u["dgrad_dy"]),
             q_quartet_bwd(rot(qw.T), u["dgrad_w"]))
    sw_ = noise["signs_wgrad"]
    rot = lambda a: block_rotate(a, 32, sw_, side)  # noqa: E731
    gw = _mm(q_quartet_bwd(rot(qx.T), u["wgrad_x"]),
             q_quartet_bwd(rot(dyt), u["wgrad_dy"]))
    dx = block_rotate(gx * mx, 32, transpose=True)
    dw = block_rotate((gw * mw.T).T, 32, transpose=True).T
    return _mm(qx, qw), dx, dw
  if name == "quartet2":  # §8
    dim = sw.get("hadamard_dim", 128)
    qx, qw = q_nvfp4_q2(x), q_nvfp4_q2(wt)
    sd, swg = (np.asarray(noise[k]) for k in ("signs_dgrad", "signs_wgrad"))
    e = lambda a, k, s: q_eden(block_rotate(a, dim, s, "pre"),  # noqa
                               noise[k].u_scale, dim)
    dx = _mm(e(dy, "dgrad_dy", sd), e(qw.T, "dgrad_w", sd))
    dw = _mm(e(qx.T, "wgrad_x", swg), e(dyt, "wgrad_dy", swg))
    return _mm(qx, qw), dx, dw
  if name.startswith("halo"):  # §9
    level, elem = int(name[4]), "e4m3" if name.endswith("fp8") else "int8"
    eager = sw.get("eager", False)
    q = lambda a: q_halo(a, elem, eager)  # noqa: E731
    n_, k_ = x.shape
    hk, hn = sylvester(k_), sylvester(n_)
    if level == 0:
      qx, qw, qdy = q(x), q(wt), q(dy)
      return _mm(qx, qw), _mm(qdy, qw.T), _mm(qx.T, qdy.T)
    qx, qw = q(x @ hk), q(wt @ hk)  # bf16(x H_K) inside q
    qdy = q(dy)
    y = _mm(qx, qw)
    dw = (_mm(qdy.T, qx.T) @ hk.T).T  # dWt = [Q(dy)ᵀ Q(xH)] H_Kᵀ
    if level == 1:
      dx = (qdy @ qw) @ hk.T
    else:
      a = q(dyt @ hn)  # [M, N]
      tt = qw.T @ a  # [K, N]
      dx = ((tt @ hn.T).T) @ hk.T
    return y, dx, dw
  if name == "quest":  # §10
    bits, dim = sw.get("bits", 4), sw.get("hadamard_dim", 128)
    rot = lambda a: block_rotate(a, dim, dtype="bfloat16")  # noqa: E731
    (qx, mx), (qw, mw) = q_quest(rot(x), bits), q_quest(rot(wt), bits)
    if not sw.get("trust", True):
      mx, mw = np.ones_like(mx), np.ones_like(mw)
    dx = block_rotate((dy @ qw) * mx, dim, dtype="bfloat16", transpose=True)
    dwt = block_rotate((dyt @ qx) * mw, dim, dtype="bfloat16",
                       transpose=True)
    return _mm(qx, qw), dx, dwt.T
  raise KeyError(name)
