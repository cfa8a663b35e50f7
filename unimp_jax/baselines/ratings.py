"""Rating baselines for the preference task, on UniMP's users and targets (unimp_jax.eval.evaluate).

  global mean   the mean training rating, for everyone
  biases        Koren's baseline predictor: mean + b_item + b_user, clipped to [1, 5], where
                  b_item = sum over the item's training ratings of (r - mean) / (count + shrink_item)
                  b_user = sum over the user's earlier ratings of (r - mean - b_item) / (count + shrink_user)
                The user's earlier ratings are the history UniMP's preference prompt is built from (all of
                it, not only the part that fits a prompt). The two shrinkages are chosen on the validation
                users from SHRINKAGES.

Training ratings are those of `unimp_jax.baselines.training_interactions`: all of the train users'
interactions (by_user), or every user's first n-2 (leave_last_out). Users with an unrated interaction
are skipped, as UniMP's evaluation skips them (`unimp_jax.tasks.preference.Preference.available`).
Each baseline predicts one real number: it is scored as the expected rating, and rounded as the argmax.
"""

from __future__ import annotations

import itertools

import numpy as np

from unimp_jax import baselines
from unimp_jax.data import formats
from unimp_jax.eval import metrics as metrics_lib

SHRINKAGES = (0.0, 1.0, 3.0, 10.0, 30.0)


def training_ratings(dataset: formats.UnifiedDataset, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(item ids, ratings) of every rated interaction in `baselines.training_interactions`."""
  rated = [i for inters in baselines.training_interactions(dataset, split) for i in inters if i.rating is not None]
  if not rated:
    raise ValueError(f'{dataset.path}: no rated training interactions for the {split} split')
  return np.asarray([i.item for i in rated], np.int64), np.asarray([i.rating for i in rated], np.float64)


def stage_ratings(dataset: formats.UnifiedDataset, split: str, stage: str):
  """(histories as (items, ratings) pairs, target items, true ratings) of the stage's rated users."""
  histories, items, true = [], [], []
  for user, target in baselines.stage_users(dataset, split, stage):
    if any(i.rating is None for i in user.interactions):
      continue
    earlier = user.interactions[:target]
    histories.append((np.asarray([i.item for i in earlier], np.int64),
                      np.asarray([i.rating for i in earlier], np.float64)))
    items.append(user.interactions[target].item)
    true.append(user.interactions[target].rating)
  return histories, np.asarray(items, np.int64), np.asarray(true, np.int64)


def bias_predictions(train, histories, items, num_items: int, shrink_item: float, shrink_user: float):
  """float [N]: the bias predictor (module docstring) fitted on `train` = (item ids, ratings), for each
  (history items, history ratings) pair and target item."""
  train_items, train_ratings = train
  mean = train_ratings.mean()
  sums = np.bincount(train_items, train_ratings - mean, minlength=num_items)
  b_item = sums / (np.bincount(train_items, minlength=num_items) + shrink_item + 1e-12)
  b_user = np.asarray([(r - mean - b_item[h]).sum() / (len(h) + shrink_user + 1e-12) for h, r in histories])
  return np.clip(mean + b_item[items] + b_user, 1.0, 5.0)


def metrics(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
  """The preference table's columns for a point prediction: rounded as the argmax, as is as the expectation."""
  return metrics_lib.rating_errors(true, argmax=np.clip(np.rint(predicted), 1, 5), expected=predicted)


def predict(dataset: formats.UnifiedDataset, split: str, stage: str = 'test') -> tuple[dict[str, np.ndarray], np.ndarray]:
  """({baseline name: predicted ratings}, true ratings) for the stage's rated users, in `split_users` order."""
  train, num_items = training_ratings(dataset, split), len(dataset.items)
  valid = stage_ratings(dataset, split, 'valid')

  def valid_rmse(shrinks):
    return np.sqrt(np.mean((bias_predictions(train, *valid[:2], num_items, *shrinks) - valid[2]) ** 2))

  shrinks = (min(itertools.product(SHRINKAGES, SHRINKAGES), key=valid_rmse) if len(valid[2])
             else (SHRINKAGES[-1], SHRINKAGES[-1]))
  histories, items, true = stage_ratings(dataset, split, stage)
  return {'global mean': np.full(len(true), train[1].mean()),
          'biases': bias_predictions(train, histories, items, num_items, *shrinks)}, true
