"""The main job: train UniMP on the multi-task mixture, evaluate, and write a report.

  python -m unimp_jax.main --config configs/tiny.py --workdir workdir/tiny [--config.KEY=VALUE ...]

On a fresh clone this builds the embedded default dataset at `data.path` if it is missing, trains the
configured model on the task mixture with Orbax checkpoints in WORKDIR/checkpoints (rerunning the same
command resumes), ranks the full catalogue for recommendation and search on the held-out users, and
writes WORKDIR/report.md with WORKDIR/loss.png, next to metrics.jsonl and TensorBoard event files.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from unimp_jax.eval import ranking
from unimp_jax.train import report, trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Preset file[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and the report go.', required=True)
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (SLURM, TPU pods).')


def main(argv):
  del argv
  if _MULTIHOST.value:
    jax.distributed.initialize()
  cfg, workdir = _CONFIG.value, _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every save at INFO; keep the console readable
    logging.set_verbosity(logging.WARNING)
  run = trainer.train(cfg, workdir)
  if run.stopped_by_signal:
    trainer.say(f'stopped by SIGTERM at step {run.last_step}; rerun the same command to resume')
    return

  # ---- evaluate: full-catalogue ranking on users never seen in training -----------------------------------
  builder = run.builder
  tables = {}
  for task in ('recommendation', 'search'):
    ranks = ranking.target_ranks(run.graphdef, run.state['params'], builder, task, 'test', cfg.data.split,
                                 cfg.data.batch_size, builder.pad)
    tables[f'{task} (test users, {len(ranks)}; full catalogue of {builder.ids.num_items} items)'] = \
        ranking.ranking_metrics(ranks)
  extra = builder.dataset.manifest['extra']
  summary = {'steps': run.last_step, 'dataset': builder.dataset.path, 'items': builder.ids.num_items,
             'users': builder.dataset.num_users, 'parameters': sum(x.size for x in jax.tree.leaves(run.state['params']))}
  if 'oracle_hr@10' in extra:
    summary.update({'oracle HR@10 (dataset ceiling)': extra['oracle_hr@10'],
                    'colour-blind HR@10 (text-only ceiling)': extra['colour_blind_hr@10']})
  path = report.write_report(workdir, title=f'UniMP on {builder.dataset.manifest["name"]}', summary=summary,
                             eval_tables=tables)
  if jax.process_index() == 0:
    with open(path) as f:
      print(f.read())


if __name__ == '__main__':
  app.run(main)
