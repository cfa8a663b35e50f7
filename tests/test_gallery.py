"""The gallery PNG shows the history pictures, the recommendations and the target; the HTML names every item."""

import os

import numpy as np
import pytest
from PIL import Image

from unimp_jax.data import formats
from unimp_jax.eval import gallery

SIZE = 16
COLOURS = [(201, 37, 113), (30, 90, 200), (240, 160, 20), (120, 60, 10), (90, 20, 160)]   # items 0-4
TITLES = ['Red Dress', 'Blue Jeans', 'Orange Scarf', 'Brown Boots', 'Purple Hat', 'Pictureless Movie (1995)']


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('gallery') / 'data')
  items = [formats.Item(source_id=str(i), title=t, has_image=i < len(COLOURS)) for i, t in enumerate(TITLES)]
  images = [np.broadcast_to(np.asarray(c, np.uint8), (SIZE, SIZE, 3)).copy() for c in COLOURS] + [None]
  users = [formats.User('u', (formats.Interaction(item=0), formats.Interaction(item=1)))]
  formats.write_dataset(path, name='gallery-test', items=items, images=images, users=users, image_size=SIZE,
                        split_seed=0)
  return formats.UnifiedDataset(path)


ROWS = [{'title': 'user A', 'history': [0, 1], 'recommended': [(2, 0.9), (5, 0.5), (3, 0.1)], 'target': 2},
        {'title': 'user B', 'history': [4], 'recommended': [(1, 0.8)], 'target': None}]


def _count(pixels: np.ndarray, rgb) -> int:
  return int((np.abs(pixels.astype(int) - rgb).max(-1) <= 2).sum())


def test_gallery_png_and_html(dataset, tmp_path):
  png = str(tmp_path / 'out' / 'gallery.png')
  html_path = gallery.write_gallery(png, ROWS, dataset)
  assert html_path == str(tmp_path / 'out' / 'gallery.html')
  assert sorted(os.listdir(tmp_path / 'out')) == ['gallery.html', 'gallery.png']   # no temporary files left
  umask = os.umask(0)
  os.umask(umask)
  for name in ('gallery.html', 'gallery.png'):  # as readable as any file the user writes, not owner-only
    assert os.stat(tmp_path / 'out' / name).st_mode & 0o777 == 0o666 & ~umask

  with Image.open(png) as im:
    pixels = np.asarray(im.convert('RGB'))
  height, width = pixels.shape[:2]
  # By hand: 2 history + 3 recommended columns of 1.2 + 0.1 in, a 0.4 in separator and 0.2 in margins;
  # a 0.35 in header, then 2 rows of 0.3 title + 1.2 picture + 0.35 caption.
  assert width / height == pytest.approx((0.4 + 5 * 1.3 + 0.4) / (0.4 + 0.35 + 2 * 1.85), rel=0.01)
  assert (width, height) == (730, 445)

  split = int(width * (0.2 + 2 * 1.3 + 0.2) / 7.3)
  cell = (1.2 * gallery.DPI) ** 2
  # Each history picture is drawn whole on the left (item 1 is also recommended on the right).
  for item in (0, 1, 4):
    assert _count(pixels[:, :split], COLOURS[item]) > 0.8 * cell, item
  assert _count(pixels[:, split:], COLOURS[2]) > 0.8 * cell
  assert _count(pixels[:, :split], COLOURS[2]) == 0                     # recommended only
  assert _count(pixels, (0x00, 0xb0, 0x00)) > 100                       # the target is outlined in green
  assert _count(pixels[:, split:], (0xbd, 0xbd, 0xbd)) > 0.5 * cell     # item 5 has no picture: a grey box

  with open(html_path) as f:
    page = f.read()
  assert 'src="gallery.png"' in page
  for title in TITLES[:4] + ['Purple Hat', 'Pictureless Movie (1995)']:
    assert title in page
  assert '(no picture)' in page and 'target' in page


def test_no_green_outline_when_the_target_is_missed(dataset, tmp_path):
  rows = [{**ROWS[0], 'target': 4}]
  gallery.write_gallery(str(tmp_path / 'g.png'), rows, dataset)
  with Image.open(tmp_path / 'g.png') as im:
    pixels = np.asarray(im.convert('RGB'))
  assert _count(pixels, (0x00, 0xb0, 0x00)) == 0
  with open(tmp_path / 'g.html') as f:
    assert 'not recommended' in f.read()


def test_bad_rows_are_named(dataset, tmp_path):
  with pytest.raises(ValueError, match='no rows'):
    gallery.write_gallery(str(tmp_path / 'g.png'), [], dataset)
  with pytest.raises(ValueError, match=r"row 0 \('user A'\): item id\(s\) \[9\]"):
    gallery.write_gallery(str(tmp_path / 'g.png'), [{**ROWS[0], 'history': [9]}], dataset)
  assert not os.path.exists(tmp_path / 'g.png')
