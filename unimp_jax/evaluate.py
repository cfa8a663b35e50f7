"""Evaluate a trained run on its held-out users, and keep every user's result.

  python -m unimp_jax.evaluate --workdir W [--stage test|valid] [--tasks recommendation,search,...]
      [--ranking full|beam|paper] [--negatives 100] [--ks 5,10] [--per_user FILE.jsonl] [--step N]
      [--by_attribute] [--paired_with OTHER_RUN/eval-test.jsonl]

Prints one table per task (recommendation and search also for warm and cold targets, and by history
length) and writes one JSON line per (task, user) to `--per_user` (default WORKDIR/eval-STAGE.jsonl):
the user, the target and whether it is cold, and for ranking tasks the target's 0-based rank and the
top items; for preference the rating probabilities and the explanation; for selection the chosen and
true slots. Every aggregate printed is a function of those lines (tests/test_main_job.py recomputes
them). `--negatives N` is the sampled-negatives protocol of many published tables (the target among N
random unseen items), labelled as such; the default ranks against the whole catalogue.
`--by_attribute` adds, for recommendation, which item attributes (colour, category, brand) the ranking
follows, next to ItemKNN given the same history window: where a model falls short of ItemKNN, this says
on which kind of target. `--paired_with FILE` compares with another run's per-user file: HR@10
differences with paired bootstrap intervals (the same users resampled for both runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from absl import logging

from unimp_jax import baselines, tasks
from unimp_jax.data import formats, splits
from unimp_jax.eval import evaluate as evaluate_lib, metrics, predictor as predictor_lib, ranking
from unimp_jax.tasks import base
from unimp_jax.train import report

HISTORY_BUCKETS = ((1, 5), (6, 10), (11, 10**9))  # history items before the target


def per_user_records(task: str, rows: dict[str, np.ndarray], builder) -> list[dict]:
  dataset = builder.dataset
  cold = formats.cold_mask(dataset)
  records = []
  for i, (user, target) in enumerate(zip(rows['user'], rows['target'])):
    item = dataset.user(int(user)).interactions[int(target)].item
    record = {'task': task, 'user': int(user), 'user_id': dataset.user(int(user)).source_id,
              'history_length': int(target), 'target_item': int(item), 'target_cold': bool(cold[item])}
    if 'rank' in rows:
      record.update(rank=int(rows['rank'][i]), top=[int(x) for x in rows['top'][i] if x >= 0])
    if 'rating_probs' in rows:
      record.update(rating=int(rows['rating'][i]), rating_probs=[float(p) for p in rows['rating_probs'][i]],
                    explanation=base.decode_text(builder, rows['explanation'][i]))
    if 'chosen' in rows:
      record.update(chosen_slots=int(rows['chosen'][i]), positive_slots=int(rows['positives'][i]))
    records.append(record)
  return records


def by_history_length(ranks: np.ndarray, lengths: np.ndarray, ks) -> dict[str, float]:
  out = {}
  for low, high in HISTORY_BUCKETS:
    keep = (lengths >= low) & (lengths <= high)
    if keep.any():
      label = f'{low}-{high}' if high < 10**9 else f'{low}+'
      metrics = ranking.ranking_metrics(ranks[keep], ks)
      out.update({f'HR@{k} (history {label}, {int(keep.sum())} users)': metrics[f'HR@{k}'] for k in ks})
  return out


def item_attributes(dataset) -> dict[str, np.ndarray]:
  """Each item's colour (where the manifest knows it), category and brand, as arrays over the catalogue."""
  out = {}
  if 'item_colour' in dataset.manifest['extra']:
    out['colour'] = np.asarray(dataset.manifest['extra']['item_colour'])
  out['category'] = np.asarray([item.category for item in dataset.items])
  out['brand'] = np.asarray([item.brand for item in dataset.items])
  return out


def by_attribute(rows: dict[str, np.ndarray], dataset, window: int, knn_ranks: np.ndarray) -> dict[str, float]:
  """Which item attributes the ranking follows: per attribute, how many targets share it with one of the
  last `window` history items (what a prompt shows), HR@10 of those targets and of the rest for the
  model and for ItemKNN given the same items (`knn_ranks`, same users), and the share of the model's top
  10 that shares it with those items."""
  out = {}
  histories = [np.asarray([i.item for i in dataset.user(int(u)).interactions[:t]][-window:])
               for u, t in zip(rows['user'], rows['target'])]
  targets = np.asarray([dataset.user(int(u)).interactions[t].item for u, t in zip(rows['user'], rows['target'])])
  for name, values in item_attributes(dataset).items():
    shared = np.asarray([values[t] in set(values[h]) for t, h in zip(targets, histories)])
    out[f'{name}: targets sharing it'] = float(shared.mean())
    for label, ranks in (('model', rows['rank']), ('ItemKNN', knn_ranks)):
      for kind, keep in (('sharing', shared), ('not sharing', ~shared)):
        if keep.any():
          out[f'{name}: {label} HR@10, targets {kind}'] = float((ranks[keep] < 10).mean())
    top = [np.isin(values[t[t >= 0][:10]], values[h]).mean() for t, h in zip(rows['top'], histories)]
    out[f'{name}: share of the model\'s top 10 sharing it'] = float(np.mean(top))
  return out


