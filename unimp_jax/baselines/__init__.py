"""Recommendation baselines (SPEC §4), scored on exactly UniMP's users, targets and protocol.

    ranks = baselines.evaluate('sasrec', dataset, 'by_user', stage='test', seed=0, epochs=50)
    ranking.ranking_metrics(ranks)   # HR@K, NDCG@K, MRR@K (unimp_jax.eval.ranking)

The protocol is UniMP's (unimp_jax.eval.evaluate, with unimp_jax.eval.ranking):

  evaluated users   splits.split_users(dataset, split, stage), in that order
  target            interaction splits.target_position(n, split, stage); history = everything before it
  ranking           full catalogue, the user's earlier items removed (ranking.seen_before), 0-based rank of
                    the target = number of remaining items scored at least as high (ranking.ranks_from_scores)

Training data (`training_sequences`) is what UniMP's own training examples can see, no more:
  by_user           the full sequences of the train users (`splits.split_users(.., 'train')`). Valid and test
                    users are never trained on, not even their histories; every baseline reads a user's
                    history only at scoring time, as UniMP does.
  leave_last_out    every user's interactions before their validation target (the first n-2), for the users
                    UniMP trains on (at least 4 interactions).
"""

from __future__ import annotations

import numpy as np

from unimp_jax.baselines import classic, sasrec
from unimp_jax.data import formats, splits
from unimp_jax.eval import ranking

NAMES = ('popularity', 'cooccurrence', 'sasrec')


def training_interactions(dataset: formats.UnifiedDataset, split: str) -> list[tuple[formats.Interaction, ...]]:
  """Per training user, the interactions (chronological) the baselines are fitted on; see the module docstring."""
  out = []
  for u in splits.split_users(dataset, split, 'train'):
    inters = dataset.user(int(u)).interactions
    out.append(inters[:len(inters) - 2] if split == 'leave_last_out' else inters)
  return out


def training_sequences(dataset: formats.UnifiedDataset, split: str) -> list[np.ndarray]:
  """The item ids (int64) of `training_interactions`."""
  return [np.asarray([i.item for i in inters], np.int64) for inters in training_interactions(dataset, split)]


def stage_users(dataset: formats.UnifiedDataset, split: str, stage: str):
  """(user, target position) of each of the stage's users, in `split_users` order."""
  for u in splits.split_users(dataset, split, stage):
    user = dataset.user(int(u))
    yield user, splits.target_position(len(user.interactions), split, stage, None)


def stage_examples(dataset: formats.UnifiedDataset, split: str, stage: str):
  """(histories, targets, seen) of the stage's users, in `split_users` order: each history is the items
  before the target, `targets` the target item ids, `seen` the items excluded from each user's ranking."""
  histories, targets, seen = [], [], []
  for user, target in stage_users(dataset, split, stage):
    histories.append(np.asarray([i.item for i in user.interactions[:target]], np.int64))
    targets.append(user.interactions[target].item)
    seen.append(ranking.seen_before(user, target))
  return histories, np.asarray(targets, np.int64), seen


def target_kinds(dataset: formats.UnifiedDataset, split: str, stage: str = 'test') -> dict[str, np.ndarray]:
  """{'warm': mask, 'cold': mask} over the stage's users (`stage_examples` order) by whether the target
  is a cold item (`extra.cold_items`: released after the data's cut-off); {} for data without any."""
  cold = formats.cold_mask(dataset)
  if not cold.any():
    return {}
  targets = stage_examples(dataset, split, stage)[1]
  return {'warm': ~cold[targets], 'cold': cold[targets]}


def scores(name: str, train: list[np.ndarray], histories: list[np.ndarray], num_items: int, *, seed: int = 0,
           **options) -> np.ndarray:
  """float [len(histories), num_items]: baseline `name` fitted on `train`, scoring every item per history."""
  if name == 'popularity':
    return classic.popularity_scores(train, histories, num_items, **options)
  if name == 'cooccurrence':
    return classic.cooccurrence_scores(train, histories, num_items, **options)
  if name == 'sasrec':
    return sasrec.sasrec_scores(train, histories, num_items, seed=seed, **options)
  raise ValueError(f'unknown baseline {name!r}; choose from {NAMES}')


def evaluate(name: str, dataset: formats.UnifiedDataset, split: str, stage: str = 'test', seed: int = 0,
             **options) -> np.ndarray:
  """0-based target ranks of the stage's users (in `split_users` order) under baseline `name`, fitted on
  `training_sequences(dataset, split)`. `options` go to the baseline (see classic.py, sasrec.py)."""
  if name not in NAMES:
    raise ValueError(f'unknown baseline {name!r}; choose from {NAMES}')
  train = training_sequences(dataset, split)
  histories, targets, seen = stage_examples(dataset, split, stage)
  item_scores = scores(name, train, histories, len(dataset.items), seed=seed, **options)
  return ranking.ranks_from_scores(item_scores, targets, seen)
