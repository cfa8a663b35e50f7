"""Every catalogue picture's image codes, in one file next to the image tokenizer that made them.

  WORKDIR/image_codes.safetensors   codes int32 [num_items, h * w] (row-major over the code grid; -1 for an
                                    item without a picture), and in its metadata the codebook size, the
                                    grid and the sha256 of the dataset's pictures

`python -m unimp_jax.vq.train` writes it after training. A UniMP run names it in `data.image_codes`: the
generation task answers with these codes as `img_k` tokens (unimp_jax.tasks.generation). The pictures'
digest ties the file to one dataset: codes made from other pictures are refused by name, never trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import safetensors.numpy

from unimp_jax.data import formats

FILE = 'image_codes.safetensors'


@dataclasses.dataclass(frozen=True)
class ImageCodes:
  codes: np.ndarray  # int32 [num_items, h * w]; -1 where the item has no picture
  codebook_size: int
  grid: tuple[int, int]
  path: str  # the file; the image tokenizer that made it is its folder (`python -m unimp_jax.vq.train`)

  @property
  def length(self) -> int:
    return self.codes.shape[1]


def pictures_digest(dataset: formats.UnifiedDataset) -> str:
  """sha256 over the manifest checksums of the dataset's stored pictures (what the codes depend on)."""
  pictures = {k: v for k, v in dataset.manifest['checksums'].items() if k.startswith('images/')}
  return hashlib.sha256(json.dumps(pictures, sort_keys=True).encode()).hexdigest()


def write(path: str, codes: np.ndarray, dataset: formats.UnifiedDataset, codebook_size: int) -> None:
  """Writes codes [num_items, h, w] (rows of items without a picture are ignored) atomically."""
  num_items, h, w = codes.shape
  has_image = np.array([item.has_image for item in dataset.items])
  if num_items != len(has_image):
    raise ValueError(f'{num_items} code grids for the {len(has_image)} items of {dataset.path}')
  flat = np.where(has_image[:, None], codes.reshape(num_items, h * w), -1).astype(np.int32)
  metadata = {'codebook_size': str(codebook_size), 'grid': json.dumps([h, w]),
              'pictures_sha256': pictures_digest(dataset), 'dataset': dataset.path}
  tmp = path + '.tmp'
  safetensors.numpy.save_file({'codes': flat}, tmp, metadata=metadata)
  os.replace(tmp, path)


def load(path: str, dataset: formats.UnifiedDataset, key: str = 'data.image_codes') -> ImageCodes:
  """The codes at `path`, checked against `dataset`; errors name `path` and the config `key`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.{key}: {path!r} is not a file; `python -m unimp_jax.vq.train` writes '
                            f'WORKDIR/{FILE}')
  with safetensors.safe_open(path, 'numpy') as f:
    metadata = f.metadata() or {}
    codes = f.get_tensor('codes') if 'codes' in f.keys() else None
  missing = {'codebook_size', 'grid', 'pictures_sha256'} - set(metadata)
  if codes is None or missing:
    raise ValueError(f'config.{key}: {path} is not an image-codes file (no "codes" tensor or metadata {missing})')
  if metadata['pictures_sha256'] != pictures_digest(dataset):
    raise ValueError(f'config.{key}: {path} was made from other pictures ({metadata.get("dataset")}) than '
                     f'{dataset.path}; rerun python -m unimp_jax.vq.train on this dataset')
  size, grid = int(metadata['codebook_size']), tuple(json.loads(metadata['grid']))
  has_image = np.array([item.has_image for item in dataset.items])
  if codes.dtype != np.int32 or codes.shape != (len(has_image), grid[0] * grid[1]):
    raise ValueError(f'config.{key}: {path} holds {codes.dtype} codes of shape {codes.shape}, expected int32 '
                     f'[{len(has_image)}, {grid[0] * grid[1]}]')
  valid = codes[has_image]
  if valid.size and (valid.min() < 0 or valid.max() >= size):
    raise ValueError(f'config.{key}: {path} has codes outside the codebook [0, {size})')
  if (codes[~has_image] != -1).any():
    raise ValueError(f'config.{key}: {path} has codes for items without a picture')
  return ImageCodes(codes=codes, codebook_size=size, grid=grid, path=os.path.abspath(path))
