"""Converters: each raw fixture (tests/fixtures/raw/<format>) -> unified dataset, checked against values read
off the fixture by hand. The expected sequences, counts and k-core outcomes are worked out in the comments."""

import ast
import calendar
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unimp_jax.data import convert, formats, tokenizer
from unimp_jax.data.formats import DatasetError

RAW = os.path.join(os.path.dirname(__file__), 'fixtures', 'raw')
FAST = ['--image_size', '16', '--bpe_vocab', '300']
COLOURS = {'B00BEAUTY1': (220, 30, 30), 'B00BEAUTY2': (30, 200, 30), 'B00BEAUTY3': (30, 30, 220),
           'B00TOY0001': (250, 140, 0), 'B00TOY0002': (140, 0, 160)}   # B00BEAUTY4, B00TOY0003: no file


def _jpeg(path, rgb):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', (24, 16), rgb).save(path, 'JPEG', quality=95)   # not square: exercises the centre crop


def _read(out):
  ds = formats.UnifiedDataset(str(out), verify=True)
  users = [ds.user(i) for i in range(ds.num_users)]
  return ds, {u.source_id: u for u in users}, [u.source_id for u in users]


def _sequence(ds, user):
  return [(ds.items[i.item].source_id, i.rating) for i in user.interactions]


def _item(ds, source_id):
  return next(it for it in ds.items if it.source_id == source_id)


def _bytes(path):
  with open(path, 'rb') as f:
    return f.read()


# ---- Amazon 2014 ------------------------------------------------------------------------------------------
# Events (unixReviewTime - 1400000000), over the Beauty (B) and Toys (T) files:
#   Alice B1@100 T1@150 B2@200 [B00MISSING@250: no metadata] B3@300   Bob B2@110 B1@210 T1@250 T2@310
#   Carol B1@120 B3@220 T2@320   Dave B1@130 B4@230   Eve T3@140 B2@240 B3@340
# 3-user/2-item core: round 1 drops Dave (2 events) and B4, T3 (1 each); Eve is left with 2 -> round 2 drops
# her; round 3 changes nothing. Left: Alice, Bob, Carol; B1 B2 B3 T1 T2; 4 + 4 + 3 = 11 interactions.

def _amazon2014(tmp_path, *args, images=COLOURS, meta_lines=None, review_lines=None):
  """Converts the fixture; the Toys domain is gzipped (as downloaded); `*_lines` replace Beauty file lines;
  `images` maps asin -> colour of a small JPEG, or -> the bytes of its file."""
  src, raw = os.path.join(RAW, 'amazon2014'), tmp_path / 'raw'
  raw.mkdir(exist_ok=True)
  for name, replace in (('meta_Beauty.json', meta_lines), ('reviews_Beauty_5.json', review_lines)):
    lines = _bytes(os.path.join(src, name)).decode().splitlines()
    for number, text in (replace or {}).items():
      lines[number - 1] = text
    (raw / name).write_text('\n'.join(lines) + '\n')
  for name in ('meta_Toys_and_Games.json', 'reviews_Toys_and_Games_5.json'):
    with gzip.open(raw / f'{name}.gz', 'wb') as f:
      f.write(_bytes(os.path.join(src, name)))
  folder = tmp_path / 'images'
  shutil.rmtree(folder, ignore_errors=True)
  for asin, content in images.items():
    if isinstance(content, bytes):
      folder.mkdir(exist_ok=True)
      (folder / f'{asin}.jpg').write_bytes(content)
    else:
      _jpeg(str(folder / f'{asin}.jpg'), content)
  return convert.main(['amazon2014', '--meta', str(raw / 'meta_Beauty.json'), str(raw / 'meta_Toys_and_Games.json.gz'),
                       '--reviews', str(raw / 'reviews_Beauty_5.json'), str(raw / 'reviews_Toys_and_Games_5.json.gz'),
                       '--images', str(folder), '--min_user_interactions', '3', '--min_item_interactions', '2',
                       *FAST, *args])


