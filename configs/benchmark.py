"""benchmark: configs/tiny.py trained three times longer, as `python -m unimp_jax.benchmark` runs it on a CPU.

The main job's preset (content item rows, gates open, plain cross-entropy, the next-item loss; its
docstring says why) at 3,000 steps: recommendation and search were still improving at 2,500
(docs/BENCHMARKS.md, "Next-item supervision"). Each variant sets its own item rows and ids
(unimp_jax.benchmark.VARIANTS); the semantic-id variant trains without the next-item loss, which
predicts one atomic id token.
"""

import os

from unimp_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tiny.py'))
  c.train.steps = 3000
  c.checkpoint.every = 500
  return c
