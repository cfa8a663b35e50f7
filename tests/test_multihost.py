"""Two processes x 4 CPU devices, one 8-device mesh, through jax.distributed on 127.0.0.1 (gloo): the path
a multi-host pod takes, on one machine. Training, checkpoints, resuming and evaluation agree with one
process of 8 devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from unimp_jax import config as config_lib
from unimp_jax.data import synthetic
from unimp_jax.eval import evaluate
from unimp_jax.train import report, trainer

ROOT = os.path.dirname(os.path.dirname(__file__))
# A constant learning rate: the losses of a run resumed with more steps do not depend on `train.steps`.
OVERRIDES = ('train.schedule=constant', 'train.warmup_fraction=0.0', 'checkpoint.every=2',
             'checkpoint.async_save=False', 'train.log_every=1')

PROCESS = """
import json, sys
import jax
from unimp_jax import config
from unimp_jax.eval import evaluate
from unimp_jax.train import trainer
coordinator, pid, workdir, data, steps = sys.argv[1:6]
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator, 2, int(pid))
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
cfg = config.load('configs/tiny.py', (f'data.path={data}', f'train.steps={steps}', *sys.argv[6:]))
run = trainer.train(cfg, workdir)
if int(steps) < 6:  # the first of the two runs only trains
  sys.exit(0)
rows = evaluate.evaluate_rows(run.graphdef, run.params, run.builder, split=cfg.data.split, batch_size=8,
                              tasks_to_run=('recommendation',))['recommendation']
print('ROWS', json.dumps({k: v.tolist() for k, v in rows.items()}))
"""


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(workdir, data, steps, cache):
  # The resumed run compiles what the first one did: jax's persistent compilation cache saves that time.
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  coordinator = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen([sys.executable, '-c', PROCESS, coordinator, str(i), str(workdir), data, str(steps),
                             *OVERRIDES], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  if steps < 6:
    return None
  rows = [json.loads(next(line for line in out.splitlines() if line.startswith('ROWS '))[5:]) for out in outs]
  assert rows[0] == rows[1]  # every process holds every user's row
  return {k: np.asarray(v) for k, v in rows[0].items()}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('multihost') / 'fashion')
  synthetic.build(path, num_items=80, num_users=50, seed=3, image_size=32, bpe_vocab=600)
  return path


def test_two_processes_train_resume_and_evaluate_as_one(data, tmp_path):
  workdir = tmp_path / 'two'
  _two_processes(workdir, data, 4, tmp_path / 'cache')
  rows = _two_processes(workdir, data, 6, tmp_path / 'cache')  # resumes at step 4 (both processes restore it)
  two = {r['step']: r['loss'] for r in report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))}
  assert sorted(two) == [1, 2, 3, 4, 5, 6]

  cfg = config_lib.load('configs/tiny.py', (f'data.path={data}', 'train.steps=6', *OVERRIDES))
  run = trainer.train(cfg, str(tmp_path / 'one'))  # this process: 8 devices
  one = {r['step']: r['loss'] for r in report.read_metrics(os.path.join(tmp_path / 'one', 'metrics.jsonl'))}
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=2e-5)
  expected = evaluate.evaluate_rows(run.graphdef, run.params, run.builder, split=cfg.data.split, batch_size=8,
                                    tasks_to_run=('recommendation',))['recommendation']
  np.testing.assert_array_equal(rows['user'], expected['user'])
  np.testing.assert_array_equal(rows['rank'], expected['rank'])
