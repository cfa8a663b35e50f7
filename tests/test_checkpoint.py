"""Checkpoints: restoring onto another mesh, async saves and retention, the data position, the config, and
falling back past corrupted or half-written steps."""

import glob
import json
import logging
import os
import subprocess
import sys
import re
import shutil
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from unimp_jax import config as config_lib
from unimp_jax.data import datasets, formats, pipeline, prompts, synthetic
from unimp_jax.model import unimp
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.train import checkpoint as checkpoint_lib
from unimp_jax.train import step as step_lib


def _mesh(data, fsdp, tensor):
  cfg = config_lib.base_config()
  cfg.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return mesh_lib.make_mesh(cfg.mesh)


@pytest.fixture(scope='module')
def abstract_params_state():
  return nnx.filter_state(unimp.abstract_model(config_lib.base_config().model)[1], nnx.Param)


def _abstract_train_state(params_state, mesh, tx):
  """The tiny model's train state as ShapeDtypeStructs carrying the shardings of `mesh` (what a trainer
  passes to `restore`)."""
  return step_lib.state_shardings(params_state, tx, mesh, config_lib.base_config().mesh.rules)[1]


def _random_arrays(abstract, seed):
  """Random values for every leaf, placed on the leaf's sharding. (The checkpointer sees only a pytree of
  arrays; `unimp.create_sharded` would give the same tree but spends ~20 s compiling its init on 2 cores.)"""
  rng = np.random.default_rng(seed)

  def one(a):
    value = (rng.integers(0, 1000, a.shape) if jnp.issubdtype(a.dtype, jnp.integer)
             else rng.standard_normal(a.shape)).astype(a.dtype)
    return jax.device_put(value, a.sharding)

  return jax.tree.map(one, abstract)


def _tiny_state(step, sharding):
  return {'step': jnp.int32(step), 'params': {'w': jax.device_put(np.arange(32.0).reshape(8, 4) + step, sharding)}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_same_values(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture(scope='module')
def saved_model(tmp_path_factory, abstract_params_state):
  """A model-sized train state saved from mesh (data, fsdp, tensor) = (8, 1, 1)."""
  tx = optax.adamw(1e-3)
  state = _random_arrays(_abstract_train_state(abstract_params_state, _mesh(8, 1, 1), tx), seed=0)
  directory = str(tmp_path_factory.mktemp('model_ckpt'))
  with checkpoint_lib.Checkpointer(directory, save_every=5, keep=2) as checkpointer:
    assert checkpointer.save(5, state)
  return directory, state, tx


def test_restores_onto_a_different_mesh(saved_model, abstract_params_state):
  directory, saved, tx = saved_model
  target = _abstract_train_state(abstract_params_state, _mesh(2, 4, 1), tx)
  with checkpoint_lib.Checkpointer(directory, save_every=5, keep=2) as checkpointer:
    restored, step = checkpointer.restore(target)
  assert step == 5
  _assert_same_values(restored, saved)
  for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert r.sharding == t.sharding
  # The test means something only if the new mesh really splits arrays the old one replicated.
  assert any('fsdp' in jax.tree.leaves(tuple(r.sharding.spec)) for r in jax.tree.leaves(restored['params']))
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(saved['params']))


def test_restore_params_reads_only_the_params(saved_model, abstract_params_state):
  directory, saved, tx = saved_model
  target = _abstract_train_state(abstract_params_state, _mesh(1, 2, 4), tx)['params']
  params = checkpoint_lib.restore_params(directory, target)
  _assert_same_values(params, saved['params'])
  for r, t in zip(jax.tree.leaves(params), jax.tree.leaves(target)):
    assert r.sharding == t.sharding
  assert any('tensor' in jax.tree.leaves(tuple(r.sharding.spec)) for r in jax.tree.leaves(params))
  # A parameter the checkpoint does not have (a newer model) is an error that names it, not a placeholder.
  leaf = jax.tree.leaves(target)[0]
  with pytest.raises(checkpoint_lib.CheckpointError, match='extra/bias'):
    checkpoint_lib.restore_params(directory, dict(target, extra={'bias': leaf}))


def test_async_saves_keep_the_last_k_and_the_best(tmp_path, devices):
  sharding = NamedSharding(jax.make_mesh((8,), ('data',), devices=devices), PartitionSpec('data'))
  accuracy = {2: 0.1, 4: 0.9, 6: 0.3, 8: 0.2, 10: 0.4}  # best at step 4, which falls out of the last 2
  with checkpoint_lib.Checkpointer(str(tmp_path), save_every=2, keep=2, best_metric='accuracy') as checkpointer:
    assert checkpointer.latest_step() is None
    for step in range(1, 11):
      assert checkpointer.should_save(step) == (step % 2 == 0)
      if checkpointer.should_save(step):
        assert checkpointer.save(step, _tiny_state(step, sharding), metrics={'accuracy': accuracy[step]})
    assert not checkpointer.save(10, _tiny_state(10, sharding), force=True)  # already saved
    checkpointer.wait()
    assert checkpointer.all_steps() == [4, 8, 10]
    assert checkpointer.latest_step() == 10 and checkpointer.best_step() == 4
    restored, step = checkpointer.restore(_abstract(_tiny_state(0, sharding)))
    assert step == 10
    _assert_same_values(restored, _tiny_state(10, sharding))
    restored, step = checkpointer.restore(_abstract(_tiny_state(0, sharding)), step=4)
    _assert_same_values(restored, _tiny_state(4, sharding))
  assert sorted(os.listdir(tmp_path)) == ['10', '4', '8']
  with pytest.raises(KeyError, match='accuracy'):
    checkpoint_lib.Checkpointer(str(tmp_path), save_every=2, keep=2, best_metric='accuracy').save(
        12, _tiny_state(12, sharding), metrics={'loss': 1.0})


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('data') / 'fashion')
  synthetic.build(path, num_items=100, num_users=40, seed=0, image_size=16, bpe_vocab=500)
  dataset = formats.UnifiedDataset(path)
  return prompts.TaskBuilder(dataset, dataset.tokenizer(), seq_len=160, num_images=6, history=4)


