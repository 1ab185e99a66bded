"""A tiny PNG line-plot writer (zlib + struct), so the training job needs no plotting library."""
from __future__ import annotations

import struct
import zlib

import numpy as np

# 3x5 digit glyphs for axis labels.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
}


def _text(img, x, y, s, color, scale=2):
  for ch in s:
    g = _GLYPHS.get(ch)
    if g is not None:
      for i, bit in enumerate(g):
        if bit == "1":
          r, c = divmod(i, 3)
          img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
    x += 4 * scale


def _line(img, x0, y0, x1, y1, color):
  n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
  xs = np.linspace(x0, x1, n).round().astype(int)
  ys = np.linspace(y0, y1, n).round().astype(int)
  for dx in (0, 1):
    for dy in (0, 1):
      img[np.clip(ys + dy, 0, img.shape[0] - 1), np.clip(xs + dx, 0, img.shape[1] - 1)] = color


def plot_curves(path, curves, width=800, height=480):
  """Writes ``curves`` ({name: [(step, value)]}) as line plots in one PNG; returns the colors."""
  colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
  img = np.full((height, width, 3), 255, np.uint8)
  left, right, top, bottom = 70, 20, 20, 40
  pts = [p for c in curves.values() for p in c]
  if pts:
    xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    x_lo, x_hi = xs.min(), max(xs.max(), xs.min() + 1)
    y_lo, y_hi = ys.min(), max(ys.max(), ys.min() + 1e-6)
    sx = lambda x: left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
    sy = lambda y: height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)
    img[top:height - bottom, left] = 0
    img[height - bottom, left:width - right] = 0
    for frac in (0.0, 0.5, 1.0):
      y = y_lo + frac * (y_hi - y_lo)
      _text(img, 4, int(sy(y)) - 5, f"{y:.2f}", (0, 0, 0))
      x = x_lo + frac * (x_hi - x_lo)
      _text(img, int(sx(x)) - 10, height - bottom + 8, f"{int(x)}", (0, 0, 0))
    for color, c in zip(colors, curves.values()):
      for (xa, ya), (xb, yb) in zip(c[:-1], c[1:]):
        _line(img, sx(xa), sy(ya), sx(xb), sy(yb), color)
  raw = b"".join(b"\x00" + img[r].tobytes() for r in range(height))
  chunk = lambda tag, data: (struct.pack(">I", len(data)) + tag + data
                             + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
  return dict(zip(curves, colors))
