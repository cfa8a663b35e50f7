"""The main job: train UniMP on the multi-task mixture, evaluate, and write a report.

  python -m unimp_jax.main --config configs/tiny.py --workdir workdir/tiny [--config.KEY=VALUE ...]

On a fresh clone this builds the embedded default dataset at `data.path` if it is missing, trains the
configured model on the task mixture with Orbax checkpoints in WORKDIR/checkpoints (rerunning the same
command resumes), evaluates every trained task on the held-out users (unimp_jax.eval.evaluate), and
writes WORKDIR/report.md with WORKDIR/loss.png and WORKDIR/gallery.png, next to metrics.jsonl and
TensorBoard event files.
"""

from __future__ import annotations

import os

import jax
from absl import flags, logging
from ml_collections import config_flags

from unimp_jax import config as config_lib, tasks
from unimp_jax.eval import evaluate, predictor as predictor_lib
from unimp_jax.train import report, trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Preset file[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and the report go.', required=True)
GALLERY_USERS = 4

_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (SLURM, TPU pods).')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'HOST:PORT of process 0, to start the processes by hand '
                                   '(launch/local.sh); with --num_processes and --process_id.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run (with --coordinator).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (with --coordinator).')


def start_processes() -> None:
  """jax.distributed: detected from the cluster (--multihost), or named (--coordinator). CPU devices of
  several processes talk through gloo."""
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise flags.ValidationError('--coordinator needs --num_processes and --process_id')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()


def main(argv):
  del argv
  start_processes()
  cfg, workdir = _CONFIG.value, _WORKDIR.value
  config_lib.make_workdir(workdir)
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every save at INFO; keep the console readable
    logging.set_verbosity(logging.WARNING)
  run = trainer.train(cfg, workdir)
  if run.stopped_by_signal:
    trainer.say(f'stopped by SIGTERM at step {run.last_step}; rerun the same command to resume')
    return

  # ---- evaluate every trained task on users never seen in training ------------------------------------
  # The predictor writes content item rows into the parameters once (model.items); evaluation uses them too.
  builder = run.builder
  predictor = predictor_lib.Predictor(cfg, run.graphdef, run.state['params'], builder.dataset, workdir)
  params = predictor.params
  trained = [t for t in tasks.EVALUATED if cfg.data.tasks[t] > 0]
  user_rows = evaluate.evaluate_rows(run.graphdef, params, builder, split=cfg.data.split,
                                     batch_size=cfg.data.batch_size, tasks_to_run=trained)
  results = evaluate.summaries(user_rows, builder)
  ranked = '; full-catalogue ranking' if builder.item_tokens.shape[1] == 1 else '; 20-beam search over item ids'
  item_answers = [name for name in trained if tasks.TASKS[name].answers_items]
  tables = {f'{name} (test users: {m["users"]}{ranked if name in item_answers else ""})':
            {k: v for k, v in m.items() if k != 'users'} for name, m in results.items()}

  # ---- each task's own tables (baselines next to the model) and gallery -------------------------------------
  sections = []
  for name in [t for t in tasks.NAMES if cfg.data.tasks[t] > 0]:
    tables.update(tasks.TASKS[name].report_tables(predictor, cfg.data.split, user_rows.get(name)))
    sections += tasks.TASKS[name].gallery(predictor, cfg.data.split, workdir, GALLERY_USERS)

  extra = builder.dataset.manifest['extra']
  summary = {'steps': run.last_step, 'dataset': builder.dataset.path, 'items': len(builder.dataset.items),
             'users': builder.dataset.num_users, 'parameters': sum(x.size for x in jax.tree.leaves(params))}
  if run.state_step != run.last_step:
    summary[f'step evaluated (the best validation {cfg.eval.metric})'] = run.state_step
  if 'oracle_hr@10' in extra:
    summary.update({'oracle HR@10 (dataset ceiling)': extra['oracle_hr@10'],
                    'colour-blind oracle HR@10 (true tastes without colour)': extra['colour_blind_hr@10']})
    for kind in ('warm', 'cold'):
      if extra.get(f'oracle_hr@10_{kind}') is not None:
        summary[f'oracle HR@10, {kind} targets'] = extra[f'oracle_hr@10_{kind}']
  path = report.write_report(workdir, title=f'UniMP on {builder.dataset.manifest["name"]}', summary=summary,
                             eval_tables=tables, extra_sections=sections)
  if jax.process_index() == 0:
    with open(path) as f:
      print(f.read())


if __name__ == '__main__':
  config_lib.run_main(main)
