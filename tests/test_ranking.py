"""Ranking metrics against hand-computed cases and an independent brute-force reference."""

import numpy as np

from unimp_jax.eval import ranking


def test_hand_computed_cases():
  m = ranking.ranking_metrics(np.asarray([0, 2, 30]))
  assert m['HR@1'] == 1 / 3 and m['HR@3'] == 2 / 3 and m['HR@20'] == 2 / 3
  np.testing.assert_allclose(m['NDCG@3'], (1.0 + 1 / np.log2(4)) / 3)
  np.testing.assert_allclose(m['MRR@5'], (1.0 + 1 / 3) / 3)


def test_against_brute_force_on_score_lists():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(50, 200))
  targets = rng.integers(0, 200, 50)
  ranks = (scores > scores[np.arange(50), targets][:, None]).sum(1)
  m = ranking.ranking_metrics(ranks)
  for k in ranking.KS:
    top = np.argsort(-scores, axis=1)[:, :k]
    hits, ndcg, rr = [], [], []
    for row, t in zip(top, targets):
      where = np.flatnonzero(row == t)
      hits.append(len(where) > 0)
      ndcg.append(1 / np.log2(where[0] + 2) if len(where) else 0.0)
      rr.append(1 / (where[0] + 1) if len(where) else 0.0)
    np.testing.assert_allclose(m[f'HR@{k}'], np.mean(hits))
    np.testing.assert_allclose(m[f'NDCG@{k}'], np.mean(ndcg))
    np.testing.assert_allclose(m[f'MRR@{k}'], np.mean(rr))


def test_ranks_remove_seen_items_and_count_ties_against_the_target():
  scores = np.asarray([[1., 5., 5., 3., 0.], [2., 2., 2., 2., 2.]])
  targets = np.asarray([2, 0])
  seen = [np.asarray([1, 4]), np.asarray([0, 3])]  # row 1 "saw" its own target: it is never removed
  np.testing.assert_array_equal(ranking.ranks_from_scores(scores, targets, seen), [0, 3])
  np.testing.assert_array_equal(ranking.ranks_from_scores(scores, targets), [1, 4])


def test_a_nan_score_ranks_last_and_removed_items_never_count():
  """A NaN target is a miss, not a perfect hit; removed items do not count against a target scored -inf."""
  scores = np.asarray([[np.nan, 1., 2., 3.], [-np.inf, -np.inf, -np.inf, 0.], [1., np.nan, 0., np.nan]])
  targets = np.asarray([0, 0, 2])
  seen = [np.asarray([]), np.asarray([1, 2]), np.asarray([])]
  ranks = ranking.ranks_from_scores(scores, targets, seen)
  np.testing.assert_array_equal(ranks, [3, 1, 1])  # row 1: only item 3 ranks ahead; row 2: NaN items rank below
  assert ranking.ranking_metrics(ranks[:1])['HR@1'] == 0.0  # was a hit at every K, NDCG inf
  np.testing.assert_array_equal(ranking.top_items(scores[2:], [np.asarray([])], 4), [[0, 2, -1, -1]])
