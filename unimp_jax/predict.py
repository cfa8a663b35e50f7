"""Recommendations, ratings and selections from a trained UniMP, for one user history.

  python -m unimp_jax.predict --workdir workdir/tiny --history 12,57,301 --top_k 10 \
      [--new_item 'photo.png|Title|Category|Brand|19.99' ...] [--query '...'] [--rate 44] [--select 3,9,12] \
      [--gallery out.png]

Prints JSON: the top-k items with their probabilities, and when asked a rating with its explanation and
a selection. From Python: unimp_jax.eval.predictor.Predictor.
"""

from __future__ import annotations

import json

from absl import app, flags

from unimp_jax.eval import gallery
from unimp_jax.eval.predictor import NewItem, Predictor

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run directory (with checkpoints/).', required=True)
_HISTORY = flags.DEFINE_list('history', [], 'Catalogue item ids, oldest first.')
_NEW_ITEM = flags.DEFINE_multi_string('new_item', [], "A new history item 'image|title|category|brand|price' "
                                      '(after the catalogue ids).')
_TOP_K = flags.DEFINE_integer('top_k', 10, 'How many items to recommend.')
_QUERY = flags.DEFINE_string('query', '', 'A search query (search instead of recommendation).')
_RATE = flags.DEFINE_integer('rate', None, 'An item to predict a rating and explanation for.')
_SELECT = flags.DEFINE_list('select', [], 'Candidate item ids for image selection.')
_GALLERY = flags.DEFINE_string('gallery', '', 'Write a PNG (+ HTML) of the history and the recommendations.')


def _new_item(spec: str) -> NewItem:
  parts = spec.split('|')
  if len(parts) < 2:
    raise app.UsageError(f"--new_item {spec!r}: expected 'image|title|category|brand|price'")
  parts += [''] * (5 - len(parts))
  return NewItem(parts[0], parts[1], parts[2], parts[3], float(parts[4]) if parts[4] else None)


def main(argv):
  del argv
  predictor = Predictor.from_workdir(_WORKDIR.value)
  history = [int(h) for h in _HISTORY.value] + [_new_item(s) for s in _NEW_ITEM.value]
  out = {'recommended': predictor.recommend(history, _TOP_K.value, _QUERY.value)}
  if _RATE.value is not None:
    out['rating'] = predictor.rate(history, _RATE.value)
  if _SELECT.value:
    out['selected'] = predictor.select(history, [int(c) for c in _SELECT.value])
  if _GALLERY.value:
    gallery.write_gallery(_GALLERY.value, [{'title': 'history -> recommended', 'history': [
        h for h in history if not isinstance(h, NewItem)], 'recommended': out['recommended'], 'target': None}],
                          predictor.dataset)
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  app.run(main)
