"""generation: the main job's tiny preset with user-guided image generation in the task mixture.

  python -m unimp_jax.vq.train --config configs/vq.py:f8 --workdir workdir/vq-f8
  python -m unimp_jax.main --config configs/generation.py --workdir workdir/generation

The first command trains the image tokenizer and writes every catalogue picture's 16 codes
(workdir/vq-f8/image_codes.safetensors, unimp_jax.vq.codes). Generation prompts carry each history
picture's codes as its answer and end with the target's codes, so they need twice tiny's 128 tokens.

Generation is half the mixture (weight 4 beside tiny's 4) over twice tiny's steps, so that every other task
sees as many examples as in tiny. At a fifth of the mixture over 1,000 steps (about 1,600 generation
examples) the pictures took the user's colour but not the requested category (docs/BENCHMARKS.md).
"""

import os

from unimp_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))
  c.data.image_codes = 'workdir/vq-f8/image_codes.safetensors'
  c.data.tasks.generation = 4.0
  c.data.seq_len = 256
  c.train.steps = 2000
  return c
