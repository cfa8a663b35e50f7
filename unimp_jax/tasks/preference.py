"""Preference prediction: a rating token `rate_1..5` and an explanation for an item the user bought.

History chunks answer with their own rating and explanation. Scoring: the rating probabilities over the
`rate_r` tokens at the answer position (argmax and expectation), then the explanation generated
greedily after the most likely rating, scored with BLEU and ROUGE (unimp_jax.eval.metrics).
"""

from __future__ import annotations

import collections

import jax
import numpy as np

from unimp_jax import baselines
from unimp_jax.baselines import ratings as rating_baselines
from unimp_jax.eval import generate, metrics
from unimp_jax.tasks import base

EXPLANATION_TOKENS = 32


class Preference(base.Task):
  name = 'preference'
  instruction = 'What is the rating and explanation for the item?'

  def available(self, builder, user):
    return all(i.rating is not None for i in user.interactions)

  def answer_length(self, builder) -> int:
    return 1 + EXPLANATION_TOKENS

  def history_answer(self, builder, inter):
    return [] if inter.rating is None else self._answer(builder, inter)

  def _answer(self, builder, inter) -> list[int]:
    explanation = builder.encode(' ' + (inter.explanation or 'Unknown'))[:EXPLANATION_TOKENS]
    return [builder.ids.rating(inter.rating), *explanation]

  def tail(self, builder, user, target, inter, rng):
    del user, target, rng
    goal = np.full(4, -1, np.int32)
    if inter.rating is None:  # a prediction: the rating is what is asked
      return [builder.chunk(inter.item)], [], goal
    goal[1] = inter.rating
    return [builder.chunk(inter.item)], self._answer(builder, inter), goal

  def evaluate(self, ctx, batch):
    probs, text = rating_and_explanation(ctx.graphdef, ctx.params, ctx.builder, batch.tokens, batch.images,
                                         batch.lengths)
    return {'rating_probs': probs[:batch.real], 'rating': np.asarray([e.target[1] for e in batch.examples]),
            'explanation': text[:batch.real]}

  def report_tables(self, predictor, split, rows):
    """The rating baselines (global mean, bias predictor) on the same test users, and the explanation
    metrics of always answering the most common training explanation: what the model's numbers must beat."""
    dataset = predictor.builder.dataset
    predicted, true = rating_baselines.predict(dataset, split)
    table = {f'{name} {metric}': value for name, values in predicted.items()
             for metric, value in rating_baselines.metrics(values, true).items() if metric.startswith('RMSE')}
    tables = {'preference baselines (the same test users)': table}
    references = target_explanations(dataset, rows)
    explanations = [i.explanation for inters in baselines.training_interactions(dataset, split) for i in inters
                    if i.explanation]
    if any(references) and explanations:
      common = collections.Counter(explanations).most_common(1)[0][0]
      tables[f'explanation baseline: always "{common}"'] = metrics.text_metrics([common] * len(references),
                                                                                 references)
    return tables

  def summarise(self, rows, builder):
    out = metrics.rating_metrics(rows['rating_probs'], rows['rating'])
    references = target_explanations(builder.dataset, rows)
    if any(references):  # datasets without reviews (MovieLens) have no explanations to score
      out.update(metrics.text_metrics([base.decode_text(builder, row) for row in rows['explanation']], references))
    return out


def target_explanations(dataset, rows: dict[str, np.ndarray]) -> list[str]:
  """The true explanation of each row's target interaction (what generated explanations are scored against)."""
  return [dataset.user(int(u)).interactions[t].explanation for u, t in zip(rows['user'], rows['target'])]


def rating_and_explanation(graphdef, params, builder, tokens, images, lengths):
  """(probabilities [B, 5] over ratings 1..5, explanation tokens [B, E]): the rating from the answer
  position's `rate_r` logits, the explanation generated greedily after the most likely rating."""
  ids = builder.ids
  logits = np.asarray(base.answer_logits(graphdef, params, tokens, images, lengths, pad_id=builder.pad))
  rating_logits = logits[:, [ids.rating(r) for r in metrics.RATINGS]]
  probs = np.exp(rating_logits - rating_logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  with_rating = np.concatenate([tokens, np.full((len(tokens), 1), builder.pad, np.int32)], axis=1)
  with_rating[np.arange(len(tokens)), lengths] = [ids.rating(int(r)) for r in probs.argmax(1) + 1]
  text = generate.sample(graphdef, params, with_rating, images, lengths + 1, jax.random.key(0),
                         max_new=EXPLANATION_TOKENS + 1, pad_id=builder.pad, eos_id=builder.eos)
  return probs, np.asarray(text)


TASK = Preference()