def test_the_data_position_and_config_round_trip(builder, tmp_path, devices):
  data_cfg = config_lib.base_config().data
  data_cfg.update(dict(batch_size=4, seq_len=160, num_images=6, history=4))
  expected = [b for _, b in zip(range(4), pipeline.make_dataset(builder, data_cfg, seed=3))]
  iterator = iter(pipeline.make_dataset(builder, data_cfg, seed=3))
  next(iterator), next(iterator)
  config = config_lib.base_config()
  sharding = NamedSharding(jax.make_mesh((8,), ('data',), devices=devices), PartitionSpec())
  with checkpoint_lib.Checkpointer(str(tmp_path), save_every=2, keep=1) as checkpointer:
    checkpointer.save(2, _tiny_state(2, sharding), data_iterator=iterator, config=config)
    next(iterator)  # moves on while the save is written; the saved position must not
  resumed = iter(pipeline.make_dataset(builder, data_cfg, seed=3))
  with checkpoint_lib.Checkpointer(str(tmp_path), save_every=2, keep=1) as checkpointer:
    _, step = checkpointer.restore(_abstract(_tiny_state(0, sharding)), data_iterator=resumed)
    saved_config = checkpointer.restore_config()
  assert step == 2
  for want in expected[2:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert saved_config == json.loads(config.to_json())  # tuples (e.g. mesh.rules) come back as JSON lists
  assert saved_config['model']['lm']['width'] == config.model.lm.width


def _save_steps(directory, steps, sharding, **kw):
  """Saves steps with a plain Grain iterator advanced `step` batches, so a restore shows which step it got."""
  with checkpoint_lib.Checkpointer(directory, save_every=1, keep=10, **kw) as checkpointer:
    for step in steps:
      iterator = iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())
      for _ in range(step):
        next(iterator)
      checkpointer.save(step, _tiny_state(step, sharding), data_iterator=iterator)


def _restore_with_position(directory, sharding):
  iterator = iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())
  with checkpoint_lib.Checkpointer(directory, save_every=1, keep=10) as checkpointer:
    state, step = checkpointer.restore(_abstract(_tiny_state(0, sharding)), data_iterator=iterator)
  return state, step, int(next(iterator)[0]) // 4


# A failing orbax restore can leave a TensorStore callback that fires after orbax closed its event loop
# ("Event loop is closed", raised in no caller's frame); it is noise from the failure being tested.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupted_steps_fall_back_to_the_previous_good_one(tmp_path, devices, caplog):
  caplog.set_level(logging.WARNING)
  sharding = NamedSharding(jax.make_mesh((8,), ('data',), devices=devices), PartitionSpec('data'))
  directory = str(tmp_path)
  _save_steps(directory, [1, 2, 3], sharding)
  for chunk in glob.glob(f'{directory}/3/state/d/*'):  # garbled array data
    with open(chunk, 'r+b') as f:
      f.write(b'\0' * 64)
  os.remove(f'{directory}/2/state/manifest.ocdbt')  # a missing file

  state, step, position = _restore_with_position(directory, sharding)
  assert (step, position) == (1, 1)
  _assert_same_values(state, _tiny_state(1, sharding))
  for bad in (2, 3):
    assert any(f'step {bad} at {directory}/{bad} cannot be restored' in r.getMessage() for r in caplog.records)
  # The bad steps are set aside, not deleted, so training can save those step numbers again.
  assert sorted(n.split('-')[0] for n in os.listdir(f'{directory}/unrestorable')) == ['2', '3']
  _save_steps(directory, [2], sharding)
  assert _restore_with_position(directory, sharding)[1:] == (2, 2)

  for step in (1, 2):
    os.remove(f'{directory}/{step}/state/manifest.ocdbt')
  with pytest.raises(checkpoint_lib.CheckpointError, match=r'(?s)step 2 at .*/2: .*step 1 at .*/1: '):
    _restore_with_position(directory, sharding)
  assert sorted(os.listdir(directory)) == ['1', '2', 'unrestorable']  # nothing moved when nothing restores


