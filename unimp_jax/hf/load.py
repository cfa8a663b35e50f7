"""Load pretrained Hugging Face weights into UniMP and report the memory it took.

  python -m unimp_jax.hf.load --config configs/tiny.py --config.pretrained.lm=DIR [--config.pretrained.vision=DIR]

Builds the model the config describes (architecture of each pretrained part from its config.json, see
unimp_jax.hf.pretrained), streams the tensors in, and prints what it loaded and the peak host memory while
importing next to the model's size: a check that a directory imports before a run reads the same keys.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from unimp_jax import runs
from unimp_jax.data import datasets
from unimp_jax.hf.pretrained import SOURCES, load_pretrained, peak_host_bytes, reset_peak_host_bytes

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Preset file[:arg].', lock_config=True)


def main(argv):
  del argv
  from unimp_jax.model import unimp
  from unimp_jax.sharding import mesh as mesh_lib
  cfg = _CONFIG.value
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if not any(cfg.pretrained[s] for s in SOURCES):
    raise app.UsageError('set at least one of --config.pretrained.vision / .lm / .idefics')
  dataset = datasets.open_dataset(cfg)
  runs.resolve(cfg, dataset)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  model = unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=cfg.seed)
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(jax.block_until_ready(nnx.state(model, nnx.Param))))
  window = 'while importing' if reset_peak_host_bytes() else 'of this process'
  for line in load_pretrained(model, cfg):
    print(line)
  print(f'model parameters {model_bytes / 2**30:.2f} GiB ({cfg.model.param_dtype}); peak host memory {window} '
        f'{peak_host_bytes() / 2**30:.2f} GiB')


if __name__ == '__main__':
  app.run(main)
