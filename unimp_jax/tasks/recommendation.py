"""Sequential recommendation: the next item from the history. Search (unimp_jax.tasks.search) is the
same task with a query.

Ranking (`EvalContext.ranking`):
  full   exact full-catalogue ranking from one forward pass: the item tokens' logits at the answer
         position (atomic IDs only)
  beam   beam search constrained to the item-ID trie (atomic or semantic IDs), 20 beams; a target
         outside the beams counts as a miss
  paper  the UniMP paper's protocol: 10-beam unconstrained generation, a beam counts when its tokens
         spell the target's ID followed by end-of-sequence (string match); history items not removed
`full` and `beam` remove the user's earlier items from the ranking (unimp_jax.eval.ranking); all three
report HR/NDCG/MRR@{1,3,5,10,20} from the target's position, and keep each user's best 20 items (`top`).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from unimp_jax import baselines
from unimp_jax.data import splits
from unimp_jax.eval import gallery, generate, metrics, ranking
from unimp_jax.tasks import base

BEAMS = {'beam': max(ranking.KS), 'paper': 10}
GALLERY_RECOMMENDATIONS = 8


class NextItem(base.Task):
  """A catalogue item as the answer, its id tokens after `<answer>`; history chunks answer with their ids."""
  answers_items = True
  history_answers_ids = True

  def answer_length(self, builder) -> int:
    return builder.item_tokens.shape[1]

  def history_answer(self, builder, inter):
    return base.item_answer(builder, inter)

  def tail(self, builder, user, target, inter, rng):
    del user, target, rng
    goal = np.full(4, -1, np.int32)
    goal[0] = inter.item
    return [], list(builder.item_tokens[inter.item]), goal

  def evaluate(self, ctx, batch):
    builder = ctx.builder
    item_tokens = builder.item_tokens
    num_items, id_length = item_tokens.shape
    targets = np.asarray([e.target[0] for e in batch.examples])
    seen = [ranking.seen_before(u, t) for u, t in zip(batch.users, batch.targets)]
    if ctx.ranking == 'full':
      if id_length != 1:
        raise ValueError('full-catalogue ranking needs atomic item IDs (config.data.item_ids); use beam ranking')
      logits = base.answer_logits(ctx.graphdef, ctx.params, batch.tokens, batch.images, batch.lengths,
                                  pad_id=builder.pad)
      scores = np.asarray(logits)[:batch.real, item_tokens[:, 0]]
      if ctx.negatives:
        seen = [sampled_out(u, t, s, num_items, ctx.negatives, ctx.seed)
                for u, t, s in zip(batch.user_ids, targets, seen)]
      return {'rank': ranking.ranks_from_scores(scores, targets, seen),
              'top': ranking.top_items(scores, seen, max(ranking.KS))}
    if ctx.negatives:
      raise ValueError('sampled negatives need full ranking (scores for every item)')
    paper = ctx.ranking == 'paper'
    banned = np.zeros((len(batch.tokens), num_items), bool)
    if not paper:
      for r, items in enumerate(seen):
        banned[r, items[items != targets[r]]] = True
    trie = base.item_trie(builder)
    out, _ = generate.beam_search(ctx.graphdef, ctx.params, batch.tokens, batch.images, batch.lengths,
                                  None if paper else banned, num_beams=BEAMS[ctx.ranking],
                                  max_new=id_length + paper, trie=None if paper else trie,
                                  pad_id=builder.pad, eos_id=builder.eos)
    out = np.asarray(out)[:batch.real]
    found = trie.items(out[..., :id_length])
    if paper:  # string match: the ID and then end-of-sequence
      found = np.where(out[..., id_length] == builder.eos, found, -1)
    hit = found == targets[:, None]
    return {'rank': np.where(hit.any(1), hit.argmax(1), num_items), 'top': found[:, :max(ranking.KS)]}

  def summarise(self, rows, builder):
    del builder
    return ranking.ranking_metrics(rows['rank'])


def sampled_out(user: int, target: int, seen: np.ndarray, num_items: int, negatives: int, seed: int) -> np.ndarray:
  """Every item but the target and `negatives` seeded random unseen ones: what the sampled-negatives
  protocol removes from the ranking."""
  pool = np.setdiff1d(np.arange(num_items), np.append(seen, target))
  kept = np.random.default_rng([seed, int(user)]).choice(pool, min(negatives, len(pool)), replace=False)
  return np.setdiff1d(np.arange(num_items), np.append(kept, target))


class Recommendation(NextItem):
  name = 'recommendation'
  instruction = 'What is the next item recommended to the user?'

  def report_tables(self, predictor, split, rows):
    """Chance, popularity and ItemKNN next to the model (same users), and colour agreement@8 where the
    dataset knows the items' colours."""
    builder = predictor.builder
    window = builder.num_images if builder.uses_images else builder.history
    tables = {'recommendation baselines (the same test users; earlier items removed)':
              baseline_table(builder.dataset, split, window)}
    colours = builder.dataset.manifest['extra'].get('item_colour')
    if colours is not None:
      tables["colour agreement@8 (share of the top 8 in the user's most frequent history colour)"] = \
          colour_table(builder.dataset, split, rows, colours)
    return tables

  def gallery(self, predictor, split, workdir, num_users):
    """A few test users' histories next to what the model recommends (every earlier purchase excluded)."""
    dataset = predictor.dataset
    rows = []
    for u in splits.split_users(dataset, split, 'test')[:num_users]:
      user = dataset.user(int(u))
      target = splits.target_position(len(user.interactions), split, 'test', None)
      history = [i.item for i in user.interactions[:target]]
      rows.append({'title': f'test user {u}', 'history': history[-predictor.builder.history:],
                   'recommended': predictor.recommend(history, GALLERY_RECOMMENDATIONS),
                   'target': user.interactions[target].item})
    if jax.process_index() == 0:
      gallery.write_gallery(os.path.join(workdir, 'gallery.png'), rows, dataset)
    return [f'## Gallery (test users: history, then top-{GALLERY_RECOMMENDATIONS} recommendations; target '
            'outlined)', '![gallery](gallery.png)']


