"""The main job and the prediction command end to end, as a user runs them (separate processes)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import support
from unimp_jax.data import formats, synthetic

ROOT = os.path.dirname(os.path.dirname(__file__))


def _run(*args):
  env = support.subprocess_env()
  proc = subprocess.run([sys.executable, '-m', *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout


def test_main_job_reports_every_task_and_predict_answers(tmp_path):
  data = str(tmp_path / 'fashion')
  synthetic.build(data, num_items=80, num_users=50, seed=3, image_size=32, bpe_vocab=600)
  workdir = str(tmp_path / 'run')
  _run('unimp_jax.main', '--config', 'configs/tiny.py', '--workdir', workdir, f'--config.data.path={data}',
       '--config.train.steps=4', '--config.checkpoint.every=2', '--config.model.item_embeddings=content')
  with open(os.path.join(workdir, 'report.md')) as f:
    text = f.read()
  for section in ('## recommendation', '## search', '## preference', '## selection', 'gallery.png', 'HR', 'RMSE',
                  'BLEU-4', 'ROUGE-L', 'F1', '## colour agreement@8', '| popularity |', 'ItemKNN (last 5 items, as the prompt) HR@10',
                  '## preference baselines', '| biases RMSE (expected) |', '## explanation baseline: always "',
                  '## selection baselines', '| random slot set F1 (chance) |'):
    assert section in text, section
  assert Image.open(os.path.join(workdir, 'gallery.png')).size[0] > 200

  picture = str(tmp_path / 'new.png')
  Image.fromarray(np.full((40, 40, 3), (220, 40, 40), np.uint8)).save(picture)
  out = json.loads(_run('unimp_jax.predict', '--workdir', workdir, '--history', '3,17,29', '--top_k', '5',
                        '--new_item', f'{picture}|Red linen shirt|shirt|Acorn|19.99', '--rate', '44',
                        '--select', '5,6,7', '--gallery', str(tmp_path / 'mine.png')))
  items = [i for i, _ in out['recommended']]
  probabilities = [p for _, p in out['recommended']]
  assert len(items) == 5 and not {3, 17, 29} & set(items) and all(0 <= i < 80 for i in items)
  assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
  assert out['rating']['rating'] in range(1, 6) and abs(sum(out['rating']['probabilities']) - 1) < 1e-5
  assert 1 <= out['rating']['expected_rating'] <= 5 and isinstance(out['rating']['explanation'], str)
  assert set(out['selected']) <= {5, 6, 7}
  assert os.path.exists(tmp_path / 'mine.png') and os.path.exists(tmp_path / 'mine.html')
  # Titles of every item named, the new one (id 80, after the catalogue) in the JSON and the gallery too.
  catalogue = formats.UnifiedDataset(data).items
  assert out['titles']['80'] == 'Red linen shirt' and out['titles']['44'] == catalogue[44].title
  assert {str(i) for i in [3, 17, 29, 44, *items, *out['selected']]} <= set(out['titles'])
  with open(tmp_path / 'mine.html') as f:
    assert 'Red linen shirt' in f.read()
  assert formats.UnifiedDataset(data).num_users == 50  # the dataset is read, never rewritten

  # The evaluation command (here with the sampled-negatives protocol): its per-user lines give back
  # exactly the aggregates it prints.
  per_user = str(tmp_path / 'users.jsonl')
  out = _run('unimp_jax.evaluate', '--workdir', workdir, '--tasks', 'recommendation,selection', '--ks', '5,10',
             '--negatives', '20', '--per_user', per_user)
  assert '20 sampled negatives' in out
  with open(per_user) as f:
    records = [json.loads(line) for line in f]
  rec = [r for r in records if r['task'] == 'recommendation']
  ranks = np.asarray([r['rank'] for r in rec])
  assert len(rec) == len({r['user'] for r in rec}) == len([r for r in records if r['task'] == 'selection']) > 0
  assert f'| HR | {np.mean(ranks < 5):.4f} | {np.mean(ranks < 10):.4f} |' in out, out
  assert ranks.max() <= 20
  for r in rec:  # the top list is the ranking the rank was read from
    assert r['target_item'] not in r['top'][:r['rank']] and (r['rank'] >= len(r['top']) or r['top'][r['rank']] == r['target_item'])


def test_by_attribute_counts_what_the_rankings_share_with_the_prompt(tmp_path):
  """`evaluate --by_attribute` against the same counts written as plain loops over the dataset."""
  from unimp_jax import evaluate as evaluate_cli
  from unimp_jax.data import splits
  synthetic.build(str(tmp_path / 'd'), num_items=80, num_users=60, seed=4, image_size=16, bpe_vocab=400)
  dataset = formats.UnifiedDataset(str(tmp_path / 'd'))
  users = splits.split_users(dataset, 'by_user', 'test')
  rng = np.random.default_rng(0)
  rows = {'user': users, 'target': np.asarray([len(dataset.user(int(u)).interactions) - 1 for u in users]),
          'rank': rng.integers(0, 30, len(users)), 'top': rng.integers(0, 80, (len(users), 20))}
  knn = rng.integers(0, 30, len(users))
  out = evaluate_cli.by_attribute(rows, dataset, 3, knn)
  colours = dataset.manifest['extra']['item_colour']
  for name, value_of in (('colour', lambda i: colours[i]), ('category', lambda i: dataset.items[i].category),
                         ('brand', lambda i: dataset.items[i].brand)):
    shared, top_shares = [], []
    for u, t, top in zip(users, rows['target'], rows['top']):
      inters = dataset.user(int(u)).interactions
      window = {value_of(i.item) for i in inters[max(0, t - 3):t]}
      shared.append(value_of(inters[t].item) in window)
      top_shares.append(sum(value_of(int(i)) in window for i in top[:10]) / 10)
    shared = np.asarray(shared)
    assert out[f'{name}: targets sharing it'] == np.mean(shared)
    assert out[f'{name}: model HR@10, targets sharing'] == np.mean(rows['rank'][shared] < 10)
    assert out[f'{name}: ItemKNN HR@10, targets not sharing'] == np.mean(knn[~shared] < 10)
    assert abs(out[f"{name}: share of the model's top 10 sharing it"] - np.mean(top_shares)) < 1e-12


def test_paired_with_compares_the_same_users_and_refuses_others(tmp_path):
  from unimp_jax import evaluate as evaluate_cli
  rng = np.random.default_rng(1)
  mine = [{'task': 'recommendation', 'user': u, 'rank': int(rng.integers(0, 40)), 'target_cold': u % 4 == 0}
          for u in range(200)]
  other = [dict(r, rank=int(rng.integers(0, 40))) for r in mine][::-1]  # any order
  path = str(tmp_path / 'other.jsonl')
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in other + [{'task': 'selection', 'user': 0, 'chosen_slots': 1}])
  table = evaluate_cli.paired_with(mine, path)[f'recommendation: this run minus {path}']
  by_user = {r['user']: r['rank'] for r in other}
  cold = np.asarray([r['target_cold'] for r in mine])
  diff = np.asarray([(r['rank'] < 10) - (by_user[r['user']] < 10) for r in mine], np.float64)
  assert table['HR@10 difference'] == pytest.approx(diff.mean())
  assert table['HR@10 difference, cold targets'] == pytest.approx(diff[cold].mean())
  assert (table['users'], table['users, warm targets'], table['users, cold targets']) == (200, 150, 50)
  low, high = map(float, table['95% interval'].split(' to '))
  assert low < diff.mean() < high
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in other[1:])
  with pytest.raises(ValueError, match=r'no recommendation result for user \d+ \(1 users missing\)'):
    evaluate_cli.paired_with(mine, path)
