"""Raw public formats -> the unified dataset (unimp_jax.data.formats).

  python -m unimp_jax.data.convert amazon2014 --meta meta_Beauty.json.gz [more domains ...] \
      --reviews reviews_Beauty_5.json.gz [...] [--images DIR] --out DIR [common flags]
  python -m unimp_jax.data.convert amazon2018 --meta meta_All_Beauty.json.gz --reviews All_Beauty_5.json.gz ...
  python -m unimp_jax.data.convert hm --root DIR --out DIR          # H&M Kaggle csv files + images/0XX/
  python -m unimp_jax.data.convert movielens --root DIR --out DIR   # u.data + u.item, or RecBole ml-100k.*

Each format has one small reader that returns a `Raw`: item metadata, the image file each item should
have, and interaction events in file order. Everything after that is shared by every format:
- events naming an item the metadata does not have are skipped, counted and listed in the manifest;
- events are sorted by time, stably, so ties keep file order and several Amazon domains interleave;
- iterative k-core (`--min_user_interactions`, `--min_item_interactions`, counting interactions) until
  stable; the catalogue is the items that survive;
- the surviving items' images are decoded; missing or undecodable ones are printed and listed in the
  manifest, then either fail the conversion (default) or drop their items, after which k-core runs again;
- item ids are a seeded permutation of the sorted source ids, so an id says nothing about popularity or
  catalogue order; users are sorted by source id;
- each review's explanation is one of its sentences, chosen by sha256(seed, user, item), so reruns agree;
- the tokenizer is a local Hugging Face one (`--tokenizer`) or a BPE trained on the dataset's text, plus
  UniMP's tokens; the dataset is written once, atomically, by formats.write_dataset.
Amazon images come from `--images DIR` holding `<asin>.jpg` (what an image fetcher wrote); without it the
items have no picture, as MovieLens items never do.
"""

from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import csv
import dataclasses
import datetime
import gzip
import hashlib
import json
import math
import os
import re
import signal
import sys
import zlib
from typing import Any, NamedTuple

import numpy as np
import tqdm

from unimp_jax.data import images as images_lib
from unimp_jax.data import prompts
from unimp_jax.data import tokenizer as tokenizer_lib
from unimp_jax.data.formats import (DatasetError, Interaction, Item, User, check_replaceable, split_by_user,
                                    write_dataset)

NUM_SLOTS = 3                   # image-selection candidates per question
KEYWORDS_PER_ITEM = 5
UNKNOWN_ITEMS_LISTED = 100      # the manifest lists at most this many unknown source ids (all are counted)
_STOPWORDS = frozenset(
    'a an and are as at be by for from in into is it its of on or our set the this to up with without you '
    'your pack pcs piece pieces new'.split())
_WORD = re.compile(r'[^\W_]+')
_SENTENCE_BREAK = re.compile(r'(?<=[.!?])\s+|\s*\n+\s*')
_PRICE = re.compile(r'^\s*\$?\s*(\d[\d,]*(?:\.\d+)?)')
MOVIELENS_GENRES = ('unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy', 'Crime',
                    'Documentary', 'Drama', 'Fantasy', 'Film-Noir', 'Horror', 'Musical', 'Mystery', 'Romance',
                    'Sci-Fi', 'Thriller', 'War', 'Western')


class Event(NamedTuple):
  user: str
  item: str
  timestamp: int
  rating: int | None = None
  review: str = ''


BAD_IMAGE_CHOICES = ('fail', 'drop', 'keep')


@dataclasses.dataclass
class Raw:
  items: dict[str, Item]            # by source id; has_image is decided at build time
  image_paths: dict[str, str]       # source id -> the file its picture must come from (absent: no picture)
  events: list[Event]               # file order
  inputs: list[str]
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)   # reader counts for the manifest


