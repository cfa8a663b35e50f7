"""Validation during training: scores saved with their steps, the best step handed on, early stopping."""

import os
import subprocess
import sys

import numpy as np
import pytest

import support
from unimp_jax import config as config_lib
from unimp_jax.data import synthetic
from unimp_jax.train import checkpoint as checkpoint_lib
from unimp_jax.train import report

# The validation HR@10 is scripted (the other validation metrics are the model's own), so that the best
# step and the early stop are known: evaluations at steps 2, 4, 6, 8 score 0.1, 0.3, 0.2, 0.3, so step 8
# ties step 4 (a tie counts as the best, and orbax keeps the later step), then 10 and 12 score less: with
# patience 2 the run stops at step 12, whose best is step 8.
TRAIN = """
import json, sys
import jax
import numpy as np
from unimp_jax import config
from unimp_jax.eval import evaluate, predictor
from unimp_jax.train import trainer
workdir, data = sys.argv[1], sys.argv[2]
cfg = config.load('configs/tiny.py', (f'data.path={data}', 'train.steps=40', 'checkpoint.every=100', 'eval.every=2',
                                      'eval.patience=2', 'checkpoint.async_save=False'))
scripted = iter([0.1, 0.3, 0.2, 0.3, 0.2, 0.25, 0.9, 0.9])
real = trainer.validation_metrics
trainer.validation_metrics = lambda *a: {**real(*a), 'valid/recommendation/HR@10': next(scripted)}
run = trainer.train(cfg, workdir)
served = predictor.Predictor.from_workdir(workdir)
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(served.params), jax.tree.leaves(run.params)))
again = evaluate.evaluate(served.graphdef, served.params, served.builder, split=cfg.data.split, stage='valid',
                          batch_size=cfg.data.batch_size, tasks_to_run=('recommendation',), max_users=500)
print('RESULT', json.dumps(dict(last_step=run.last_step, state_step=run.state_step, served_is_state=same)))
print('NDCG', again['recommendation']['NDCG@10'])
# Rerunning the command neither trains nor evaluates again: the stop follows from the saved scores.
def refuse(*a):
  raise AssertionError('the rerun evaluated again')
trainer.validation_metrics = refuse
rerun = trainer.train(cfg, workdir)
print('RERUN', json.dumps(dict(last_step=rerun.last_step, state_step=rerun.state_step)))
"""


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('validation') / 'fashion')
  synthetic.build(path, num_items=80, num_users=60, seed=4, image_size=32, bpe_vocab=600)
  return path


def _train(workdir, data):
  env = support.subprocess_env()
  proc = subprocess.run([sys.executable, '-c', TRAIN, str(workdir), data], env=env, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)), timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return (*(support.printed(proc.stdout, tag) for tag in ('RESULT', 'NDCG', 'RERUN')), proc.stdout + proc.stderr)


def test_the_best_validation_step_is_handed_on_and_the_run_stops_early(data, tmp_path):
  workdir = tmp_path / 'run'
  result, ndcg, rerun, out = _train(workdir, data)
  assert result == dict(last_step=12, state_step=8, served_is_state=True), out[-3000:]
  assert 'stopped early at step 12' in out
  records = report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records] == list(range(1, 13))  # nothing trained after the stop
  scored = {r['step']: r for r in records if 'valid/recommendation/HR@10' in r}
  assert sorted(scored) == [2, 4, 6, 8, 10, 12]
  directory = os.path.join(workdir, 'checkpoints')
  assert checkpoint_lib.served_step(directory) == 8
  # The best step is kept besides the newest 3 (tiny.py's checkpoint.keep), each saved with its scores.
  with checkpoint_lib.Checkpointer(directory, save_every=100, keep=3) as ckpt:
    assert ckpt.all_steps() == [8, 10, 12]
  # The model's own validation scores are those of the step they are saved with: recomputed by the
  # script from the served step's parameters, on the validation users.
  np.testing.assert_allclose(ndcg, scored[8]['valid/recommendation/NDCG@10'], rtol=1e-6)
  # The script reran the command: it neither trained nor evaluated again.
  assert rerun == dict(last_step=12, state_step=8), out[-3000:]
  assert len(report.read_metrics(os.path.join(workdir, 'metrics.jsonl'))) == 12


def test_validation_settings_are_checked():
  for override, says in (('eval.metric=recommendation', "'task/metric'"), ('eval.metric=caption/x', "'task/metric'"),
                         ('eval.mode=best', "'best' is not one of"), ('eval.every=-1', 'every=-1')):
    cfg = config_lib.load('configs/tiny.py', (override,))
    with pytest.raises(config_lib.ConfigError, match=says):
      config_lib.validate(cfg, 8)
  cfg = config_lib.load('configs/tiny.py', ('eval.every=5', 'eval.metric=generation/PSNR'))
  with pytest.raises(config_lib.ConfigError, match='does not train generation'):
    config_lib.validate(cfg, 8)
