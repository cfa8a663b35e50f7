"""Baselines: hand-computed popularity and co-occurrence ranks, UniMP's protocol, SASRec learning order."""

import numpy as np
import pytest

from unimp_jax import baselines
from unimp_jax.baselines import classic, sasrec
from unimp_jax.data import formats, splits
from unimp_jax.eval import ranking

# Leave-last-out: each user trains on all but the last two items; valid = second to last, test = last.
HAND_MADE = (
    (0, 1, 2, 3, 4, 5),   # trains on 0 1 2 3
    (0, 1, 2, 6, 3),      # trains on 0 1 2
    (0, 1, 2, 7),         # trains on 0 1
    (0, 5, 1, 3),         # trains on 0 5
)
# Training counts: item 0: 4, 1: 3, 2: 2, 3: 1, 5: 1, and 4, 6, 7: 0.


def _write(path, sequences, num_items):
  items = [formats.Item(source_id=f'item-{i}') for i in range(num_items)]
  users = [formats.User(f'user-{u}', tuple(formats.Interaction(item=i, timestamp=t) for t, i in enumerate(seq)))
           for u, seq in enumerate(sequences)]
  formats.write_dataset(str(path), name='hand-made', items=items, images=[None] * num_items, users=users,
                        image_size=4, split_seed=0)
  return formats.UnifiedDataset(str(path))


@pytest.fixture(scope='module')
def hand_made(tmp_path_factory):
  return _write(tmp_path_factory.mktemp('data') / 'hand', HAND_MADE, num_items=8)


def test_training_data_is_what_unimp_trains_on(hand_made):
  train = baselines.training_sequences(hand_made, 'leave_last_out')
  assert [list(s) for s in train] == [[0, 1, 2, 3], [0, 1, 2], [0, 1], [0, 5]]
  by_user = baselines.training_sequences(hand_made, 'by_user')
  assert [list(s) for s in by_user] == [list(HAND_MADE[u]) for u in hand_made.splits['train']]
  assert not set(hand_made.splits['test']) & set(hand_made.splits['train'])


def test_popularity_hand_computed_and_seen_items_never_rank_above_the_target(hand_made):
  # test targets 5, 3, 7, 3. User 3 has seen 0, 5, 1: only item 2 (count 2) beats item 3 (count 1);
  # counting the seen items 0 and 1 would give rank 3. Ties count against the target: item 5 ties with
  # user 1's item 3 (rank 1); user 2's item 7 (count 0) ties with every unseen item (3, 4, 5, 6: rank 4).
  np.testing.assert_array_equal(baselines.evaluate('popularity', hand_made, 'leave_last_out'), [0, 1, 4, 1])
  # valid targets 4, 6, 2, 1 after histories 0123, 012, 01, 05: items 4 and 6 (count 0) tie with or
  # lose to all 3 and 4 unseen others.
  np.testing.assert_array_equal(baselines.evaluate('popularity', hand_made, 'leave_last_out', 'valid'),
                                [3, 4, 0, 0])


def test_cooccurrence_hand_computed(hand_made):
  train = baselines.training_sequences(hand_made, 'leave_last_out')
  s = classic.item_similarity(train, 8, window=None)
  # C[0,1] = 3 (three sequences hold both), n_0 = 4, n_1 = 3; C[2,3] = 1, n_2 = 2, n_3 = 1.
  np.testing.assert_allclose([s[0, 1], s[1, 0], s[2, 3], s[0, 5], s[4, 0]], [3 / 12 ** .5, 3 / 12 ** .5, 1 / 2 ** .5, .5, 0])
  assert (np.diag(s) == 0).all()
  # window=1: only neighbours count, so 0 and 2 (two apart) never co-occur.
  assert classic.cooccurrence(train, 8, window=1)[0, 2] == 0 and classic.cooccurrence(train, 8, window=2)[0, 2] == 2
  # User 3 (history 0 5 1, target 3): item 2 scores S02 + S12 = 2/8**.5 + 2/6**.5 > item 3's 1/2 + 1/3**.5.
  # User 1 (history 0 1 2 6, target 3): 3 beats 5 (S03 + S13 + S23 against S05). With recent=1 only item 6
  # is read, which co-occurs with nothing: what is left is the popularity tie-break.
  # User 2 (history 0 1 2, target 7): 7 co-occurs with nothing and has count 0, so it ties with 4 and 6 and
  # loses to 3 and 5: rank 4.
  np.testing.assert_array_equal(baselines.evaluate('cooccurrence', hand_made, 'leave_last_out'), [0, 0, 4, 1])
  scores = classic.cooccurrence_scores(train, [np.asarray([0, 1, 2, 6])], 8, recent=1)
  np.testing.assert_allclose(scores[0], 1e-9 * np.asarray([4, 3, 2, 1, 0, 1, 0, 0]) / 4)


