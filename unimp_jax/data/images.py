"""Decoding and resizing item pictures, once, at conversion time."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImage(ValueError):
  """An image file that is missing, truncated or not an image; the message names it."""


def decode(data: bytes, size: int, name: str) -> np.ndarray:
  """Any PIL-readable bytes -> uint8 [size, size, 3]: RGB, centre-cropped to a square, resized (bicubic)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      rgb = image.convert('RGB')
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
