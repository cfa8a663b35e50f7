"""The stage-1 pretraining corpus: pictures with captions that say what they show, nothing about shoppers.

  python -m unimp_jax.data.captions --out DIR [--num N] [--seed 0] [--image_size 32] [--tokenizer DIR]
      [--full_debian [DIR]] [--bpe_vocab 1024] [--overwrite]
  python -m unimp_jax.data.captions --tsv FILE [FILE ...] --pictures DIR --out DIR [--image_size 224]
      [--on_bad_row fail|skip] [--workers 16] [--timeout 10] [--retries 3] [--tokenizer DIR] [--overwrite]

A Flamingo learns what pictures show from web image-text pairs before it learns any task. This module
writes such a corpus in the unified format (unimp_jax.data.formats), in two ways:

- **Embedded** (offline, from `--seed`; same seed, same bytes): Fashion-MNIST photos that are never the
  catalogue's. By default the committed 3,000 test-split photos (assets/fashion_mnist_captions); with
  `--full_debian` every photo of the Debian package `dataset-fashion-mnist` (train and t10k, 70,000)
  except the catalogue's 2,000. Either way any photo whose pixel bytes equal a catalogue photo's is
  dropped, so no picture a recommender is scored on was seen in pretraining. Each photo is colourised
  exactly as the catalogue is (`synthetic.colourise`, one of `synthetic.COLOURS`, uniformly) and
  captioned with a seeded choice among `TEMPLATES`, always naming its colour and its kind:
  "a red pair of sandals", "photo of a teal coat", "this bag is purple".
- **Web tables** (`--tsv`): CC3M / CC12M / LAION-style `url, caption` rows; the pictures are downloaded
  by unimp_jax.data.fetch into `--pictures` (parallel, retried, resumable: rerun to retry failures).

Layout. One item per (picture, caption): `title` = the caption, `category` = the kind (embedded; '' for
web rows), no brand, price or keywords, `has_image` true. There are **no users**: a user is a shopper
with a history, and a caption pair has neither (formats.write_dataset writes zero users and empty
splits). Interleaving is left to the stage-1 pipeline: it draws 1-5 items per example and renders
`<image> caption <|endofchunk|>` chunks, seeded by (seed, epoch, index) as history windows are, so every
epoch sees new groupings instead of ones frozen at build time; to hold pictures out it can split the
item ids as users are split, `formats.split_by_user(num_items, split_seed)`. The embedded manifest's `extra`
carries `item_colour` (indices into `colours`), so unimp_jax.eval.probe can read it like the catalogue.

Tokenizer. A checkpoint moves cleanly from stage 1 to stage 2 only if both datasets share a base
vocabulary, so `--tokenizer DIR` accepts the stage-2 dataset's own `tokenizer/` directory (its base
vocabulary is taken without its added tokens) as well as a local Hugging Face tokenizer (as
`python -m unimp_jax.data.convert --tokenizer` does); without it a BPE is trained on the captions. The
added tokens are UniMP's with **no item tokens** (`num_items=0`): a caption has no item id to predict,
and then the whole stage-1 vocabulary `[base | <image> <|endofchunk|> <answer> rate_1..5 s_0..s_2]` is
a prefix of every stage-2 vocabulary on the same base, so each row a stage-1 run trains means the same
token in stage 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys

import numpy as np
from transformers import PreTrainedTokenizerFast

from unimp_jax.data import fetch, formats, synthetic
from unimp_jax.data import images as images_lib
from unimp_jax.data import tokenizer as tokenizer_lib
from unimp_jax.data.formats import DatasetError

ASSETS = os.path.join(os.path.dirname(__file__), 'assets', 'fashion_mnist_captions')
DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
DEBIAN_SPLITS = ('train', 't10k')
FAILURES_LISTED = 100   # the manifest lists at most this many skipped rows (all are counted)

# Kinds named in the plural are "a pair of" them; everything else takes an article.
PLURAL_KINDS = frozenset({'trousers', 'sandals', 'sneakers', 'ankle boots'})
TEMPLATES = (
    '{a_colour_kind}',
    'photo of {a_colour_kind}',
    'a product photo of {a_colour_kind}',
    'a picture showing {a_colour_kind}',
    '{colour} {kind}',
    '{kind} in {colour}',
    '{a_kind} in {colour}',
    '{a_kind}, coloured {colour}',
    '{this_kind} {is_are} {colour}',
    'the colour of {this_kind} is {colour}',
)

URL_COLUMNS = ('url',)
CAPTION_COLUMNS = ('caption', 'text')
_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://\S+$')


# ---- the embedded corpus -----------------------------------------------------------------------------

def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def caption(template: str, colour: str, kind: str) -> str:
  """One caption naming `colour` and `kind` (a `synthetic.CATEGORIES` name) through `template`."""
  plural = kind in PLURAL_KINDS
  a_kind = f'a pair of {kind}' if plural else f'{_article(kind)} {kind}'
  a_colour_kind = f'{_article(colour)} {colour} {"pair of " if plural else ""}{kind}'
  return template.format(colour=colour, kind=kind, a_kind=a_kind, a_colour_kind=a_colour_kind,
                         this_kind=f'{"these" if plural else "this"} {kind}', is_are='are' if plural else 'is')


def corpus_photos(debian_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str], int]:
  """(photos, labels, source ids, how many catalogue duplicates were dropped).

  The committed test-split subset, or with `debian_dir` every photo of the Debian package; photos whose
  pixel bytes equal one of the catalogue's (synthetic.load_photos) are dropped either way.
  """
  if debian_dir is None:
    photos, labels = synthetic.read_idx(os.path.join(ASSETS, 'images-idx3-ubyte.gz'),
                                        os.path.join(ASSETS, 'labels-idx1-ubyte.gz'))
    sources = [f'fashion_mnist_captions:{i}' for i in range(len(photos))]
  else:
    parts = []
    for split in DEBIAN_SPLITS:
      paths = [os.path.join(debian_dir, f'{split}-{kind}-ubyte.gz') for kind in ('images-idx3', 'labels-idx1')]
      missing = [p for p in paths if not os.path.exists(p)]
      if missing:
        raise DatasetError(f'{missing[0]} not found: --full_debian needs the Debian package dataset-fashion-mnist '
                           '(apt-get install dataset-fashion-mnist) or a directory with its files')
      parts.append((split, *synthetic.read_idx(*paths)))
    photos = np.concatenate([p for _, p, _ in parts])
    labels = np.concatenate([label for _, _, label in parts])
    sources = [f'{split}:{i}' for split, p, _ in parts for i in range(len(p))]
  catalogue = {photo.tobytes() for photo in synthetic.load_photos()[0]}
  keep = np.asarray([photo.tobytes() not in catalogue for photo in photos], bool)
  return photos[keep], labels[keep], [s for s, k in zip(sources, keep) if k], int((~keep).sum())


def _tokenizer(captions: list[str], tokenizer_dir: str | None, bpe_vocab: int) -> PreTrainedTokenizerFast:
  base = tokenizer_lib.load_base(tokenizer_dir) if tokenizer_dir else tokenizer_lib.train_bpe(captions, bpe_vocab)
  return tokenizer_lib.with_unimp_tokens(base, num_items=0, num_slots=synthetic.NUM_SLOTS, num_image_codes=0)


def build(out: str, *, num: int | None = None, seed: int = 0, image_size: int = 32, tokenizer: str | None = None,
          debian_dir: str | None = None, bpe_vocab: int = 1024, overwrite: bool = False) -> dict:
  """Writes the embedded caption corpus (`num` photos, default all available) at `out`; returns the manifest."""
  photos, labels, sources, duplicates = corpus_photos(debian_dir)
  num = len(photos) if num is None else num
  if not 1 <= num <= len(photos):
    raise ValueError(f'--num {num}: the corpus has {len(photos)} photos'
                     f'{"" if debian_dir else " (--full_debian has more)"}')
  rng = np.random.default_rng(seed)
  photo = rng.permutation(len(photos))[:num]
  colour = rng.integers(len(synthetic.COLOURS), size=num)
  template = rng.integers(len(TEMPLATES), size=num)
  names, rgb = list(synthetic.COLOURS), list(synthetic.COLOURS.values())
  kinds = [synthetic.CATEGORIES[labels[p]] for p in photo]
  captions = [caption(TEMPLATES[t], names[c], k) for t, c, k in zip(template, colour, kinds)]
  items = [formats.Item(source_id=sources[p], title=text, category=kind, has_image=True)
           for p, text, kind in zip(photo, captions, kinds)]
  images = (synthetic.colourise(photos[p], rgb[c], image_size) for p, c in zip(photo, colour))
  extra = {'generator': 'unimp_jax.data.captions', 'kind': 'captions', 'seed': seed,
           'photos': 'debian' if debian_dir else 'embedded', 'photos_available': len(photos),
           'catalogue_duplicates_dropped': duplicates, 'templates': list(TEMPLATES),
           'colours': names, 'item_colour': colour.tolist()}
  return formats.write_dataset(out, name='fashion-captions', items=items, images=images, users=[],
                               image_size=image_size, split_seed=seed,
                               tokenizer=_tokenizer(captions, tokenizer, bpe_vocab), extra=extra,
                               overwrite=overwrite)


# ---- web tables: url, caption ------------------------------------------------------------------------

def read_table(path: str, on_bad_row: str = 'fail') -> tuple[list[tuple[int, str, str]], list[str]]:
  """([(line, url, caption)], [skipped rows, each 'FILE:LINE: reason']) of a `url, caption` TSV.

  With a header naming a url column (`url`/`URL`) and a caption column (`caption`/`TEXT`) the other
  columns are ignored (LAION); without one, each row has exactly two fields and the one that is a URL
  (scheme://...) in the first row is the URL column of every row (CC3M: caption, url; CC12M: url,
  caption). A malformed row raises DatasetError naming FILE:LINE, or with on_bad_row='skip' is skipped
  and listed. Parquet needs pyarrow, which this project does not install.
  """
  if path.endswith('.parquet'):
    raise DatasetError(f'{path}: reading parquet needs pyarrow, which is not installed (pip install pyarrow); '
                       'or export the table as TSV')
  rows, skipped, columns = [], [], None
  with open(path, 'rb') as f:  # decoded line by line, so an undecodable line is named by its number
    for number, raw in enumerate(f, 1):
      where = f'{path}:{number}'
      try:
        line = _decode(raw, where)
        if not line.strip():
          continue
        fields = line.split('\t')
        if columns is None:
          columns = _columns(fields, where)
          if columns.header:
            continue
        rows.append((number, *_row(fields, columns, where)))
      except DatasetError as e:
        if on_bad_row == 'fail':
          raise
        skipped.append(str(e))
  return rows, skipped


def _decode(raw: bytes, where: str) -> str:
  try:
    return raw.decode('utf-8').rstrip('\r\n')
  except UnicodeDecodeError as e:
    raise DatasetError(f'{where}: not UTF-8 text ({e.reason} at byte {e.start}); a compressed table must be '
                       'unpacked first') from None


@dataclasses.dataclass(frozen=True)
class _Columns:
  url: int
  caption: int
  header: bool    # the first row names the columns (then rows may have more columns, which are ignored)


def _columns(fields: list[str], where: str) -> _Columns:
  """Which field is the URL and which the caption, from a table's first row."""
  names = [f.strip().lower() for f in fields]
  url = next((i for i, n in enumerate(names) if n in URL_COLUMNS), None)
  text = next((i for i, n in enumerate(names) if n in CAPTION_COLUMNS), None)
  if url is not None and text is not None:
    return _Columns(url, text, header=True)
  looks = [bool(_URL.match(f.strip())) for f in fields]
  if len(fields) != 2 or sum(looks) != 1:
    raise DatasetError(f'{where}: expected a header with columns url and caption (or URL and TEXT), or two '
                       f'tab-separated fields of which one is a URL, got {fields!r}')
  return _Columns(looks.index(True), looks.index(False), header=False)


