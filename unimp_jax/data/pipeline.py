"""The Grain pipeline: unified dataset -> task examples -> fixed-shape batches -> global arrays.

    users of the split -> seeded shuffle (a new order each epoch) -> this process's share
      -> example(seed, epoch, user): target position, task and selection drawn from a generator seeded
         by exactly those three numbers -> batch -> (worker processes) -> iterator with checkpointable state

Because every example is a pure function of (seed, epoch, user), a restored iterator state reproduces
the same batches, and the union of all processes' examples is the single-process set.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import jax
import jax.experimental.multihost_utils
import numpy as np
from absl import logging

from unimp_jax import config as config_lib, tasks
from unimp_jax.data import captions, formats, prompts, semantic_ids, splits, synthetic
from unimp_jax.data import tokenizer as tokenizer_lib
from unimp_jax.data.tokenizer import TokenIds
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.vq import codes as vq_codes

def gather_images(dataset: formats.UnifiedDataset, image_items: np.ndarray) -> np.ndarray:
  """uint8 [slots, H, W, 3]: the pictures of the slots' items, zeros for empty slots (-1)."""
  size = dataset.image_size
  images = np.zeros((len(image_items), size, size, 3), np.uint8)
  shown = image_items >= 0
  if shown.any():
    images[shown] = dataset.images(image_items[shown])
  return images


@dataclasses.dataclass
class MakeExample:
  """(epoch, user) -> feature dict. Picklable, so Grain worker processes can run it."""
  builder: prompts.TaskBuilder
  seed: int
  split: str
  stage: str
  proportions: dict[str, float]
  weights: dict[str, float]

  def __call__(self, epoch_user: tuple[int, int]) -> dict[str, np.ndarray]:
    epoch, user_index = epoch_user
    rng = np.random.default_rng([self.seed, epoch, user_index])
    if self.builder.dataset.num_users:
      user = self.builder.dataset.user(user_index)
      target = splits.target_position(len(user.interactions), self.split, self.stage, rng)
    else:  # an image–caption corpus: the unit is a picture, shown after a few others
      user = tasks.caption.window(self.builder.dataset, user_index, rng)
      target = len(user.interactions) - 1
    names = [t for t, p in self.proportions.items() if p > 0 and tasks.TASKS[t].available(self.builder, user)]
    p = np.asarray([self.proportions[t] for t in names], np.float64)
    task = names[int(rng.choice(len(names), p=p / p.sum()))]
    ex = self.builder.build(task, user, target, with_answer=self.stage == 'train', rng=rng)
    features = dict(tokens=ex.tokens, answer_mask=ex.answer_mask, image_items=ex.image_items,
                    task=np.int32(ex.task), weight=np.float32(self.weights[task]),
                    prompt_length=np.int32(ex.prompt_length), target=ex.target, user=np.int32(user_index),
                    next_items=ex.next_items)
    if self.builder.uses_images:  # text-only and id-only runs carry no pictures at all
      features['images'] = gather_images(self.builder.dataset, ex.image_items)
    return features


def epoch_units(dataset: formats.UnifiedDataset, data_cfg, stage: str) -> np.ndarray:
  """What one epoch runs over: the split's users; for an image–caption corpus (it has no users) every
  picture, in training only (stage 1 is scored by probing the catalogue's pictures, not held-out captions)."""
  stage1 = data_cfg.tasks.caption > 0
  if stage1 != (dataset.num_users == 0):
    raise ValueError(f'{dataset.path} has {dataset.num_users} users, but config.data.tasks '
                     f'{"trains captions (stage 1)" if stage1 else "has no caption task"}: stage 1 trains the '
                     'caption task alone on an image–caption corpus, stage 2 the other tasks on shoppers')
  if stage1:
    pictures = np.flatnonzero([item.has_image for item in dataset.items])
    return pictures if stage == 'train' else pictures[:0]
  users = splits.split_users(dataset, data_cfg.split, stage)
  return users[:data_cfg.train_users or None] if stage == 'train' else users