def paired_with(records: list[dict], path: str) -> dict[str, dict[str, float]]:
  """HR@10 of this run minus another run's (`path`, a per-user file of the same users), with the paired
  bootstrap interval (metrics.paired_bootstrap), per ranking task, overall and for warm and cold targets."""
  with open(path) as f:
    other = {(r['task'], r['user']): r for r in map(json.loads, f) if 'rank' in r}
  tables = {}
  for task in sorted({r['task'] for r in records if 'rank' in r}):
    mine = [r for r in records if r['task'] == task]
    missing = [r['user'] for r in mine if (task, r['user']) not in other]
    if missing:
      raise ValueError(f'{path} has no {task} result for user {missing[0]} ({len(missing)} users missing): '
                       'paired intervals need the same users')
    hits = np.asarray([[r['rank'] < 10, other[task, r['user']]['rank'] < 10] for r in mine], np.float64)
    cold = np.asarray([r['target_cold'] for r in mine])
    table = {}
    for kind, keep in (('', np.ones(len(mine), bool)), (', warm targets', ~cold), (', cold targets', cold)):
      if keep.any() and (kind == '' or cold.any()):
        diff = metrics.paired_bootstrap(hits[keep, 0], hits[keep, 1])
        table[f'HR@10 difference{kind}'] = diff['difference']
        table[f'95% interval{kind}'] = f'{diff["low"]:.4f} to {diff["high"]:.4f}'
        table[f'users{kind}'] = int(keep.sum())
    tables[f'{task}: this run minus {path}'] = table
  return tables


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--step', type=int, default=None, help='a checkpoint step (default: the newest)')
  parser.add_argument('--stage', choices=('test', 'valid'), default='test')
  parser.add_argument('--tasks', default=','.join(tasks.EVALUATED))
  parser.add_argument('--ranking', choices=evaluate_lib.RANKINGS, default=None,
                      help='default: full for atomic ids, beam for semantic ones')
  parser.add_argument('--negatives', type=int, default=0, help='sampled-negatives protocol (0: full catalogue)')
  parser.add_argument('--ks', default=','.join(map(str, ranking.KS)))
  parser.add_argument('--per_user', default=None, help='JSONL file (default WORKDIR/eval-STAGE.jsonl)')
  parser.add_argument('--paired_with', default=None,
                      help='another run\'s per-user file (same users): HR@10 differences, paired bootstrap intervals')
  parser.add_argument('--by_attribute', action='store_true',
                      help='recommendation: which item attributes (colour, category, brand) the ranking follows, '
                      'next to ItemKNN given the same history window')
  args = parser.parse_args(argv)
  names = [t for t in args.tasks.split(',') if t]
  if not names or any(t not in tasks.EVALUATED for t in names):
    parser.error(f'--tasks {args.tasks!r}: a comma-separated list from {tasks.EVALUATED}')
  try:
    ks = tuple(int(k) for k in args.ks.split(','))
  except ValueError:
    ks = ()
  if not ks or not set(ks) <= set(ranking.KS):
    parser.error(f'--ks {args.ks!r}: a comma-separated list from {ranking.KS}')
  if args.negatives < 0:
    parser.error(f'--negatives {args.negatives}: must be >= 0')
  if not os.path.isdir(os.path.join(args.workdir, 'checkpoints')):
    parser.error(f'{args.workdir} has no checkpoints/ (a main-job or benchmark run directory)')
  logging.set_verbosity(logging.WARNING)

  predictor = predictor_lib.Predictor.from_workdir(args.workdir, args.step)
  cfg, builder = predictor.cfg, predictor.builder
  rows = evaluate_lib.evaluate_rows(predictor.graphdef, predictor.params, builder, split=cfg.data.split,
                                    stage=args.stage, batch_size=cfg.data.batch_size, tasks_to_run=names,
                                    ranking_method=args.ranking, seed=cfg.seed, negatives=args.negatives)
  protocol = f'{args.negatives} sampled negatives' if args.negatives else 'full catalogue'
  tables, records = {}, []
  for task, task_rows in rows.items():
    records += per_user_records(task, task_rows, builder)
    parts = {'': task_rows}
    ranked = tasks.TASKS[task].answers_items
    if ranked:
      kinds = evaluate_lib.by_target_kind(task_rows, builder.dataset)
      parts.update({f', {kind} targets': part for kind, part in kinds.items()})
    for suffix, part in parts.items():
      summary = evaluate_lib.summarise(task, part, builder)
      if ranked:
        summary = {k: v for k, v in summary.items() if k == 'users' or int(k.split('@')[1]) in ks}
      label = f'{task}{suffix} ({summary.pop("users")} {args.stage} users' + (f'; {protocol})' if ranked else ')')
      tables[label] = summary
    if ranked:
      tables[f'{task} by history length'] = by_history_length(task_rows['rank'], task_rows['target'], ks)
    if args.by_attribute and task == 'recommendation' and not args.negatives:
      window = builder.num_images if builder.uses_images else builder.history  # the most a prompt shows
      knn = baselines.evaluate('cooccurrence', builder.dataset, cfg.data.split, args.stage, recent=window)
      if not np.array_equal(splits.split_users(builder.dataset, cfg.data.split, args.stage), task_rows['user']):
        raise ValueError('evaluated users differ from the stage users; ItemKNN ranks would not be paired')
      tables[f'{task} by item attribute (the last {window} history items)'] = by_attribute(
          task_rows, builder.dataset, window, knn)

  if args.paired_with:
    tables.update(paired_with(records, args.paired_with))
  path = args.per_user or os.path.join(args.workdir, f'eval-{args.stage}.jsonl')
  with open(path + '.tmp', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  os.replace(path + '.tmp', path)
  for name, values in tables.items():
    print(f'## {name}\n\n{report.metrics_table(values)}\n')
  print(f'per-user results: {path} ({len(records)} lines)')
  return tables


if __name__ == '__main__':
  try:
    main()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
