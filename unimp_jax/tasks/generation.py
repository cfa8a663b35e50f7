"""User-guided image generation: the picture a query asks for, as image-code tokens `img_k`.

History chunks answer with their pictures' codes and the final answer is the target's codes, from the
file `data.image_codes` names (unimp_jax.vq.codes, written by `python -m unimp_jax.vq.train`). The task
trains in the mixture. Decoding is constrained to exactly h * w code tokens (`generate_codes`); the codes
are drawn by the image tokenizer in the codes file's folder and scored against the target picture (PSNR,
SSIM by dm-pix) and by a classifier trained on the item pictures (unimp_jax.vq.judge): does the picture
show the target's category and the user's most frequent history colour, and how far are generated
pictures from real ones (Fréchet distance on the judge's features).
"""

from __future__ import annotations

import functools
import os

import dm_pix
import jax
import numpy as np
from PIL import Image

from unimp_jax import baselines
from unimp_jax.data import formats, splits
from unimp_jax.eval import generate, metrics
from unimp_jax.tasks import base
from unimp_jax.vq import judge as judge_lib
from unimp_jax.vq import train as vq_train

DECODINGS = ('greedy', 'top_p', 'beam')


def generate_codes(graphdef, params, builder, tokens, images, lengths, *, decoding: str = 'greedy',
                   rng: jax.Array | None = None, top_p: float = 0.9, temperature: float = 1.0,
                   num_beams: int = 4) -> np.ndarray:
  """Image codes int32 [B, h * w] in [0, K) for generation prompts, through the KV-cache generator.

  Every step may emit only `img_k` tokens and there are exactly h * w steps (end-of-sequence is never
  allowed), so every row is a whole picture. `greedy`: the most likely code each step; `top_p`: sampled
  from the top-p nucleus at `temperature` (needs `rng`); `beam`: the best of `num_beams` beams.
  """
  if decoding not in DECODINGS:
    raise ValueError(f'decoding {decoding!r} is not one of {DECODINGS}')
  if builder.image_codes is None:
    raise ValueError('this model was trained without image codes (config.data.image_codes)')
  ids, length = builder.ids, builder.image_codes.shape[1]
  first = ids.image_code(0)
  vocab = ids.added_range[1]
  allowed = np.zeros((len(tokens), vocab), bool)
  allowed[:, first:first + ids.num_image_codes] = True
  kw = dict(max_new=length, pad_id=builder.pad, eos_id=builder.eos)
  if decoding == 'beam':
    out, _ = generate.beam_search(graphdef, params, tokens, images, lengths, allowed_bv=allowed,
                                  num_beams=num_beams, **kw)
    out = np.asarray(out)[:, 0]
  else:
    if decoding == 'top_p' and rng is None:
      raise ValueError('top-p decoding samples: pass rng')
    out = np.asarray(generate.sample(graphdef, params, tokens, images, lengths,
                                     jax.random.key(0) if rng is None else rng, allowed,
                                     temperature=0.0 if decoding == 'greedy' else temperature, top_p=top_p, **kw))
  return (out - first).astype(np.int32)


@functools.cache
def _image_tokenizer(directory: str):
  return vq_train.load(directory)


@functools.cache
def _judge(dataset_path: str) -> judge_lib.Judge:
  return judge_lib.train(formats.UnifiedDataset(dataset_path))


def pictures(builder, codes: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3]: codes [N, h * w] drawn by the image tokenizer that made the run's codes."""
  graphdef, params, cfg = _image_tokenizer(os.path.dirname(builder.image_codes_path))
  side = builder.dataset.image_size // cfg.model.downsample
  return vq_train.pictures_from_codes(graphdef, params, np.asarray(codes).reshape(-1, side, side))


def target_items(dataset, users, targets) -> np.ndarray:
  return np.asarray([dataset.user(int(u)).interactions[int(t)].item for u, t in zip(users, targets)])


def picture_scores(builder, users, targets, shown: np.ndarray) -> dict[str, float]:
  """How pictures `shown` [N, H, W, 3] (one per test user) match what each user asked for: PSNR and SSIM
  to the target picture; the share the judge sees as the target's category, as the user's most frequent
  history colour and as the target's colour; and the Fréchet distance of the judge's features to the
  target pictures'."""
  dataset = builder.dataset
  items = target_items(dataset, users, targets)
  real = dataset.images(items)
  judge = _judge(dataset.path)
  seen, labels = judge.predict(shown), judge_lib.item_labels(dataset)
  scale = lambda x: x.astype(np.float32) / 255.0
  # PSNR of the mean squared error over all pictures: a reference that shows the target itself (the most
  # bought picture can be it) has an infinite PSNR, which would make a mean of per-picture PSNRs infinite.
  out = {'PSNR (dB, of the mean squared error)': float(-10 * np.log10(dm_pix.mse(scale(real), scale(shown)).mean())),
         'SSIM': float(dm_pix.ssim(scale(real), scale(shown)).mean()),
         'category shown': float((seen['category'] == labels['category'][1][items]).mean())}
  if 'colour' in seen:
    colour = labels['colour'][1]
    histories = [[i.item for i in dataset.user(int(u)).interactions[:int(t)]] for u, t in zip(users, targets)]
    favourite = metrics.favourite_colours(histories, colour)
    out["user's colour shown"] = float((seen['colour'] == favourite).mean())
    out["target's colour shown"] = float((seen['colour'] == colour[items]).mean())
  out['Fréchet distance (judge features)'] = judge_lib.frechet_distance(judge.features(shown), judge.features(real))
  out['users'] = len(items)
  return out