@dataclasses.dataclass(frozen=True)
class Options:
  out: str
  name: str
  seed: int = 0
  image_size: int = 224
  min_user_interactions: int = 5
  min_item_interactions: int = 5
  on_bad_image: str = 'fail'        # 'fail' | 'drop' | 'keep' (the item, without a picture)
  tokenizer: str | None = None      # a local Hugging Face tokenizer directory; None: train a BPE
  bpe_vocab: int = 8000
  overwrite: bool = False
  cold_after: int | None = None     # cut-off timestamp: items first interacted with after it are cold

  def __post_init__(self):
    if self.on_bad_image not in BAD_IMAGE_CHOICES:
      raise ValueError(f'on_bad_image={self.on_bad_image!r}: use one of {BAD_IMAGE_CHOICES}')


# ---- shared text helpers -----------------------------------------------------------------------------

def keywords(*texts: str) -> tuple[str, ...]:
  """Up to KEYWORDS_PER_ITEM distinct lowercase content words, in order of appearance."""
  out: list[str] = []
  for word in _WORD.findall(' '.join(texts).lower()):
    if len(word) > 2 and not word.isdigit() and word not in _STOPWORDS and word not in out:
      out.append(word)
  return tuple(out[:KEYWORDS_PER_ITEM])


def sentences(text: str) -> list[str]:
  return [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]


def explanation(review: str, seed: int, user: str, item: str) -> str:
  """One sentence of the review (preferring ones of 3+ words), chosen by a hash of (seed, user, item)."""
  candidates = sentences(review)
  candidates = [s for s in candidates if len(s.split()) >= 3] or candidates
  if not candidates:
    return ''
  digest = hashlib.sha256(f'{seed}\x1f{user}\x1f{item}'.encode()).digest()
  return candidates[int.from_bytes(digest[:8], 'big') % len(candidates)]


