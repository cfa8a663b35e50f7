"""Count-based baselines: most-popular items, and item-to-item co-occurrence (ItemKNN with cosine).

Both score the whole catalogue from counts over the training sequences (see
`unimp_jax.baselines.training_sequences`); neither has parameters to learn or randomness, so the seed
does not matter. The item-item matrix is dense [num_items, num_items]: fine for catalogues up to a few
tens of thousands of items, which is also where the dense [users, items] score protocol stops.
"""

from __future__ import annotations

import numpy as np


def item_counts(train: list[np.ndarray], num_items: int) -> np.ndarray:
  """float [num_items]: how often each item occurs in the training sequences."""
  counts = np.zeros(num_items, np.float64)
  for seq in train:
    np.add.at(counts, seq, 1.0)
  return counts


def popularity_scores(train: list[np.ndarray], histories: list[np.ndarray], num_items: int) -> np.ndarray:
  """Every user gets the same scores: the items' interaction counts in the training data. Items never
  bought in training tie at 0 (the protocol counts ties against the target: no gain from them)."""
  return np.broadcast_to(item_counts(train, num_items), (len(histories), num_items)).copy()


def cooccurrence(train: list[np.ndarray], num_items: int, window: int | None) -> np.ndarray:
  """float [num_items, num_items], symmetric, zero diagonal: C[a, b] = number of times a and b occur in
  one training sequence at most `window` positions apart (None: anywhere in the same sequence)."""
  counts = np.zeros((num_items, num_items), np.float64)
  for seq in train:
    for distance in range(1, len(seq) if window is None else min(window + 1, len(seq))):
      a, b = seq[:-distance], seq[distance:]
      np.add.at(counts, (a, b), 1.0)
      np.add.at(counts, (b, a), 1.0)
  np.fill_diagonal(counts, 0.0)  # an item repeated in a sequence says nothing about other items
  return counts


def item_similarity(train: list[np.ndarray], num_items: int, window: int | None) -> np.ndarray:
  """Cosine-normalised co-occurrence, S[a, b] = C[a, b] / sqrt(n_a * n_b) with n the item counts, so a
  best-seller is not similar to everything merely by being everywhere. Unseen items have S = 0."""
  n = np.sqrt(item_counts(train, num_items))
  return cooccurrence(train, num_items, window) / np.maximum(np.outer(n, n), 1e-12)


def cooccurrence_scores(train: list[np.ndarray], histories: list[np.ndarray], num_items: int, *,
                        window: int | None = None, recent: int | None = None) -> np.ndarray:
  """score(user, i) = sum of S[h, i] over the user's `recent` most recent history items h (None: all of
  them), equally weighted, plus popularity * 1e-9 as a tie-break, so items that no history item co-occurs
  with are ordered by popularity instead of all tying at 0.

  The defaults (`window=None`, `recent=None`) are plain item-based collaborative filtering (ItemKNN with
  cosine over the training users' histories); `window` and `recent` make it local in time for data with
  a strong order signal. Both are options of `evaluate`.
  """
  similarity = item_similarity(train, num_items, window)
  popularity = item_counts(train, num_items)
  tie_break = 1e-9 * popularity / max(popularity.max(), 1.0)
  out = np.empty((len(histories), num_items), np.float64)
  for r, history in enumerate(histories):
    out[r] = similarity[history if recent is None else history[-recent:]].sum(0) + tie_break
  return out
