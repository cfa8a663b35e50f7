"""The embedded dataset: deterministic, atomic, and generated the way docs/DATA.md says."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from unimp_jax.data import formats, splits, synthetic
from unimp_jax.data import tokenizer as tokenizer_lib

SMALL = dict(num_items=200, num_users=120, image_size=16, bpe_vocab=400)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('data') / 'fashion')
  synthetic.build(path, seed=3, **SMALL)
  return formats.UnifiedDataset(path, verify=True)


def test_same_seed_same_bytes_other_seed_other_bytes(built, tmp_path):
  again = synthetic.build(str(tmp_path / 'again'), seed=3, **SMALL)
  assert again['checksums'] == built.manifest['checksums']
  other = synthetic.build(str(tmp_path / 'other'), seed=4, **SMALL)
  assert other['checksums']['items.jsonl'] != built.manifest['checksums']['items.jsonl']
  assert other['checksums']['users.array_record'] != built.manifest['checksums']['users.array_record']


def test_text_never_names_the_colour_but_the_picture_shows_it(built):
  colours = built.manifest['extra']['colours']
  item_colour = built.manifest['extra']['item_colour']
  for item in built.items:
    text = ' '.join([item.title, item.brand, item.category, item.description, *item.keywords]).lower()
    assert not any(c in text.split() for c in colours), text
  images = built.images(range(len(built.items))).astype(np.float32)
  palette = np.asarray(list(synthetic.COLOURS.values()), np.float32)
  # The mean colour of the lit pixels points the way of the item's palette colour.
  lit = images.sum(-1, keepdims=True) > 60
  mean_rgb = (images * lit).sum((1, 2)) / np.maximum(lit.sum((1, 2)), 1)
  cos = (mean_rgb / np.linalg.norm(mean_rgb, axis=1, keepdims=True)) @ (palette / np.linalg.norm(palette, axis=1, keepdims=True)).T
  assert (cos.argmax(1) == np.asarray(item_colour)).mean() > 0.98


def test_users_are_chronological_and_selections_are_decided_by_colour(built):
  favourite = built.manifest['extra']['user_favourite_colour']
  item_colour = np.asarray(built.manifest['extra']['item_colour'])
  num_selections = 0
  for u in range(built.num_users):
    user = built.user(u)
    times = [i.timestamp for i in user.interactions]
    assert times == sorted(times) and len(set(i.item for i in user.interactions)) == len(times)
    assert all(1 <= i.rating <= 5 and i.explanation and i.query for i in user.interactions)
    for s in user.selections:
      num_selections += 1
      assert len(s.candidates) == 3 and 1 <= len(s.positives) <= 2 and set(s.positives) <= set(s.candidates)
      is_favourite = item_colour[list(s.candidates)] == favourite[u]
      assert set(np.asarray(s.candidates)[is_favourite]) == set(s.positives)
      assert len({built.items[c].category for c in s.candidates}) == 1
  assert num_selections > built.num_users


def test_images_carry_signal_text_cannot(built):
  extra = built.manifest['extra']
  assert extra['oracle_hr@10'] > 2 * extra['colour_blind_hr@10'] > 0


def test_tokenizer_is_saved_with_the_dataset(built):
  tok = built.tokenizer()
  ids = tokenizer_lib.TokenIds(tok.unimp_layout)
  assert tok.convert_tokens_to_ids('<image>') == ids.image == ids.base_vocab_size
  assert tok.convert_tokens_to_ids(f'item_{len(built.items) - 1}') == ids.item(len(built.items) - 1)
  assert ids.num_items == len(built.items) and ids.num_slots == synthetic.NUM_SLOTS


def test_a_failed_write_leaves_nothing_behind(tmp_path):
  items = [formats.Item(source_id=str(i), has_image=True) for i in range(3)]

  def images():
    yield np.zeros((8, 8, 3), np.uint8)
    raise RuntimeError('decoder crashed')

  with pytest.raises(RuntimeError, match='decoder crashed'):
    formats.write_dataset(str(tmp_path / 'ds'), name='t', items=items, images=images(), users=[],
                          image_size=8, split_seed=0)
  assert os.listdir(tmp_path) == []


SIGTERM_MID_WRITE = """
import os, signal, sys
import numpy as np
from unimp_jax.data import convert, formats
signal.signal(signal.SIGTERM, convert._exit_on_sigterm)  # what `python -m unimp_jax.data.convert` installs
def images():
  yield np.zeros((8, 8, 3), np.uint8)
  os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-write, as a scheduler's preemption would
  yield np.zeros((8, 8, 3), np.uint8)