def price(value: Any) -> float | None:
  """A number, or a string like "$12.99" / "$10.99 - $15.99" (first figure); anything else is None."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    try:
      return float(value) if math.isfinite(value) and value >= 0 else None
    except OverflowError:
      return None
  match = _PRICE.match(value) if isinstance(value, str) else None
  return float(match.group(1).replace(',', '')) if match else None


def _text(value: Any) -> str:
  if isinstance(value, str):
    return value.strip()
  if isinstance(value, list):
    return ' '.join(v.strip() for v in value if isinstance(v, str) and v.strip())
  return ''


# ---- reading files, with errors that name file and line ----------------------------------------------

def _lines(path: str, encoding: str = 'utf-8'):
  """(1-based line number, line without its newline) of a plain or gzipped file; blank lines skipped. A
  progress bar on stderr follows the bytes read from disk (compressed bytes for a gzipped file)."""
  with open(path, 'rb') as f:
    gzipped = f.read(2) == b'\x1f\x8b'
  number = 0
  try:
    with open(path, 'rb') as on_disk, (gzip.open(on_disk) if gzipped else on_disk) as f, tqdm.tqdm(
        total=os.path.getsize(path), desc=f'reading {os.path.basename(path)}', unit='B', unit_scale=True,
        dynamic_ncols=True, mininterval=1) as progress:
      for number, raw in enumerate(f, 1):
        if number % 4096 == 0:
          progress.update(on_disk.tell() - progress.n)
        try:
          line = raw.decode(encoding).rstrip('\r\n')
        except UnicodeDecodeError as e:
          raise DatasetError(f'{path}:{number}: not {encoding} text ({e})') from None
        if line.strip():
          yield number, line
      progress.update(progress.total - progress.n)
  except (OSError, EOFError, zlib.error) as e:
    raise DatasetError(f'{path}:{number + 1}: cannot read ({e})') from None


def _dict_lines(path: str, parse, hint: str = ''):
  """(where, dict) per line, `parse` being json.loads or ast.literal_eval (never eval); `hint` is added to
  the error of a line that does not parse."""
  for number, line in _lines(path):
    where = f'{path}:{number}'
    try:
      record = parse(line)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
      raise DatasetError(f'{where}: cannot parse the line ({type(e).__name__}: {e}){hint}') from None
    if not isinstance(record, dict):
      raise DatasetError(f'{where}: expected a dict, got {type(record).__name__}')
    yield where, record


def _required(record: dict, key: str, types: tuple[type, ...], where: str):
  if key not in record:
    raise DatasetError(f'{where}: missing "{key}"')
  value = record[key]
  if not isinstance(value, types) or isinstance(value, bool):
    raise DatasetError(f'{where}: "{key}" is {value!r}, expected {" or ".join(t.__name__ for t in types)}')
  return value


def _rating(value: Any, where: str) -> int:
  try:
    rating = float(value)
  except (TypeError, ValueError):
    rating = math.nan
  if not 1 <= rating <= 5:
    raise DatasetError(f'{where}: rating {value!r} is not in 1..5')
  return int(round(rating))


def _int(value: str, what: str, where: str) -> int:
  try:
    return int(float(value))
  except (ValueError, OverflowError):
    raise DatasetError(f'{where}: {what} {value!r} is not a number') from None


def _csv(path: str, columns: tuple[str, ...]):
  """(where, {column: value}) per record of a headed CSV file, checking the header and field counts.

  Lines come from `_lines`, decoded one at a time, so bad bytes are blamed on their own line (a text-mode
  file decodes ahead in blocks); `line` is the physical line the reader has reached.
  """
  line = 0

  def numbered():
    nonlocal line
    for line, text in _lines(path):
      yield text

  reader = csv.reader(numbered())
  try:
    header = next(reader, [])
    missing = [c for c in columns if c not in header]
    if missing:
      raise DatasetError(f'{path}:1: missing column(s) {", ".join(missing)}')
    index = [header.index(c) for c in columns]
    for row in reader:
      if len(row) != len(header):
        raise DatasetError(f'{path}:{line}: {len(row)} fields, the header has {len(header)}')
      yield f'{path}:{line}', dict(zip(columns, (row[i] for i in index)))
  except csv.Error as e:
    raise DatasetError(f'{path}:{line}: {e}') from None


# ---- one reader per format ---------------------------------------------------------------------------

def _amazon_reviews(paths: list[str]) -> list[Event]:
  """Amazon 2014 and 2018 review lines share the fields we use."""
  events = []
  for path in paths:
    for where, r in _dict_lines(path, json.loads):
      events.append(Event(user=_required(r, 'reviewerID', (str,), where), item=_required(r, 'asin', (str,), where),
                          timestamp=_required(r, 'unixReviewTime', (int,), where),
                          rating=_rating(_required(r, 'overall', (int, float), where), where),
                          review=_text(r.get('reviewText'))))
  return events


def _category(levels: Any) -> str:
  """The most specific level of a category path (a list of names)."""
  names = [c.strip() for c in levels if isinstance(c, str) and c.strip()] if isinstance(levels, list) else []
  return names[-1] if names else ''


# Metadata keys only one Amazon release has: a record with the other's and none of its own is the other format.
AMAZON_KEYS = {'amazon2014': ('categories', 'imUrl', 'salesRank', 'related'),
               'amazon2018': ('category', 'imageURL', 'imageURLHighRes', 'main_cat', 'also_buy', 'also_view')}
AMAZON_SYNTAX = {'amazon2014': ast.literal_eval, 'amazon2018': json.loads}


def _amazon_meta(source_format: str, paths: list[str]):
  """(where, record) per metadata line of `source_format`, refusing files of the other release by name."""
  other = next(f for f in AMAZON_KEYS if f != source_format)
  hint = ('; amazon2014 metadata is Python-literal lines, amazon2018 JSON lines: is the format argument right?'
          if source_format == 'amazon2018' else '')
  for path in paths:
    for where, m in _dict_lines(path, AMAZON_SYNTAX[source_format], hint):
      theirs = [k for k in AMAZON_KEYS[other] if k in m]
      if theirs and not any(k in m for k in AMAZON_KEYS[source_format]):
        raise DatasetError(f'{where}: this record has {", ".join(map(repr, theirs))}, which {other} metadata has, and '
                           f'none of {", ".join(map(repr, AMAZON_KEYS[source_format]))}, which {source_format} '
                           f'metadata has: convert it as {other}')
      yield where, m


def _read_amazon(source_format: str, meta_paths: list[str], review_paths: list[str], images_dir: str | None, *,
                 category_levels) -> Raw:
  if images_dir is not None and not os.path.isdir(images_dir):
    raise DatasetError(f'--images {images_dir} is not a directory')
  items: dict[str, Item] = {}
  duplicates = 0
  for where, m in _amazon_meta(source_format, meta_paths):
    asin = _required(m, 'asin', (str,), where)
    if asin in items:   # the 2018 metadata repeats some products: the first line wins
      duplicates += 1
      continue
    title, category = _text(m.get('title')), _category(category_levels(m))
    items[asin] = Item(source_id=asin, title=title, brand=_text(m.get('brand')), category=category,
                       price=price(m.get('price')), description=_text(m.get('description')),
                       keywords=keywords(title, category))
  image_paths = {} if images_dir is None else {a: os.path.join(images_dir, f'{a}.jpg') for a in items}
  return Raw(items, image_paths, _amazon_reviews(review_paths), inputs=[*meta_paths, *review_paths],
             notes={'duplicate_meta_lines': duplicates})


def _first_url(value: Any) -> str:
  urls = [value] if isinstance(value, str) else value if isinstance(value, list) else []
  return next((u.strip() for u in urls if isinstance(u, str) and u.strip()), '')


IMAGE_URL = {  # the best picture URL of a metadata record, per format
    'amazon2014': lambda m: _first_url(m.get('imUrl')),
    'amazon2018': lambda m: _first_url(m.get('imageURLHighRes')) or _first_url(m.get('imageURL')),
}


def write_image_urls(source_format: str, meta: list[str], out: str) -> int:
  """`asin<TAB>url` for every product with a picture URL: the input of `python -m unimp_jax.data.fetch`,
  whose output directory is then this converter's `--images`. Returns the number of lines."""
  urls = {}
  for where, m in _amazon_meta(source_format, meta):
    asin, url = _required(m, 'asin', (str,), where), IMAGE_URL[source_format](m)
    if url and asin not in urls:
      urls[asin] = url
  with open(out, 'w') as f:
    f.writelines(f'{asin}\t{url}\n' for asin, url in urls.items())
  return len(urls)


