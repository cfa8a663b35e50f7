"""Decoding and resizing item pictures, once, at conversion time."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


# The most pixels a picture may declare. Real product photos have far fewer; a decompression bomb (a
# 164 KB PNG declaring 13,000 x 13,000) would cost gigabytes and tens of seconds per decode. Checked from
# the header, before anything is decoded.
MAX_PIXELS = 40_000_000


class BadImage(ValueError):
  """An image file that is missing, truncated, not an image or too large; the message names it."""


def decode(data: bytes, size: int, name: str) -> np.ndarray:
  """Any PIL-readable bytes -> uint8 [size, size, 3]: RGB, centre-cropped to a square, resized (bicubic)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      w, h = image.size
      if w * h > MAX_PIXELS:
        raise BadImage(f'{name}: declares {w} x {h} = {w * h:,} pixels, more than images.MAX_PIXELS = {MAX_PIXELS:,} '
                       '(a decompression bomb, or a picture to downscale before converting)')
      image.draft('RGB', (size, size))  # JPEG: decode at the smallest scale still >= size (a no-op otherwise)
      image.load()
      rgb = image.convert('RGB')
  except BadImage:
    raise
  except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
    raise BadImage(f'{name}: cannot decode image ({e})') from None
  w, h = rgb.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  square = rgb.crop((left, top, left + side, top + side))
  return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), np.uint8)


def load(path: str, size: int) -> np.ndarray:
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise BadImage(f'{path}: {e.strerror}') from None
  return decode(data, size, path)