def test_amazon2014_merges_domains_filters_and_keeps_time_order(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  manifest = _amazon2014(tmp_path, '--out', str(tmp_path / 'out'))
  assert manifest['counts'] == {'items': 5, 'items_with_image': 5, 'users': 3, 'interactions': 11}
  extra = manifest['extra']
  assert extra['raw_counts'] == {'items': 7, 'users': 5, 'interactions': 17}
  assert (extra['unknown_item_interactions'], extra['unknown_items']) == (1, ['B00MISSING'])
  assert extra['k_core_rounds'] == 3 and extra['bad_images'] == {}

  ds, users, order = _read(tmp_path / 'out')
  assert order == ['A1ALICE', 'A2BOB', 'A3CAROL']
  assert _sequence(ds, users['A1ALICE']) == [('B00BEAUTY1', 5), ('B00TOY0001', 3), ('B00BEAUTY2', 4), ('B00BEAUTY3', 1)]
  assert _sequence(ds, users['A2BOB']) == [('B00BEAUTY2', 2), ('B00BEAUTY1', 4), ('B00TOY0001', 5), ('B00TOY0002', 4)]
  assert _sequence(ds, users['A3CAROL']) == [('B00BEAUTY1', 3), ('B00BEAUTY3', 5), ('B00TOY0002', 2)]
  assert [i.timestamp - 1400000000 for i in users['A1ALICE'].interactions] == [100, 150, 200, 300]

  first = users['A1ALICE'].interactions[0]
  assert first.review == 'Smells lovely. My skin feels soft after a week of use! Would buy again.'
  assert first.explanation in ('My skin feels soft after a week of use!', 'Would buy again.')  # 3+ words
  cream, salts, train = _item(ds, 'B00BEAUTY1'), _item(ds, 'B00BEAUTY3'), _item(ds, 'B00TOY0001')
  assert (cream.title, cream.brand, cream.category, cream.price) == ('Rose Petal Face Cream', 'Petalia', 'Face', 12.99)
  assert cream.keywords == ('rose', 'petal', 'face', 'cream') and cream.has_image
  assert (salts.brand, salts.price, salts.category) == ('', None, 'Bath Salts')
  assert train.category == 'Trains'          # the first category path's most specific level
  # A Python-literal value that looks like code is data: read as the string it is, never run.
  assert _item(ds, 'B00BEAUTY2').description == "__import__('os').system('touch PWNED')"
  assert not os.path.exists(tmp_path / 'PWNED')

  for source_id, rgb in COLOURS.items():
    image = ds.images([ds.items.index(_item(ds, source_id))])[0]
    assert image.shape == (16, 16, 3)
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), rgb, atol=12)
  layout = ds.tokenizer().unimp_layout
  assert layout['num_items'] == 5 and layout['num_slots'] == 3 and layout['base_vocab_size'] <= 300


