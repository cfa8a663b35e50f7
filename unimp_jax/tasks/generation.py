"""User-guided image generation: the picture a query asks for, as image-code tokens `img_k`.

History chunks answer with their pictures' codes and the final answer is the target's codes, from the
file `data.image_codes` names (unimp_jax.vq.codes, written by `python -m unimp_jax.vq.train`). The task
trains in the mixture; it is not scored yet (constrained decoding and the picture scores come next).
"""

from __future__ import annotations

import numpy as np

from unimp_jax.tasks import base


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
