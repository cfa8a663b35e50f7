"""Prints a preset's parameter counts and every parameter's sharding, from abstract shapes only.

  python -m unimp_jax.model.summary --config configs/paper.py:7b --devices 64 --config.mesh.tensor=4

Nothing is allocated, so paper-scale presets print in seconds on a laptop. `--devices` lays the mesh
out for a device count other than this machine's (an abstract mesh); the counts are checked against
the analytic formula in `unimp_jax.config.num_params_analytic`.
"""

from __future__ import annotations

import math

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from unimp_jax import config as config_lib
from unimp_jax.model import unimp
from unimp_jax.sharding import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Preset file[:arg].', lock_config=True)
_DEVICES = flags.DEFINE_integer('devices', None, 'Device count to lay the mesh out for (default: this host).')
_PER_PARAM = flags.DEFINE_bool('per_param', True, 'Print one line per parameter.')


def abstract_specs(cfg, num_devices: int):
  """{path: (shape, dtype, logical axes, PartitionSpec)} for every parameter, and the mesh shape."""
  shape = config_lib.validate(cfg, num_devices)
  mesh = jax.sharding.AbstractMesh(shape, mesh_lib.MESH_AXES)
  _, state = unimp.abstract_model(cfg.model)
  specs = {}
  for path, var in nnx.to_flat_state(nnx.state(state, nnx.Param)):
    axes = var.get_metadata()['logical_axes']
    specs[path] = (var.shape, var.dtype, axes, mesh_lib.logical_to_spec(axes, cfg.mesh.rules, var.shape, mesh))
  return specs, shape


def summarize(cfg, num_devices: int, per_param: bool = True) -> str:
  specs, shape = abstract_specs(cfg, num_devices)
  counts = {name: sum(math.prod(s[0]) for p, s in specs.items() if p[0] == name)
            for name in ('vision', 'connector', 'lm', 'items')}
  counts['total'] = sum(counts.values())
  analytic = config_lib.num_params_analytic(cfg.model)
  lines = [f'mesh (data, fsdp, tensor) = {shape}']
  for name, n in counts.items():
    lines.append(f'{name:>10}: {n:>15,d} parameters (analytic {analytic[name]:,d})')
  if per_param:
    lines.append(f'{"parameter":<44} {"shape":<24} {"logical axes":<36} mesh axes')
    for path, (shp, _, axes, spec) in sorted(specs.items()):
      lines.append(f'{"/".join(map(str, path)):<44} {str(shp):<24} {str(axes):<36} {mesh_lib.describe(spec)}')
  return '\n'.join(lines)


def main(argv):
  del argv
  print(summarize(_CONFIG.value, _DEVICES.value or jax.device_count(), _PER_PARAM.value))


if __name__ == '__main__':
  app.run(main)
