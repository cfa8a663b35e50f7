"""Runs that are killed or preempted resume exactly (separate processes, real signals)."""

import os
import signal
import subprocess
import sys
import time

import pytest

import support
from unimp_jax.data import synthetic
from unimp_jax.train import checkpoint as checkpoint_lib
from unimp_jax.train import report

TRAIN = """
import sys
from unimp_jax import config
from unimp_jax.train import trainer
workdir, data, steps = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = config.load('configs/tiny.py', (f'data.path={data}', f'train.steps={steps}', 'checkpoint.every=3',
                                      'train.log_every=1'))
trainer.train(cfg, workdir)
"""


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('resume') / 'fashion')
  synthetic.build(path, num_items=150, num_users=60, seed=2, image_size=32, bpe_vocab=1024)
  return path


def _start(workdir, data, steps):
  env = support.subprocess_env()
  return subprocess.Popen([sys.executable, '-c', TRAIN, str(workdir), data, str(steps)], env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]


def _losses(workdir):
  records = report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return {r['step']: (r['loss'], r['tokens']) for r in records}


def _wait_for(condition, proc, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() < deadline, 'timed out'
    time.sleep(0.2)


def _finished_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()
                and os.path.exists(os.path.join(directory, d, '_CHECKPOINT_METADATA')))


def test_sigkill_then_restart_gives_bit_identical_losses(data, tmp_path):
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  uninterrupted, proc = _start(straight, data, 6), _start(killed, data, 6)  # side by side: both mostly wait
  _wait_for(lambda: 3 in _finished_steps(killed), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _finish(uninterrupted)
  _finish(_start(killed, data, 6))
  expected, resumed = _losses(straight), _losses(killed)
  assert sorted(expected) == sorted(resumed) == list(range(1, 7))
  assert resumed == expected  # same data order (token counts) and bit-identical losses


def test_sigterm_saves_the_current_step_and_exits_cleanly(data, tmp_path):
  proc = _start(tmp_path, data, 1000)
  _wait_for(lambda: len(_losses(tmp_path)) >= 4 if os.path.exists(tmp_path / 'metrics.jsonl') else False, proc)
  proc.send_signal(signal.SIGTERM)
  _finish(proc)
  last_logged = max(_losses(tmp_path))
  assert _finished_steps(tmp_path)[-1] == last_logged < 1000
  with checkpoint_lib.Checkpointer(str(tmp_path / 'checkpoints'), save_every=3, keep=3) as checkpointer:
    assert checkpointer.latest_step() == last_logged
    assert checkpointer.restore_config(last_logged)['train']['steps'] == 1000


def test_a_diverged_step_is_named_and_nothing_past_it_is_logged_or_saved(tmp_path, data):
  """Metrics are read one step late, while the next step runs. A step whose loss is not finite still ends
  the run naming that step (here the first after a learning rate of 1e30 takes effect: step 1 warms up
  from 0), with every earlier step logged once and the step after it neither logged nor saved (it is a
  checkpoint step)."""
  from unimp_jax import config
  from unimp_jax.train import trainer
  cfg = config.load('configs/tiny.py', (f'data.path={data}', 'train.steps=8', 'checkpoint.every=2',
                                        'train.learning_rate=1e30'))
  workdir = str(tmp_path / 'run')
  with pytest.raises(trainer.TrainingDiverged, match=r'^step 3: loss nan .* not finite; the last good checkpoint '
                                                     r'is at step 2$'):
    trainer.train(cfg, workdir)
  assert [r['step'] for r in report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))] == [1, 2]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
