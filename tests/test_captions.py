"""The stage-1 caption corpus: never a catalogue photo, captions that name exactly what the picture shows,
same seed same bytes, a tokenizer that shares stage 2's base vocabulary, and `url, caption` tables
converted through the fetcher with bad rows named by file and line."""

import gzip
import http.server
import io
import os
import re
import struct
import threading

import numpy as np
import pytest
from PIL import Image

from unimp_jax.data import captions, formats, synthetic
from unimp_jax.data import tokenizer as tokenizer_lib

SMALL = dict(num=300, image_size=16, bpe_vocab=300)
COLOUR_NAMES = list(synthetic.COLOURS)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('captions') / 'corpus')
  captions.build(path, seed=5, **SMALL)
  return formats.UnifiedDataset(path, verify=True)


def _idx(path: str, header: str) -> np.ndarray:
  with gzip.open(path) as f:
    f.read(struct.calcsize(header))
    return np.frombuffer(f.read(), np.uint8)


def test_no_picture_is_a_catalogue_photo(corpus):
  catalogue = _idx(os.path.join(synthetic.ASSETS, 'images-idx3-ubyte.gz'), '>IIII').reshape(-1, 28, 28)
  photos = _idx(os.path.join(captions.ASSETS, 'images-idx3-ubyte.gz'), '>IIII').reshape(-1, 28, 28)
  assert len(photos) == 3000 and not {p.tobytes() for p in photos} & {p.tobytes() for p in catalogue}
  # What was written: each picture is its own source photo in its colour, and none is a catalogue photo
  # in any colour.
  written = corpus.images(range(len(corpus.items)))
  colours = corpus.manifest['extra']['item_colour']
  for item, picture, colour in zip(corpus.items, written, colours):
    source = int(item.source_id.split(':')[1])
    expected = synthetic.colourise(photos[source], synthetic.COLOURS[COLOUR_NAMES[colour]], 16)
    np.testing.assert_array_equal(picture, expected)
  shown = {p.tobytes() for p in written}
  palette = synthetic.COLOURS.values()
  assert not shown & {synthetic.colourise(p, rgb, 16).tobytes() for p in catalogue for rgb in palette}


def _write_idx(directory, split: str, photos: np.ndarray) -> None:
  """A Debian-layout IDX pair (gzipped, big-endian headers) holding `photos`, all labelled 0."""
  with gzip.open(os.path.join(directory, f'{split}-images-idx3-ubyte.gz'), 'wb') as f:
    f.write(struct.pack('>IIII', 2051, len(photos), 28, 28) + photos.tobytes())
  with gzip.open(os.path.join(directory, f'{split}-labels-idx1-ubyte.gz'), 'wb') as f:
    f.write(struct.pack('>II', 2049, len(photos)) + bytes(len(photos)))


def test_full_debian_photos_leave_out_exactly_the_catalogue(tmp_path):
  """A package-layout directory whose train split starts with catalogue photos, as the real one does."""
  catalogue = _idx(os.path.join(synthetic.ASSETS, 'images-idx3-ubyte.gz'), '>IIII').reshape(-1, 28, 28)
  fresh = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
  _write_idx(tmp_path, 'train', np.concatenate([catalogue[:5], fresh[:3]]))
  _write_idx(tmp_path, 't10k', np.concatenate([fresh[3:], catalogue[100:101]]))
  photos, labels, sources, dropped = captions.corpus_photos(str(tmp_path))
  assert dropped == 6 and sources == ['train:5', 'train:6', 'train:7', 't10k:0', 't10k:1', 't10k:2', 't10k:3']
  np.testing.assert_array_equal(photos, fresh)
  np.testing.assert_array_equal(labels, np.zeros(7))
  os.remove(tmp_path / 't10k-labels-idx1-ubyte.gz')
  with pytest.raises(formats.DatasetError, match='t10k-labels-idx1-ubyte.gz not found'):
    captions.corpus_photos(str(tmp_path))


def _words(text: str) -> list[str]:
  return re.findall(r'[a-z]+(?:-[a-z]+)*', text)


def _names(words: list[str], phrase: str) -> bool:
  part = phrase.split()
  return any(words[i:i + len(part)] == part for i in range(len(words) - len(part) + 1))


