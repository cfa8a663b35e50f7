"""The same weights on every mesh layout give the same outputs; large parameters are really sharded."""

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from unimp_jax import config as config_lib
from unimp_jax.model import summary, unimp
from unimp_jax.sharding import mesh as mesh_lib

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]


def _eight_head_tiny():
  """tiny with 8 heads in every tower, so that a tensor axis of 8 divides them."""
  cfg = config_lib.base_config()
  cfg.model.vision.num_heads = 8
  cfg.model.connector.update(num_heads=8, head_dim=8)
  cfg.model.lm.update(num_heads=8, num_kv_heads=8)
  return cfg


def _on_mesh(cfg, shape, host_state):
  cfg.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
  assert config_lib.validate(cfg, jax.device_count()) == shape
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, abstract = unimp.abstract_model(cfg.model)
  state = jax.device_put(host_state, mesh_lib.state_shardings(abstract, mesh, cfg.mesh.rules))
  return mesh, graphdef, state


def test_same_weights_same_outputs_on_every_mesh():
  cfg = _eight_head_tiny()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.lm.vocab_size, (8, 48))
  tokens[:, [3, 20, 33]] = cfg.model.image_token_id
  images = rng.normal(size=(8, 3, 32, 32, 3)).astype(np.float32)
  mask = np.ones_like(tokens, bool)
  mask[1, 40:] = False

  reference = unimp.create_sharded(cfg.model, mesh_lib.make_mesh(cfg.mesh), cfg.mesh.rules, seed=3)
  reference.lm.groups.cross.alpha_attn[...] = 0.5 + reference.lm.groups.cross.alpha_attn[...]
  host_state = jax.device_get(nnx.state(reference))

  outputs = {}
  for shape in MESHES:
    mesh, graphdef, state = _on_mesh(cfg, shape, host_state)
    with mesh_lib.use_mesh(mesh, cfg.mesh.rules):
      batch = [jax.device_put(x, mesh_lib.data_sharding(mesh, cfg.mesh.rules, x.ndim))
               for x in (tokens, images, mask)]
      logits = unimp.jit_forward(graphdef)(state, *batch)
    assert logits.sharding.spec[0] == (('data', 'fsdp') if shape[1] > 1 else 'data' if shape[0] > 1 else None)
    if shape[1] > 1:  # fsdp really splits the parameters
      embed = state['lm']['embed']
      assert embed.sharding.spec[1] == 'fsdp'
      assert embed.addressable_shards[0].data.shape == (4096 // shape[2], 128 // shape[1])
    if shape[2] > 1:
      q = state['lm']['groups']['layers']['q']['kernel']
      assert q.addressable_shards[0].data.shape[-1] == 128 // shape[2]
    outputs[shape] = np.asarray(logits)
  for shape in MESHES[1:]:
    np.testing.assert_allclose(outputs[shape], outputs[MESHES[0]], atol=1e-5, rtol=0, err_msg=str(shape))


@pytest.mark.parametrize('preset', ['1b', '3b', '7b'])
def test_paper_presets_shard_every_large_parameter_under_fsdp(preset):
  cfg = config_lib.load(f'configs/paper.py:{preset}')
  cfg.data.batch_size = 8  # the preset's 48 is for real pods; the 8 fake devices need a multiple of 8
  specs, shape = summary.abstract_specs(cfg, jax.device_count())
  assert shape == (1, 8, 1)
  large = {p: s for p, s in specs.items() if math.prod(s[0]) > 1_000_000}
  assert len(large) > 10
  unsharded = [p for p, (_, _, _, spec) in large.items() if 'fsdp' not in jax.tree.leaves(tuple(spec))]
  assert not unsharded, unsharded


SNAPSHOTS = os.path.join(os.path.dirname(__file__), 'fixtures', 'sharding')


@pytest.mark.parametrize('preset,devices', [('configs/tiny.py', 8), ('configs/paper.py:1b', 64),
                                            ('configs/paper.py:3b', 64)])
def test_every_parameters_sharding_is_the_reviewed_one(preset, devices):
  """Golden layouts: every parameter's shape, logical axes and mesh axes, from abstract shapes, against the
  file reviewed when the layout last changed. A change to the rules table or to a module's axes shows up
  here, parameter by parameter. Rewrite the files on purpose with UNIMP_UPDATE_SNAPSHOTS=1."""
  cfg = config_lib.load(preset)
  cfg.data.batch_size = devices
  specs, shape = summary.abstract_specs(cfg, devices)
  layout = {'mesh': list(shape), 'parameters': {
      '/'.join(map(str, path)): [list(shp), list(map(str, axes)), mesh_lib.describe(spec)]
      for path, (shp, _, axes, spec) in sorted(specs.items())}}
  path = os.path.join(SNAPSHOTS, preset.split('/')[-1].replace('.py', '').replace(':', '-') + '.json')
  if os.environ.get('UNIMP_UPDATE_SNAPSHOTS'):
    os.makedirs(SNAPSHOTS, exist_ok=True)
    lines = ',\n'.join(f'  {json.dumps(k)}: {json.dumps(v)}' for k, v in layout['parameters'].items())
    with open(path, 'w') as f:  # one line per parameter, for review
      f.write(f'{{"mesh": {json.dumps(layout["mesh"])}, "parameters": {{\n{lines}\n}}}}\n')
  with open(path) as f:
    reviewed = json.load(f)
  assert reviewed['mesh'] == layout['mesh']
  changed = {k: (reviewed['parameters'].get(k), v) for k, v in layout['parameters'].items()
             if reviewed['parameters'].get(k) != v}
  gone = sorted(set(reviewed['parameters']) - set(layout['parameters']))
  assert not changed and not gone, (changed, gone)