def read_amazon2014(meta: list[str], reviews: list[str], images_dir: str | None = None) -> Raw:
  def first_path(m):   # "categories": a list of category paths
    paths = m.get('categories')
    return paths[0] if isinstance(paths, list) and paths else []
  return _read_amazon('amazon2014', meta, reviews, images_dir, category_levels=first_path)


def read_amazon2018(meta: list[str], reviews: list[str], images_dir: str | None = None) -> Raw:
  return _read_amazon('amazon2018', meta, reviews, images_dir, category_levels=lambda m: m.get('category'))


def read_hm(root: str) -> Raw:
  """H&M has no ratings, reviews, brands or per-article prices (transaction prices are rescaled).

  Transactions of customers missing from customers.csv are skipped and counted, like unknown articles.
  """
  def article_id(value: str, where: str) -> str:
    if not value.isdigit() or len(value) > 10:
      raise DatasetError(f'{where}: article_id {value!r} is not a number of at most 10 digits')
    return value.zfill(10)

  articles = os.path.join(root, 'articles.csv')
  items = {}
  for where, a in _csv(articles, ('article_id', 'prod_name', 'product_type_name', 'colour_group_name',
                                  'detail_desc')):
    aid = article_id(a['article_id'], where)
    items[aid] = Item(source_id=aid, title=a['prod_name'].strip(), category=a['product_type_name'].strip(),
                      description=a['detail_desc'].strip(),
                      keywords=keywords(a['prod_name'], a['product_type_name'], a['colour_group_name']))
  customers_path = os.path.join(root, 'customers.csv')
  # Events hold these shared strings, not one copy per transaction row (the full file has 31M rows).
  customers = {c['customer_id']: c['customer_id'] for _, c in _csv(customers_path, ('customer_id',))}
  articles_by_id = {aid: aid for aid in items}
  transactions = os.path.join(root, 'transactions_train.csv')
  events, unknown_customers, days = [], 0, {}
  for where, t in _csv(transactions, ('t_dat', 'customer_id', 'article_id')):
    if t['t_dat'] not in days:
      try:
        day = datetime.date.fromisoformat(t['t_dat'])
      except ValueError:
        raise DatasetError(f'{where}: t_dat {t["t_dat"]!r} is not YYYY-MM-DD') from None
      days[t['t_dat']] = (day - datetime.date(1970, 1, 1)).days * 86400
    user = customers.get(t['customer_id'])
    if user is None:
      unknown_customers += 1
      continue
    aid = article_id(t['article_id'], where)
    events.append(Event(user=user, item=articles_by_id.get(aid, aid), timestamp=days[t['t_dat']]))
  image_paths = {aid: os.path.join(root, 'images', aid[:3], f'{aid}.jpg') for aid in items}
  return Raw(items, image_paths, events, inputs=[articles, customers_path, transactions],
             notes={'unknown_customer_transactions': unknown_customers})