def test_every_caption_names_exactly_its_colour_and_kind(corpus):
  colours = corpus.manifest['extra']['item_colour']
  assert corpus.num_users == 0 and corpus.manifest['extra']['kind'] == 'captions'
  wordings = set()
  for item, colour in zip(corpus.items, colours):
    words = _words(item.title)
    assert {c for c in COLOUR_NAMES if c in words} == {COLOUR_NAMES[colour]}, item.title
    assert {k for k in synthetic.CATEGORIES if _names(words, k)} == {item.category}, item.title
    wordings.add(item.title.replace(COLOUR_NAMES[colour], 'C').replace(item.category, 'K'))
  assert len(wordings) > len(captions.TEMPLATES)   # every template, some in singular and plural forms
  assert len({item.category for item in corpus.items}) == 10
  assert len(set(colours)) == 8
  # The pictures agree: the mean colour of the lit pixels points the way of the named colour.
  images = corpus.images(range(len(corpus.items))).astype(np.float32)
  palette = np.asarray(list(synthetic.COLOURS.values()), np.float32)
  lit = images.sum(-1, keepdims=True) > 60
  mean_rgb = (images * lit).sum((1, 2)) / np.maximum(lit.sum((1, 2)), 1)
  cos = (mean_rgb / np.linalg.norm(mean_rgb, axis=1, keepdims=True)) @ (
      palette / np.linalg.norm(palette, axis=1, keepdims=True)).T
  assert (cos.argmax(1) == np.asarray(colours)).mean() > 0.98


def test_plural_kinds_read_as_pairs():
  assert captions.caption('{a_colour_kind}', 'red', 'sandals') == 'a red pair of sandals'
  assert captions.caption('{a_colour_kind}', 'orange', 'coat') == 'an orange coat'
  assert captions.caption('{this_kind} {is_are} {colour}', 'purple', 'bag') == 'this bag is purple'
  assert captions.caption('{this_kind} {is_are} {colour}', 'teal', 'ankle boots') == 'these ankle boots are teal'


def test_same_seed_same_bytes_other_seed_other_bytes(corpus, tmp_path):
  again = captions.build(str(tmp_path / 'again'), seed=5, **SMALL)
  assert again == corpus.manifest
  other = captions.build(str(tmp_path / 'other'), seed=6, **SMALL)
  assert other['checksums']['items.jsonl'] != corpus.manifest['checksums']['items.jsonl']


def test_a_stage2_tokenizer_directory_gives_the_same_base_vocabulary(tmp_path):
  stage2 = str(tmp_path / 'fashion')
  synthetic.build(stage2, num_items=60, num_users=20, seed=1, image_size=16, bpe_vocab=400)
  out = str(tmp_path / 'corpus')
  captions.build(out, num=40, seed=1, image_size=16, tokenizer=os.path.join(stage2, 'tokenizer'))
  first, second = formats.UnifiedDataset(stage2).tokenizer(), formats.UnifiedDataset(out).tokenizer()
  assert second.unimp_layout == dict(first.unimp_layout, num_items=0)
  # Every stage-1 token id means the same token in stage 2: the stage-1 vocabulary is a prefix.
  assert first.convert_ids_to_tokens(list(range(len(second)))) == second.convert_ids_to_tokens(list(range(len(second))))
  text = 'a red pair of sandals, Category coat Price 12.99'
  assert second.encode(text, add_special_tokens=False) == first.encode(text, add_special_tokens=False)
  ids = tokenizer_lib.TokenIds(second.unimp_layout)
  assert second.convert_tokens_to_ids(['<image>', '<|endofchunk|>', '<answer>']) == [ids.image, ids.end_of_chunk,
                                                                                    ids.answer]


def test_command_line_builds_the_embedded_corpus(tmp_path):
  manifest = captions.main(['--out', str(tmp_path / 'c'), '--num', '20', '--image_size', '8', '--bpe_vocab', '300'])
  assert manifest['counts'] == {'items': 20, 'items_with_image': 20, 'users': 0, 'interactions': 0}
  with pytest.raises(SystemExit):  # --tsv needs a directory for the pictures
    captions.main(['--out', str(tmp_path / 'd'), '--tsv', 'x.tsv'])


# ---- web tables -------------------------------------------------------------------------------------

def _png(rgb) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((12, 12, 3), rgb, np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


PICTURES = {'/red.png': _png((220, 40, 40)), '/teal.png': _png((30, 160, 160))}


@pytest.fixture(scope='module')
def server():
  """127.0.0.1 only: serves PICTURES, 404 for anything else; counts requests."""
  counts = {}

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):
      counts[self.path] = counts.get(self.path, 0) + 1
      body = PICTURES.get(self.path)
      self.send_response(200 if body else 404)
      self.send_header('Content-Length', str(len(body or b'')))
      self.end_headers()
      self.wfile.write(body or b'')

    def log_message(self, *args):
      """Silent: no request log on the test's stderr."""

  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  httpd.daemon_threads = True
  threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
  yield lambda path: f'http://127.0.0.1:{httpd.server_port}{path}', counts
  httpd.shutdown()