def test_ranks_follow_the_protocol_for_any_scores(hand_made):
  histories, targets, seen = baselines.stage_examples(hand_made, 'leave_last_out', 'test')
  assert list(targets) == [5, 3, 7, 3] and [list(h) for h in histories] == [list(u[:-1]) for u in HAND_MADE]
  users = splits.split_users(hand_made, 'by_user', 'test')
  _, targets, _ = baselines.stage_examples(hand_made, 'by_user', 'test')
  assert list(targets) == [HAND_MADE[u][-1] for u in users]
  # The worst scores for the target: every unseen item ranks above it, never a seen one.
  rigged = np.ones((4, 8))
  rigged[np.arange(4), [5, 3, 7, 3]] = 0
  ranks = ranking.ranks_from_scores(rigged, np.asarray([5, 3, 7, 3]), seen)
  np.testing.assert_array_equal(ranks, [8 - len(u) for u in HAND_MADE])


def test_unknown_baseline_names_the_choices(hand_made):
  with pytest.raises(ValueError, match="'bpr'.*popularity.*cooccurrence.*sasrec"):
    baselines.evaluate('bpr', hand_made, 'leave_last_out')
  assert baselines.NAMES == ('popularity', 'cooccurrence', 'sasrec')


def test_sasrec_learns_a_sequential_pattern_popularity_cannot(tmp_path):
  # Every user walks the catalogue in steps of +1 from a random start: the next item is always the
  # previous one + 1 (mod N), and every item is equally popular.
  num_items, rng = 24, np.random.default_rng(0)
  sequences = [tuple(int(i) for i in (start + np.arange(rng.integers(5, 9))) % num_items)
               for start in rng.integers(0, num_items, 96)]
  dataset = _write(tmp_path / 'walk', sequences, num_items)
  options = dict(hidden=32, blocks=1, heads=1, dropout=0.0, epochs=20, batch_size=32, learning_rate=1e-2)
  ranks = baselines.evaluate('sasrec', dataset, 'leave_last_out', seed=0, **options)
  assert ranking.ranking_metrics(ranks)['HR@1'] > 0.9
  assert ranking.ranking_metrics(baselines.evaluate('popularity', dataset, 'leave_last_out'))['HR@1'] < 0.3


def test_sasrec_is_deterministic_given_the_seed():
  rng = np.random.default_rng(1)
  train = [rng.integers(0, 30, 6) for _ in range(20)]
  histories = [rng.integers(0, 30, 4) for _ in range(3)]
  options = dict(hidden=16, blocks=1, epochs=2, batch_size=8, dropout=0.3)  # dropout: randomness in training
  a = sasrec.sasrec_scores(train, histories, 30, seed=3, **options)
  b = sasrec.sasrec_scores(train, histories, 30, seed=3, **options)
  assert a.shape == (3, 30) and np.isfinite(a).all()
  np.testing.assert_array_equal(a, b)