def test_bad_images_fail_by_default_naming_the_file_and_drop_reapplies_k_core(tmp_path, capsys):
  # B00BEAUTY3.jpg holds garbage bytes, B00TOY0002.jpg does not exist.
  bad = {**{k: v for k, v in COLOURS.items() if k != 'B00TOY0002'}, 'B00BEAUTY3': b'\xff\xd8\xff\xe0 not a jpeg'}
  with pytest.raises(DatasetError, match=r'2 item image\(s\) missing or undecodable, e\.g\. .*B00BEAUTY3\.jpg'):
    _amazon2014(tmp_path, '--out', str(tmp_path / 'out'), images=bad)
  assert not os.path.exists(tmp_path / 'out')
  printed = capsys.readouterr().out
  assert 'B00BEAUTY3' in printed and 'B00TOY0002.jpg' in printed

  manifest = _amazon2014(tmp_path, '--out', str(tmp_path / 'dropped'), '--on_bad_image', 'drop', images=bad)
  # B3 and T2 go. Carol keeps only B1 -> dropped; Alice and Bob keep 3 each; B1, B2, T1 keep 2 users each.
  assert sorted(manifest['extra']['bad_images']) == ['B00BEAUTY3', 'B00TOY0002']
  assert 'cannot decode' in manifest['extra']['bad_images']['B00BEAUTY3']
  assert manifest['counts'] == {'items': 3, 'items_with_image': 3, 'users': 2, 'interactions': 6}
  ds, users, order = _read(tmp_path / 'dropped')
  assert order == ['A1ALICE', 'A2BOB']
  assert _sequence(ds, users['A1ALICE']) == [('B00BEAUTY1', 5), ('B00TOY0001', 3), ('B00BEAUTY2', 4)]
  assert _sequence(ds, users['A2BOB']) == [('B00BEAUTY2', 2), ('B00BEAUTY1', 4), ('B00TOY0001', 5)]


@pytest.mark.parametrize('meta_lines, review_lines, where, message', [
    ({3: "{'asin': 'B00BEAUTY3', 'title': 'Lavender"}, None, 'meta_Beauty.json:3', 'cannot parse'),
    ({2: "__import__('os').system('touch PWNED')"}, None, 'meta_Beauty.json:2', 'cannot parse'),
    ({1: "['B00BEAUTY1']"}, None, 'meta_Beauty.json:1', 'expected a dict'),
    (None, {2: '{"reviewerID": "A1ALICE", "asin": '}, 'reviews_Beauty_5.json:2', 'cannot parse'),
    (None, {4: '{"reviewerID": "A4DAVE", "asin": "B00BEAUTY1", "unixReviewTime": 1}'}, 'reviews_Beauty_5.json:4',
     'missing "overall"'),
    (None, {5: '{"reviewerID": "A1", "asin": "B00BEAUTY2", "overall": 7.0, "unixReviewTime": 1}'},
     'reviews_Beauty_5.json:5', 'rating 7.0 is not in 1..5'),
])
def test_malformed_lines_name_file_and_line_and_nothing_is_executed(tmp_path, monkeypatch, meta_lines,
                                                                    review_lines, where, message):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(DatasetError, match=re.escape(f'{where}: {message}')):
    _amazon2014(tmp_path, '--out', str(tmp_path / 'out'), meta_lines=meta_lines, review_lines=review_lines)
  assert not os.path.exists(tmp_path / 'PWNED') and not os.path.exists(tmp_path / 'out')


def test_the_converter_never_calls_eval_or_exec():
  with open(convert.__file__) as f:
    tree = ast.parse(f.read())
  calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
  assert not calls & {'eval', 'exec', 'compile'}


def test_same_seed_is_byte_identical_and_other_seeds_differ(tmp_path):
  for name, seed in (('a', '0'), ('b', '0'), ('c', '1')):
    _amazon2014(tmp_path, '--out', str(tmp_path / name), '--seed', seed)
  for name in ('items.jsonl', 'users.array_record'):
    assert _bytes(tmp_path / 'a' / name) == _bytes(tmp_path / 'b' / name)
    assert _bytes(tmp_path / 'a' / name) != _bytes(tmp_path / 'c' / name)
  a, c = formats.UnifiedDataset(str(tmp_path / 'a')), formats.UnifiedDataset(str(tmp_path / 'c'))
  assert sorted(it.source_id for it in a.items) == sorted(it.source_id for it in c.items)

  with pytest.raises(DatasetError, match='already exists'):
    _amazon2014(tmp_path, '--out', str(tmp_path / 'a'))
  assert _amazon2014(tmp_path, '--out', str(tmp_path / 'a'), '--overwrite', '--seed', '1')['counts']['items'] == 5
  assert _bytes(tmp_path / 'a' / 'items.jsonl') == _bytes(tmp_path / 'c' / 'items.jsonl')
  # --overwrite replaces a dataset only: not the raw input folder, nor any other folder or file.
  raw_files = sorted(os.listdir(tmp_path / 'raw'))
  for target in (tmp_path / 'raw', tmp_path / 'raw' / 'meta_Beauty.json'):
    with pytest.raises(DatasetError, match='not a dataset'):
      _amazon2014(tmp_path, '--out', str(target), '--overwrite')
  assert sorted(os.listdir(tmp_path / 'raw')) == raw_files