def make_dataset(builder: prompts.TaskBuilder, data_cfg, *, seed: int, stage: str = 'train',
                 num_epochs: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """This process's batches (of `batch_size / process_count` examples) as a Grain IterDataset."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if data_cfg.batch_size % process_count:
    raise ValueError(f'config.data.batch_size={data_cfg.batch_size} is not divisible by {process_count} processes')
  users = epoch_units(builder.dataset, data_cfg, stage)
  n = len(users)
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map_with_index(lambda g, i: (g // n, int(users[i])))  # global index -> (epoch, user)
  ds = ds[process_index::process_count]
  ds = ds.map(MakeExample(builder, seed, data_cfg.split, stage, dict(data_cfg.tasks), dict(data_cfg.task_weights)))
  ds = ds.batch(data_cfg.batch_size // process_count, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if data_cfg.workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers))
  return ds


GENERATED = 'data/generated'  # where the embedded datasets are built on first use (git-ignored)


def _check_buildable(key: str, path: str) -> None:
  generated = os.path.abspath(GENERATED)
  if os.path.exists(os.path.join(path, 'manifest.json')) or \
      os.path.commonpath([os.path.abspath(path), generated]) == generated:
    return
  raise config_lib.ConfigError(
      f'config.{key}: no dataset at {path!r} (no manifest.json). The embedded datasets are built on first use '
      f'only under {GENERATED}/; convert real data with python -m unimp_jax.data.convert')


def open_dataset(cfg) -> formats.UnifiedDataset:
  """The dataset at `data.path`. If nothing is there yet and the path is under `data/generated/`, the
  embedded one is built there first: the default catalogue, or for stage 1 (`data.tasks.caption`) the
  embedded caption corpus on the base vocabulary of the catalogue `eval.probe_data` (itself built first
  if missing), so that a stage-1 checkpoint starts stage 2 on the same tokens. Anywhere else a missing
  dataset is an error: a mistyped path must not train on a freshly built synthetic dataset."""
  if not os.path.exists(os.path.join(cfg.data.path, 'manifest.json')):
    _check_buildable('data.path', cfg.data.path)
    if cfg.data.tasks.caption > 0:
      _check_buildable('eval.probe_data', cfg.eval.probe_data)
    if jax.process_index() == 0:
      size = cfg.model.vision.image_size
      if cfg.data.tasks.caption > 0:
        catalogue = cfg.eval.probe_data
        if not os.path.exists(os.path.join(catalogue, 'manifest.json')):
          logging.info('building the embedded default dataset at %s', catalogue)
          synthetic.build(catalogue, seed=cfg.seed, image_size=size)
        logging.info('building the embedded caption corpus at %s', cfg.data.path)
        captions.build(cfg.data.path, seed=cfg.seed, image_size=size, tokenizer=os.path.join(catalogue, 'tokenizer'))
      else:
        logging.info('building the embedded default dataset at %s', cfg.data.path)
        synthetic.build(cfg.data.path, seed=cfg.seed, image_size=size)
    jax.experimental.multihost_utils.sync_global_devices('dataset built')
  return formats.UnifiedDataset(cfg.data.path)


def image_codes(cfg, dataset: formats.UnifiedDataset) -> vq_codes.ImageCodes | None:
  """The catalogue's image codes `data.image_codes` names (checked against the dataset), or None."""
  return vq_codes.load(cfg.data.image_codes, dataset) if cfg.data.image_codes else None


def token_ids(cfg, dataset: formats.UnifiedDataset) -> TokenIds:
  """The run's token layout: the dataset tokenizer's, plus the image-code tokens of `data.image_codes` and
  the semantic id tokens `data.semantic` fixes."""
  layout = dataset.tokenizer().unimp_layout
  if cfg.data.image_codes:
    layout = dict(layout, num_image_codes=image_codes(cfg, dataset).codebook_size)
  if cfg.data.item_ids == 'semantic':
    layout = dict(layout, semantic_codebooks=list(semantic_ids.codebook_sizes(cfg.data.semantic)))
  return TokenIds(layout)


def fit_model_to_dataset(cfg, dataset: formats.UnifiedDataset) -> None:
  """Sets the vocabulary sizes from the dataset's tokenizer and the config's semantic id tokens (item
  counts come from the data, never from a preset) and checks that the stored pictures have the vision
  tower's size. Needs no model parameters, so the model can be built after it."""
  ids = token_ids(cfg, dataset)
  cfg.model.lm.vocab_size = ids.base_vocab_size  # `<image>` is usually the first added token: image_token_id follows
  cfg.model.lm.added_vocab_size = ids.added_vocab_size
  cfg.model.item_tokens = tuple(ids.item_range)
  if cfg.model.image_token_id != ids.image:  # a base tokenizer's own <image> (a real IDEFICS's): a fact of the data
    with cfg.model.unlocked():  # assigning would move the field it refers to (lm.vocab_size): replace it
      del cfg.model['image_token_id']
      cfg.model.image_token_id = ids.image
  if dataset.image_size != cfg.model.vision.image_size:
    raise ValueError(f'{dataset.path} stores {dataset.image_size} px pictures but config.model.vision.image_size '
                     f'is {cfg.model.vision.image_size}; rebuild the dataset or change the config')


def make_builder(cfg, dataset: formats.UnifiedDataset, workdir: str | None = None, params=None,
                 graphdef=None) -> prompts.TaskBuilder:
  """The one place a task builder is made from a config: training, evaluation and prediction.

  Fits `cfg.model.lm` to the dataset (as `fit_model_to_dataset`). With `data.item_ids = 'semantic'` the
  items' codes are WORKDIR's saved ones, or are computed (from `data.semantic.embeddings`, or from the
  model `params`/`graphdef` the run starts from) and saved there; see unimp_jax.data.semantic_ids.
  """
  fit_model_to_dataset(cfg, dataset)
  tokenizer, codes, pictures = dataset.tokenizer(), None, image_codes(cfg, dataset)
  if pictures is not None:  # before any semantic id tokens: the layout puts img_k right after the items
    tokenizer = tokenizer_lib.with_image_code_tokens(tokenizer, pictures.codebook_size)
  if cfg.data.item_ids == 'semantic':
    tokenizer = tokenizer_lib.with_semantic_tokens(tokenizer, semantic_ids.codebook_sizes(cfg.data.semantic))
    codes = semantic_ids.for_run(cfg, dataset, tokenizer, workdir, params, graphdef).codes
  return prompts.TaskBuilder(dataset, tokenizer, seq_len=cfg.data.seq_len, num_images=cfg.data.num_images,
                             history=cfg.data.history, item_codes=codes, item_content=cfg.data.item_content,
                             image_codes=pictures)


def global_batch(local: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
  """Assembles each process's rows into arrays sharded over the mesh's batch axes."""
  return {k: jax.make_array_from_process_local_data(mesh_lib.data_sharding(mesh, rules, v.ndim), v)
          for k, v in local.items()}