def read_movielens(root: str) -> Raw:
  """MovieLens-100K as GroupLens ships it (u.data, u.item) or as RecBole atomic files (ml-100k.inter/.item)."""
  items, events = {}, []
  if not any(os.path.exists(os.path.join(root, name)) for name in ('u.data', 'ml-100k.inter')):
    raise DatasetError(f'{root} holds neither u.data + u.item nor ml-100k.inter + ml-100k.item')
  if os.path.exists(os.path.join(root, 'u.data')):
    item_path, inter_path = os.path.join(root, 'u.item'), os.path.join(root, 'u.data')
    for number, line in _lines(item_path, encoding='latin-1'):
      fields = line.split('|')
      if len(fields) != 5 + len(MOVIELENS_GENRES) or any(f not in ('0', '1') for f in fields[5:]):
        raise DatasetError(f'{item_path}:{number}: expected id|title|release|video release|url|19 genre flags')
      genres = [g for g, flag in zip(MOVIELENS_GENRES, fields[5:]) if flag == '1']
      items[fields[0]] = _movie(fields[0], fields[1], genres)
    for number, line in _lines(inter_path):
      fields = line.split('\t')
      if len(fields) != 4:
        raise DatasetError(f'{inter_path}:{number}: expected user, item, rating, timestamp separated by tabs')
      where = f'{inter_path}:{number}'
      events.append(Event(fields[0], fields[1], _int(fields[3], 'timestamp', where), _rating(fields[2], where)))
  else:
    item_path, inter_path = os.path.join(root, 'ml-100k.item'), os.path.join(root, 'ml-100k.inter')
    for where, m in _atomic(item_path, ('item_id', 'movie_title', 'release_year', 'class')):
      year = m['release_year'].strip()
      title = f'{m["movie_title"].strip()} ({year})' if year.isdigit() else m['movie_title'].strip()
      items[m['item_id']] = _movie(m['item_id'], title, m['class'].split())
    for where, r in _atomic(inter_path, ('user_id', 'item_id', 'rating', 'timestamp')):
      events.append(Event(r['user_id'], r['item_id'], _int(r['timestamp'], 'timestamp', where),
                          _rating(r['rating'], where)))
  return Raw(items, {}, events, inputs=[item_path, inter_path])


def _movie(movie_id: str, title: str, genres: list[str]) -> Item:
  return Item(source_id=movie_id, title=title.strip(), category=', '.join(genres),
              keywords=keywords(re.sub(r'\(\d{4}\)', '', title), *genres))


def _atomic(path: str, columns: tuple[str, ...]):
  """RecBole atomic file: tab separated, header `name:type`."""
  lines = _lines(path)
  _, header = next(lines, (1, ''))
  names = [h.split(':')[0] for h in header.split('\t')]
  missing = [c for c in columns if c not in names]
  if missing:
    raise DatasetError(f'{path}:1: missing column(s) {", ".join(missing)}')
  index = [names.index(c) for c in columns]
  for number, line in lines:
    fields = line.split('\t')
    if len(fields) != len(names):
      raise DatasetError(f'{path}:{number}: {len(fields)} fields, the header has {len(names)}')
    yield f'{path}:{number}', dict(zip(columns, (fields[i] for i in index)))


# ---- shared: filter, check images, number, write -----------------------------------------------------

