"""Two processes x 4 CPU devices, one 8-device mesh, through jax.distributed on 127.0.0.1 (gloo): the path
a multi-host pod takes, on one machine. Training, checkpoints, resuming and evaluation agree with one
process of 8 devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import support
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
coordinator, pid, workdir, data = sys.argv[1:5]
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator, 2, int(pid))
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
trainer.train(config.load('configs/tiny.py', (f'data.path={data}', 'train.steps=4', *sys.argv[5:])), workdir)
# Resumed at step 4 with more steps: both processes restore the checkpoint the two of them wrote.
cfg = config.load('configs/tiny.py', (f'data.path={data}', 'train.steps=6', *sys.argv[5:]))
run = trainer.train(cfg, workdir)
rows = evaluate.evaluate_rows(run.graphdef, run.params, run.builder, split=cfg.data.split, batch_size=8,
                              tasks_to_run=('recommendation',))['recommendation']
print('ROWS', json.dumps({k: v.tolist() for k, v in rows.items()}))
"""


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(workdir, data):
  env = support.subprocess_env(devices=4)
  coordinator = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen([sys.executable, '-c', PROCESS, coordinator, str(i), str(workdir), data, *OVERRIDES], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
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
  rows = _two_processes(workdir, data)
  records = report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]  # the second run resumed at 4, retraining nothing
  two = {r['step']: r['loss'] for r in records}

  cfg = config_lib.load('configs/tiny.py', (f'data.path={data}', 'train.steps=6', *OVERRIDES))
  run = trainer.train(cfg, str(tmp_path / 'one'))  # this process: 8 devices
  one = {r['step']: r['loss'] for r in report.read_metrics(os.path.join(tmp_path / 'one', 'metrics.jsonl'))}
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=2e-5)
  expected = evaluate.evaluate_rows(run.graphdef, run.params, run.builder, split=cfg.data.split, batch_size=8,
                                    tasks_to_run=('recommendation',))['recommendation']
  np.testing.assert_array_equal(rows['user'], expected['user'])
  np.testing.assert_array_equal(rows['rank'], expected['rank'])
