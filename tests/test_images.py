"""Picture decoding (unimp_jax/data/images.py): what it returns, and what it refuses before decoding."""

import io

import numpy as np
import pytest
from PIL import Image

from unimp_jax.data import images


def _encoded(picture: Image.Image, fmt: str) -> bytes:
  out = io.BytesIO()
  picture.save(out, format=fmt)
  return out.getvalue()


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
def test_a_picture_is_centre_cropped_and_resized(fmt):
  left, right = np.zeros((60, 40, 3), np.uint8), np.zeros((60, 40, 3), np.uint8)
  left[..., 0], right[..., 2] = 250, 250  # red | blue, 80 x 60: the centre square is half of each
  picture = Image.fromarray(np.concatenate([left, right], axis=1))
  out = images.decode(_encoded(picture, fmt), 16, 'p')
  expected = np.asarray(picture.crop((10, 0, 70, 60)).resize((16, 16), Image.Resampling.BICUBIC))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_allclose(out[:, :6].mean((0, 1)), expected[:, :6].mean((0, 1)), atol=8 if fmt == 'JPEG' else 0)
  np.testing.assert_allclose(out[:, 10:].mean((0, 1)), expected[:, 10:].mean((0, 1)), atol=8 if fmt == 'JPEG' else 0)


def test_a_picture_declaring_too_many_pixels_is_refused_before_decoding(monkeypatch):
  """A valid PNG above the limit (the limit lowered so the test stays small); PIL alone would decode it."""
  monkeypatch.setattr(images, 'MAX_PIXELS', 100 * 100)
  bomb = _encoded(Image.new('RGB', (101, 100)), 'PNG')
  with pytest.raises(images.BadImage, match=r'^bomb.png: declares 101 x 100 = 10,100 pixels'):
    images.decode(bomb, 16, 'bomb.png')
  assert images.decode(_encoded(Image.new('RGB', (100, 100)), 'PNG'), 16, 'ok.png').shape == (16, 16, 3)
