"""Semantic item ids: residual k-means codes of item embeddings, made unique by one extra level.

TIGER-style (Rajput et al., 2023) ids let a catalogue of any size share a fixed, small set of tokens:

    level 0      k-means of the item embeddings                     -> code c_0
    level l > 0  k-means of what levels < l leave unexplained       -> code c_l
                 (the residual x - sum of the chosen centroids)
    last level   items with the same (c_0, .., c_{L-1}) are numbered 0, 1, 2, .. in item-id order

so item i is spelt `sid_0_{c_0} sid_1_{c_1} .. sid_L_{c_L}` and no two items share a spelling. Similar
items share prefixes, so what the model learns about one transfers to its neighbours.

The embeddings are either a file the user supplies (`data.semantic.embeddings`: `.npy` or
`.safetensors`, [num_items, D]) or computed from our own towers: the mean of the vision encoder's patch
features of the item's picture, next to the mean of the LM's input embeddings over the item's text
tokens, each half L2-normalised so picture and text weigh the same. They come from the parameters the
run starts from: a pretrained or fine-tuning start gives meaningful ids; a from-scratch run gets the
seeded random initialisation's view of the pictures (a random patch projection still reflects their
colours) and of the text (random token embeddings: a bag of the item's words).

The codes are computed once per run, saved as `WORKDIR/semantic_ids.json`, and reloaded by resumed
runs, evaluation and prediction, so a run's ids never change. The token count per level is fixed by the
config (`codebook` per code level, `max_collisions` for the last), so the model's vocabulary is sized
before any embedding exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from unimp_jax.data import formats, prompts

CODES_FILE = 'semantic_ids.json'
INITS = ('k-means++', 'random')
_ROWS = 8192  # distances are computed this many rows at a time: memory O(rows x codebook)


@dataclasses.dataclass(frozen=True)
class SemanticIds:
  codes: np.ndarray                    # int32 [num_items, levels + 1]: the last level resolves collisions
  codebook_sizes: tuple[int, ...]      # tokens per level (as the config fixes them)
  centroids: tuple[np.ndarray, ...]    # per code level [k, D]: sum of the chosen rows reconstructs x


def codebook_sizes(semantic_cfg) -> tuple[int, ...]:
  """Tokens per level, from the config alone: `codebook` for each k-means level, `max_collisions` last."""
  return (int(semantic_cfg.codebook),) * int(semantic_cfg.levels) + (int(semantic_cfg.max_collisions),)


# ---- k-means ------------------------------------------------------------------------------------------

def squared_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """[N, M] squared distances, |x|^2 - 2 x.c + |c|^2 a block of rows at a time (never an N x M x D array)."""
  out = np.empty((len(x), len(centres)))
  c2 = (centres ** 2).sum(1)
  for start in range(0, len(x), _ROWS):
    rows = x[start:start + _ROWS]
    out[start:start + _ROWS] = np.maximum((rows ** 2).sum(1, keepdims=True) - 2.0 * rows @ centres.T + c2, 0.0)
  return out


def nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(index of each row's nearest centroid, its squared distance); ties go to the lower index."""
  d2 = squared_distances(x, centroids)
  assign = d2.argmin(1)
  return assign, d2[np.arange(len(x)), assign]


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, *, iterations: int = 50,
           init: str = 'k-means++') -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means in float64 -> (centroids [k', D], assignment [N]); k' = min(k, distinct rows).

  A cluster that empties is re-seeded with the row farthest from its centroid (among clusters that keep
  a row), so all k' stay in use.
  Deterministic for the same `rng` state.
  """
  x = np.asarray(x, np.float64)
  distinct = np.unique(x, axis=0)
  k = min(k, len(distinct))
  if init == 'random':
    centroids = distinct[np.sort(rng.choice(len(distinct), k, replace=False))]
  elif init == 'k-means++':
    # Arthur & Vassilvitskii (2007): each new centre is drawn with probability ~ D(x)^2, the squared
    # distance to the nearest centre so far. "Greedy" as in scikit-learn: of 2 + log(k) such draws the
    # one that lowers the total D^2 most is kept, which rarely puts two centres in one cluster.
    trials = 2 + int(np.log(k))
    centroids = np.empty((k, x.shape[1]))
    centroids[0] = x[rng.integers(len(x))]
    dist2 = squared_distances(x, centroids[:1])[:, 0]
    for j in range(1, k):  # k <= distinct rows, so some row is always at a positive distance
      candidates = rng.choice(len(x), trials, p=dist2 / dist2.sum())
      new_dist2 = np.minimum(dist2[:, None], squared_distances(x, x[candidates]))
      best = int(new_dist2.sum(0).argmin())
      centroids[j], dist2 = x[candidates[best]], new_dist2[:, best]
  else:
    raise ValueError(f'k-means init {init!r} is not one of {INITS}')
  assign = None
  for _ in range(iterations):
    new_assign, dist2 = nearest(x, centroids)
    counts = np.bincount(new_assign, minlength=k)
    for empty in np.flatnonzero(counts == 0):  # k <= N: some cluster has a row to spare
      far = int(np.where(counts[new_assign] > 1, dist2, -1.0).argmax())
      counts[new_assign[far]] -= 1
      new_assign[far], dist2[far], counts[empty] = empty, 0.0, 1
      centroids[empty] = x[far]
    if assign is not None and np.array_equal(new_assign, assign):
      break
    assign = new_assign
    order = np.argsort(assign, kind='stable')  # every cluster is non-empty here: sum contiguous runs
    sums = np.add.reduceat(x[order], np.r_[0, np.cumsum(counts)[:-1]], axis=0)
    centroids = sums / counts[:, None]
  return centroids, nearest(x, centroids)[0]


def residual_kmeans(embeddings: np.ndarray, *, levels: int, codebook: int, seed: int, iterations: int = 50,
                    init: str = 'k-means++') -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
  """(codes int32 [N, levels], centroids per level): level l clusters the residual of levels < l."""
  residual = np.asarray(embeddings, np.float64).copy()
  codes, centroids = [], []
  for level in range(levels):
    level_centroids, assign = kmeans(residual, codebook, np.random.default_rng([seed, level]),
                                     iterations=iterations, init=init)
    residual -= level_centroids[assign]
    codes.append(assign)
    centroids.append(level_centroids)
  return np.stack(codes, 1).astype(np.int32), tuple(centroids)


def resolve_collisions(codes: np.ndarray) -> np.ndarray:
  """Appends a level numbering the items of each shared code tuple 0, 1, 2, .. (in item-id order)."""
  _, group = np.unique(codes, axis=0, return_inverse=True)
  group = group.reshape(-1)
  order = np.argsort(group, kind='stable')
  sorted_group = group[order]
  starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
  rank_sorted = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
  extra = np.empty(len(order), np.int32)
  extra[order] = rank_sorted
  return np.concatenate([codes, extra[:, None]], 1).astype(np.int32)


def quantise(embeddings: np.ndarray, semantic_cfg) -> SemanticIds:
  """Residual k-means + the collision level, with the sizes `data.semantic` fixes."""
  sizes = codebook_sizes(semantic_cfg)
  codes, centroids = residual_kmeans(embeddings, levels=semantic_cfg.levels, codebook=semantic_cfg.codebook,
                                     seed=semantic_cfg.seed, iterations=semantic_cfg.iterations,
                                     init=semantic_cfg.init)
  codes = resolve_collisions(codes)
  needed = int(codes[:, -1].max()) + 1
  if needed > sizes[-1]:
    raise ValueError(f'config.data.semantic.max_collisions={sizes[-1]} is too small: {needed} items share one '
                     f'code tuple; raise it, or raise data.semantic.codebook / data.semantic.levels')
  return SemanticIds(codes, sizes, centroids)


# ---- embeddings -------------------------------------------------------------------------------------------

def load_embeddings(path: str, num_items: int) -> np.ndarray:
  """float64 [num_items, D] from a `.npy` (no pickles) or a `.safetensors` file with one tensor."""
  key = 'config.data.semantic.embeddings'
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{key}={path!r}: no such file')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    tensors = load_file(path)
    if len(tensors) != 1:
      raise ValueError(f'{path} ({key}) holds tensors {sorted(tensors)}; expected exactly one [num_items, D]')
    array = next(iter(tensors.values()))
  else:
    try:
      array = np.load(path, allow_pickle=False)
    except ValueError as e:
      raise ValueError(f'{path} ({key}) is not a plain .npy array: {e}') from None
  if array.ndim != 2 or array.shape[0] != num_items:
    raise ValueError(f'{path} ({key}) has shape {list(array.shape)}; the dataset has {num_items} items, so it '
                     f'must be [{num_items}, D] with row i the embedding of item i')
  if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
    raise ValueError(f'{path} ({key}) must hold finite numbers, not {array.dtype} with NaN/inf')
  return array.astype(np.float64)


def tower_embeddings(graphdef, params, dataset: formats.UnifiedDataset, tokenizer, *, use_pictures: bool = True,
                     batch_size: int = 64) -> np.ndarray:
  """float32 [num_items, vision width + LM width]: [mean patch feature | mean text-token embedding].

  `params` is the model state (a pure dict or nnx.State, sharded or not); items without a picture, and
  all items when `use_pictures` is False (a model that never sees pictures must not get them through its
  ids), get a zero picture half.
  """
  text = [tokenizer.encode(prompts.TaskBuilder.item_line(item), add_special_tokens=False) for item in dataset.items]
  width = max(map(len, text))
  tokens = np.full((len(text), width), tokenizer.pad_token_id, np.int32)
  for i, t in enumerate(text):
    tokens[i, :len(t)] = t
  valid = np.arange(width) < np.asarray([len(t) for t in text])[:, None]
  has_image = np.asarray([item.has_image and use_pictures for item in dataset.items])

  leaf_sharding = getattr(jax.tree.leaves(params)[0], 'sharding', None)
  replicated = (jax.sharding.NamedSharding(leaf_sharding.mesh, jax.sharding.PartitionSpec())
                if isinstance(leaf_sharding, jax.sharding.NamedSharding) else None)

  def embed(params, images_bhwc, tokens_bt, valid_bt):
    model = nnx.merge(graphdef, params)
    hidden_bpd, _ = model.vision(images_bhwc)
    picture = hidden_bpd[:, 1:].astype(jnp.float32).mean(1)  # patches only: the class token is not pooled
    words = model.lm.embed_tokens(tokens_bt).astype(jnp.float32)
    text = (words * valid_bt[..., None]).sum(1) / jnp.maximum(valid_bt.sum(1, keepdims=True), 1)
    return picture, text

  embed = jax.jit(embed, out_shardings=replicated)  # replicated: every process reads the whole result

  pictures, texts = [], []
  for start in range(0, len(text), batch_size):
    rows = np.minimum(np.arange(start, start + batch_size), len(text) - 1)  # fixed shape: one compile
    picture, words = embed(params, dataset.images(rows), tokens[rows], valid[rows])
    real = min(batch_size, len(text) - start)
    pictures.append(np.asarray(picture)[:real])
    texts.append(np.asarray(words)[:real])
  picture, words = np.concatenate(pictures) * has_image[:, None], np.concatenate(texts)
  unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  return np.concatenate([unit(picture), unit(words)], 1).astype(np.float32)


# ---- one run's ids: saved once, reloaded ever after -------------------------------------------------------

def save(path: str, ids: SemanticIds, semantic_cfg, source: str) -> None:
  """Writes the codes as JSON atomically (a temporary sibling renamed into place)."""
  record = dict(levels=int(semantic_cfg.levels), codebook=int(semantic_cfg.codebook),
                max_collisions=int(semantic_cfg.max_collisions), seed=int(semantic_cfg.seed),
                init=semantic_cfg.init, iterations=int(semantic_cfg.iterations), source=source,
                num_items=len(ids.codes), codebook_sizes=list(ids.codebook_sizes), codes=ids.codes.tolist())
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(record, f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load(path: str, semantic_cfg, num_items: int) -> SemanticIds:
  """Saved codes; an error if they were made for another catalogue or another token layout."""
  with open(path) as f:
    record = json.load(f)
  sizes = codebook_sizes(semantic_cfg)
  for key, want in (('num_items', num_items), ('codebook_sizes', list(sizes))):
    if record[key] != want:
      name = 'the dataset' if key == 'num_items' else 'config.data.semantic (levels, codebook, max_collisions)'
      raise ValueError(f'{path} was made with {key}={record[key]}, but {name} gives {want}; use the config the '
                       f'ids were made with, or a new workdir')
  codes = np.asarray(record['codes'], np.int32).reshape(num_items, len(sizes))
  return SemanticIds(codes, sizes, ())


def for_run(cfg, dataset: formats.UnifiedDataset, tokenizer, workdir: str | None, params=None,
            graphdef=None) -> SemanticIds:
  """The run's semantic ids: `WORKDIR/semantic_ids.json` if saved (resume, evaluation); else those of the
  run whose parameters it starts from (`checkpoint.init_params_from`), so fine-tuning keeps its ids; else
  computed (from `data.semantic.embeddings`, or from `params`) and saved in WORKDIR."""
  semantic_cfg, num_items = cfg.data.semantic, len(dataset.items)
  sources = [workdir] if workdir else []
  if cfg.checkpoint.init_params_from:
    sources.append(os.path.dirname(os.path.normpath(cfg.checkpoint.init_params_from)))
  for directory in sources:
    path = os.path.join(directory, CODES_FILE)
    if os.path.exists(path):
      ids = load(path, semantic_cfg, num_items)
      if workdir and directory != workdir and jax.process_index() == 0:
        save(os.path.join(workdir, CODES_FILE), ids, semantic_cfg, source=path)
      return ids
  if semantic_cfg.embeddings:
    embeddings, source = load_embeddings(semantic_cfg.embeddings, num_items), semantic_cfg.embeddings
  elif params is not None and graphdef is not None:
    embeddings, source = tower_embeddings(graphdef, params, dataset, tokenizer,
                                          use_pictures=cfg.data.item_content == 'image+text'), 'towers'
  else:
    raise ValueError(f'semantic item ids (config.data.item_ids=semantic): no {CODES_FILE} in '
                     f'{sources or "(no workdir)"}, no config.data.semantic.embeddings file, and no model '
                     'parameters to embed the items with')
  ids = quantise(embeddings, semantic_cfg)
  if jax.process_count() > 1:  # float rounding may differ between hosts: process 0's codes are the codes
    from jax.experimental import multihost_utils
    ids = dataclasses.replace(ids, codes=np.asarray(multihost_utils.broadcast_one_to_all(ids.codes)))
  logging.info('semantic item ids from %s: %d items, codebooks %s, %d share a code prefix', source, num_items,
               ids.codebook_sizes, int((ids.codes[:, -1] > 0).sum()))
  if workdir and jax.process_index() == 0:
    save(os.path.join(workdir, CODES_FILE), ids, semantic_cfg, source=source)
  return ids
