"""User-guided image generation: the picture a query asks for, as image-code tokens `img_k`.

The prompts are built (history chunks answer with their pictures' codes, the final answer is the
target's codes) when the dataset carries image codes (`TaskBuilder(image_codes=...)`). No dataset or
converter writes codes yet, so the task is never available and never scored: it is the prompt format
the image tokenizer will plug into.
"""

from __future__ import annotations

import numpy as np

from unimp_jax.tasks import base


class Generation(base.Task):
  name = 'generation'
  instruction = 'Query: {query} What is the generated image ID to the query based on the history?'
  evaluated = False

  def available(self, builder, user):
    del user
    return builder.image_codes is not None

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
    raise ValueError('generation is not scored yet: no image codes, no decoder to turn codes into pictures')

  def summarise(self, rows, builder):
    raise ValueError('generation is not scored yet: no image codes, no decoder to turn codes into pictures')


TASK = Generation()
