"""The main job.

  python -m unimp_jax.main --config configs/tiny.py --workdir workdir/tiny [--config.KEY=VALUE ...]

Until the training loop lands this job proves data and model end to end on the configured mesh: it
builds the embedded default dataset at `data.path` if it is missing, sizes the vocabulary from the
dataset's tokenizer, validates the config, builds the mesh, initialises the model directly sharded,
draws one multi-task batch from the Grain pipeline and runs the compiled forward pass on it, then
writes `forward.json` into the workdir.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from unimp_jax import config as config_lib
from unimp_jax.data import pipeline, tasks
from unimp_jax.model import unimp, vision
from unimp_jax.sharding import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Preset file[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where outputs go.', required=True)
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (SLURM, TPU pods).')


def main(argv):
  del argv
  if _MULTIHOST.value:
    jax.distributed.initialize()
  cfg = _CONFIG.value
  os.makedirs(_WORKDIR.value, exist_ok=True)

  # ---- data -----------------------------------------------------------------------------------------
  dataset = pipeline.open_dataset(cfg)
  pipeline.fit_model_to_dataset(cfg, dataset)
  builder = tasks.TaskBuilder(dataset, dataset.tokenizer(), seq_len=cfg.data.seq_len,
                              num_images=cfg.data.num_images, history=cfg.data.history)
  batches = iter(pipeline.make_dataset(builder, cfg.data, seed=cfg.seed))

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
  local = next(batches)
  pad = dataset.tokenizer().pad_token_id
  with mesh_lib.use_mesh(mesh, cfg.mesh.rules):
    batch = pipeline.global_batch(
        dict(tokens=local['tokens'], images=local['images'], mask=local['tokens'] != pad), mesh, cfg.mesh.rules)
    model_inputs = (batch['tokens'], jax.jit(vision.normalize)(batch['images']), batch['mask'])

    # ---- forward pass -------------------------------------------------------------------------------
    forward = unimp.jit_forward(graphdef)
    start = time.perf_counter()
    logits = forward(state, *model_inputs).block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    logits = forward(state, *model_inputs).block_until_ready()
    step_s = time.perf_counter() - start

  finite = bool(jax.device_get(jnp.isfinite(logits).all()))
  report = dict(dataset=dict(path=dataset.path, **dataset.manifest['counts'],
                             oracle_hr_at_10=dataset.manifest['extra'].get('oracle_hr@10'),
                             colour_blind_hr_at_10=dataset.manifest['extra'].get('colour_blind_hr@10')),
                batch_tasks=[tasks.TASKS[t] for t in local['task']],
                mesh=dict(zip(mesh_lib.MESH_AXES, mesh_shape)), parameters=int(num_params),
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
