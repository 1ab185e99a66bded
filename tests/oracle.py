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


def abs_terms(fn, a, sa, b, sb, *args):
  """``fn`` (an oracle GEMM) on |a| and |b|: Σ_k |a·sa| |b·sb| for every output, the scale of
  its accumulation error (the scales are positive)."""
  return fn(np.abs(f64(a)), sa, np.abs(f64(b)), sb, *args)


def gemm_nt_abs(a, sa, b, sb):
  return abs_terms(gemm_nt, a, sa, b, sb)


def assert_elementwise(got, want, mag, out_dtype):
  """Each element of ``got`` within its own rounding (bf16: 2^-8 relative, f32: 2^-20) plus
  2^-10 of its Σ|terms| (FP8 tensor cores accumulate a 128-deep block to ~14 bits before the
  FP32 promotion). Loose next to ``calc_diff``, but per element: a wrong row, column, scale
  block or tile, which a global metric averages away over a large output, fails here."""
  got = f64(got)
  rel = 2.0 ** -8 if np.dtype(out_dtype).itemsize == 2 else 2.0 ** -20
  bad = np.abs(got - want) > rel * np.abs(want) + 2.0 ** -10 * mag + 1e-30
  if bad.any():
    idx = tuple(int(i[0]) for i in np.nonzero(bad))
    raise AssertionError(f"{int(bad.sum())} of {bad.size} elements off, first at {idx}: got "
                         f"{got[idx]:.6g}, float64 {want[idx]:.6g}, sum|terms| {mag[idx]:.6g}")


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
