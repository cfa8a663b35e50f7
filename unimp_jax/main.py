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
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from unimp_jax import baselines
from unimp_jax.data import pipeline
from unimp_jax.eval import evaluate, gallery, metrics, predictor as predictor_lib, ranking
from unimp_jax.train import report, trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Preset file[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and the report go.', required=True)
GALLERY_USERS = 4

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

  # ---- evaluate every trained task on users never seen in training ------------------------------------
  # The predictor writes content item rows into the parameters once (model.items); evaluation uses them too.
  builder = run.builder
  predictor = predictor_lib.Predictor(cfg, run.graphdef, run.state['params'], builder.dataset, workdir)
  params = predictor.params
  trained = [t for t in evaluate.EVAL_TASKS if cfg.data.tasks[t] > 0]
  user_rows = evaluate.evaluate_rows(run.graphdef, params, builder, split=cfg.data.split,
                                     batch_size=cfg.data.batch_size, tasks_to_run=trained)
  results = evaluate.summaries(user_rows, builder)
  ranked = '; full-catalogue ranking' if builder.item_tokens.shape[1] == 1 else '; 20-beam search over item ids'
  tables = {f'{task} (test users: {m["users"]}{ranked if task in ("recommendation", "search") else ""})':
            {k: v for k, v in m.items() if k != 'users'} for task, m in results.items()}

  # ---- a gallery: a few test users' histories next to what the model recommends --------------------------
  rows = []
  for u in pipeline.split_users(builder.dataset, cfg.data.split, 'test')[:GALLERY_USERS]:
    user = builder.dataset.user(int(u))
    target = pipeline.target_position(len(user.interactions), cfg.data.split, 'test', None)
    history = [i.item for i in user.interactions[:target]]  # all of it: every earlier purchase is excluded
    rows.append({'title': f'test user {u}', 'history': history[-cfg.data.history:],
                 'recommended': predictor.recommend(history, 8), 'target': user.interactions[target].item})
  if jax.process_index() == 0:
    gallery.write_gallery(os.path.join(workdir, 'gallery.png'), rows, builder.dataset)

  extra = builder.dataset.manifest['extra']
  if 'recommendation' in trained:
    tables['recommendation baselines (the same test users; earlier items removed)'] = baseline_table(
        builder.dataset, cfg.data.split, cfg.data.num_images if builder.uses_images else cfg.data.history)
  if 'item_colour' in extra and 'recommendation' in trained:
    tables['colour agreement@8 (share of the top 8 in the user\'s most frequent history colour)'] = \
        colour_table(builder.dataset, cfg.data.split, user_rows['recommendation'], extra['item_colour'])
  summary = {'steps': run.last_step, 'dataset': builder.dataset.path, 'items': len(builder.dataset.items),
             'users': builder.dataset.num_users, 'parameters': sum(x.size for x in jax.tree.leaves(params))}
  if 'oracle_hr@10' in extra:
    summary.update({'oracle HR@10 (dataset ceiling)': extra['oracle_hr@10'],
                    'colour-blind oracle HR@10 (true tastes without colour)': extra['colour_blind_hr@10']})
    for kind in ('warm', 'cold'):
      if extra.get(f'oracle_hr@10_{kind}') is not None:
        summary[f'oracle HR@10, {kind} targets'] = extra[f'oracle_hr@10_{kind}']
  path = report.write_report(workdir, title=f'UniMP on {builder.dataset.manifest["name"]}', summary=summary,
                             eval_tables=tables, extra_sections=[
                                 '## Gallery (test users: history, then top-8 recommendations; target outlined)',
                                 '![gallery](gallery.png)'])
  if jax.process_index() == 0:
    with open(path) as f:
      print(f.read())


def baseline_table(dataset, split: str, window: int) -> dict[str, float]:
  """HR@10 of chance, popularity and ItemKNN (given the whole history, and given only the last `window`
  items, the most a prompt shows: equal information), overall and for warm and cold targets."""
  _, targets, _ = baselines.stage_examples(dataset, split, 'test')
  kinds = {'': np.ones(len(targets), bool),
           **{f', {kind} targets': keep for kind, keep in baselines.target_kinds(dataset, split).items()}}
  rankers = {'popularity': ('popularity', {}), 'ItemKNN (whole history)': ('cooccurrence', {}),
             f'ItemKNN (last {window} items, as the prompt)': ('cooccurrence', {'recent': window})}
  table = {'chance HR@10': 10 / len(dataset.items), 'test users': len(targets)}
  for label, (name, options) in rankers.items():
    ranks = baselines.evaluate(name, dataset, split, **options)
    for kind, keep in kinds.items():
      if keep.any():
        table[f'{label} HR@10{kind}'] = ranking.ranking_metrics(ranks[keep])['HR@10']
  return table


def colour_table(dataset, split: str, rows: dict[str, np.ndarray], item_colour, k: int = 8) -> dict[str, float]:
  """Colour agreement@k of UniMP's top k (the evaluation's recommendation `rows`) and popularity's, for
  every test user, earlier items excluded."""
  histories = [np.asarray([i.item for i in dataset.user(int(u)).interactions[:t]], np.int64)
               for u, t in zip(rows['user'], rows['target'])]
  popular = baselines.scores('popularity', baselines.training_sequences(dataset, split), histories, len(dataset.items))
  return {'UniMP': metrics.colour_agreement(rows['top'][:, :k], histories, item_colour),
          'popularity': metrics.colour_agreement(ranking.top_items(popular, histories, k), histories, item_colour),
          'test users': len(histories)}


if __name__ == '__main__':
  app.run(main)