def k_core(events: list[Event], min_user: int, min_item: int) -> tuple[list[Event], int]:
  """Drops events of users/items with too few interactions until none has; returns (events, rounds)."""
  rounds = 0
  while True:
    rounds += 1
    per_user = collections.Counter(e.user for e in events)
    per_item = collections.Counter(e.item for e in events)
    kept = [e for e in events if per_user[e.user] >= min_user and per_item[e.item] >= min_item]
    if len(kept) == len(events):
      return kept, rounds
    events = kept


def bad_images(paths: dict[str, str], size: int) -> dict[str, str]:
  """{source id: error} for every listed image that is missing or cannot be decoded."""
  def error(source_id: str) -> str | None:
    try:
      images_lib.load(paths[source_id], size)
    except images_lib.BadImage as e:
      return str(e)
    return None

  ids = sorted(paths)
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
    errors = tqdm.tqdm(pool.map(error, ids), total=len(ids), desc='checking pictures', unit='picture',
                       dynamic_ncols=True, mininterval=1)
    return {i: e for i, e in zip(ids, errors) if e is not None}


def item_permutation(source_ids: list[str], seed: int) -> dict[str, int]:
  """source id -> item id: the sorted ids take the positions of a seeded permutation of 0..N-1."""
  order = np.random.default_rng(seed).permutation(len(source_ids))
  return {source_id: int(i) for source_id, i in zip(sorted(source_ids), order)}


def build(raw: Raw, opts: Options, source_format: str) -> dict[str, Any]:
  """Raw -> unified dataset at opts.out; returns the manifest."""
  inputs = ', '.join(raw.inputs)
  if not raw.items or not raw.events:
    raise DatasetError(f'no {"items" if not raw.items else "interactions"} in {inputs}: the files hold no records of '
                       'that kind')
  events = [e for e in raw.events if e.item in raw.items]
  if not events:
    raise DatasetError(f'none of the {len(raw.events)} interactions names an item of the metadata (e.g. '
                       f'{raw.events[0].item!r}, and the metadata has e.g. {next(iter(raw.items))!r}); are the '
                       f'files of the same dataset? ({inputs})')
  unknown = collections.Counter(e.item for e in raw.events if e.item not in raw.items)
  if unknown:
    print(f'skipped {sum(unknown.values())} interaction(s) with {len(unknown)} item(s) missing from the metadata: '
          f'{", ".join(sorted(unknown)[:UNKNOWN_ITEMS_LISTED])}')
  events.sort(key=lambda e: e.timestamp)
  events, rounds = k_core(events, opts.min_user_interactions, opts.min_item_interactions)

  surviving = {e.item for e in events}
  bad = bad_images({i: p for i, p in raw.image_paths.items() if i in surviving}, opts.image_size)
  if bad:
    print(f'{len(bad)} of {len(surviving)} item images are missing or cannot be decoded:')
    for source_id, error in bad.items():
      print(f'  {source_id}: {error}')
    if opts.on_bad_image == 'fail':
      raise DatasetError(f'{len(bad)} item image(s) missing or undecodable, e.g. {next(iter(bad.values()))}; '
                         'pass --on_bad_image drop to drop those items (k-core is then re-applied), or keep to '
                         'keep them without a picture')
    if opts.on_bad_image == 'keep':  # has_image=false: the model sees their text only
      raw = dataclasses.replace(raw, image_paths={i: p for i, p in raw.image_paths.items() if i not in bad})
    else:
      events, more_rounds = k_core([e for e in events if e.item not in bad], opts.min_user_interactions,
                                   opts.min_item_interactions)
      rounds += more_rounds
  if not events:
    raise DatasetError(f'no interactions survive {opts.min_user_interactions}/{opts.min_item_interactions}-core '
                       'filtering; lower --min_user_interactions / --min_item_interactions')

  ids = item_permutation(list({e.item for e in events}), opts.seed)
  items = [Item(source_id='')] * len(ids)
  for source_id, i in ids.items():
    items[i] = dataclasses.replace(raw.items[source_id], has_image=source_id in raw.image_paths)
  history: dict[str, list[Interaction]] = collections.defaultdict(list)
  for e in events:
    history[e.user].append(Interaction(item=ids[e.item], rating=e.rating, review=e.review, timestamp=e.timestamp,
                                       explanation=explanation(e.review, opts.seed, e.user, e.item)))
  users = [User(source_id=u, interactions=tuple(history[u])) for u in sorted(history)]
  cold_items = []
  if opts.cold_after is not None:
    users, cold_items = cold_start(users, opts.cold_after, opts.seed)

  if opts.tokenizer:
    base = tokenizer_lib.load_base(opts.tokenizer)
  else:
    base = tokenizer_lib.train_bpe(prompts.tokenizer_corpus(items, users), opts.bpe_vocab)
  tokenizer = tokenizer_lib.with_unimp_tokens(base, num_items=len(items), num_slots=NUM_SLOTS, num_image_codes=0)

  extra = {
      'source_format': source_format, 'inputs': raw.inputs, 'seed': opts.seed,
      'min_user_interactions': opts.min_user_interactions, 'min_item_interactions': opts.min_item_interactions,
      'k_core_rounds': rounds,
      'raw_counts': {'items': len(raw.items), 'interactions': len(raw.events),
                     'users': len({e.user for e in raw.events})},
      'unknown_item_interactions': sum(unknown.values()),
      'unknown_items': sorted(unknown)[:UNKNOWN_ITEMS_LISTED],
      'on_bad_image': opts.on_bad_image, 'bad_images': bad, **raw.notes}
  if opts.cold_after is not None:
    extra.update(cutoff=opts.cold_after, cold_items=cold_items)
  stream = (images_lib.load(raw.image_paths[it.source_id], opts.image_size) if it.has_image else None
            for it in tqdm.tqdm(items, desc='writing pictures', unit='item', dynamic_ncols=True, mininterval=1))
  return write_dataset(opts.out, name=opts.name, items=items, images=stream, users=users,
                       image_size=opts.image_size, split_seed=opts.seed, tokenizer=tokenizer, extra=extra,
                       overwrite=opts.overwrite)


