"""A compile-ahead memory plan: the real train step, compiled from abstract shapes on a fake mesh.

    python -m unimp_jax.plan --config configs/paper.py:3b --devices 64 --config.data.batch_size=64

Nothing is allocated and no dataset is read: the parameters, optimizer state and batch are
`jax.ShapeDtypeStruct`s with their shardings, and the step is `jax.jit(...).lower(...).compile()`d as the
trainer compiles it. On CPU, `--devices` fake host devices stand in for the accelerators (per-device
numbers are what each device would hold; XLA's CPU and TPU/GPU memory planners differ in detail, so
leave headroom). The vocabulary is the config's (`model.lm.added_vocab_size` stands in for the dataset's
added tokens). Prints per-device argument, output, temporary and peak memory, FLOPs per step (XLA cost
analysis, per device; it counts the body of a loop once, so with scanned layers one layer per stack:
`--config.model.scan_layers=false` counts them all) and the compile time; the last line is one JSON object with the keys
`argument_bytes`, `output_bytes`, `temp_bytes`, `peak_bytes`, `flops` and `compile_s`.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'A config file (file.py:arg).')
_DEVICES = flags.DEFINE_integer('devices', 8, 'Fake CPU devices to compile for (the mesh is config.mesh over them).')
_TOPOLOGY = flags.DEFINE_string('topology', None, "Compile with the TPU compiler for this topology instead, e.g. "
                                "'v5e:8x8' or 'v4:4x4x4' (needs libtpu: pip install -e '.[tpu]'; no TPU needed).")

GIB = 2 ** 30


def abstract_batch(cfg, mesh) -> dict:
  """The step's inputs (unimp_jax.train.step.step_inputs) as sharded ShapeDtypeStructs."""
  import jax
  import numpy as np
  from unimp_jax.sharding import mesh as mesh_lib
  b, t = cfg.data.batch_size, cfg.data.seq_len
  shapes = {'tokens': ((b, t), np.int32), 'answer_mask': ((b, t), np.bool_), 'weight': ((b,), np.float32),
            'task': ((b,), np.int32)}
  if cfg.data.num_images and cfg.data.item_content in ('image', 'image+text'):
    size = cfg.model.vision.image_size
    shapes['images'] = ((b, cfg.data.num_images, size, size, 3), np.uint8)
  if cfg.train.next_item_weight:
    shapes['next_items'] = ((b, t), np.int32)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=mesh_lib.data_sharding(mesh, cfg.mesh.rules, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def tpu_devices(topology: str) -> list:
  """The devices of a described TPU topology, for compiling without the hardware (libtpu's compiler)."""
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(platform='tpu', topology_name=topology, chip_config_name='default',
                                           chips_per_host_bounds=(2, 2, 1), num_slices=1).devices)


def plan(cfg, devices=None) -> dict:
  """Compiles the train step for `cfg` on `devices` (default: jax's); per-device bytes, FLOPs, compile
  seconds."""
  import jax
  from flax import nnx
  from unimp_jax import config as config_lib
  from unimp_jax.model import unimp
  from unimp_jax.sharding import mesh as mesh_lib
  from unimp_jax.train import optim
  from unimp_jax.train import step as step_lib
  if cfg.model.item_embeddings != 'learned':
    raise ValueError("config.model.item_embeddings: the plan compiles learned item rows; content rows need the "
                     "catalogue's pictures (set it to 'learned', as configs/paper.py does)")
  devices = jax.devices() if devices is None else devices
  config_lib.validate(cfg, len(devices))
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  graphdef, abstract_params = unimp.abstract_model(cfg.model, cfg.seed)
  tx = optim.make_optimizer(cfg.train, nnx.to_pure_dict(abstract_params))
  shardings, abstract_state = step_lib.state_shardings(abstract_params, tx, mesh, cfg.mesh.rules)
  batch = abstract_batch(cfg, mesh)
  train_step = step_lib.make_train_step(
      graphdef, tx, cfg.train, pad_id=0, shardings=shardings,
      batch_sharding=step_lib.batch_shardings(mesh, cfg.mesh.rules, {k: v.ndim for k, v in batch.items()}))
  begin = time.perf_counter()
  with mesh_lib.use_mesh(mesh, cfg.mesh.rules):
    compiled = train_step.lower(abstract_state, batch, None).compile()
  seconds = time.perf_counter() - begin
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  argument, output = memory.argument_size_in_bytes, memory.output_size_in_bytes
  temp, alias = memory.temp_size_in_bytes, memory.alias_size_in_bytes
  # Donated state aliases its output: at the peak a device holds the arguments, the temporaries and
  # whatever output does not reuse an argument's buffer.
  return {'argument_bytes': argument, 'output_bytes': output, 'temp_bytes': temp,
          'peak_bytes': argument + temp + output - alias, 'flops': float(cost.get('flops', 0.0)),
          'compile_s': round(seconds, 2)}


def main(argv):
  del argv
  # Fake devices must be asked for before jax starts its CPU backend (its first use, below).
  os.environ['XLA_FLAGS'] = ' '.join(
      [os.environ.get('XLA_FLAGS', ''), f'--xla_force_host_platform_device_count={_DEVICES.value}']).strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax
  from unimp_jax.sharding import mesh as mesh_lib
  if _TOPOLOGY.value:
    devices, target = tpu_devices(_TOPOLOGY.value), f'TPU {_TOPOLOGY.value} (libtpu\'s compiler)'
  elif jax.device_count() != _DEVICES.value:
    raise app.UsageError(f'asked for {_DEVICES.value} devices, jax has {jax.device_count()} '
                         f'({jax.devices()[0].platform}); XLA_FLAGS={os.environ["XLA_FLAGS"]!r}')
  else:
    devices, target = jax.devices(), 'fake CPU devices'
  cfg = _CONFIG.value
  shape = mesh_lib.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, len(devices))
  result = plan(cfg, devices)
  print(f'{len(devices)} {target}: mesh (data, fsdp, tensor) = {shape}, batch {cfg.data.batch_size} x '
        f'{cfg.data.seq_len} tokens, remat {cfg.model.remat}, compute {cfg.model.dtype}')
  for key in ('argument_bytes', 'output_bytes', 'temp_bytes', 'peak_bytes'):
    print(f'{key.replace("_bytes", ""):>9} {result[key] / GIB:8.2f} GiB per device')
  counted = ('every layer' if not cfg.model.scan_layers else
             'a scanned layer once: --config.model.scan_layers=false counts every layer')
  print(f'    flops {result["flops"]:.3e} per device per step (XLA cost analysis; it counts {counted}); '
        f'compiled in {result["compile_s"]:.1f} s')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
