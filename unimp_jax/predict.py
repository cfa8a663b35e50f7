"""Recommendations, ratings and selections from a trained UniMP, for one user history.

  python -m unimp_jax.predict --workdir workdir/tiny --history 12,57,301 --top_k 10 \
      [--new_item 'photo.png|Title|Category|Brand|19.99' ...] [--query '...'] [--rate 44] [--select 3,9,12] \
      [--gallery out.png]

Prints JSON: the top-k items with their probabilities, and when asked a rating with its explanation and
a selection. From Python: unimp_jax.eval.predictor.Predictor.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from unimp_jax.data import formats
from unimp_jax.eval import gallery
from unimp_jax.eval.predictor import NewItem, Predictor, run_config
from unimp_jax.train import checkpoint as checkpoint_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run directory (with checkpoints/).', required=True)
_HISTORY = flags.DEFINE_list('history', [], 'Catalogue item ids, oldest first.')
_NEW_ITEM = flags.DEFINE_multi_string('new_item', [], "A new history item 'image|title|category|brand|price' "
                                      '(after the catalogue ids).')
_TOP_K = flags.DEFINE_integer('top_k', 10, 'How many items to recommend.')
_QUERY = flags.DEFINE_string('query', '', 'A search query (search instead of recommendation).')
_RATE = flags.DEFINE_integer('rate', None, 'An item to predict a rating and explanation for.')
_SELECT = flags.DEFINE_list('select', [], 'Candidate item ids for image selection.')
_GALLERY = flags.DEFINE_string('gallery', '', 'Write a PNG (+ HTML) of the history and the recommendations.')


class InputError(ValueError):
  """A command-line input the model cannot answer for; the message names the flag."""


def _item_id(flag: str, text: str, num_items: int) -> int:
  try:
    item = int(text)
  except ValueError:
    raise InputError(f'{flag} {text!r}: not an item id') from None
  if not 0 <= item < num_items:
    raise InputError(f'{flag} {item}: not an item id of this catalogue (0 to {num_items - 1})')
  return item


def _new_item(spec: str) -> NewItem:
  parts = spec.split('|')
  if len(parts) < 2 or len(parts) > 5:
    raise InputError(f"--new_item {spec!r}: expected 'image|title|category|brand|price'")
  parts += [''] * (5 - len(parts))
  if parts[0] and not os.path.isfile(parts[0]):
    raise InputError(f'--new_item {spec!r}: no picture at {parts[0]!r}')
  try:
    price = float(parts[4]) if parts[4] else None
  except ValueError:
    raise InputError(f'--new_item {spec!r}: price {parts[4]!r} is not a number') from None
  return NewItem(parts[0], parts[1], parts[2], parts[3], price)


def checked_inputs(num_items: int, num_slots: int) -> dict:
  """Every flag checked against the catalogue before the model is loaded (that takes seconds to minutes)."""
  history = [_item_id('--history', h, num_items) for h in _HISTORY.value] + [_new_item(s) for s in _NEW_ITEM.value]
  unseen = num_items - len({h for h in history if isinstance(h, int)})
  if not 1 <= _TOP_K.value <= unseen:
    raise InputError(f'--top_k {_TOP_K.value}: must be between 1 and {unseen}, the catalogue items not in the history')
  rate = None if _RATE.value is None else _item_id('--rate', str(_RATE.value), num_items)
  select = [_item_id('--select', c, num_items) for c in _SELECT.value]
  if select and len(select) != num_slots:
    raise InputError(f'--select: {len(select)} candidates; selection takes exactly {num_slots}')
  return {'history': history, 'rate': rate, 'select': select}


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every restore, and warns that a read is read-only
    logging.set_verbosity(logging.ERROR)
  try:
    cfg = run_config(_WORKDIR.value)
    dataset = formats.UnifiedDataset(cfg.data.path)
    inputs = checked_inputs(len(dataset.items), dataset.tokenizer().unimp_layout['num_slots'])
  except (InputError, checkpoint_lib.CheckpointError, formats.DatasetError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  history = inputs['history']
  if not history:
    print('warning: empty history: the recommendations are the same for everyone', file=sys.stderr)
  predictor = Predictor.from_workdir(_WORKDIR.value)
  out = {'recommended': predictor.recommend(history, _TOP_K.value, _QUERY.value)}
  if inputs['rate'] is not None:
    out['rating'] = predictor.rate(history, inputs['rate'])
  if inputs['select']:
    out['selected'] = predictor.select(history, inputs['select'])
  if _GALLERY.value:
    gallery.write_gallery(_GALLERY.value, [{'title': 'history -> recommended', 'history': [
        h for h in history if not isinstance(h, NewItem)], 'recommended': out['recommended'], 'target': None}],
                          predictor.dataset)
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  app.run(main)
