"""The main job.

  python -m unimp_jax.main --config configs/tiny.py --workdir workdir/tiny [--config.KEY=VALUE ...]

Until the training loop lands this job proves the model end to end on the configured mesh: it
validates the config, builds the mesh, initialises the model directly sharded, and runs the compiled
forward pass on a batch shaped like a UniMP prompt (history chunks `<image> text ... <|endofchunk|>`
over `data.num_images` image slots), then writes `forward.json` into the workdir.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from unimp_jax import config as config_lib
from unimp_jax.model import unimp
from unimp_jax.sharding import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Preset file[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where outputs go.', required=True)
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (SLURM, TPU pods).')


def prompt_like_batch(cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """This process's rows of a global batch: one `<image>` per history chunk, rest random text."""
  d, m = cfg.data, cfg.model
  rows = d.batch_size // jax.process_count()
  tokens = rng.integers(0, m.lm.vocab_size, (rows, d.seq_len))
  chunk = d.seq_len // (d.num_images + 1)
  tokens[:, np.arange(d.num_images) * chunk] = m.image_token_id
  images = rng.normal(size=(rows, d.num_images, m.vision.image_size, m.vision.image_size, m.vision.channels))
  return dict(tokens=tokens.astype(np.int32), images=images.astype(np.float32),
              mask=np.ones((rows, d.seq_len), bool))


def main(argv):
  del argv
  if _MULTIHOST.value:
    jax.distributed.initialize()
  cfg = _CONFIG.value
  os.makedirs(_WORKDIR.value, exist_ok=True)

  # ---- set up the mesh ------------------------------------------------------------------------------
  mesh_shape = config_lib.validate(cfg, jax.device_count())
  mesh = mesh_lib.make_mesh(cfg.mesh)
  logging.info('mesh (data, fsdp, tensor) = %s over %d devices', mesh_shape, jax.device_count())

  # ---- create the model, sharded --------------------------------------------------------------------
  start = time.perf_counter()
  model = unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=cfg.seed)
  graphdef, state = nnx.split(model)
  num_params = sum(x.size for x in jax.tree.leaves(state))
  init_s = time.perf_counter() - start

  # ---- shard and transfer a batch -------------------------------------------------------------------
  local = prompt_like_batch(cfg, np.random.default_rng(cfg.seed + jax.process_index()))
  with mesh_lib.use_mesh(mesh, cfg.mesh.rules):
    batch = {k: jax.make_array_from_process_local_data(mesh_lib.data_sharding(mesh, cfg.mesh.rules, v.ndim), v)
             for k, v in local.items()}

    # ---- forward pass -------------------------------------------------------------------------------
    forward = unimp.jit_forward(graphdef)
    start = time.perf_counter()
    logits = forward(state, batch['tokens'], batch['images'], batch['mask']).block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    logits = forward(state, batch['tokens'], batch['images'], batch['mask']).block_until_ready()
    step_s = time.perf_counter() - start

  finite = bool(jax.device_get(jnp.isfinite(logits).all()))
  report = dict(mesh=dict(zip(mesh_lib.MESH_AXES, mesh_shape)), parameters=int(num_params),
                logits_shape=list(logits.shape), logits_finite=finite, init_seconds=round(init_s, 3),
                first_call_seconds=round(compile_s, 3), forward_seconds=round(step_s, 4),
                tokens_per_second=round(logits.shape[0] * logits.shape[1] / step_s, 1))
  if jax.process_index() == 0:
    with open(os.path.join(_WORKDIR.value, 'forward.json'), 'w') as f:
      json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
  if not finite:
    raise SystemExit('forward pass produced non-finite logits')


if __name__ == '__main__':
  app.run(main)