# ---- Amazon 2018 ------------------------------------------------------------------------------------------
# Events (unixReviewTime - 1514764800): A BEAU01@0 FASH01@1000 BEAU02@2000 (no reviewText);
#   B FASH01@100 FASH02@1100 BEAU01@2100; C FASH02@200 BEAU02@700; D BEAU01@300.
# 2/2-core drops D; every item keeps 2 users. Left: 3 users, 4 items, 8 interactions.

def test_amazon2018_reads_json_meta_prices_and_merges_domains(tmp_path):
  src = os.path.join(RAW, 'amazon2018')
  manifest = convert.main(
      ['amazon2018', '--meta', f'{src}/meta_All_Beauty.json', f'{src}/meta_AMAZON_FASHION.json',
       '--reviews', f'{src}/All_Beauty_5.json', f'{src}/AMAZON_FASHION_5.json', '--out', str(tmp_path / 'out'),
       '--min_user_interactions', '2', '--min_item_interactions', '2', *FAST])
  assert manifest['counts'] == {'items': 4, 'items_with_image': 0, 'users': 3, 'interactions': 8}
  assert manifest['extra']['duplicate_meta_lines'] == 1
  ds, users, order = _read(tmp_path / 'out')
  assert order == ['U2018A', 'U2018B', 'U2018C']
  assert _sequence(ds, users['U2018A']) == [('B018BEAU01', 5), ('B018FASH01', 4), ('B018BEAU02', 3)]
  assert _sequence(ds, users['U2018B']) == [('B018FASH01', 2), ('B018FASH02', 5), ('B018BEAU01', 4)]
  assert _sequence(ds, users['U2018C']) == [('B018FASH02', 1), ('B018BEAU02', 4)]
  no_text = users['U2018A'].interactions[2]
  assert (no_text.review, no_text.explanation) == ('', '')

  serum, brush = _item(ds, 'B018BEAU01'), _item(ds, 'B018BEAU02')
  dress, tote = _item(ds, 'B018FASH01'), _item(ds, 'B018FASH02')
  assert (serum.price, serum.brand, serum.category) == (12.99, 'Glow Lab', '')
  assert serum.description == 'Brightening serum with vitamin C. 30 ml glass bottle.'
  assert (brush.price, brush.brand) == (None, '')
  assert (dress.title, dress.price, dress.category) == ('Linen Summer Dress', 24.0, 'Dresses')  # first line wins
  assert (tote.price, tote.category, tote.keywords) == (1299.0, 'Totes', ('canvas', 'tote', 'bag', 'totes'))
  assert not any(it.has_image for it in ds.items)   # no --images: like MovieLens, items have no picture


# ---- H&M --------------------------------------------------------------------------------------------------
# Transactions (file order): a 0108775015@09-20, a 0110065001@09-20, b 0110065001@09-20, c 0108775044@09-21,
#   b 0108775015@09-22, [eeee5555: not a customer], c 0111565001@09-23, a 0111565001@09-19,
#   d 0176209023@09-24, c 0108775044@09-25, a 108775044@09-25 (unpadded id).
# 2/2-core drops d and 0176209023 (which has no image file: only surviving items' images are read).

