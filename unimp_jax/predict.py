"""Recommendations, ratings, selections and generated pictures from a trained UniMP, for one user history.

  python -m unimp_jax.predict --workdir workdir/tiny --history 12,57,301 --top_k 10 \
      [--new_item 'photo.png|Title|Category|Brand|19.99' ...] [--query '...'] [--rate 44] [--select 3,9,12] \
      [--gallery out.png] [--generate 'red summer dress' --generate_out picture.png]

Prints JSON: the top-k items with their probabilities, when asked a rating with its explanation, a
selection and the path of a generated picture (a model trained with `data.image_codes`), and the titles
of every item named. From Python: unimp_jax.eval.predictor.Predictor.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from PIL import Image

from unimp_jax import runs
from unimp_jax.data import formats
from unimp_jax.eval import gallery, predictor as predictor_lib
from unimp_jax.eval.predictor import Predictor
from unimp_jax.tasks import generation
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
_GENERATE = flags.DEFINE_string('generate', '', 'A query: generate the picture of the item it asks for.')
_GENERATE_OUT = flags.DEFINE_string('generate_out', '', 'Where --generate writes its PNG.')
_DECODING = flags.DEFINE_enum('decoding', 'greedy', generation.DECODINGS, 'How --generate decodes image codes.')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every restore, and warns that a read is read-only
    logging.set_verbosity(logging.ERROR)
  try:
    cfg = runs.saved_config(_WORKDIR.value)
    dataset = formats.UnifiedDataset(cfg.data.path)
    inputs = predictor_lib.check_request(
        len(dataset.items), dataset.tokenizer().unimp_layout['num_slots'], history=_HISTORY.value,
        new_items=_NEW_ITEM.value, top_k=_TOP_K.value, rate=_RATE.value, select=_SELECT.value,
        generate=_GENERATE.value, generate_out=_GENERATE_OUT.value, image_codes=bool(cfg.data.image_codes))
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
  if _GENERATE.value:
    Image.fromarray(predictor.generate(history, _GENERATE.value, decoding=_DECODING.value)).save(_GENERATE_OUT.value)
    out['generated'] = {'query': _GENERATE.value, 'picture': _GENERATE_OUT.value, 'decoding': _DECODING.value}
  view, ids = predictor.history_view(history)  # new items get ids after the catalogue's
  if _GALLERY.value:
    title = 'history -> recommended'
    if 'rating' in out:
      title += f'; item {inputs["rate"]} rated {out["rating"]["rating"]} ({out["rating"]["expected_rating"]:.2f})'
    if 'selected' in out:
      title += f'; selected {out["selected"]} of {inputs["select"]}'
    gallery.write_gallery(_GALLERY.value, [{'title': title, 'history': ids, 'recommended': out['recommended'],
                                            'target': None}], view)
  shown = ids + [i for i, _ in out['recommended']] + out.get('selected', []) + \
      ([inputs['rate']] if inputs['rate'] is not None else [])
  out['titles'] = {str(i): view.items[i].title for i in sorted(set(shown))}
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  app.run(main)
