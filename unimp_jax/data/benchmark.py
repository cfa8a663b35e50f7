"""Is the input pipeline ever the bottleneck? Pipeline throughput next to the model's consumption rate.

  python -m unimp_jax.data.benchmark --config configs/tiny.py [--steps 30]

Prints examples/s of the Grain pipeline with 0 and 2 worker processes and of one compiled
forward+backward pass of the model on the same batches (a stand-in for the train step until the
training loop lands: it has no optimizer update, so the real step is slower and the ratio below is a
lower bound). Goal: pipeline >= 3x the step's need. All rates come from the same process, measured one
after another after a warm-up.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from unimp_jax import runs
from unimp_jax.data import datasets, pipeline
from unimp_jax.model import unimp
from unimp_jax.sharding import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Preset file[:arg].', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 30, 'Batches timed per measurement (after 3 warm-up batches).')


def pipeline_rate(builder, data_cfg, seed: int, steps: int) -> float:
  it = iter(pipeline.make_dataset(builder, data_cfg, seed=seed))
  for _ in range(3):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * data_cfg.batch_size / (time.perf_counter() - start)


def step_rate(cfg, builder, steps: int) -> float:
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, state = nnx.split(unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=cfg.seed))
  pad = builder.tokenizer.pad_token_id

  @jax.jit
  def grad_step(state, batch):
    def loss_fn(state):
      tokens = batch['tokens']
      images = batch.get('images')  # None: text / ids-only runs
      logits = nnx.merge(graphdef, state)(tokens, images, tokens != pad)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
      mask = batch['answer_mask'][:, 1:] * batch['weight'][:, None]
      return (ce * mask).sum() / jnp.maximum(batch['answer_mask'][:, 1:].sum(), 1)
    return jax.grad(loss_fn)(state)

  it = iter(pipeline.make_dataset(builder, cfg.data, seed=cfg.seed))
  with mesh_lib.use_mesh(mesh, cfg.mesh.rules):
    batches = [pipeline.global_batch(next(it), mesh, cfg.mesh.rules) for _ in range(4)]
    jax.block_until_ready(grad_step(state, batches[0]))
    start = time.perf_counter()
    for i in range(steps):
      grads = grad_step(state, batches[i % len(batches)])
    jax.block_until_ready(grads)
  return steps * cfg.data.batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  cfg = _CONFIG.value
  dataset = datasets.open_dataset(cfg)
  runs.resolve(cfg, dataset)
  builder = datasets.make_builder(cfg, dataset)  # atomic ids (semantic ones need a run)
  rates = {}
  for workers in (0, 2):
    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.workers = workers
    rates[f'pipeline, {workers} workers'] = pipeline_rate(builder, data_cfg, cfg.seed, _STEPS.value)
  need = step_rate(cfg, builder, _STEPS.value)
  print(f'batch {cfg.data.batch_size} x {cfg.data.seq_len} tokens, {cfg.data.num_images} image slots, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s)')
  print(f'{"":34} {"examples/s":>12} {"x step need":>12}')
  print(f'{"model forward+backward (no update)":34} {need:12.1f} {1.0:12.2f}')
  for name, rate in rates.items():
    print(f'{name:34} {rate:12.1f} {rate / need:12.2f}')


if __name__ == '__main__':
  app.run(main)