def cold_start(users: list[User], cutoff: int, seed: int) -> tuple[list[User], list[int]]:
  """(users, cold item ids) for `--cold_after`: an item whose first interaction comes after `cutoff` is
  cold, and the by-user split's training users (formats.split_by_user with the same seed) keep only
  their interactions up to the cut-off, so no cold item reaches training; validation and test users keep
  everything, so their targets include cold items. (Leave-last-out training reads every user's earlier
  interactions and gives no such guarantee.)"""
  first: dict[int, int] = {}
  for user in users:
    for inter in user.interactions:
      first[inter.item] = min(inter.timestamp, first.get(inter.item, inter.timestamp))
  cold = sorted(item for item, t in first.items() if t > cutoff)
  train = set(split_by_user(len(users), seed)['train'])
  users = [dataclasses.replace(u, interactions=tuple(i for i in u.interactions if i.timestamp <= cutoff))
           if k in train else u for k, u in enumerate(users)]
  return users, cold


# ---- command line ------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--out', help='Directory the unified dataset is written to (required unless --write_urls).')
  common.add_argument('--name', help='Dataset name in the manifest (default: the format).')
  common.add_argument('--seed', type=int, default=0, help='Item-id permutation, explanation choice, user split.')
  common.add_argument('--image_size', type=int, default=224, help='Images are centre-cropped and resized to this.')
  common.add_argument('--min_user_interactions', type=int, default=5, help='k-core threshold for users.')
  common.add_argument('--min_item_interactions', type=int, default=5, help='k-core threshold for items.')
  common.add_argument('--on_bad_image', choices=BAD_IMAGE_CHOICES, default='fail',
                      help='Missing/undecodable image: fail naming it, drop its item and re-apply k-core, or keep '
                           'the item without a picture (e.g. H&M without its images/ folder).')
  common.add_argument('--tokenizer', help='Local Hugging Face tokenizer directory (default: train a BPE).')
  common.add_argument('--bpe_vocab', type=int, default=8000, help='Vocabulary size of the trained BPE.')
  common.add_argument('--overwrite', action='store_true', help='Replace an existing dataset at --out.')
  common.add_argument('--cold_after', type=int, metavar='TIMESTAMP',
                      help='Items first interacted with after this time are cold (extra.cold_items); training '
                      'users keep only their interactions up to it, so evaluation scores warm and cold targets.')

  parser = argparse.ArgumentParser(prog='python -m unimp_jax.data.convert', description=__doc__.split('\n')[0])
  formats = parser.add_subparsers(dest='format', required=True)
  for name, year in (('amazon2014', 'Python-literal'), ('amazon2018', 'JSON')):
    amazon = formats.add_parser(name, parents=[common], help=f'Amazon Review Data ({year} metadata lines).')
    amazon.add_argument('--meta', nargs='+', required=True, help='Metadata files (.gz or plain), any domains.')
    amazon.add_argument('--reviews', nargs='+', help='Review JSON-lines files (.gz or plain); required unless '
                        '--write_urls.')
    amazon.add_argument('--images', help='Directory of <asin>.jpg (default: items have no picture).')
    amazon.add_argument('--write_urls', metavar='FILE', help='Only write the asin<TAB>url list of the '
                        'pictures to FILE (for unimp_jax.data.fetch, whose output is --images) and stop.')
  formats.add_parser('hm', parents=[common], help='H&M Kaggle: articles/customers/transactions_train.csv, '
                     'images/0XX/0XXXXXXXXX.jpg.').add_argument('--root', required=True)
  formats.add_parser('movielens', parents=[common], help='MovieLens-100K: u.data + u.item, or RecBole '
                     'ml-100k.inter + ml-100k.item.').add_argument('--root', required=True)
  return parser


