"""The Grain pipeline: unified dataset -> task examples -> fixed-shape batches -> global arrays.

    users of the split -> seeded shuffle (a new order each epoch) -> this process's share
      -> example(seed, epoch, user): target position, task and selection drawn from a generator seeded
         by exactly those three numbers -> batch -> (worker processes) -> iterator with checkpointable state

Because every example is a pure function of (seed, epoch, user), a restored iterator state reproduces
the same batches, and the union of all processes' examples is the single-process set.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from unimp_jax import tasks
from unimp_jax.data import formats, prompts, splits
from unimp_jax.sharding import mesh as mesh_lib

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


def global_batch(local: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
  """Assembles each process's rows into arrays sharded over the mesh's batch axes."""
  return {k: jax.make_array_from_process_local_data(mesh_lib.data_sharding(mesh, rules, v.ndim), v)
          for k, v in local.items()}
