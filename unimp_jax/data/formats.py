"""The one on-disk format every converter writes and the pipeline reads (documented in docs/DATA.md).

    DATASET/
      manifest.json        counts, image size, splits seed, tokenizer, sha256 of every other file
      items.jsonl          one item per line, in item-id order (ids are 0..num_items-1)
      images/              TensorStore zarr3 array [num_items, H, W, 3] uint8, zstd, one item per chunk
      users.array_record   one JSON record per user: chronological interactions (+ selection sets)
      splits.json          by-user 80/10/10 split (user indices), seeded
      tokenizer/           the tokenizer training and export use (see unimp_jax.data.tokenizer)

Every image is decoded and resized once, at conversion, so the pipeline gathers images by item index
without JPEG decoding per sample. Items without a picture (MovieLens) have `has_image = false` and an
all-zero image. Writes are atomic: everything goes to a temporary sibling directory that is renamed
into place only when complete, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts
from array_record.python.array_record_module import ArrayRecordWriter

from unimp_jax.data import tokenizer as tokenizer_lib

FORMAT_VERSION = 1
IMAGE_WRITE_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Item:
  source_id: str                 # the id in the raw data (ASIN, article id, movie id)
  title: str = ''
  brand: str = ''
  category: str = ''
  price: float | None = None
  description: str = ''
  keywords: tuple[str, ...] = ()
  has_image: bool = False


@dataclasses.dataclass(frozen=True)
class Interaction:
  item: int                      # item id (row of items.jsonl / images)
  rating: int | None = None      # 1..5
  review: str = ''
  explanation: str = ''
  timestamp: int = 0
  query: str = ''                # a search query that leads to this item ('' = use the item's keywords)


@dataclasses.dataclass(frozen=True)
class Selection:
  """An image-selection question: pick the positives among the candidates (item ids)."""
  candidates: tuple[int, ...]
  positives: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class User:
  source_id: str
  interactions: tuple[Interaction, ...]   # chronological
  selections: tuple[Selection, ...] = ()


class DatasetError(ValueError):
  """A dataset that cannot be written or read; the message names the file or record."""


def user_to_json(user: User) -> bytes:
  return json.dumps(dataclasses.asdict(user), separators=(',', ':'), sort_keys=True).encode()


def user_from_json(record: bytes) -> User:
  d = json.loads(record)
  return User(source_id=d['source_id'],
              interactions=tuple(Interaction(**i) for i in d['interactions']),
              selections=tuple(Selection(tuple(s['candidates']), tuple(s['positives'])) for s in d['selections']))


def cold_mask(dataset) -> np.ndarray:
  """bool [num_items]: the dataset's cold items (`extra.cold_items`, released after its cut-off and never
  in training; unimp_jax.data.synthetic, `convert --cold_after`); all False for data without any."""
  mask = np.zeros(len(dataset.items), bool)
  mask[dataset.manifest.get('extra', {}).get('cold_items', [])] = True
  return mask


def split_by_user(num_users: int, seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, list[int]]:
  """Seeded by-user split: test users are never seen in training."""
  order = np.random.default_rng(seed).permutation(num_users)
  n_train = int(round(fractions[0] * num_users))
  n_valid = int(round(fractions[1] * num_users))
  return {'train': sorted(order[:n_train].tolist()), 'valid': sorted(order[n_train:n_train + n_valid].tolist()),
          'test': sorted(order[n_train + n_valid:].tolist())}


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _checksums(root: str) -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      full = os.path.join(dirpath, name)
      rel = os.path.relpath(full, root)
      if rel != 'manifest.json':
        out[rel] = _sha256(full)
  return dict(sorted(out.items()))


def _image_spec(path: str, num_items: int, image_size: int) -> dict[str, Any]:
  return {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': path},
          'metadata': {'shape': [num_items, image_size, image_size, 3], 'data_type': 'uint8',
                       'chunk_grid': {'name': 'regular',
                                      'configuration': {'chunk_shape': [1, image_size, image_size, 3]}},
                       'codecs': [{'name': 'bytes'}, {'name': 'zstd', 'configuration': {'level': 3}}]}}


def check_replaceable(path: str, overwrite: bool):
  """A dataset may be written at `path`: nothing is there, or (with `overwrite`) a dataset is. Overwriting
  replaces a dataset, never whatever folder or file the output path happens to name."""
  if not os.path.exists(path):
    return
  if not overwrite:
    raise DatasetError(f'{path} already exists; pass overwrite=True (--overwrite) to replace it')
  if not os.path.isfile(os.path.join(path, 'manifest.json')):
    raise DatasetError(f'{path} is not a dataset (no manifest.json), so overwrite will not delete it; '
                       'remove it yourself or write somewhere else')


def remove_abandoned_partials(path: str) -> None:
  """Removes the hidden `.NAME.partial-PID-*` folders that writers of `path` left when they were killed
  (SIGKILL, a power cut: no cleanup runs) and whose process no longer exists. A live writer's is kept."""
  parent, prefix = os.path.dirname(path), f'.{os.path.basename(path)}.partial-'
  for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
    pid = entry[len(prefix):].split('-', 1)[0]
    if entry.startswith(prefix) and pid.isdigit() and not _process_exists(int(pid)):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
      print(f'removed {os.path.join(parent, entry)}, left by an interrupted write (process {pid})')


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # signal 0: only asks whether the process exists
  except ProcessLookupError:
    return False
  except PermissionError:  # it exists, as another user's
    return True
  return True


