"""The float64 NumPy oracle: dequantize exactly, multiply in float64, DeepGEMM's diff metric."""
import numpy as np

B = 128


def calc_diff(x, y):
  """DeepGEMM's metric ``1 - 2Σxy / Σ(x² + y²)``, in float64 (0 for identical arrays)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  denom = (x * x + y * y).sum()
  return 0.0 if denom == 0 else float(1.0 - 2.0 * (x * y).sum() / denom)


def f64(x):
  return np.asarray(np.asarray(x).astype(np.float32), np.float64)


def deq_token(x, s, axis=-1):
  x, s = f64(x), f64(s)
  n = x.shape[axis]
  return x * np.take(np.repeat(s, B, axis=axis), np.arange(n), axis=axis)


def deq_block(w, s):
  w, s = f64(w), f64(s)
  n, k = w.shape[-2:]
  return w * np.repeat(np.repeat(s, B, axis=-2), B, axis=-1)[..., :n, :k]


def gemm_nt(a, sa, b, sb, bias=None, c=None):
  d = deq_token(a, sa) @ deq_block(b, sb).T
  if bias is not None:
    d = d + f64(bias)
  if c is not None:
    d = d + f64(c)
  return d


def offsets(group_sizes, m):
  """Row ranges of the groups, with the op's clipping rules."""
  ends = np.minimum(np.cumsum(np.maximum(np.asarray(group_sizes, np.int64), 0)), m)
  return np.concatenate([[0], ends[:-1]]), ends


def grouped_contiguous(a, sa, b, sb, group_sizes):
  x, w = deq_token(a, sa), deq_block(b, sb)
  d = np.zeros((x.shape[0], w.shape[1]))
  for g, (s, e) in enumerate(zip(*offsets(group_sizes, x.shape[0]))):
    d[s:e] = x[s:e] @ w[g].T
  return d


def grouped_masked(a, sa, b, sb, masked_m):
  x, w = deq_token(a, sa), deq_block(b, sb)
  d = np.einsum("gmk,gnk->gmn", x, w)
  for g, mm in enumerate(np.asarray(masked_m)):
    d[g, max(int(mm), 0):] = 0
  return d


def k_grouped(a, sa, b, sb, group_sizes, c=None):
  x, y = deq_token(a, sa, axis=0), deq_token(b, sb, axis=0)
  d = np.zeros((len(group_sizes), x.shape[1], y.shape[1]))
  for g, (s, e) in enumerate(zip(*offsets(group_sizes, x.shape[0]))):
    d[g] = x[s:e].T @ y[s:e]
  return d if c is None else d + f64(c)
