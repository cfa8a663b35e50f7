"""Hugging Face checkpoint directories: safetensors in (single or sharded), safetensors out; pickles refused.

`Checkpoint` maps tensor names to `LazyTensor`s: shapes come from the file headers, and a tensor's bytes
are read only when `np.asarray` asks for them, so a loader can check a whole mapping first and then hold
one tensor at a time. `write_sharded` writes shards as tensors arrive and the index last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
PICKLED = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read safely; the message names the file."""


class LazyTensor:
  """One tensor of a safetensors file: `shape` and `dtype` from the header; `np.asarray` reads it (the file
  is mapped only while it reads, so the pages read do not stay in this process's memory)."""

  def __init__(self, path: str, name: str, shape, dtype: str):
    self.path, self.name, self.shape, self.dtype = path, name, tuple(shape), dtype

  def __array__(self, dtype=None, copy=None):
    with safe_open(self.path, framework='numpy') as f:
      array = f.get_tensor(self.name)
    return array if dtype is None else array.astype(dtype)


class Checkpoint(Mapping):
  """The tensors of an HF checkpoint directory (`model.safetensors`, or shards named by
  `model.safetensors.index.json`). Pickled weights (`pytorch_model.bin`, ...) are refused, never loaded."""

  def __init__(self, directory: str):
    self.directory = directory
    if not os.path.isdir(directory):
      raise FileNotFoundError(f'{directory}: no such checkpoint directory')
    index, single = os.path.join(directory, INDEX), os.path.join(directory, WEIGHTS)
    if os.path.exists(index):
      with open(index) as f:
        try:
          weight_map = json.load(f)['weight_map']
        except (json.JSONDecodeError, KeyError) as e:
          raise CheckpointError(f'{index} is not a safetensors index (needs a "weight_map"): {e}') from None
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      weight_map, files = None, [WEIGHTS]
    else:
      pickled = sorted(n for n in os.listdir(directory) if n.endswith(PICKLED))
      if pickled:
        raise CheckpointError(f'{os.path.join(directory, pickled[0])} is a pickle, which can run arbitrary code '
                              'and is never loaded here; convert it to safetensors first (in transformers: '
                              '`model.save_pretrained(out, safe_serialization=True)`)')
      raise FileNotFoundError(f'{directory} has neither {WEIGHTS} nor {INDEX}')
    self._tensors: dict[str, LazyTensor] = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise CheckpointError(f'{index} names {name}, which is not in {directory}')
      with safe_open(path, framework='numpy') as handle:
        for key in handle.keys():
          if weight_map is not None and weight_map.get(key) != name:
            raise CheckpointError(f'{path} holds {key!r}, which {INDEX} places in {weight_map.get(key)}')
          info = handle.get_slice(key)
          self._tensors[key] = LazyTensor(path, key, info.get_shape(), info.get_dtype())
    if weight_map is not None and (absent := sorted(set(weight_map) - set(self._tensors))):
      raise CheckpointError(f'{INDEX} lists {absent[0]!r} in {weight_map[absent[0]]}, which does not hold it')

  def __getitem__(self, name: str) -> LazyTensor:
    return self._tensors[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)


def read_json(directory: str, name: str = 'config.json') -> dict:
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{directory} has no {name}: is it a Hugging Face model directory?')
  with open(path) as f:
    return json.load(f)


def write_sharded(directory: str, tensors: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int) -> int:
  """Writes `model-0000k-of-0000N.safetensors` shards of at most `max_shard_bytes` (a bigger tensor gets a
  shard of its own) and `model.safetensors.index.json`, holding one shard in memory. Returns the shard count."""
  shards, current, size, total, written = [], {}, 0, 0, set()

  def flush():
    nonlocal current, size
    if current:
      path = os.path.join(directory, f'shard-{len(shards):05d}.tmp')
      save_file(current, path, metadata={'format': 'pt'})
      shards.append((path, list(current)))
      current, size = {}, 0

  for name, array in tensors:
    if name in written:
      raise ValueError(f'tensor {name!r} written twice')
    written.add(name)
    if size and size + array.nbytes > max_shard_bytes:
      flush()
    current[name] = array
    size += array.nbytes
    total += array.nbytes
  flush()
  weight_map = {}
  for k, (path, names) in enumerate(shards):
    final = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
    os.replace(path, os.path.join(directory, final))
    weight_map.update(dict.fromkeys(names, final))
  with open(os.path.join(directory, INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_map.items()))}, f, indent=2)
  return len(shards)
