"""MovieLens-100K from the recbole wheel: a fake wheel in RecBole's exact file format, no network."""

import os
import subprocess
import zipfile

import numpy as np
import pytest

from unimp_jax.data import convert, formats, movielens

INTER_HEADER = 'user_id:token\titem_id:token\trating:float\ttimestamp:float'    # as in the real wheel
ITEM_HEADER = 'item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq'
ITEM_LINES = ["1\tToy Story\t1995\tAnimation Children's Comedy",
              '2\tGoldenEye\t1995\tAction Adventure Thriller',
              '3\tFour Rooms\t1995\tThriller',
              '4\tGet Shorty\t1995\tAction Comedy Drama',
              '5\tCopycat\t1995\tCrime Drama Thriller',
              '6\tShanghai Triad (Yao a yao yao dao waipo qiao)\t1995\tDrama',
              "1412\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation Children's"]
KEPT = ['1', '2', '3', '4', '5', '1412']


def _events():
  """Users 1-6 rate the six KEPT movies, each in its own seeded order (time order != file order); user 7 rates
  two movies (dropped by the 5-core), movie 6 has two ratings (dropped), movie 999 has no metadata (skipped)."""
  rng = np.random.default_rng(0)
  events = []
  for user in range(1, 7):
    for k, movie in enumerate(rng.permutation(KEPT)):
      events.append((str(user), str(movie), int(rng.integers(1, 6)), 880000000 + 1000 * user + 10 * k))
  events += [('7', '1', 3, 880000001), ('7', '2', 4, 880000002), ('1', '6', 5, 879999999),
             ('2', '6', 1, 879999998), ('3', '999', 2, 879999997)]
  return [events[i] for i in rng.permutation(len(events))]


def _fake_wheel(cache, events):
  cache.mkdir(parents=True, exist_ok=True)
  inter = '\n'.join([INTER_HEADER] + ['\t'.join(map(str, e)) for e in events]) + '\n'
  item = '\n'.join([ITEM_HEADER] + ITEM_LINES) + '\n'
  with zipfile.ZipFile(cache / 'recbole-1.2.1-py3-none-any.whl', 'w') as z:
    z.writestr('recbole/__init__.py', 'raise ImportError("never imported")\n')
    z.writestr(movielens.MEMBERS['ml-100k.inter'], inter)
    z.writestr(movielens.MEMBERS['ml-100k.item'], item)


def _no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f'subprocess.run called: {args}')
  monkeypatch.setattr(movielens.subprocess, 'run', refuse)


def test_prepare_from_a_cached_wheel(tmp_path, monkeypatch):
  _no_network(monkeypatch)
  events = _events()
  _fake_wheel(tmp_path / 'cache', events)
  out = movielens.prepare(str(tmp_path / 'cache'), str(tmp_path / 'ml'), seed=0, image_size=16)
  assert out == str(tmp_path / 'ml')
  assert sorted(os.listdir(tmp_path / 'cache' / 'ml-100k')) == ['ml-100k.inter', 'ml-100k.item']

  ds = formats.UnifiedDataset(out, verify=True)
  assert ds.manifest['counts'] == {'items': 6, 'items_with_image': 0, 'users': 6, 'interactions': 36}
  extra = ds.manifest['extra']
  assert extra['raw_counts'] == {'items': 7, 'interactions': len(events), 'users': 7}
  assert extra['unknown_items'] == ['999'] and extra['source']['wheel'] == 'recbole-1.2.1-py3-none-any.whl'
  assert ds.image_size == 16 and not ds.images(np.arange(6)).any()
  assert sorted(it.source_id for it in ds.items) == sorted(KEPT)
  land = next(it for it in ds.items if it.source_id == '1412')
  assert land.title == 'Land Before Time III: The Time of the Great Giving (1995)'   # year column 'V' ignored
  assert next(it for it in ds.items if it.source_id == '1').title == 'Toy Story (1995)'

  for u in range(ds.num_users):
    user = ds.user(u)
    expected = sorted((e for e in events if e[0] == user.source_id and e[1] in KEPT), key=lambda e: e[3])
    got = [(ds.items[i.item].source_id, i.rating, i.timestamp) for i in user.interactions]
    assert got == [(e[1], e[2], e[3]) for e in expected]                # chronological, ratings kept
  assert [ds.user(u).source_id for u in range(ds.num_users)] == ['1', '2', '3', '4', '5', '6']
  assert ds.tokenizer().unimp_layout['num_items'] == 6


def test_an_existing_dataset_is_not_rebuilt_and_the_cli_reports_counts(tmp_path, monkeypatch, capsys):
  _no_network(monkeypatch)
  _fake_wheel(tmp_path / 'cache', _events())
  movielens.main(['--cache', str(tmp_path / 'cache'), '--out', str(tmp_path / 'ml'), '--image_size', '16'])
  assert '"interactions": 36' in capsys.readouterr().out
  monkeypatch.setattr(convert, 'build', lambda *a, **k: pytest.fail('rebuilt an existing dataset'))
  movielens.main(['--cache', str(tmp_path / 'cache'), '--out', str(tmp_path / 'ml')])
  assert 'already existed' in capsys.readouterr().out
  (tmp_path / 'half').mkdir()
  with pytest.raises(formats.DatasetError, match='holds no manifest.json'):
    movielens.prepare(str(tmp_path / 'cache'), str(tmp_path / 'half'))


def test_a_failed_download_names_the_command(tmp_path, monkeypatch):
  calls = []

  def failing_pip(command, **kwargs):
    calls.append(command)
    return subprocess.CompletedProcess(command, 1, stdout='', stderr='ERROR: No matching distribution found for '
                                       'recbole==1.2.1\n(network is unreachable)')
  monkeypatch.setattr(movielens.subprocess, 'run', failing_pip)
  with pytest.raises(formats.DatasetError) as error:
    movielens.prepare(str(tmp_path / 'cache'), str(tmp_path / 'ml'))
  message = str(error.value)
  assert '-m pip download --no-deps' in message and 'recbole==1.2.1' in message
  assert 'exited with 1' in message and 'network is unreachable' in message and str(tmp_path / 'cache') in message
  assert calls and calls[0][1:4] == ['-m', 'pip', 'download']
  assert not os.path.exists(tmp_path / 'ml')


def test_a_wheel_without_the_data_is_named(tmp_path, monkeypatch):
  _no_network(monkeypatch)
  (tmp_path / 'cache').mkdir()
  with zipfile.ZipFile(tmp_path / 'cache' / 'recbole-1.2.1-py3-none-any.whl', 'w') as z:
    z.writestr('recbole/__init__.py', '')
  with pytest.raises(formats.DatasetError, match=r'recbole-1\.2\.1-py3-none-any\.whl does not hold .*ml-100k.inter'):
    movielens.prepare(str(tmp_path / 'cache'), str(tmp_path / 'ml'))
  (tmp_path / 'cache' / 'recbole-1.2.1-py3-none-any.whl').write_bytes(b'not a zip')
  with pytest.raises(formats.DatasetError, match='not a readable wheel'):
    movielens.prepare(str(tmp_path / 'cache'), str(tmp_path / 'ml'))