def write_dataset(path: str, *, name: str, items: Sequence[Item], images: Iterable[np.ndarray | None],
                  users: Sequence[User], image_size: int, split_seed: int, tokenizer=None,
                  extra: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Writes a complete dataset at `path` atomically; returns the manifest.

  `images` yields one [image_size, image_size, 3] uint8 array (or None: no picture) per item, in item
  order, so converters can stream them. `tokenizer` is a `transformers.PreTrainedTokenizerFast`.
  """
  path = os.path.abspath(path)
  check_replaceable(path, overwrite)
  for i, user in enumerate(users):
    for j, inter in enumerate(user.interactions):
      if not 0 <= inter.item < len(items):
        raise DatasetError(f'user {user.source_id} (#{i}) interaction {j}: item {inter.item} is not in the '
                           f'{len(items)} items')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  remove_abandoned_partials(path)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.partial-{os.getpid()}-', dir=parent)
  try:
    with open(os.path.join(tmp, 'items.jsonl'), 'w') as f:
      for item in items:
        f.write(json.dumps(dataclasses.asdict(item), sort_keys=True) + '\n')

    store = ts.open(_image_spec(os.path.join(tmp, 'images'), len(items), image_size), create=True).result()
    has_image = _write_images(store, images, len(items), image_size)
    if has_image != [item.has_image for item in items]:
      bad = next(i for i, (a, b) in enumerate(zip(has_image, (it.has_image for it in items))) if a != b)
      raise DatasetError(f'item {bad} ({items[bad].source_id}): has_image={items[bad].has_image} but the '
                         f'image stream {"gave" if has_image[bad] else "did not give"} a picture')

    writer = ArrayRecordWriter(os.path.join(tmp, 'users.array_record'), 'group_size:1')
    for user in users:
      writer.write(user_to_json(user))
    writer.close()

    with open(os.path.join(tmp, 'splits.json'), 'w') as f:
      json.dump({'seed': split_seed, 'by_user': split_by_user(len(users), split_seed)}, f)
    if tokenizer is not None:
      tokenizer_lib.save(tokenizer, os.path.join(tmp, 'tokenizer'))

    manifest = {
        'format_version': FORMAT_VERSION, 'name': name,
        'counts': {'items': len(items), 'items_with_image': int(sum(has_image)), 'users': len(users),
                   'interactions': int(sum(len(u.interactions) for u in users))},
        'image_size': image_size, 'split_seed': split_seed,
        'tokenizer': 'tokenizer' if tokenizer is not None else None,
        'extra': extra or {}, 'checksums': _checksums(tmp)}
    with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.rename(tmp, path)
    return manifest
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_images(store, images: Iterable[np.ndarray | None], num_items: int, size: int) -> list[bool]:
  has_image, batch, start = [], [], 0
  blank = np.zeros((size, size, 3), np.uint8)
  for i, image in enumerate(images):
    if i >= num_items:
      raise DatasetError(f'the image stream yields more than {num_items} images')
    if image is not None and (image.shape != (size, size, 3) or image.dtype != np.uint8):
      raise DatasetError(f'item {i}: image is {image.dtype}{list(image.shape)}, expected uint8[{size}, {size}, 3]')
    has_image.append(image is not None)
    batch.append(blank if image is None else image)
    if len(batch) == IMAGE_WRITE_BATCH:
      store[start:start + len(batch)].write(np.stack(batch)).result()
      start, batch = start + len(batch), []
  if batch:
    store[start:start + len(batch)].write(np.stack(batch)).result()
  if len(has_image) != num_items:
    raise DatasetError(f'the image stream yields {len(has_image)} images for {num_items} items')
  return has_image


class UnifiedDataset:
  """Read access: items, users by index, images gathered by item index."""

  def __init__(self, path: str, verify: bool = False):
    self.path = os.path.abspath(path)
    manifest_path = os.path.join(self.path, 'manifest.json')
    if not os.path.exists(manifest_path):
      raise DatasetError(f'{manifest_path} not found: not a unified dataset (or an unfinished write)')
    with open(manifest_path) as f:
      self.manifest = json.load(f)
    if self.manifest.get('format_version') != FORMAT_VERSION:
      raise DatasetError(f'{manifest_path}: format_version {self.manifest.get("format_version")}, '
                         f'this code reads {FORMAT_VERSION}')
    if verify:
      self.verify()
    with open(os.path.join(self.path, 'items.jsonl')) as f:
      self.items = [Item(**{**d, 'keywords': tuple(d['keywords'])}) for d in map(json.loads, f)]
    with open(os.path.join(self.path, 'splits.json')) as f:
      self.splits = json.load(f)['by_user']
    self.image_size = self.manifest['image_size']
    self._images = None
    self._users = None

  def __getstate__(self):  # open file handles stay behind; a worker process reopens them
    return {**self.__dict__, '_images': None, '_users': None}

  def verify(self) -> None:
    """Recomputes every checksum; raises naming the first file that differs or is missing/extra."""
    actual = _checksums(self.path)
    expected = self.manifest['checksums']
    for rel in sorted(set(actual) | set(expected)):
      if actual.get(rel) != expected.get(rel):
        state = 'missing' if rel not in actual else 'unexpected' if rel not in expected else 'modified'
        raise DatasetError(f'{os.path.join(self.path, rel)}: {state} (manifest checksum mismatch)')

  @property
  def num_users(self) -> int:
    return self.manifest['counts']['users']

  def user(self, index: int) -> User:
    if self._users is None:  # opened lazily: data-source handles are not shared across processes
      import grain
      self._users = grain.sources.ArrayRecordDataSource(os.path.join(self.path, 'users.array_record'))
    return user_from_json(self._users[index])

  def images(self, item_ids) -> np.ndarray:
    """uint8 [len(item_ids), H, W, 3]."""
    if self._images is None:
      self._images = ts.open({'driver': 'zarr3', 'kvstore': {'driver': 'file',
                                                               'path': os.path.join(self.path, 'images')}},
                             read=True).result()
    return np.asarray(self._images[np.asarray(item_ids, np.int64)].read().result())

  def tokenizer(self):
    if not self.manifest.get('tokenizer'):
      raise DatasetError(f'{self.path} has no tokenizer')
    return tokenizer_lib.load(os.path.join(self.path, self.manifest['tokenizer']))
