"""Which users train and which are held out, and which interaction of a user is the answer.

Two splits (config `data.split`): `by_user`, the dataset's own train/valid/test users (held-out users
are never trained on); `leave_last_out`, every user in every stage, the last interaction kept for test
and the one before it for validation.
"""

from __future__ import annotations

import numpy as np

from unimp_jax.data import formats

SPLITS = ('by_user', 'leave_last_out')
STAGES = ('train', 'valid', 'test')


def split_users(dataset: formats.UnifiedDataset, split: str, stage: str) -> np.ndarray:
  """Indices of the users an epoch runs over (users too short to have a target are left out)."""
  if split not in SPLITS or stage not in STAGES:
    raise ValueError(f'config.data.split={split!r} / stage={stage!r}: choose from {SPLITS} x {STAGES}')
  users = dataset.splits[stage] if split == 'by_user' else range(dataset.num_users)
  min_len = 4 if split == 'leave_last_out' else 2  # leave-last-out keeps 2 targets back + 1 history + 1 train
  return np.asarray([u for u in users if len(dataset.user(u).interactions) >= min_len], np.int64)


def target_position(num: int, split: str, stage: str, rng: np.random.Generator) -> int:
  """Which interaction is the answer. Training draws a fresh one per epoch; evaluation is fixed."""
  if stage == 'train':
    return int(rng.integers(1, num - 2 if split == 'leave_last_out' else num))
  return num - 2 if (split == 'leave_last_out' and stage == 'valid') else num - 1