def baseline_table(dataset, split: str, window: int) -> dict[str, float]:
  """HR@10 of chance, popularity and ItemKNN (given the whole history, and given only the last `window`
  items, the most a prompt shows: equal information), overall and for warm and cold targets."""
  _, targets, _ = baselines.stage_examples(dataset, split, 'test')
  kinds = {'': np.ones(len(targets), bool),
           **{f', {kind} targets': keep for kind, keep in baselines.target_kinds(dataset, split).items()}}
  rankers = {'popularity': ('popularity', {}), 'ItemKNN (whole history)': ('cooccurrence', {}),
             f'ItemKNN (last {window} items, as the prompt)': ('cooccurrence', {'recent': window})}
  table = {'chance HR@10': 10 / len(dataset.items), 'test users': len(targets)}
  for label, (name, options) in rankers.items():
    ranks = baselines.evaluate(name, dataset, split, **options)
    for kind, keep in kinds.items():
      if keep.any():
        table[f'{label} HR@10{kind}'] = ranking.ranking_metrics(ranks[keep])['HR@10']
  return table


def colour_table(dataset, split: str, rows: dict[str, np.ndarray], item_colour, k: int = 8) -> dict[str, float]:
  """Colour agreement@k of UniMP's top k (the evaluation's recommendation `rows`) and popularity's, for
  every test user, earlier items excluded."""
  histories = [np.asarray([i.item for i in dataset.user(int(u)).interactions[:t]], np.int64)
               for u, t in zip(rows['user'], rows['target'])]
  popular = baselines.scores('popularity', baselines.training_sequences(dataset, split), histories, len(dataset.items))
  return {'UniMP': metrics.colour_agreement(rows['top'][:, :k], histories, item_colour),
          'popularity': metrics.colour_agreement(ranking.top_items(popular, histories, k), histories, item_colour),
          'test users': len(histories)}


TASK = Recommendation()
