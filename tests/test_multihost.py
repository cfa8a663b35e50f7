"""Two processes x 4 CPU devices, one 8-device mesh, through jax.distributed on 127.0.0.1 (gloo): the path
a multi-host pod takes, on one machine. A SIGTERM to one process stops both after the same step;
training, checkpoints, resuming and evaluation agree with one process of 8 devices."""

import os
import signal
import subprocess
import sys
import time

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
overrides = (f'data.path={data}', *sys.argv[5:])
# Trains until the SIGTERM the test sends to process 1 only (one host of a pod preempted).
first = trainer.train(config.load('configs/tiny.py', (*overrides, 'train.steps=1000')), workdir)
print('STOPPED', json.dumps([first.last_step, first.stopped_by_signal]), flush=True)
# Resumed with two more steps: both processes restore the checkpoint the two of them wrote.
cfg = config.load('configs/tiny.py', (*overrides, f'train.steps={first.last_step + 2}'))
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
  """Starts the two processes, sends SIGTERM to process 1 once 3 steps are logged, and returns (the step
  both stopped at, the evaluation rows)."""
  env = support.subprocess_env(devices=4)
  coordinator = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen([sys.executable, '-c', PROCESS, coordinator, str(i), str(workdir), data, *OVERRIDES],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    metrics, deadline = os.path.join(workdir, 'metrics.jsonl'), time.time() + 600
    while not (os.path.exists(metrics) and len(report.read_metrics(metrics)) >= 3):
      assert all(p.poll() is None for p in procs) and time.time() < deadline, procs[0].communicate()[0][-4000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=600)[0] for p in procs]  # without agreeing on the stop, both hang here
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  stops = [support.printed(out, 'STOPPED') for out in outs]
  assert stops[0] == stops[1] and stops[0][1], stops  # the same step, and both say a signal stopped them
  rows = [support.printed(out, 'ROWS') for out in outs]
  assert rows[0] == rows[1]  # every process holds every user's row
  return stops[0][0], {k: np.asarray(v) for k, v in rows[0].items()}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('multihost') / 'fashion')
  synthetic.build(path, num_items=80, num_users=50, seed=3, image_size=32, bpe_vocab=600)
  return path


def test_two_processes_stop_together_resume_and_evaluate_as_one(data, tmp_path):
  workdir = tmp_path / 'two'
  stopped, rows = _two_processes(workdir, data)
  records = report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  # Saved at the stop, resumed there: nothing retrained, nothing skipped.
  assert stopped >= 3 and [r['step'] for r in records] == list(range(1, stopped + 3))
  two = {r['step']: r['loss'] for r in records}

  cfg = config_lib.load('configs/tiny.py', (f'data.path={data}', f'train.steps={stopped + 2}', *OVERRIDES))
  run = trainer.train(cfg, str(tmp_path / 'one'))  # this process: 8 devices
  one = {r['step']: r['loss'] for r in report.read_metrics(os.path.join(tmp_path / 'one', 'metrics.jsonl'))}
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=2e-5)
  expected = evaluate.evaluate_rows(run.graphdef, run.params, run.builder, split=cfg.data.split, batch_size=8,
                                    tasks_to_run=('recommendation',))['recommendation']
  np.testing.assert_array_equal(rows['user'], expected['user'])
  np.testing.assert_array_equal(rows['rank'], expected['rank'])