def _check_arguments(args):
  """Every input named on the command line exists and every number makes sense, before any file is
  parsed (a bad --out would otherwise surface only after the whole meta file)."""
  inputs = [('--meta', p) for p in getattr(args, 'meta', None) or []]
  inputs += [('--reviews', p) for p in getattr(args, 'reviews', None) or []]
  for flag, path in inputs:
    if not os.path.isfile(path):
      raise DatasetError(f'{flag} {path}: no such file')
  for flag, path in (('--images', getattr(args, 'images', None)), ('--root', getattr(args, 'root', None)),
                     ('--tokenizer', args.tokenizer)):
    if path and not os.path.isdir(path):
      raise DatasetError(f'{flag} {path}: no such directory')
  for flag in ('image_size', 'min_user_interactions', 'min_item_interactions', 'bpe_vocab'):
    if getattr(args, flag) < 1:
      raise DatasetError(f'--{flag} {getattr(args, flag)}: must be at least 1')
  check_replaceable(args.out, args.overwrite)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = _parser().parse_args(argv)
  if getattr(args, 'write_urls', None):
    count = write_image_urls(args.format, args.meta, args.write_urls)
    print(f'wrote {count} picture URLs to {args.write_urls}')
    return {'image_urls': count}
  if not args.out:
    raise DatasetError('--out is required: the directory the unified dataset is written to')
  if args.format.startswith('amazon') and not args.reviews:
    raise DatasetError('--reviews is required: the review JSON-lines files')
  _check_arguments(args)  # before reading anything
  if args.format == 'amazon2014':
    raw = read_amazon2014(args.meta, args.reviews, args.images)
  elif args.format == 'amazon2018':
    raw = read_amazon2018(args.meta, args.reviews, args.images)
  elif args.format == 'hm':
    raw = read_hm(args.root)
  else:
    raw = read_movielens(args.root)
  opts = Options(out=args.out, name=args.name or args.format, seed=args.seed, image_size=args.image_size,
                 min_user_interactions=args.min_user_interactions,
                 min_item_interactions=args.min_item_interactions, on_bad_image=args.on_bad_image,
                 tokenizer=args.tokenizer, bpe_vocab=args.bpe_vocab, overwrite=args.overwrite,
                 cold_after=args.cold_after)
  manifest = build(raw, opts, args.format)
  print(f'wrote {opts.out}: {json.dumps(manifest["counts"])}')
  return manifest


def _exit_on_sigterm(signum, frame):
  raise SystemExit(128 + signum)  # unwinds like an exception: write_dataset removes its partial folder


if __name__ == '__main__':
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  try:
    main()
  except (DatasetError, OSError) as e:  # OSError: a file that vanished or cannot be read mid-conversion
    sys.exit(f'error: {e}')