def reference_scores(builder, split: str, rows) -> dict[str, dict[str, float]]:
  """`picture_scores` of two references for the evaluation's users: the image tokenizer's reconstruction
  of the target (the ceiling), and the most bought picture of the target's category (user-blind)."""
  items = target_items(builder.dataset, rows['user'], rows['target'])
  bought = np.bincount(np.concatenate(baselines.training_sequences(builder.dataset, split)),
                       minlength=len(builder.dataset.items))
  category = np.asarray([item.category for item in builder.dataset.items])
  popular = {c: int(np.flatnonzero(category == c)[bought[category == c].argmax()]) for c in set(category)}
  references = {
      'tokenizer reconstruction of the target (ceiling)': pictures(builder, builder.image_codes[items]),
      "most bought picture of the target's category (user-blind)":
          builder.dataset.images([popular[c] for c in category[items]])}
  return {name: picture_scores(builder, rows['user'], rows['target'], shown) for name, shown in references.items()}


class Generation(base.Task):
  name = 'generation'
  instruction = 'Query: {query} What is the generated image ID to the query based on the history?'

  def available(self, builder, user):
    """Every item the user bought has a picture (so has codes), as preference needs every rating."""
    return builder.image_codes is not None and all(builder.image_codes[i.item, 0] >= 0 for i in user.interactions)

  def answer_length(self, builder) -> int:
    return 0 if builder.image_codes is None else builder.image_codes.shape[1]

  def history_answer(self, builder, inter):
    return list(builder.ids.image_code(builder.image_codes[inter.item]))

  def tail(self, builder, user, target, inter, rng):
    del user, target, rng
    goal = np.full(4, -1, np.int32)
    goal[0] = inter.item
    return [], list(builder.ids.image_code(builder.image_codes[inter.item])), goal

  def evaluate(self, ctx, batch):
    """Greedy codes of each prompt: 'codes' int32 [B, h * w]."""
    return {'codes': generate_codes(ctx.graphdef, ctx.params, ctx.builder, batch.tokens, batch.images,
                                    batch.lengths)}

  def summarise(self, rows, builder):
    return picture_scores(builder, rows['user'], rows['target'], pictures(builder, rows['codes']))

  def report_tables(self, predictor, split, rows):
    """The references' scores on the same test users, and the judge's own held-out accuracy."""
    builder = predictor.builder
    tables = {f'generation reference: {name}': scores
              for name, scores in reference_scores(builder, split, rows).items()}
    judge = _judge(builder.dataset.path)
    tables['generation judge (held-out item pictures)'] = {
        f'{head} accuracy': acc for head, acc in judge.accuracy.items()} | {
        f'{head} chance': 1 / len(names) for head, names in judge.labels.items()}
    return tables

  def gallery(self, predictor, split, workdir, num_users):
    """A few test users: their last history pictures, then the picture generated for their query, then
    the real target."""
    dataset, builder = predictor.dataset, predictor.builder
    rows, lines = [], []
    for u in splits.split_users(dataset, split, 'test')[:num_users]:
      user = dataset.user(int(u))
      target = splits.target_position(len(user.interactions), split, 'test', None)
      history = [i.item for i in user.interactions[:target]]
      query = builder.query_text(user.interactions[target])
      shown = history[-builder.num_images:]
      rows.append(list(dataset.images(shown)) + [predictor.generate(history, query),
                                                 dataset.images([user.interactions[target].item])[0]])
      lines.append(f'| test user {u} | {" ".join(map(str, shown))} | {query} |')
    if jax.process_index() == 0:
      _gallery_png(os.path.join(workdir, 'generation.png'), rows)
    table = '\n'.join(['| row | history items shown | query |', '|---|---|---|', *lines])  # one block: the
    return ['## Generation gallery (each row: the last history pictures, the generated picture, the real '  # report
            'target)', '![generation](generation.png)', table]  # puts a blank line between blocks


def _gallery_png(path: str, rows: list[list[np.ndarray]], scale: int = 4) -> None:
  """Rows of equally sized pictures (fewer history pictures are padded with white), written atomically."""
  width = max(len(r) for r in rows)
  blank = np.full_like(rows[0][0], 255)
  grid = np.concatenate([np.concatenate([blank] * (width - len(r)) + r, 1) for r in rows], 0)
  image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)
  image.save(path + '.tmp.png')
  os.replace(path + '.tmp.png', path)


TASK = Generation()
