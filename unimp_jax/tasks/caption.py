"""Stage 1, captioning: what a picture shows, in words. Nothing about shoppers.

UniMP fine-tunes a Flamingo that already knows what pictures show. No weights can be downloaded here,
so stage 1 (configs/pretrain.py) trains the same model on an image–caption corpus
(unimp_jax.data.captions). An example is 1 to `MAX_PICTURES` pictures of the corpus, each followed by
its caption as an answer span:

    <image> <answer> a red pair of sandals <|endofchunk|> <image> <answer> photo of a teal coat <eos>

The captions are answer spans, so the loss is stage 2's (every caption token is supervised), and each
caption can be read only through the gated cross-attention to its own picture (`media_mask='previous'`),
which is what stage 1 is for. A corpus has no users: an epoch runs over its pictures, and the pictures
shown before each one are drawn from (seed, epoch, picture), so every epoch groups them anew (`window`).

Stage 1 is scored by what its towers carry, not by a task metric: its report is the linear probe of
unimp_jax.eval.probe on the catalogue's pictures (`eval.probe_data`), next to the same probe of random
towers.
"""

from __future__ import annotations

import numpy as np

from unimp_jax.data import formats
from unimp_jax.eval import probe
from unimp_jax.tasks import base

CAPTION_TOKENS = 24
MAX_PICTURES = 5


class Caption(base.Task):
  name = 'caption'
  instruction = ''
  shows_item_text = False  # a chunk is its picture and the caption, never the item line
  evaluated = False

  def available(self, builder, user):
    return all(builder.dataset.items[i.item].has_image for i in user.interactions)

  def answer_length(self, builder) -> int:
    return CAPTION_TOKENS

  def history_answer(self, builder, inter):
    return list(builder.encode(' ' + builder.dataset.items[inter.item].title)[:CAPTION_TOKENS])

  def tail(self, builder, user, target, inter, rng):
    del user, target, rng
    goal = np.full(4, -1, np.int32)
    goal[0] = inter.item
    return [(np.asarray([builder.ids.image], np.int32), inter.item)], self.history_answer(builder, inter), goal

  def evaluate(self, ctx, batch):
    raise ValueError('captioning is scored by the probe of its towers (unimp_jax.eval.probe), not per example')

  def summarise(self, rows, builder):
    raise ValueError('captioning is scored by the probe of its towers (unimp_jax.eval.probe), not per example')

  def report_tables(self, predictor, split, rows):
    """Colour and kind probes of the run's towers and of the random ones it started from, on the pictures
    of the catalogue `eval.probe_data` (never in the corpus: unimp_jax.data.captions drops them)."""
    del split, rows
    cfg = predictor.cfg
    catalogue = formats.UnifiedDataset(cfg.eval.probe_data)
    towers = {'stage-1 towers': (predictor.graphdef, predictor.params), 'random towers': probe.random_towers(cfg)}
    tables = {}
    for label, (graphdef, params) in towers.items():
      result = probe.probe(graphdef, params, catalogue, seed=cfg.seed)
      title = (f'linear probe, {label} ({catalogue.path}: {result["items_fit"]} pictures fit, '
               f'{result["items_held_out"]} held out)')
      tables[title] = {f'{name} {kind}': result[f'{name}_{kind}']
                       for name in ('colour', 'category') for kind in ('accuracy', 'chance')}
    return tables


def window(dataset: formats.UnifiedDataset, picture: int, rng: np.random.Generator) -> formats.User:
  """`picture` and up to `MAX_PICTURES - 1` other pictures of the corpus before it, as one pseudo-user
  whose last interaction is the target."""
  others = rng.choice(len(dataset.items) - 1, int(rng.integers(0, MAX_PICTURES)), replace=False)
  others = np.where(others >= picture, others + 1, others)  # every item but `picture`
  return formats.User(f'caption-{picture}', tuple(formats.Interaction(item=int(i)) for i in [*others, picture]), ())


TASK = Caption()
