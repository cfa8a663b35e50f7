"""Image selection: which of the candidate items shown after `Select from:` suit the user.

The candidates are item chunks prefixed `Selection <item id>`; the answer is the positives' ids, in the
candidates' order. Answering with ids, not with the candidate's position, makes selection the same
question as recommendation asked of a few items: the id's output row is the item itself (its content row,
unimp_jax/model/items.py, or its learned row), so the model ranks a candidate by what it is. A position
token carries nothing about its candidate: to answer with one, the model must find the liked candidate
and copy the token written before it, a two-step circuit this model size did not learn (selection F1
stayed at chance, docs/BENCHMARKS.md, "Selection answers with item ids").
A user without selection questions gets one made from the target item and two random warm items.
Scoring: greedy decoding restricted to the candidates' id tokens and end-of-sequence; the candidates
whose ids were generated before end-of-sequence, as sets (precision, recall, F1).
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
    return builder.ids.num_slots * builder.item_tokens.shape[1]

  def history_answer(self, builder, inter):
    return base.item_answer(builder, inter)

  def tail(self, builder, user, target, inter, rng):
    selection = user.selections[target % len(user.selections)] if user.selections else made_up(builder, inter, rng)
    goal = np.full(4, -1, np.int32)
    goal[2] = sum(1 << k for k, c in enumerate(selection.candidates) if c in selection.positives)
    word = builder.text(' Selection')
    chunks = [(builder.text(' Select from:'), None)]
    chunks += [builder.chunk(c, prefix=[*word, *builder.item_tokens[c]], show_item=builder.item_content != 'ids')
               for c in selection.candidates]  # with `ids` content the id is the whole chunk: written once
    answer = [int(t) for c in selection.candidates if c in selection.positives for t in builder.item_tokens[c]]
    return chunks, answer, goal

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


def candidate_ids(builder, prompt: np.ndarray, ids: set[tuple] | None = None) -> np.ndarray:
  """The id tokens [num_slots, id length] of a selection prompt's candidates, read back from the prompt:
  the id written after each `Selection` word (item text never holds id tokens, so nothing else matches).
  `ids`: the catalogue's id token tuples, when the caller reads many prompts."""
  word, width = builder.text(' Selection'), builder.item_tokens.shape[1]
  ids = {tuple(row) for row in builder.item_tokens.tolist()} if ids is None else ids
  found = [prompt[p + len(word):p + len(word) + width] for p in range(len(prompt) - len(word) - width + 1)
           if (prompt[p:p + len(word)] == word).all() and tuple(prompt[p + len(word):p + len(word) + width]) in ids]
  if len(found) < builder.ids.num_slots:
    raise ValueError(f'a selection prompt with {len(found)} candidates; {builder.ids.num_slots} expected')
  return np.stack(found[-builder.ids.num_slots:])


def chosen_slots(graphdef, params, builder, tokens, images, lengths) -> np.ndarray:
  """Bitmasks [B] of the candidates whose ids are generated greedily before end-of-sequence, decoding
  restricted to the candidates' id tokens and end-of-sequence (other ids, or a half-written one, ignored)."""
  ids = {tuple(row) for row in builder.item_tokens.tolist()}  # once per batch, not per prompt
  candidates = np.stack([candidate_ids(builder, row[:n], ids)
                         for row, n in zip(np.asarray(tokens), np.asarray(lengths))])
  b, slots, width = candidates.shape
  allowed = np.zeros((b, builder.ids.base_vocab_size + builder.ids.added_vocab_size), bool)
  allowed[np.arange(b)[:, None], candidates.reshape(b, -1)] = True
  allowed[:, builder.eos] = True
  out = np.asarray(generate.sample(graphdef, params, tokens, images, lengths, jax.random.key(0), allowed,
                                   max_new=slots * width + 1, pad_id=builder.pad, eos_id=builder.eos))
  out = np.where(np.cumsum(out == builder.eos, axis=1) == 0, out, builder.pad)[:, :slots * width]
  written = out.reshape(b, slots, 1, width)  # [B, answers, 1, id length] against [B, 1, candidates, id length]
  hits = (written == candidates[:, None]).all(-1).any(1)
  return (hits * (1 << np.arange(slots))).sum(1)


TASK = Selection()
