"""Ranking metrics for recommendation and search: HR@K, NDCG@K and MRR@K from the target's rank.

Every ranker in this codebase (UniMP, the baselines) is scored the same way: the items the user
interacted with before the target are removed from the ranking (the usual full-sort protocol; the
synthetic shoppers never buy an item twice), and the target's 0-based rank among the rest is counted.
"""

from __future__ import annotations

import numpy as np

KS = (1, 3, 5, 10, 20)


def ranking_metrics(ranks: np.ndarray, ks=KS) -> dict[str, float]:
  """ranks: 0-based rank of each example's target. One relevant item, so NDCG@K = 1/log2(rank+2)."""
  ranks = np.asarray(ranks)
  out = {}
  for k in ks:
    hit = ranks < k
    out[f'HR@{k}'] = float(hit.mean())
    out[f'NDCG@{k}'] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out[f'MRR@{k}'] = float(np.where(hit, 1.0 / (ranks + 1.0), 0.0).mean())
  return out


def seen_before(user, target: int) -> np.ndarray:
  """Item ids the user interacted with before interaction `target` (excluded from the ranking)."""
  return np.asarray([i.item for i in user.interactions[:target]], np.int64)


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray, seen: list[np.ndarray] | None = None) -> np.ndarray:
  """0-based rank of each row's target among its items, after removing that row's `seen` items (the
  target itself is never removed). Ties count against the target: rank = #other items scored at least as
  high, so a ranker that scores many items alike (popularity's zero counts) gains nothing from the tie.
  A NaN score ranks below every number (a NaN target is ranked last, never a hit), and removed items
  are left out by mask, so they never count against a target, whatever its score."""
  scores = np.asarray(scores, np.float64)
  scores = np.where(np.isnan(scores), -np.inf, scores)
  rows = np.arange(len(scores))
  removed = np.zeros(scores.shape, bool)
  if seen is not None:
    for r, items in enumerate(seen):
      items = np.asarray(items, np.int64)
      removed[r, items[items != targets[r]]] = True
  return ((scores >= scores[rows, targets][:, None]) & ~removed).sum(1) - 1


def top_items(scores: np.ndarray, seen: list[np.ndarray], k: int) -> np.ndarray:
  """int [rows, k]: each row's k best items (best first, ties by item id) after removing its `seen` items;
  -1 where fewer remain."""
  scores = np.array(scores, np.float64)
  for r, items in enumerate(seen):
    scores[r, np.asarray(items, np.int64)] = -np.inf
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return np.where(np.isfinite(np.take_along_axis(scores, order, axis=1)), order, -1)
