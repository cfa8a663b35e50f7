"""UniMP against its baselines on the same users, splits and metrics: a Markdown report and PNG plots.

  python -m unimp_jax.benchmark --dataset fashion --workdir workdir/bench-fashion
  python -m unimp_jax.benchmark --dataset movielens --workdir workdir/bench-ml100k [--cache ~/.cache/unimp_jax]

`fashion` is the embedded dataset (built if missing; its oracle and colour-blind ceilings, and the
attribute ceiling of unimp_jax.baselines.attributes, are reported next to the models). `movielens` is
real MovieLens-100K, taken from the RecBole 1.2.1 wheel with `pip download --no-deps` into `--cache`
(never imported, never committed): text-only items, so UniMP runs without pictures there, on
recommendation and rating.

Every UniMP variant is trained with the main job's trainer in WORKDIR/<variant> (rerunning resumes or
reuses the finished checkpoints) and scored by unimp_jax.eval.evaluate; the baselines by
unimp_jax.baselines. Evaluation throughput (users/s) of full-catalogue ranking and of the paper's
10-beam generation is measured on the same model and users, one after the other, after compiling.
Writes WORKDIR/BENCHMARK.md, WORKDIR/hr10.png and prints the Markdown.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import time

import jax
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from unimp_jax import baselines, config as config_lib, tasks
from unimp_jax.baselines import attributes
from unimp_jax.baselines import ratings as rating_baselines
from unimp_jax.data import movielens, splits
from unimp_jax.eval import evaluate, metrics, ranking
from unimp_jax.tasks import generation, selection
from unimp_jax.train import report, trainer

# name -> (config.data.item_content, config.data.item_ids, config.model.item_embeddings). UniMP and its
# text-only twin embed item tokens by the items' content (unimp_jax/model/items.py), so both can rank
# cold items and differ only in the pictures; "IDs only" is pure collaborative filtering (learned rows);
# "semantic ids" is the TIGER-style variant. MovieLens items have no pictures: its "UniMP" is text.
VARIANTS = {'fashion': {'UniMP': ('image+text', 'atomic', 'content'),
                        'UniMP text only': ('text', 'atomic', 'content'),
                        'UniMP IDs only': ('ids', 'atomic', 'learned'),
                        'UniMP semantic ids': ('image+text', 'semantic', 'learned')},
            'movielens': {'UniMP': ('text', 'atomic', 'content'), 'UniMP IDs only': ('ids', 'atomic', 'learned')}}


def chosen_variants(dataset: str, names: list[str] | None) -> dict[str, tuple[str, str, str]]:
  """The `VARIANTS` of `dataset` that `--variants` names (all when None), UniMP always among them: the
  paired intervals are against it."""
  unknown = sorted(set(names or ()) - set(VARIANTS[dataset]))
  if unknown:
    raise config_lib.ConfigError(f'--variants: {unknown} are not variants of {dataset}: {list(VARIANTS[dataset])}')
  return {k: v for k, v in VARIANTS[dataset].items() if names is None or k == 'UniMP' or k in names}


def selection_chance_rows(positives: np.ndarray, num_slots: int) -> dict[str, dict]:
  """Result rows of the user-blind answers to the same selection questions: the chance level."""
  return {f'selection: {answer.removesuffix(" F1")}': {'selection': {'users': len(positives), 'F1': f1}}
          for answer, f1 in selection.constant_answers(positives, num_slots).items()}


def _slug(name: str) -> str:
  return name.lower().replace(' ', '-')


def users_per_second(run, cfg, method: str) -> float:
  """Recommendation users/s of one ranking method over the test users, timed on a second pass (the first
  compiles every prompt-length bucket)."""
  users = splits.split_users(run.builder.dataset, cfg.data.split, 'test')
  kw = dict(split=cfg.data.split, stage='test', batch_size=cfg.data.batch_size, ranking_method=method)
  params = run.params
  evaluate.task_rows(run.graphdef, params, run.builder, 'recommendation', users, **kw)
  start = time.perf_counter()
  evaluate.task_rows(run.graphdef, params, run.builder, 'recommendation', users, **kw)
  return len(users) / (time.perf_counter() - start)


def _write(path: str, text: str) -> None:
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  base, workdir, name, cache, variants = f.config, f.workdir, f.dataset, f.cache, f.variants
  config_lib.make_workdir(workdir)
  if name == 'movielens':
    base.data.path = movielens.prepare(cache, os.path.join(cache, 'ml-100k-unified'),
                                       seed=base.seed, image_size=base.model.vision.image_size)
    base.data.tasks.update(search=0.0, selection=0.0)
  chosen = chosen_variants(name, variants)
  results, runs, user_ranks = {}, {}, {}  # per-user recommendation ranks, in split_users order
  for variant, (content, item_ids, item_rows) in chosen.items():
    cfg = copy.deepcopy(base)
    cfg.data.item_content, cfg.data.item_ids, cfg.model.item_embeddings = content, item_ids, item_rows
    if item_ids == 'semantic':  # the next-item loss predicts one atomic id token
      cfg.train.next_item_weight = 0.0
    if variant != 'UniMP':  # generation's history chunks answer with picture codes: others would read them
      cfg.data.tasks.generation = 0.0
    trainer.say(f'==== {variant} ({content}, {item_ids} ids, {item_rows} item rows) ====')
    run = trainer.train(cfg, os.path.join(workdir, _slug(variant)))
    runs[variant] = run
    rows = evaluate.evaluate_rows(run.graphdef, run.params, run.builder, split=cfg.data.split,
                                  batch_size=cfg.data.batch_size,
                                  tasks_to_run=[t for t in tasks.EVALUATED if cfg.data.tasks[t] > 0])
    results[variant] = evaluate.summaries(rows, run.builder)
    if variant == 'UniMP' and 'selection' in rows:
      results.update(selection_chance_rows(rows['selection']['positives'], run.builder.ids.num_slots))
    if variant == 'UniMP' and 'generation' in rows:
      results.update({f'generation: {name}': {'generation': scores} for name, scores in
                      generation.reference_scores(run.builder, cfg.data.split, rows['generation']).items()})
    users = splits.split_users(run.builder.dataset, cfg.data.split, 'test')
    if not np.array_equal(rows['recommendation']['user'], users):  # the baselines' order
      raise RuntimeError(f'{variant}: evaluated users differ from the stage users; intervals would not be paired')
    user_ranks[variant] = rows['recommendation']['rank']
  # The paper's 10-beam protocol next to our ranking, and what each costs, on UniMP (atomic ids).
  for variant in ('UniMP',):
    run = runs[variant]
    results[f'{variant}, paper protocol (10 beams)'] = evaluate.evaluate(
        run.graphdef, run.params, run.builder, split=base.data.split, batch_size=base.data.batch_size,
        tasks_to_run=('recommendation',), ranking_method='paper')
  speed = {'model': 'UniMP', **{m: users_per_second(runs['UniMP'], base, m) for m in ('full', 'paper')}}
  dataset = runs['UniMP'].builder.dataset
  kinds = baselines.target_kinds(dataset, base.data.split)

  def ranked(ranks):  # overall, and for warm and cold targets as UniMP's rows are (evaluate.by_target_kind)
    out = {'recommendation': {'users': len(ranks), **ranking.ranking_metrics(ranks)}}
    out.update({f'recommendation, {kind} targets': {'users': int(keep.sum()), **ranking.ranking_metrics(ranks[keep])}
                for kind, keep in kinds.items() if keep.any()})
    return out

  for baseline in baselines.NAMES:
    trainer.say(f'==== {baseline} ====')
    user_ranks[baseline] = baselines.evaluate(baseline, dataset, base.data.split, seed=base.seed)
    results[baseline] = ranked(user_ranks[baseline])
  predicted, true = rating_baselines.predict(dataset, base.data.split)
  for baseline, values in predicted.items():
    results[baseline] = {'preference': {'users': len(true), **rating_baselines.metrics(values, true)}}
  extra = dataset.manifest['extra']
  ceilings = {}
  if name == 'fashion':
    ceilings = {'oracle HR@10 (dataset ceiling)': extra['oracle_hr@10'],
                'colour-blind oracle HR@10 (true tastes without colour)': extra['colour_blind_hr@10']}
    ceilings.update({f'oracle HR@10, {kind} targets': extra[f'oracle_hr@10_{kind}'] for kind in kinds})
    # Every item has a picture, so a prompt shows the last num_images history items (fewer if the text
    # runs out of seq_len): ItemKNN and the attribute ceiling given that same window, too.
    window = base.data.num_images
    recent_name = f'cooccurrence, last {window} items'
    user_ranks[recent_name] = baselines.evaluate('cooccurrence', dataset, base.data.split, recent=window)
    results[recent_name] = ranked(user_ranks[recent_name])
    for recent, label in ((window, f'last {window} items, as a prompt shows them'), (None, 'whole history')):
      ranks = attributes.evaluate(dataset, base.data.split, recent=recent)
      ceilings[f'attribute ceiling HR@10 ({label})'] = ranking.ranking_metrics(ranks)['HR@10']
      ceilings.update({f'attribute ceiling HR@10 ({label}), {kind} targets': ranking.ranking_metrics(ranks[keep])['HR@10']
                       for kind, keep in kinds.items() if keep.any()})
      if 'cold' in kinds:  # with popularity a never-bought item scores last: cold items need content alone
        ranks = attributes.evaluate(dataset, base.data.split, recent=recent, popularity=False)
        ceilings[f'content-only attribute ceiling HR@10 ({label}), cold targets'] = ranking.ranking_metrics(
            ranks[kinds['cold']])['HR@10']
  # Paired bootstrap: UniMP's per-user hit@10 minus each other method's, on the same test users.
  intervals = {other: metrics.paired_bootstrap(user_ranks['UniMP'] < 10, r < 10, seed=base.seed)
               for other, r in user_ranks.items() if other != 'UniMP'}
  report.plot_benchmark(os.path.join(workdir, 'hr10.png'), results, ceilings)
  command = f'python -m unimp_jax.benchmark --dataset {name} --workdir {workdir}'
  if variants is not None:
    command += f' --variants {shlex.quote(",".join(variants))}'
  text = report.benchmark_markdown(dataset.manifest['name'], base, results, ceilings, speed, command, intervals)
  if jax.process_index() == 0:
    _write(os.path.join(workdir, 'BENCHMARK.md'), text)
    _write(os.path.join(workdir, 'results.json'),
           json.dumps({'results': results, 'speed': speed, 'ceilings': ceilings, 'intervals': intervals}, indent=1))
    print(text)


if __name__ == '__main__':  # flags defined here only: importing this module must not clash with other commands'
  config_flags.DEFINE_config_file('config', 'configs/benchmark.py', 'Preset file[:arg].', lock_config=True)
  flags.DEFINE_enum('dataset', 'fashion', ['fashion', 'movielens'], 'Which benchmark.')
  flags.DEFINE_string('workdir', None, 'Where runs, the report and plots go.', required=True)
  flags.DEFINE_string('cache', os.path.expanduser('~/.cache/unimp_jax'), 'Download cache (MovieLens).')
  flags.DEFINE_list('variants', None, 'UniMP variants to train (default: all of the dataset\'s; '
                    'UniMP itself always runs: the intervals are against it).')
  config_lib.run_main(main)