def test_a_step_restored_with_nan_counts_as_damaged_and_is_set_aside(tmp_path, devices, caplog):
  """Garbage in a data file can decode to NaN without a read error. Training never saves a non-finite
  state, so a NaN read back means damage: that step is set aside and the previous one restored."""
  caplog.set_level(logging.WARNING)
  sharding = NamedSharding(jax.make_mesh((8,), ('data',), devices=devices), PartitionSpec('data'))
  directory = str(tmp_path)
  _save_steps(directory, [1], sharding)
  damaged, w = _tiny_state(2, sharding), np.arange(32.0).reshape(8, 4) + 2
  w[3, 1] = np.nan
  damaged['params']['w'] = jax.device_put(w, sharding)
  with checkpoint_lib.Checkpointer(directory, save_every=1, keep=10) as checkpointer:
    checkpointer.save(2, damaged, data_iterator=iter(grain.MapDataset.range(100).batch(4).to_iter_dataset()))
  state, step, position = _restore_with_position(directory, sharding)
  assert (step, position) == (1, 1)
  _assert_same_values(state, _tiny_state(1, sharding))
  assert any("['params']['w'] holds NaN or inf" in r.getMessage() for r in caplog.records)
  assert [n.split('-')[0] for n in os.listdir(f'{directory}/unrestorable')] == ['2']


def test_a_step_whose_arrays_differ_from_their_checksums_is_set_aside(tmp_path, devices, caplog):
  """Damage that decodes to other finite numbers (here: step 2's arrays replaced by another save's) is
  caught by the checksums saved with the step, which is set aside; the previous one is restored."""
  caplog.set_level(logging.WARNING)
  sharding = NamedSharding(jax.make_mesh((8,), ('data',), devices=devices), PartitionSpec('data'))
  directory, other = str(tmp_path / 'run'), str(tmp_path / 'other')
  _save_steps(directory, [1, 2], sharding)
  _save_steps(other, [1, 5], sharding)
  shutil.rmtree(f'{directory}/2/state')
  shutil.copytree(f'{other}/5/state', f'{directory}/2/state')
  state, step, position = _restore_with_position(directory, sharding)
  assert (step, position) == (1, 1)
  _assert_same_values(state, _tiny_state(1, sharding))
  assert any("['params']['w'] does not match the checksum saved with it" in r.getMessage() for r in caplog.records)
  assert [n.split('-')[0] for n in os.listdir(f'{directory}/unrestorable')] == ['2']


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'int8', 'bool', 'key'])
def test_checksums_follow_every_bit_and_position_whatever_the_sharding(devices, dtype):
  """The sums equal numpy's on the raw bits, on one device and sharded over 8, and one flipped bit or
  two swapped elements change them."""
  rng = np.random.default_rng(0)
  if dtype == 'key':
    value = jax.random.split(jax.random.key(0), 16)
    raw = np.asarray(jax.random.key_data(value)).view(np.uint32)
  else:
    value = (rng.standard_normal((16, 6)) * 3).astype(jnp.dtype(dtype)) if dtype != 'bool' else rng.random((16, 6)) > .5
    raw = np.asarray(value)
    raw = raw.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[raw.dtype.itemsize]) \
        if raw.dtype != bool else raw
  words = raw.reshape(-1).astype(np.uint64)
  expected = [int(words.sum() % 2**32), int((words * np.arange(1, words.size + 1)).sum() % 2**32)]
  sharded = jax.device_put(value, NamedSharding(jax.make_mesh((8,), ('data',), devices=devices), PartitionSpec('data')))
  assert checkpoint_lib.checksums({'x': value}) == checkpoint_lib.checksums({'x': sharded}) == {"['x']": expected}
  if dtype not in ('key', 'bool'):
    flipped, swapped = np.array(value), np.array(value)
    flipped.view(np.uint8)[5] ^= 1
    swapped[[0, 1]] = swapped[[1, 0]]
    if not np.array_equal(swapped, value):
      for changed in (flipped, swapped):
        assert checkpoint_lib.checksums({'x': changed}) != {"['x']": expected}