def _hm(tmp_path):
  root = tmp_path / 'hm'
  shutil.copytree(os.path.join(RAW, 'hm'), root)
  colours = {'0108775015': (10, 10, 10), '0108775044': (245, 245, 245), '0110065001': (200, 0, 0),
             '0111565001': (0, 0, 200)}
  for aid, rgb in colours.items():
    _jpeg(str(root / 'images' / aid[:3] / f'{aid}.jpg'), rgb)
  return root, colours


def test_hm_keeps_chronological_order_with_stable_ties(tmp_path):
  root, colours = _hm(tmp_path)
  manifest = convert.main(['hm', '--root', str(root), '--out', str(tmp_path / 'out'),
                           '--min_user_interactions', '2', '--min_item_interactions', '2', *FAST])
  assert manifest['counts'] == {'items': 4, 'items_with_image': 4, 'users': 3, 'interactions': 9}
  assert manifest['extra']['unknown_customer_transactions'] == 1
  ds, users, order = _read(tmp_path / 'out')
  assert order == ['aaaa1111', 'bbbb2222', 'cccc3333']
  assert _sequence(ds, users['aaaa1111']) == [('0111565001', None), ('0108775015', None), ('0110065001', None),
                                               ('0108775044', None)]
  assert _sequence(ds, users['cccc3333']) == [('0108775044', None), ('0111565001', None), ('0108775044', None)]
  assert users['aaaa1111'].interactions[0].timestamp == calendar.timegm((2018, 9, 19, 0, 0, 0))
  assert all(i.review == '' and i.explanation == '' for u in users.values() for i in u.interactions)
  bra = _item(ds, '0110065001')
  assert (bra.title, bra.category, bra.price, bra.brand) == ('OP T-shirt(Idro)', 'Bra', None, '')
  assert bra.description == 'Microfibre T-shirt bra with underwired, moulded, lightly padded cups.'
  assert bra.keywords == ('shirt', 'idro', 'bra', 'black')
  for aid, rgb in colours.items():
    np.testing.assert_allclose(ds.images([ds.items.index(_item(ds, aid))])[0].reshape(-1, 3).mean(0), rgb, atol=12)


def test_hm_without_its_images_folder_converts_with_keep_and_the_items_have_no_picture(tmp_path):
  root, _ = _hm(tmp_path)
  shutil.rmtree(root / 'images')
  args = ['hm', '--root', str(root), '--min_user_interactions', '2', '--min_item_interactions', '2', *FAST]
  with pytest.raises(DatasetError, match='or keep to keep them without a picture'):
    convert.main([*args, '--out', str(tmp_path / 'failed')])
  manifest = convert.main([*args, '--out', str(tmp_path / 'out'), '--on_bad_image', 'keep'])
  # The same catalogue and histories as with the pictures (k-core is not re-applied), none with a picture.
  assert manifest['counts'] == {'items': 4, 'items_with_image': 0, 'users': 3, 'interactions': 9}
  assert len(manifest['extra']['bad_images']) == 4 and manifest['extra']['on_bad_image'] == 'keep'
  ds, users, _ = _read(tmp_path / 'out')
  assert not any(it.has_image for it in ds.items) and not ds.images(np.arange(4)).any()
  assert _sequence(ds, users['cccc3333']) == [('0108775044', None), ('0111565001', None), ('0108775044', None)]


@pytest.mark.parametrize('line, message', [('2018-09-20,bbbb2222,0110065001,0.03', '4 fields, the header has 5'),
                                           ('20/09/2018,bbbb2222,0110065001,0.03,1', 'is not YYYY-MM-DD')])
def test_hm_malformed_transaction_names_file_and_line(tmp_path, line, message):
  root, _ = _hm(tmp_path)
  path = root / 'transactions_train.csv'
  lines = path.read_text().splitlines()
  lines[3] = line
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(DatasetError, match=f'transactions_train.csv:4: .*{message}'):
    convert.main(['hm', '--root', str(root), '--out', str(tmp_path / 'out'), *FAST])


