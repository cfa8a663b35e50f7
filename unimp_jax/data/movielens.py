"""Real MovieLens-100K, taken from the PyPI wheel recbole==1.2.1, converted to the unified format.

    python -m unimp_jax.data.movielens --cache ~/.cache/unimp_jax --out data/ml-100k [--seed 0 --image_size 32]

RecBole ships MovieLens-100K as atomic files inside its wheel. We fetch the wheel with pip
(`pip download --no-deps`: an ordinary registry download, nothing installed), read the two files we need
straight out of the zip, and never import recbole. The data's licence (GroupLens) forbids redistribution,
so it lives only in the cache and the output directory, never in this repository.

Steps, each skipped when its result already exists, so a rerun is cheap and an interrupted one resumes:
1. CACHE/recbole-1.2.1-py3-none-any.whl    (pip download; the only step that needs the network)
2. CACHE/ml-100k/ml-100k.{inter,item}      (extracted from the wheel, written under a temporary name first)
3. OUT/                                    (unimp_jax.data.convert with its defaults: 5-core users and
                                            items, seeded item ids, BPE tokenizer; written atomically)
The items have no pictures (all-zero images, has_image false); the image array still has the model's
picture size, because the pipeline checks it against model.vision.image_size.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

from unimp_jax.data import convert
from unimp_jax.data.formats import DatasetError

RECBOLE_REQUIREMENT = 'recbole==1.2.1'
WHEEL_PATTERN = 'recbole-1.2.1-*.whl'
MEMBERS = {'ml-100k.inter': 'recbole/dataset_example/ml-100k/ml-100k.inter',
           'ml-100k.item': 'recbole/dataset_example/ml-100k/ml-100k.item'}
DEFAULT_IMAGE_SIZE = 32          # the default config's model.vision.image_size


def download_command(cache_dir: str) -> list[str]:
  return [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary', ':all:', RECBOLE_REQUIREMENT,
          '-d', cache_dir]


def find_or_download_wheel(cache_dir: str) -> str:
  """The recbole wheel in cache_dir, downloaded with pip first if it is not there."""
  wheels = sorted(glob.glob(os.path.join(cache_dir, WHEEL_PATTERN)))
  if not wheels:
    command = download_command(cache_dir)
    try:
      result = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
      result = subprocess.CompletedProcess(command, returncode=-1, stdout='', stderr=str(e))
    wheels = sorted(glob.glob(os.path.join(cache_dir, WHEEL_PATTERN)))
    if result.returncode != 0 or not wheels:
      detail = (result.stderr or result.stdout or '').strip().splitlines()[-5:]
      raise DatasetError(
          f'could not download MovieLens-100K: `{" ".join(command)}` '
          f'{"exited with " + str(result.returncode) if result.returncode else "left no " + WHEEL_PATTERN}'
          f'{": " + " | ".join(detail) if detail else ""}. Without network access, run that command on a machine '
          f'that has it and copy the wheel into {cache_dir}')
  return wheels[-1]


def extract(wheel: str, dest: str) -> dict[str, str]:
  """Copies ml-100k.inter and ml-100k.item out of the wheel into dest (each atomically); returns their paths."""
  os.makedirs(dest, exist_ok=True)
  paths = {name: os.path.join(dest, name) for name in MEMBERS}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  try:
    with zipfile.ZipFile(wheel) as archive:
      missing = [m for m in MEMBERS.values() if m not in archive.namelist()]
      if missing:
        raise DatasetError(f'{wheel} does not hold {", ".join(missing)}; is it the recbole 1.2.1 wheel?')
      for name, member in MEMBERS.items():
        fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.partial', dir=dest)
        try:
          with os.fdopen(fd, 'wb') as f:
            f.write(archive.read(member))
          os.replace(tmp, paths[name])
        except BaseException:
          os.remove(tmp)
          raise
  except zipfile.BadZipFile as e:
    raise DatasetError(f'{wheel} is not a readable wheel ({e}); delete it and rerun to download it again') from None
  return paths


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def prepare(cache_dir: str, out: str, seed: int = 0, *, image_size: int = DEFAULT_IMAGE_SIZE) -> str:
  """MovieLens-100K as a unified dataset at `out` (returned); nothing is done if out/manifest.json exists.

  `image_size` must equal the model's model.vision.image_size (the pipeline checks); the pictures are blank.
  """
  out = os.path.abspath(out)
  if os.path.exists(os.path.join(out, 'manifest.json')):
    return out
  if os.path.exists(out):
    raise DatasetError(f'{out} exists but holds no manifest.json, so it is not a finished dataset; remove it or '
                       'choose another --out')
  cache_dir = os.path.abspath(cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  wheel = find_or_download_wheel(cache_dir)
  root = os.path.dirname(extract(wheel, os.path.join(cache_dir, 'ml-100k'))['ml-100k.inter'])
  raw = convert.read_movielens(root)
  raw.notes['source'] = {'requirement': RECBOLE_REQUIREMENT, 'wheel': os.path.basename(wheel),
                         'wheel_sha256': _sha256(wheel)}
  convert.build(raw, convert.Options(out=out, name='ml-100k', seed=seed, image_size=image_size), 'movielens')
  return out


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(prog='python -m unimp_jax.data.movielens', description=__doc__.split('\n')[0])
  parser.add_argument('--cache', required=True, help='Holds the recbole wheel and the extracted ml-100k files.')
  parser.add_argument('--out', required=True, help='Directory the unified dataset is written to.')
  parser.add_argument('--seed', type=int, default=0, help='Item-id permutation and user split.')
  parser.add_argument('--image_size', type=int, default=DEFAULT_IMAGE_SIZE,
                      help='Must equal model.vision.image_size of the config that trains on it.')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  existed = os.path.exists(os.path.join(args.out, 'manifest.json'))
  out = prepare(args.cache, args.out, args.seed, image_size=args.image_size)
  with open(os.path.join(out, 'manifest.json')) as f:
    counts = json.load(f)['counts']
  print(f'{out} {"already existed" if existed else "written"} in {time.perf_counter() - start:.1f} s: '
        f'{json.dumps(counts)}')
  return out


if __name__ == '__main__':
  try:
    main()
  except DatasetError as e:
    sys.exit(f'error: {e}')