# Saves step 3 in a fresh process that dies (no cleanup, no exception handling) at the moment orbax
# would rename the finished tmp folder into place: exactly what a preempted or killed run leaves.
_KILLED_MID_SAVE = """
import os, sys
import jax, jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from unimp_jax.train import checkpoint as checkpoint_lib
from unimp_jax.train import step as step_lib

async def die(self):
  os._exit(9)

atomicity.AtomicRenameTemporaryPath.finalize = die
with checkpoint_lib.Checkpointer(sys.argv[1], save_every=1, keep=10) as checkpointer:
  checkpointer.save(3, {'step': jnp.int32(3), 'params': {'w': jnp.zeros((8, 4))}})
"""


def test_a_half_written_step_is_ignored(tmp_path, devices, caplog):
  caplog.set_level(logging.WARNING)
  sharding = NamedSharding(jax.make_mesh((8,), ('data',), devices=devices), PartitionSpec('data'))
  directory = str(tmp_path)
  _save_steps(directory, [1, 2], sharding)
  run = subprocess.run([sys.executable, '-c', textwrap.dedent(_KILLED_MID_SAVE), directory],
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 9, run.stderr[-2000:]
  leftover = f'{directory}/3.orbax-checkpoint-tmp'
  assert os.path.isdir(leftover) and not os.path.exists(f'{directory}/3')

  state, step, position = _restore_with_position(directory, sharding)
  assert (step, position) == (2, 2)
  _assert_same_values(state, _tiny_state(2, sharding))
  assert any(f'step 3 at {leftover} was never finished' in r.getMessage() for r in caplog.records)
  assert not os.path.exists(leftover)  # removed when the Checkpointer opened the directory
  with checkpoint_lib.Checkpointer(directory, save_every=1, keep=10) as checkpointer:
    assert checkpointer.save(3, _tiny_state(3, sharding))  # the step the killed run lost can be saved again
  assert checkpointer.all_steps() == [1, 2, 3]


def test_resume_refuses_a_changed_model_data_or_optimizer_key_naming_it(tmp_path):
  from unimp_jax.train import trainer
  data = str(tmp_path / 'fashion')
  synthetic.build(data, num_items=60, num_users=20, seed=5, image_size=32, bpe_vocab=400)
  cfg = config_lib.load('configs/tiny.py', (f'data.path={data}',))
  datasets.fit_model_to_dataset(cfg, formats.UnifiedDataset(data))  # as the trainer saves it
  workdir = str(tmp_path / 'run')
  with checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=1, keep=1,
                                   async_save=False) as ckpt:
    ckpt.save(1, {'x': np.zeros(2)}, config=cfg)
  for override, says in (('data.batch_size=16', 'config.data.batch_size: 8 in the checkpoint, 16 now'),
                         ('model.lm.width=64', 'config.model.lm.width: 128 in the checkpoint, 64 now'),
                         ('train.learning_rate=0.001', 'config.train.learning_rate: 0.0005 in the checkpoint')):
    changed = config_lib.load('configs/tiny.py', (f'data.path={data}', override))
    with pytest.raises(config_lib.ConfigError, match=re.escape(says)):
      trainer.train(changed, workdir)
  # A longer run and another mesh or checkpoint interval are fine; the step count is worth a warning.
  longer = config_lib.load('configs/tiny.py', (f'data.path={data}', 'train.steps=5000', 'checkpoint.every=7',
                                               'mesh.fsdp=2'))
  datasets.fit_model_to_dataset(longer, formats.UnifiedDataset(data))
  refused, allowed = config_lib.resume_changes(json.loads(json.dumps(cfg.to_dict())), longer)
  assert refused == [] and allowed == ['config.train.steps: 1000 in the checkpoint, 5000 now']


def test_reading_another_runs_checkpoints_logs_no_read_only_warning(tmp_path, devices, caplog):
  """Orbax warns "Given directory is read only" for every read-only manager: noise in predict, evaluate
  and the main job when they read a run's (or the image tokenizer's) checkpoints."""
  sharding = NamedSharding(jax.make_mesh((8,), ('data',), devices=devices), PartitionSpec('data'))
  _save_steps(str(tmp_path), [1], sharding)
  caplog.set_level(logging.WARNING)
  ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(read_only=True, create=False)).close()
  assert any('read only' in r.getMessage() for r in caplog.records)  # what orbax says on its own
  caplog.clear()
  checkpoint_lib.stored_param_shapes(str(tmp_path))
  checkpoint_lib.restore_params(str(tmp_path), _abstract(_tiny_state(0, sharding))['params'])
  assert not any('read only' in r.getMessage() for r in caplog.records)
