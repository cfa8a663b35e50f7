"""Stage 1: image–caption pretraining of the tiny model, the start of a stage-2 run (configs/tiny.py).

    python -m unimp_jax.main --config configs/pretrain.py --workdir workdir/pretrain
    python -m unimp_jax.main --config configs/tiny.py --workdir workdir/tiny-from-stage1 \\
        --config.checkpoint.init_params_from=workdir/pretrain/checkpoints

The model is tiny's, so every stage-1 parameter has a stage-2 place (unimp_jax.train.checkpoint.
init_params; the item tokens and content-row projections start fresh). The corpus is the embedded caption
corpus (unimp_jax.data.captions: 3,000 colourised Fashion-MNIST photos that are not the catalogue's,
captioned with their colour and kind), built at `data.path` on first use with the catalogue's base
vocabulary. The report shows linear probes of the towers on the catalogue's pictures, next to the random
towers the run started from (unimp_jax.tasks.caption).
"""

from unimp_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.data.path = 'data/generated/captions'
  c.eval.probe_data = 'data/generated/fashion'
  c.data.tasks.update(recommendation=0.0, search=0.0, preference=0.0, selection=0.0, generation=0.0, caption=1.0)
  c.model.lm.alpha_init = 1.0  # as configs/tiny.py: the captions are read through the cross-attention
  c.train.steps = 600
  c.checkpoint.every = 200
  return c