def test_hm_bad_bytes_are_blamed_on_their_line(tmp_path):
  root, _ = _hm(tmp_path)
  path = root / 'transactions_train.csv'
  lines = path.read_bytes().splitlines()
  lines[5] = lines[5].replace(b'bbbb', b'bb\xff\xfe')
  path.write_bytes(b'\n'.join(lines) + b'\n')
  with pytest.raises(DatasetError, match='transactions_train.csv:6: not utf-8'):
    convert.main(['hm', '--root', str(root), '--out', str(tmp_path / 'out'), *FAST])


# ---- MovieLens --------------------------------------------------------------------------------------------
# 196: 1@949 543@950 2@1000; 186: 2@742 1@700 4@800 (file order differs from time order); 22: 543, 4, 2;
# 7: 3, 5 (2 ratings: dropped by the 3-user core, and with it movies 3 and 5).

@pytest.mark.parametrize('source', ['ml-100k', 'recbole'])
def test_movielens_without_images_converts_end_to_end(tmp_path, source, capsys):
  manifest = convert.main(['movielens', '--root', os.path.join(RAW, 'movielens', source), '--out',
                           str(tmp_path / 'out'), '--min_user_interactions', '3', '--min_item_interactions', '2',
                           *FAST])
  progress = capsys.readouterr().err  # progress bars on stderr: every file read to its end, every item written
  assert re.search(r'reading (u\.data|ml-100k\.inter): 100%', progress) and 'writing pictures: 100%' in progress, progress
  assert manifest['counts'] == {'items': 4, 'items_with_image': 0, 'users': 3, 'interactions': 9}
  ds, users, order = _read(tmp_path / 'out')
  assert order == ['186', '196', '22']
  assert _sequence(ds, users['186']) == [('1', 4), ('2', 3), ('4', 2)]
  assert _sequence(ds, users['22']) == [('543', 1), ('4', 4), ('2', 5)]
  assert [i.timestamp for i in users['186'].interactions] == [891717700, 891717742, 891717800]
  toy, miserables = _item(ds, '1'), _item(ds, '543')
  assert (toy.title, toy.category, toy.price) == ('Toy Story (1995)', "Animation, Children's, Comedy", None)
  assert toy.keywords == ('toy', 'story', 'animation', 'children', 'comedy')
  assert (miserables.title, miserables.category) == ('Misérables, Les (1995)', 'Drama, Musical')  # latin-1 u.item
  assert not any(it.has_image for it in ds.items)
  assert not ds.images(np.arange(4)).any()


@pytest.mark.parametrize('args, message', [
    (['movielens', '--root', 'ROOT/missing'], '--root ROOT/missing: no such directory'),
    (['amazon2014', '--meta', 'ROOT/meta.json', '--reviews', 'ROOT/r.json'], '--meta ROOT/meta.json: no such file'),
    (['movielens', '--root', 'ROOT', '--image_size', '0'], '--image_size 0: must be at least 1'),
    (['movielens', '--root', 'ROOT', '--tokenizer', 'ROOT/tok'], '--tokenizer ROOT/tok: no such directory'),
    (['movielens', '--root', 'ROOT', '--out', 'ROOT/u.data'], 'already exists'),
    (['movielens', '--root', 'ROOT', '--out', 'ROOT/u.data', '--overwrite'], 'is not a dataset'),
])
def test_bad_arguments_are_refused_before_anything_is_read(tmp_path, monkeypatch, args, message):
  root = tmp_path / 'ml'
  shutil.copytree(os.path.join(RAW, 'movielens', 'ml-100k'), root)
  monkeypatch.setattr(convert, 'read_movielens', lambda *_: pytest.fail('read the input before checking it'))
  args = [a.replace('ROOT', str(root)) for a in args]
  out = [] if '--out' in args else ['--out', str(tmp_path / 'out')]
  with pytest.raises(DatasetError, match=re.escape(message.replace('ROOT', str(root)))):
    convert.main([*args, *out])
  assert sorted(os.listdir(root)) == ['u.data', 'u.item']  # nothing deleted


