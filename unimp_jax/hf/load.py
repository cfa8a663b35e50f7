"""Load pretrained Hugging Face weights into UniMP and report the memory it took.

  python -m unimp_jax.hf.load --config configs/tiny.py --config.pretrained.lm=DIR [--out DIR]

Builds the model the config describes (architecture of each pretrained part from its config.json, see
unimp_jax.hf.pretrained), streams the tensors in, and prints what it loaded and this process's peak host
memory next to the model's size. `--out` writes the parameters as a checkpoint that a run starts from with
`--config.checkpoint.init_params_from=DIR` (training can also read `pretrained.*` itself).
"""

from __future__ import annotations

import os

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from unimp_jax import config as config_lib
from unimp_jax.data import pipeline
from unimp_jax.hf.pretrained import SOURCES, fit_config, load_pretrained, peak_host_bytes

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Preset file[:arg].', lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'Write the loaded parameters here (a checkpoints/ directory).')


def main(argv):
  del argv
  from unimp_jax.model import unimp
  from unimp_jax.sharding import mesh as mesh_lib
  cfg = _CONFIG.value
  if not any(cfg.pretrained[s] for s in SOURCES):
    raise app.UsageError('set at least one of --config.pretrained.vision / .lm / .idefics')
  dataset = pipeline.open_dataset(cfg)
  fit_config(cfg, dataset)
  pipeline.fit_model_to_dataset(cfg, dataset)
  config_lib.validate(cfg, jax.device_count())
  mesh = mesh_lib.make_mesh(cfg.mesh)
  model = unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=cfg.seed)
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  for line in load_pretrained(model, cfg):
    print(line)
  print(f'model parameters {model_bytes / 2**30:.2f} GiB ({cfg.model.param_dtype}); peak host memory of this '
        f'process {peak_host_bytes() / 2**30:.2f} GiB')
  if _OUT.value:
    from unimp_jax.train import checkpoint as checkpoint_lib
    params = nnx.to_pure_dict(nnx.state(model))
    with checkpoint_lib.Checkpointer(os.path.abspath(_OUT.value), save_every=1, keep=1, async_save=False) as ckpt:
      ckpt.save(0, {'params': params}, config=cfg, force=True)
    print(f'wrote {_OUT.value}: start a run from it with --config.checkpoint.init_params_from={_OUT.value}')


if __name__ == '__main__':
  app.run(main)
