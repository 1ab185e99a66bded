"""Trace-time validation shared by the ops: every message names the op and the operand."""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from jax_deepgemm.quant_kernels import FP8_DTYPE, ceil_div

OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def array(op, name, x):
  """``jnp.asarray(x)`` for an operand; what converts to no array of numbers (None, a string, a
  dict, a ragged list) is a TypeError naming the op and the operand, not JAX's unnamed one
  (for None a ValueError)."""
  if x is None or isinstance(x, (str, bytes)):
    raise TypeError(f"{op}: {name} must be an array of numbers, got {type(x).__name__}")
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{op}: {name} must be an array of numbers, got {type(x).__name__}") from e


def arrays(op, names, *xs):
  """``array`` of each of ``xs``, named by the words of ``names``."""
  return tuple(array(op, name, x) for name, x in zip(names.split(), xs, strict=True))


def dtype(op, name, x, *allowed):
  allowed = [jnp.dtype(a) for a in allowed]
  if jnp.dtype(x.dtype) not in allowed:
    want = " or ".join(str(a) for a in allowed)
    raise TypeError(f"{op}: {name} must be {want}, got {x.dtype}")


def fp8(op, name, x):
  dtype(op, name, x, FP8_DTYPE)


def shape(op, name, x, expected, hint=""):
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(x.shape)}"
                     + (f" ({hint})" if hint else ""))


def ndim(op, name, x, n, layout):
  if x.ndim != n:
    raise ValueError(f"{op}: {name} must be {n}-D {layout}, got shape {tuple(x.shape)}")


def out_dtype(op, d, default=jnp.bfloat16):
  """``out_dtype``, with ``None`` meaning the op's default."""
  try:
    d = jnp.dtype(default if d is None else d)
  except TypeError:
    raise TypeError(f"{op}: out_dtype must be bfloat16 or float32, got {d!r}") from None
  if d not in OUT_DTYPES:
    raise TypeError(f"{op}: out_dtype must be bfloat16 or float32, got {d}")
  return d


def accumulating_out_dtype(op, d):
  """``out_dtype`` of an op given ``c``: float32 (None means it). Any other is a TypeError, as a
  wrong dtype is in every op (the K-grouped op said ValueError, the dense one TypeError)."""
  d = out_dtype(op, d, default=jnp.float32)
  if d != jnp.float32:
    raise TypeError(f"{op}: accumulating into c produces float32, so out_dtype must be float32 "
                    f"or None, got {d}")
  return d


def group_sizes(op, name, g, groups):
  if g.ndim != 1 or g.shape[0] != groups:
    raise ValueError(f"{op}: {name} must have shape ({groups},) (one entry per group), "
                     f"got {tuple(g.shape)}")
  if not jnp.issubdtype(g.dtype, jnp.integer):
    raise TypeError(f"{op}: {name} must be an integer array (int32), got {g.dtype}")


def token_scales(op, name, s, rows, k):
  """1x128 scales of an activation ``[rows, k]``: ``[rows, ceil(k/128)]`` float32."""
  dtype(op, name, s, jnp.float32)
  shape(op, name, s, (rows, ceil_div(k, 128)), "one float32 scale per 1x128 group")


def block_scales(op, name, s, lead, n, k):
  """128x128 scales of a weight ``[*lead, n, k]``: ``[*lead, ceil(n/128), ceil(k/128)]``."""
  dtype(op, name, s, jnp.float32)
  shape(op, name, s, tuple(lead) + (ceil_div(n, 128), ceil_div(k, 128)),
        "one float32 scale per 128x128 block")


def concrete_int(op, name, v):
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
    raise TypeError(f"{op}: {name} must be a Python int (static), got {type(v).__name__}")
  if v < 0:
    raise ValueError(f"{op}: {name} must be >= 0, got {v}")
  return int(v)


def static_bool(op, name, v):
  """A static flag: a Python (or NumPy) bool, never a traced value or a truthy string."""
  if not isinstance(v, (bool, np.bool_)):
    raise TypeError(f"{op}: {name} must be a Python bool (static), got {type(v).__name__}")
  return bool(v)


def static_axis(op, v):
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
    raise TypeError(f"{op}: axis must be a Python int (static), got {type(v).__name__}")
  return int(v)


def sizes_array(op, name, x):
  """``jnp.asarray`` of group sizes, where an empty Python sequence means int32 (not float32).

  A host array of wider integers is clipped to int32's range first: without x64, ``asarray``
  would wrap a size of 2**32 + 3 to 3 (the ops clip sizes to the rows anyway).
  """
  if x is None or isinstance(x, (str, bytes)):
    raise TypeError(f"{op}: {name} must be an integer array, got {type(x).__name__}")
  if isinstance(x, (list, tuple)):
    if len(x) == 0:
      return jnp.zeros((0,), jnp.int32)
    # (asarray made [3, True] [3, 1]; a JAX or 0-d NumPy bool, traced too, likewise)
    if any(isinstance(v, (bool, np.bool_)) or getattr(v, "dtype", None) == np.bool_ for v in x):
      raise TypeError(f"{op}: {name} must be integers, got a bool in {x!r}")
    # Python ints past int32 (2**32 + 3) overflowed in asarray: clipped like a host array.
    if all(isinstance(v, (int, np.integer)) for v in x):
      x = np.asarray([min(max(int(v), -2**63), 2**63 - 1) for v in x], np.int64)
  if isinstance(x, (np.ndarray, np.generic)) and np.issubdtype(x.dtype, np.integer):
    info = np.iinfo(np.int32)
    if np.iinfo(x.dtype).max > info.max:
      x = np.clip(x, info.min, info.max).astype(np.int32)
  return array(op, name, x)