FAST = dict(image_size=8, bpe_vocab=300, workers=2, timeout=2.0, retries=0)


def test_tsv_rows_become_items_and_unfetchable_rows_are_skipped_by_line(server, tmp_path):
  url, counts = server
  table = tmp_path / 'pairs.tsv'
  table.write_text(f'URL\tTEXT\tsimilarity\n'
                   f'{url("/red.png")}\ta red coat\t0.3\n'
                   f'file:///etc/hostname\ta blue bag\t0.3\n'
                   f'{url("/missing.png")}\ta pink dress\t0.3\n'
                   f'\n'
                   f'{url("/teal.png")}\t  teal   sandals \t0.3\n')
  pictures, out = str(tmp_path / 'pictures'), str(tmp_path / 'corpus')
  manifest = captions.convert_tables([str(table)], out, pictures=pictures, **FAST)
  ds = formats.UnifiedDataset(out, verify=True)
  assert [(i.source_id, i.title, i.has_image) for i in ds.items] == [
      ('pairs.tsv:2', 'a red coat', True), ('pairs.tsv:6', 'teal sandals', True)]
  np.testing.assert_array_equal(ds.images([0, 1]), np.broadcast_to(
      np.asarray([[220, 40, 40], [30, 160, 160]], np.uint8)[:, None, None], (2, 8, 8, 3)))
  skipped = manifest['extra']['skipped']
  assert len(skipped) == 2 and manifest['extra']['failed_pictures'] == 2
  assert skipped[0].startswith(f'{table}:3: file:///etc/hostname: unsupported URL scheme')
  assert skipped[1].startswith(f'{table}:4: {url("/missing.png")}: http 404')
  assert ds.num_users == 0 and ds.tokenizer().unimp_layout['num_items'] == 0

  again = captions.convert_tables([str(table)], out, pictures=pictures, overwrite=True, **FAST)  # resumes
  assert (again['extra']['downloaded'], again['extra']['already_on_disk']) == (0, 2)
  assert counts['/red.png'] == 1 and again['checksums'] == manifest['checksums']


def test_a_bad_row_is_named_by_file_and_line(server, tmp_path):
  url, _ = server
  table = tmp_path / 'cc3m.tsv'   # CC3M's order, no header: caption, url
  table.write_text(f'a red coat\t{url("/red.png")}\n'
                   f'a caption without its url\n'
                   f'\t{url("/teal.png")}\n')
  with pytest.raises(formats.DatasetError, match=re.escape(f'{table}:2: 1 tab-separated field(s), expected 2')):
    captions.convert_tables([str(table)], str(tmp_path / 'a'), pictures=str(tmp_path / 'p'), **FAST)
  assert not os.path.exists(tmp_path / 'a')
  manifest = captions.convert_tables([str(table)], str(tmp_path / 'b'), pictures=str(tmp_path / 'p'),
                                     on_bad_row='skip', **FAST)
  assert manifest['counts']['items'] == 1 and manifest['extra']['bad_rows'] == 2
  assert [s.split(': ')[0] for s in manifest['extra']['skipped']] == [f'{table}:2', f'{table}:3']
  assert manifest['extra']['skipped'][1].endswith('empty caption')
  assert formats.UnifiedDataset(str(tmp_path / 'b')).items[0].title == 'a red coat'


def test_unreadable_tables_are_refused_by_line(tmp_path):
  table = tmp_path / 'odd.tsv'
  table.write_text('just words\tmore words\n')
  with pytest.raises(formats.DatasetError, match=re.escape(f'{table}:1: expected a header')):
    captions.read_table(str(table))
  table.write_bytes(b'url\tcaption\n\x1f\x8b\x08\xff\tzipped\n')
  with pytest.raises(formats.DatasetError, match=re.escape(f'{table}:2: not UTF-8 text')):
    captions.read_table(str(table))


def test_parquet_says_to_install_pyarrow(tmp_path):
  with pytest.raises(formats.DatasetError, match='pip install pyarrow'):
    captions.read_table(str(tmp_path / 'laion.parquet'))