def test_movielens_grouplens_and_recbole_files_give_the_same_dataset(tmp_path):
  for source in ('ml-100k', 'recbole'):
    convert.main(['movielens', '--root', os.path.join(RAW, 'movielens', source), '--out', str(tmp_path / source),
                  '--min_user_interactions', '3', '--min_item_interactions', '2', *FAST])
  for name in ('items.jsonl', 'users.array_record'):
    assert _bytes(tmp_path / 'ml-100k' / name) == _bytes(tmp_path / 'recbole' / name)


@pytest.mark.parametrize('source_format,meta,reviews,message', [
    # 2018 metadata is JSON, which Python literals include: only its keys tell it apart.
    ('amazon2014', 'amazon2018/meta_All_Beauty.json', 'amazon2018/All_Beauty_5.json',
     r"meta_All_Beauty.json:1: this record has 'category', 'imageURL', 'imageURLHighRes', 'main_cat', 'also_buy', "
     r"'also_view', which amazon2018 metadata has, .*: convert it as amazon2018"),
    ('amazon2018', 'amazon2014/meta_Beauty.json', 'amazon2014/reviews_Beauty_5.json',
     r'meta_Beauty.json:1: cannot parse the line .*amazon2014 metadata is Python-literal lines'),
    ('amazon2018', 'amazon2018/meta_All_Beauty.json', 'EMPTY',
     r'no interactions in .*meta_All_Beauty.json, .*EMPTY: the files hold no records'),
    ('amazon2018', 'amazon2018/meta_All_Beauty.json', 'amazon2014/reviews_Beauty_5.json',
     r"none of the \d+ interactions names an item of the metadata \(e.g. 'B00BEAUTY\d', and the metadata has "
     r"e.g. 'B018BEAU01'\); are the files of the same dataset\?"),
])
def test_the_wrong_format_or_empty_or_unrelated_files_are_named_not_blamed_on_k_core(
    tmp_path, source_format, meta, reviews, message):
  (tmp_path / 'EMPTY').write_text('\n')
  path = lambda name: str(tmp_path / name) if name == 'EMPTY' else os.path.join(RAW, name)
  with pytest.raises(DatasetError, match=message):
    convert.main([source_format, '--meta', path(meta), '--reviews', path(reviews), '--out', str(tmp_path / 'out'),
                  *FAST])
  assert not os.path.exists(tmp_path / 'out')


