"""User-guided image generation: the picture a query asks for, as image-code tokens `img_k`.

History chunks answer with their pictures' codes and the final answer is the target's codes, from the
file `data.image_codes` names (unimp_jax.vq.codes, written by `python -m unimp_jax.vq.train`). The task
trains in the mixture; it is not scored yet (constrained decoding and the picture scores come next).
"""

from __future__ import annotations

import jax
import numpy as np

from unimp_jax.eval import generate
from unimp_jax.tasks import base

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


class Generation(base.Task):
  name = 'generation'
  instruction = 'Query: {query} What is the generated image ID to the query based on the history?'
  evaluated = False

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
    raise ValueError('generation is not scored yet: constrained decoding to pictures comes next')

  def summarise(self, rows, builder):
    raise ValueError('generation is not scored yet: constrained decoding to pictures comes next')


TASK = Generation()
