"""Image selection: which of the candidate items shown after `Select from:` suit the user.

The candidates are item chunks prefixed `Selection <slot_k>`; the answer is the positive slots' tokens.
A user without selection questions gets one made from the target item and two random warm items.
Scoring: the slot tokens generated greedily before end-of-sequence, as sets (precision, recall, F1).
"""

from __future__ import annotations

import jax
import numpy as np

from unimp_jax.data import formats
from unimp_jax.eval import generate, metrics
from unimp_jax.tasks import base


class Selection(base.Task):
  name = 'selection'
  instruction = 'Can you select the suitable item from above for the user?'
  history_answers_ids = True

  def answer_length(self, builder) -> int:
    return builder.ids.num_slots

  def history_answer(self, builder, inter):
    return base.item_answer(builder, inter)

  def tail(self, builder, user, target, inter, rng):
    selection = user.selections[target % len(user.selections)] if user.selections else made_up(builder, inter, rng)
    slots = sorted(selection.candidates.index(p) for p in selection.positives)
    goal = np.full(4, -1, np.int32)
    goal[2] = sum(1 << s for s in slots)
    word = builder.text(' Selection')
    chunks = [(builder.text(' Select from:'), None)]
    chunks += [builder.chunk(c, prefix=[*word, builder.ids.slot(k)]) for k, c in enumerate(selection.candidates)]
    return chunks, [builder.ids.slot(s) for s in slots], goal

  def evaluate(self, ctx, batch):
    chosen = chosen_slots(ctx.graphdef, ctx.params, ctx.builder, batch.tokens, batch.images, batch.lengths)
    return {'chosen': chosen[:batch.real], 'positives': np.asarray([e.target[2] for e in batch.examples])}

  def summarise(self, rows, builder):
    del builder
    return metrics.selection_metrics(rows['chosen'], rows['positives'])

  def report_tables(self, predictor, split, rows):
    """What answers that ignore the user score on the same questions: the chance level of the model's F1."""
    del split
    return {'selection baselines (the same test questions)': constant_answers(rows['positives'],
                                                                              predictor.builder.ids.num_slots)}


def made_up(builder, inter: formats.Interaction, rng: np.random.Generator) -> formats.Selection:
  """For data without selection questions: the true next item among two random others, never cold
  items (`extra.cold_items`: released after the data's cut-off, so training must not show them)."""
  pool = np.flatnonzero(~formats.cold_mask(builder.dataset))
  pool = pool[pool != inter.item]
  others = rng.choice(pool, 2, replace=False)
  candidates = rng.permutation(np.asarray([inter.item, *others]))
  return formats.Selection(tuple(int(c) for c in candidates), (inter.item,))


def constant_answers(positives: np.ndarray, num_slots: int) -> dict[str, float]:
  """F1 of answers that ignore the user: a uniformly random non-empty slot set (its expectation: the mean
  over all 2^S - 1 sets), every slot, and always the first slot."""
  f1 = lambda mask: metrics.selection_metrics(np.full(len(positives), mask), positives)['F1']
  subsets = range(1, 1 << num_slots)
  return {'random slot set F1 (chance)': float(np.mean([f1(m) for m in subsets])),
          'every slot F1': f1((1 << num_slots) - 1), 'first slot F1': f1(1)}


def chosen_slots(graphdef, params, builder, tokens, images, lengths) -> np.ndarray:
  """Bitmasks [B] of the slot tokens generated greedily before end-of-sequence (others ignored)."""
  ids = builder.ids
  out = np.asarray(generate.sample(graphdef, params, tokens, images, lengths, jax.random.key(0),
                                   max_new=ids.num_slots + 1, pad_id=builder.pad, eos_id=builder.eos))
  slot_tokens = np.asarray([ids.slot(s) for s in range(ids.num_slots)])
  before_end = np.cumsum(out == builder.eos, axis=1) == 0
  hits = (out[:, :, None] == slot_tokens) & before_end[:, :, None]  # [B, new tokens, slots]
  return (hits.any(1) * (1 << np.arange(ids.num_slots))).sum(1)


TASK = Selection()