def test_attribute_ceiling_fits_the_same_weights_as_scipy_and_needs_the_simulators_colours(tmp_path, hand_made):
  import scipy.optimize
  from unimp_jax.baselines import attributes
  from unimp_jax.data import synthetic
  synthetic.build(str(tmp_path / 'fashion'), num_items=60, num_users=60, seed=0, image_size=16, bpe_vocab=400)
  dataset = formats.UnifiedDataset(str(tmp_path / 'fashion'))
  attrs = attributes.item_attributes(dataset)
  train = baselines.training_sequences(dataset, 'by_user')
  popularity = np.log1p(classic.item_counts(train, 60))
  weights = attributes.fit(train, attrs, popularity, recent=3)

  # Independent reference: the same likelihood written position by position in float64, minimised by scipy.
  rows = []
  for seq in train:
    for t in range(1, len(seq)):
      window, f = seq[max(0, t - 3):t], []
      for field in ('colour', 'category', 'brand'):
        share = np.asarray([np.mean(attrs[field][window] == attrs[field][i]) for i in range(60)])
        f += [share, np.log(share + 0.05)]
      gap = np.abs(attrs['log_price'] - attrs['log_price'][window].mean())
      f += [gap, gap ** 2, popularity]
      rows.append((np.stack(f, 1), np.isin(np.arange(60), seq[:t]), seq[t]))

  def nll(w):
    total = 0.0
    for features, seen, target in rows:
      logits = np.where(seen, -np.inf, features @ w)
      total += np.logaddexp.reduce(logits) - logits[target]
    return total / len(rows)

  reference = scipy.optimize.minimize(nll, np.zeros(9), method='BFGS')
  assert nll(weights) < reference.fun + 1e-5  # the same maximum likelihood (the share/log-share pairs
  np.testing.assert_allclose(weights, reference.x, atol=0.03 * np.abs(reference.x).max())  # are correlated)
  ranks = attributes.evaluate(dataset, 'by_user', recent=3)
  assert len(ranks) == len(dataset.splits['test']) and (ranks >= 0).all()
  # The popularity feature holds cold targets (no training purchases) back; the content-only ceiling
  # ranks them by their attributes alone.
  cold = baselines.target_kinds(dataset, 'by_user')['cold']
  content = attributes.evaluate(dataset, 'by_user', recent=3, popularity=False)
  assert cold.any() and content[cold].mean() < ranks[cold].mean()

  with pytest.raises(ValueError, match=r'hand.*extra.item_colour'):
    attributes.item_attributes(hand_made)


def test_rating_baselines_hand_computed(tmp_path):
  from unimp_jax.baselines import ratings
  # Leave-last-out trains on each user's first two ratings: item 0: 5 4 5, item 1: 3 3, item 2: 2.
  sequences = [((0, 5), (1, 3), (2, 4), (3, 2)), ((0, 4), (2, 2), (1, 5), (3, 1)), ((1, 3), (0, 5), (3, 1), (2, 4))]
  items = [formats.Item(source_id=f'item-{i}') for i in range(4)]
  users = [formats.User(f'user-{u}', tuple(formats.Interaction(item=i, rating=r, timestamp=t)
                                            for t, (i, r) in enumerate(seq))) for u, seq in enumerate(sequences)]
  formats.write_dataset(str(tmp_path / 'rated'), name='rated', items=items, images=[None] * 4, users=users,
                        image_size=4, split_seed=0)
  dataset = formats.UnifiedDataset(str(tmp_path / 'rated'))
  mean = 22 / 6
  train = ratings.training_ratings(dataset, 'leave_last_out')
  assert train[1].mean() == pytest.approx(mean)
  histories, targets, true = ratings.stage_ratings(dataset, 'leave_last_out', 'test')
  np.testing.assert_array_equal(targets, [3, 3, 2])
  np.testing.assert_array_equal(true, [2, 1, 4])
  # b_item = 1, -2/3, -5/3, 0 (no ratings). User 0's residuals on items 0, 1, 2: 1/3, 0, 2, so with
  # shrink_user = 1: b_user = (7/3) / 4; the target (item 3) has no bias: 22/6 + 7/12.
  predicted = ratings.bias_predictions(train, histories, targets, 4, shrink_item=0.0, shrink_user=1.0)
  assert predicted[0] == pytest.approx(mean + 7 / 12)
  predictions, true_again = ratings.predict(dataset, 'leave_last_out')
  np.testing.assert_array_equal(true_again, true)
  errors = np.asarray([2, 1, 4]) - mean
  m = ratings.metrics(predictions['global mean'], true)
  assert m['RMSE (expected)'] == pytest.approx(np.sqrt(np.mean(errors ** 2)))
  assert m['MAE (expected)'] == pytest.approx(np.mean(np.abs(errors)))
  assert m['MAE (argmax)'] == pytest.approx((2 + 3 + 0) / 3)  # the mean 3.67 rounds to 4