def test_cli_exits_with_the_file_and_line_of_a_malformed_record(tmp_path):
  root = tmp_path / 'ml'
  shutil.copytree(os.path.join(RAW, 'movielens', 'ml-100k'), root)
  with open(root / 'u.data', 'a') as f:
    f.write('5\t1\t3\n')
  result = subprocess.run([sys.executable, '-m', 'unimp_jax.data.convert', 'movielens', '--root', str(root),
                           '--out', str(tmp_path / 'out'), *FAST], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode != 0
  assert 'u.data:12: expected user, item, rating, timestamp' in result.stderr
  assert not os.path.exists(tmp_path / 'out')


# ---- shared pieces ----------------------------------------------------------------------------------------

def test_a_local_tokenizer_is_used_as_the_base_vocabulary(tmp_path):
  base = tokenizer.train_bpe(['a small local vocabulary for testing'] * 4, 280)
  base.save_pretrained(str(tmp_path / 'tok'))
  convert.main(['movielens', '--root', os.path.join(RAW, 'movielens', 'recbole'), '--out', str(tmp_path / 'out'),
                '--tokenizer', str(tmp_path / 'tok'), '--min_user_interactions', '3', '--min_item_interactions', '2',
                '--image_size', '16'])
  tok = formats.UnifiedDataset(str(tmp_path / 'out')).tokenizer()
  assert tok.unimp_layout['base_vocab_size'] == len(base)
  assert tok.convert_tokens_to_ids('item_3') == len(base) + 3 + 5 + 3 + 3


def test_helpers():
  assert [convert.price(v) for v in ('$12.99', '', '$10.99 - $15.99', '$1,299.00', 'see site', 3, None, True)] == [
      12.99, None, 10.99, 1299.0, None, 3.0, None, None]
  assert convert.keywords('The New Rose & Oud Set of 3', 'Perfume') == ('rose', 'oud', 'perfume')
  events = [convert.Event(u, i, t) for t, (u, i) in enumerate(['ax', 'ay', 'bx', 'by', 'bz', 'cz'])]
  # 2/2-core: z has b, c; c has only z -> c goes, then z has only b -> z goes; a and b keep x and y.
  kept, rounds = convert.k_core(events, 2, 2)
  assert [(e.user, e.item) for e in kept] == [('a', 'x'), ('a', 'y'), ('b', 'x'), ('b', 'y')] and rounds == 3
  ids = convert.item_permutation(['x', 'y', 'z', 'w'], seed=3)
  assert sorted(ids.values()) == [0, 1, 2, 3] and ids == convert.item_permutation(['w', 'z', 'y', 'x'], seed=3)
  review = 'Great. It fits my feet well. The laces broke within a week.'
  chosen = {convert.explanation(review, seed, 'u', 'i') for seed in range(20)}
  assert chosen == {'It fits my feet well.', 'The laces broke within a week.'}
  assert convert.explanation(review, 7, 'u', 'i') == convert.explanation(review, 7, 'u', 'i')


@pytest.mark.parametrize('source_format,meta,expected', [
    ('amazon2014', 'meta_Beauty.json', ('B00BEAUTY1', 'http://ecx.images-amazon.com/images/I/41beauty1.jpg')),
    ('amazon2018', 'meta_All_Beauty.json',  # the high-resolution URL, not the 40 px thumbnail
     ('B018BEAU01', 'https://images-na.ssl-images-amazon.com/images/I/41serum.jpg')),
])
def test_picture_url_list_feeds_the_fetcher(tmp_path, source_format, meta, expected):
  from unimp_jax.data import fetch
  meta_path = os.path.join(RAW, source_format, meta)
  out = tmp_path / 'urls.tsv'
  count = convert.main([source_format, '--meta', meta_path, '--write_urls', str(out)])
  rows = fetch.read_urls(str(out))  # the fetcher's own reader accepts the file
  assert count['image_urls'] == len(rows) > 0
  assert all(url.startswith('http') for _, url in rows) and len({a for a, _ in rows}) == len(rows)
  assert rows[0] == expected


def test_cold_after_marks_late_items_cold_and_keeps_them_out_of_training(tmp_path):
  # First interactions in the fixture: 543 @878887116, 4 @878887200, 2 @878887300, 1 @881250949.
  cutoff = 880_000_000
  manifest = convert.main(['movielens', '--root', os.path.join(RAW, 'movielens', 'ml-100k'), '--out',
                           str(tmp_path / 'out'), '--min_user_interactions', '3', '--min_item_interactions', '2',
                           '--cold_after', str(cutoff), *FAST])
  ds = formats.UnifiedDataset(str(tmp_path / 'out'))
  extra = manifest['extra']
  assert extra['cutoff'] == cutoff and [ds.items[i].source_id for i in extra['cold_items']] == ['1']
  with open(tmp_path / 'out' / 'splits.json') as f:
    splits = json.load(f)['by_user']
  for u in range(ds.num_users):
    inters = ds.user(u).interactions
    if u in splits['train']:
      assert all(i.timestamp <= cutoff for i in inters) and not set(extra['cold_items']) & {i.item for i in inters}
    else:  # evaluated users keep everything
      assert len(inters) == 3
