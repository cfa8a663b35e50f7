"""The attribute ceiling of the embedded dataset: what a perfect reader of item attributes can rank.

Not a baseline: it reads every item's true colour (which no text names; the simulator records it in the
manifest, unimp_jax.data.synthetic) and true category, brand and price. It answers the question UniMP's
result has to be read against: given only the history items a prompt shows, how well can *any* model
that recognises each item's attributes perfectly rank the next item?

The ranker is a conditional logit, score(i | h) = w . f(i, h), fitted by maximum likelihood (softmax
over the items not yet bought) on every next item of the training sequences
(`unimp_jax.baselines.training_sequences`), with the same `recent` window at training and scoring time.
Features of item i given the history h, where share_a = the fraction of h with i's value of attribute a:

  share and log(share + 0.05)     for colour, category and brand (6 features)
  |log price_i - mean log price_h| and its square
  log(1 + training count of i)    (popularity)

Scored under UniMP's protocol (`unimp_jax.baselines.stage_examples`, `ranking.ranks_from_scores`).

    python -m unimp_jax.baselines.attributes --data data/generated/fashion [--recent 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unimp_jax import baselines
from unimp_jax.baselines import classic
from unimp_jax.data import formats
from unimp_jax.eval import ranking

SMOOTHING = 0.05
ITERATIONS = 50  # L-BFGS steps; 9 weights converge well before
NUM_FEATURES = 9


def item_attributes(dataset: formats.UnifiedDataset) -> dict[str, np.ndarray]:
  """Integer colour / category / brand codes and log price per item, from the simulator's records."""
  colour = dataset.manifest['extra'].get('item_colour')
  if colour is None or len(colour) != len(dataset.items):
    raise ValueError(f'{dataset.path}: the manifest has no `extra.item_colour` for its {len(dataset.items)} '
                     'items; the attribute ceiling needs the embedded dataset (unimp_jax.data.synthetic)')
  codes = {}
  for field in ('category', 'brand'):
    values = [getattr(item, field) for item in dataset.items]
    codes[field] = np.unique(values, return_inverse=True)[1]
  price = np.asarray([item.price for item in dataset.items], np.float64)
  if not np.all(price > 0):
    raise ValueError(f'{dataset.path}: item {int(np.argmin(price > 0))} has no positive price')
  return dict(colour=np.asarray(colour), **codes, log_price=np.log(price))


def _history_stats(histories: list[np.ndarray], attrs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per history: the share of each attribute value [N, values] and the mean log price [N]."""
  stats = {}
  for field in ('colour', 'category', 'brand'):
    values = attrs[field].max() + 1
    stats[field] = np.stack([np.bincount(attrs[field][h], minlength=values) / len(h) for h in histories])
  stats['log_price'] = np.asarray([attrs['log_price'][h].mean() for h in histories])
  return {k: v.astype(np.float32) for k, v in stats.items()}


def _scores(w, stats, attrs, popularity):
  """float [N, num_items]: w . f(i, h) for every history and item."""
  features = []
  for field in ('colour', 'category', 'brand'):
    share = stats[field][:, attrs[field]]
    features += [share, jnp.log(share + SMOOTHING)]
  gap = jnp.abs(attrs['log_price'][None, :] - stats['log_price'][:, None])
  features += [gap, gap ** 2, jnp.broadcast_to(popularity, gap.shape)]
  return sum(wk * f for wk, f in zip(w, features))


def _windows(sequences: list[np.ndarray], recent: int | None):
  """(histories, next items, items bought before) at every position after the first of each sequence."""
  histories, targets, seen = [], [], []
  for seq in sequences:
    for t in range(1, len(seq)):
      histories.append(seq[:t] if recent is None else seq[max(0, t - recent):t])
      targets.append(seq[t])
      seen.append(seq[:t])
  return histories, np.asarray(targets), seen


def fit(train: list[np.ndarray], attrs: dict[str, np.ndarray], popularity: np.ndarray,
        recent: int | None) -> np.ndarray:
  """The 9 feature weights maximising the likelihood of the training sequences' next items."""
  histories, targets, seen = _windows(train, recent)
  num_items = len(popularity)
  mask = np.zeros((len(histories), num_items), bool)
  for r, s in enumerate(seen):
    mask[r, s] = True

  @jax.jit
  def solve(mask, targets, stats, attrs, popularity):
    def nll(w):
      logits = jnp.where(mask, -1e9, _scores(w, stats, attrs, popularity))  # earlier items cannot come next
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], 1))

    opt, value_and_grad = optax.lbfgs(), optax.value_and_grad_from_state(nll)

    def step(carry, _):
      w, state = carry
      value, grad = value_and_grad(w, state=state)
      updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=nll)
      return (optax.apply_updates(w, updates), state), None

    w = jnp.zeros(NUM_FEATURES)
    w, _ = jax.lax.scan(step, (w, opt.init(w)), length=ITERATIONS)[0]
    return w, jnp.linalg.norm(jax.grad(nll)(w))

  w, grad_norm = solve(mask, targets, _history_stats(histories, attrs), attrs, np.float32(popularity))
  if not grad_norm < 1e-3:
    raise RuntimeError(f'the attribute ceiling did not converge: |gradient| {float(grad_norm):.2g} after '
                       f'{ITERATIONS} L-BFGS steps')
  return np.asarray(w)


def evaluate(dataset: formats.UnifiedDataset, split: str, stage: str = 'test',
             recent: int | None = None, popularity: bool = True) -> np.ndarray:
  """0-based target ranks of the stage's users, as `baselines.evaluate` returns them, for the ranker
  fitted on the training sequences and reading each user's `recent` latest items (None: all).

  `popularity=False` drops the popularity feature: the content-only ceiling, the one that applies to
  cold items (with it, an item no training user bought scores last, so the ceiling on cold targets is 0)."""
  attrs = item_attributes(dataset)
  train = baselines.training_sequences(dataset, split)
  counts = classic.item_counts(train, len(dataset.items))
  popularity = np.log1p(counts) if popularity else np.zeros(len(counts))
  w = fit(train, attrs, popularity, recent)
  histories, targets, seen = baselines.stage_examples(dataset, split, stage)
  windows = [h if recent is None else h[-recent:] for h in histories]
  scores = _scores(w, _history_stats(windows, attrs), attrs, popularity)
  return ranking.ranks_from_scores(np.asarray(scores), targets, seen)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', default='data/generated/fashion')
  parser.add_argument('--split', default='by_user')
  parser.add_argument('--stage', default='test')
  parser.add_argument('--recent', type=int, nargs='*', default=[5, 0],
                      help='history windows to report (0: the whole history)')
  parser.add_argument('--content_only', action='store_true',
                      help='without the popularity feature: the ceiling that applies to cold items')
  args = parser.parse_args(argv)
  dataset = formats.UnifiedDataset(args.data)
  kinds = {'': slice(None), **{f', {kind} targets': keep
                               for kind, keep in baselines.target_kinds(dataset, args.split, args.stage).items()}}
  name = 'content-only attribute ceiling' if args.content_only else 'attribute ceiling'
  for recent in args.recent:
    ranks = evaluate(dataset, args.split, args.stage, recent or None, popularity=not args.content_only)
    window = f'last {recent} items' if recent else 'whole history'
    for kind, keep in kinds.items():
      metrics = ranking.ranking_metrics(ranks[keep])
      print(f'{name}, {window}{kind} ({len(ranks[keep])} users): '
            + ' '.join(f'{k} {v:.4f}' for k, v in metrics.items() if k.startswith('HR@')))


if __name__ == '__main__':
  main()
