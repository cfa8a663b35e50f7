"""Recommendations, ratings and selections from a trained UniMP, for one user history.

  python -m unimp_jax.predict --workdir workdir/tiny --history 12,57,301 --top_k 10 \
      [--new_item 'photo.png|Title|Category|Brand|19.99' ...] [--query '...'] [--rate 44] [--select 3,9,12] \
      [--gallery out.png]

Prints JSON: the top-k items with their probabilities, and when asked a rating with its explanation and
a selection. From Python: unimp_jax.eval.predictor.Predictor.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from unimp_jax.data import formats
from unimp_jax.eval import gallery, predictor as predictor_lib
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


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every restore, and warns that a read is read-only
    logging.set_verbosity(logging.ERROR)
  try:
    cfg = run_config(_WORKDIR.value)
    dataset = formats.UnifiedDataset(cfg.data.path)
    inputs = predictor_lib.check_request(
        len(dataset.items), dataset.tokenizer().unimp_layout['num_slots'], history=_HISTORY.value,
        new_items=_NEW_ITEM.value, top_k=_TOP_K.value, rate=_RATE.value, select=_SELECT.value)
  except (predictor_lib.InputError, checkpoint_lib.CheckpointError, formats.DatasetError) as e:
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