items = [formats.Item(source_id=str(i), has_image=True) for i in range(2)]
formats.write_dataset(sys.argv[1], name='t', items=items, images=images(), users=[], image_size=8, split_seed=0)
"""


def test_sigterm_during_a_conversion_leaves_nothing_behind(tmp_path):
  proc = subprocess.run([sys.executable, '-c', SIGTERM_MID_WRITE, str(tmp_path / 'ds')], capture_output=True,
                        text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
  assert os.listdir(tmp_path) == []


def test_the_partial_folder_of_a_killed_writer_is_removed_by_the_next_write(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()  # its pid now names no process (SIGKILL leaves such a folder: nothing runs to remove it)
  os.makedirs(tmp_path / f'.ds.partial-{dead.pid}-abc' / 'images')
  os.makedirs(tmp_path / f'.ds.partial-{os.getpid()}-xyz')  # a live writer's: kept
  formats.write_dataset(str(tmp_path / 'ds'), name='t', items=[formats.Item(source_id='0')], images=[None],
                        users=[], image_size=8, split_seed=0)
  assert sorted(os.listdir(tmp_path)) == [f'.ds.partial-{os.getpid()}-xyz', 'ds']
  assert f'partial-{dead.pid}-abc, left by an interrupted write' in capsys.readouterr().out


def test_verify_names_a_modified_file(built, tmp_path):
  path = str(tmp_path / 'copy')
  synthetic.build(path, seed=3, **SMALL)
  with open(os.path.join(path, 'splits.json'), 'w') as f:
    json.dump({'seed': 0, 'by_user': {}}, f)
  with pytest.raises(formats.DatasetError, match='splits.json: modified'):
    formats.UnifiedDataset(path, verify=True)


@pytest.mark.parametrize('split', ['by_user', 'leave_last_out'])
def test_no_cold_item_reaches_a_training_example(built, split):
  """Property over the whole training pipeline: no picture slot, item token, target or next-item label of
  any example of two epochs of every task is a cold item, while test targets do include cold ones. The
  train step leaves exactly the cold items' tokens out of its softmax."""
  from unimp_jax import config as config_lib
  from unimp_jax.data import datasets, pipeline
  from unimp_jax.train import step as step_lib
  cold = np.asarray(built.manifest['extra']['cold_items'])
  assert len(cold) == round(synthetic.COLD_FRACTION * len(built.items))
  cfg = config_lib.base_config()
  cfg.data.update(path=built.path, split=split, seq_len=320, num_images=8, batch_size=4)
  cfg.model.vision.image_size = built.image_size
  builder = datasets.make_builder(cfg, built)
  cold_tokens = builder.ids.item(cold)
  np.testing.assert_array_equal(np.sort(step_lib.excluded_tokens(cfg.train, builder)), np.sort(cold_tokens))
  cfg.train.exclude_cold_items = False
  assert step_lib.excluded_tokens(cfg.train, builder) is None
  users = len(splits.split_users(built, split, 'train'))
  examples, tasks_seen = 0, set()
  for batch in pipeline.make_dataset(builder, cfg.data, seed=0, num_epochs=2):
    tasks_seen |= set(batch['task'].tolist())
    assert not np.isin(batch['image_items'], cold).any()
    assert not np.isin(batch['tokens'], cold_tokens).any()
    assert not np.isin(batch['next_items'], cold_tokens).any()
    assert not np.isin(batch['target'][:, 0], cold).any()
    examples += len(batch['tokens'])
  assert examples >= 2 * users - cfg.data.batch_size and tasks_seen == {0, 1, 2, 3}  # every trained task
  test_targets = [built.user(int(u)).interactions[-1].item for u in splits.split_users(built, 'by_user', 'test')]
  assert np.isin(test_targets, cold).any()
