"""benchmark: the tiny model trained longer, as `python -m unimp_jax.benchmark` runs it on a CPU.

From scratch, so the cross-attention gates start open (model.lm.alpha_init): at 0 they stay near 0
and the pictures never reach the LM (see unimp_jax/model/lm.py). Each variant sets its own item rows
(unimp_jax.benchmark.VARIANTS).
"""

from unimp_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.lm.alpha_init = 1.0
  c.train.steps = 1200
  c.data.tasks.update(recommendation=2.0, search=1.0, preference=0.5, selection=0.5)  # mostly ranking
  c.checkpoint.every = 400
  return c