def _row(fields: list[str], columns: _Columns, where: str) -> tuple[str, str]:
  needed = max(columns.url, columns.caption) + 1
  if (len(fields) < needed) if columns.header else (len(fields) != 2):
    expected = f'at least {needed} (the header\'s url and caption columns)' if columns.header else '2'
    raise DatasetError(f'{where}: {len(fields)} tab-separated field(s), expected {expected}')
  url, text = fields[columns.url].strip(), ' '.join(fields[columns.caption].split())
  if not _URL.match(url):
    raise DatasetError(f'{where}: {url!r} is not a URL')
  if not text:
    raise DatasetError(f'{where}: empty caption')
  return url, text


def picture_id(url: str) -> str:
  """The fetcher's file name for a URL's picture: rows that share a URL share one download."""
  return hashlib.sha256(url.encode('utf-8')).hexdigest()[:32]


def convert_tables(paths: list[str], out: str, *, pictures: str, image_size: int = 224, seed: int = 0,
                   tokenizer: str | None = None, bpe_vocab: int = 8000, on_bad_row: str = 'fail',
                   workers: int = 16, timeout: float = 10.0, retries: int = 3, overwrite: bool = False) -> dict:
  """`url, caption` tables -> a caption corpus at `out`; pictures are fetched into `pictures` first.

  Rows whose picture cannot be fetched (a dead link, a refused scheme such as file://, not a picture)
  are skipped, printed and listed with FILE:LINE and the fetcher's reason; so are malformed rows with
  on_bad_row='skip'. Returns the manifest.
  """
  if on_bad_row not in ('fail', 'skip'):
    raise ValueError(f'on_bad_row={on_bad_row!r}: use "fail" or "skip"')
  if os.path.exists(out) and not overwrite:  # before downloading anything
    raise DatasetError(f'{out} already exists; pass --overwrite to replace it')
  rows, bad_rows = [], []   # rows: (FILE:LINE, source id, url, caption)
  for path in paths:
    more, skipped = read_table(path, on_bad_row)
    rows += [(f'{path}:{n}', f'{os.path.basename(path)}:{n}', url, text) for n, url, text in more]
    bad_rows += skipped
  urls = dict.fromkeys(url for _, _, url, _ in rows)
  os.makedirs(pictures, exist_ok=True)
  url_list = os.path.join(pictures, 'caption-urls.tsv')
  with open(url_list, 'w', encoding='utf-8') as f:
    f.writelines(f'{picture_id(url)}\t{url}\n' for url in urls)
  summary = fetch.fetch(url_list, pictures, workers=workers, timeout=timeout, retries=retries)
  with open(os.path.join(pictures, fetch.FAILURES_FILE), encoding='utf-8') as f:
    reasons = {fields[0]: fields[2] for fields in (line.rstrip('\n').split('\t') for line in f) if len(fields) == 3}

  kept, failed = [], []
  for where, source_id, url, text in rows:
    pid = picture_id(url)
    if os.path.exists(os.path.join(pictures, f'{pid}.jpg')):
      kept.append((source_id, pid, text))
    else:
      failed.append(f'{where}: {url}: {reasons.get(pid, "not downloaded")}')
  for message in (bad_rows + failed)[:FAILURES_LISTED]:
    print(f'skipped {message}')
  if not kept:
    raise DatasetError(f'no picture of the {len(rows)} row(s) of {", ".join(paths)} could be fetched, e.g. '
                       f'{failed[0] if failed else "(no rows)"}')
  items = [formats.Item(source_id=source_id, title=text, has_image=True) for source_id, _, text in kept]
  images = (images_lib.load(os.path.join(pictures, f'{pid}.jpg'), image_size) for _, pid, _ in kept)
  extra = {'generator': 'unimp_jax.data.captions', 'kind': 'captions', 'seed': seed, 'inputs': list(paths),
           'pictures': os.path.abspath(pictures), 'rows': len(rows) + len(bad_rows),
           'downloaded': summary.downloaded, 'already_on_disk': summary.skipped,
           'bad_rows': len(bad_rows), 'failed_pictures': len(failed),
           'skipped': (bad_rows + failed)[:FAILURES_LISTED]}
  vocabulary = _tokenizer([text for _, _, text in kept], tokenizer, bpe_vocab)
  return formats.write_dataset(out, name='captions', items=items, images=images, users=[], image_size=image_size,
                               split_seed=seed, tokenizer=vocabulary, extra=extra, overwrite=overwrite)


# ---- command line ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog='python -m unimp_jax.data.captions', description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='Directory the caption corpus is written to.')
  parser.add_argument('--seed', type=int, default=0, help='Photos, colours and wording; the held-out split.')
  parser.add_argument('--image_size', type=int, help='Picture side in pixels (default 32 embedded, 224 --tsv): '
                      'the vision tower\'s config.model.vision.image_size.')
  parser.add_argument('--tokenizer', help='A unified dataset\'s tokenizer/ directory (its base vocabulary) or a '
                      'local Hugging Face tokenizer; default: a BPE trained on the captions.')
  parser.add_argument('--bpe_vocab', type=int, help='Vocabulary size of the trained BPE (default 1024 '
                      'embedded, 8000 --tsv).')
  parser.add_argument('--overwrite', action='store_true', help='Replace an existing dataset at --out.')
  embedded = parser.add_argument_group('embedded corpus (the default)')
  embedded.add_argument('--num', type=int, help='Photos in the corpus (default: all available).')
  embedded.add_argument('--full_debian', nargs='?', const=DEBIAN_DIR, metavar='DIR',
                        help=f'Use every Fashion-MNIST photo of the Debian package (default {DEBIAN_DIR}) '
                        'except the catalogue\'s, instead of the committed 3,000.')
  web = parser.add_argument_group('web tables')
  web.add_argument('--tsv', nargs='+', metavar='FILE', help='url<TAB>caption tables (CC3M/CC12M/LAION-style).')
  web.add_argument('--pictures', help='Directory the pictures are fetched into (resumable); required with --tsv.')
  web.add_argument('--on_bad_row', choices=('fail', 'skip'), default='fail',
                   help='A malformed row: fail naming FILE:LINE, or skip it and list it in the manifest.')
  web.add_argument('--workers', type=int, default=16, help='Parallel downloads.')
  web.add_argument('--timeout', type=float, default=10.0, help='Seconds per download attempt.')
  web.add_argument('--retries', type=int, default=3, help='Extra attempts after a transient failure.')
  args = parser.parse_args(argv)
  if args.tsv:
    if args.num is not None or args.full_debian:
      parser.error('--num and --full_debian build the embedded corpus; they do not apply to --tsv')
    if not args.pictures:
      parser.error('--pictures DIR is required with --tsv: the fetched pictures go there')
    manifest = convert_tables(args.tsv, args.out, pictures=args.pictures, image_size=args.image_size or 224,
                              seed=args.seed, tokenizer=args.tokenizer, bpe_vocab=args.bpe_vocab or 8000,
                              on_bad_row=args.on_bad_row, workers=args.workers, timeout=args.timeout,
                              retries=args.retries, overwrite=args.overwrite)
  else:
    manifest = build(args.out, num=args.num, seed=args.seed, image_size=args.image_size or 32,
                     tokenizer=args.tokenizer, debian_dir=args.full_debian, bpe_vocab=args.bpe_vocab or 1024,
                     overwrite=args.overwrite)
  print(f'wrote {args.out}: {json.dumps(manifest["counts"])}')
  return manifest


if __name__ == '__main__':
  try:
    main()
  except DatasetError as e:
    sys.exit(f'error: {e}')
