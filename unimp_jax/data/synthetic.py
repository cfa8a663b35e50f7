"""The embedded default dataset: real product photos, simulated shoppers, part of the signal image-only.

  python -m unimp_jax.data.synthetic --out data/generated/fashion [--num_items 1250 --num_users 10000 --seed 0]

Items are Fashion-MNIST photos (a committed 2,000-photo subset), each colourised with one of eight
colours. Category comes from the photo's class; brand, style, material and price are drawn at random;
the title, description and keywords are built from those and never name the colour. Each user has a
taste over colour, category, brand and price; the taste drives which items they buy (in order), how
they rate them, the explanation sentence (naming the feature that moved the rating most), the search
query that leads to each purchase, and image-selection questions whose answer is decided by colour
alone. docs/DATA.md describes the process and the two ceilings this module computes:

  oracle HR@10       rank the unseen items by the user's true utility
  colour-blind HR@10 the same, but without the colour terms (what text alone can support)

Same seed, same bytes; the build is atomic (unimp_jax.data.formats.write_dataset).
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct

import numpy as np
from PIL import Image

from unimp_jax.data import formats, prompts
from unimp_jax.data import tokenizer as tokenizer_lib

ASSETS = os.path.join(os.path.dirname(__file__), 'assets', 'fashion_mnist')
CATEGORIES = ('t-shirt', 'trousers', 'pullover', 'dress', 'coat', 'sandals', 'shirt', 'sneakers', 'bag',
              'ankle boots')
COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220), 'yellow': (235, 200, 40),
           'purple': (140, 60, 180), 'orange': (240, 130, 30), 'teal': (30, 160, 160), 'pink': (240, 120, 180)}
BRANDS = ('Acorn', 'Bellweather', 'Corvid', 'Dunmore', 'Elmstead', 'Fenwick', 'Galloway', 'Harrow', 'Ingram',
          'Juniper', 'Kestrel', 'Lindqvist')
STYLES = ('classic', 'sporty', 'casual', 'formal', 'vintage', 'modern', 'relaxed', 'slim')
MATERIALS = ('cotton', 'wool', 'denim', 'leather', 'linen', 'polyester', 'canvas', 'suede')
BASE_PRICE = (15, 45, 40, 60, 90, 35, 30, 70, 55, 85)

# Utility weights of a user's taste (see docs/DATA.md). Purchases are drawn with probability
# proportional to exp(utility / TEMPERATURE) among items the user has not bought yet.
W_FAVOURITE_COLOUR, W_SECOND_COLOUR, W_CATEGORY, W_BRAND, W_PRICE = 2.5, 1.0, 1.5, 1.0, 1.0
TEMPERATURE = 0.5
NUM_SLOTS = 3  # candidates per image-selection question
# New ("cold") items: this share of the catalogue is released at CUTOFF. Every interaction before a
# user's last happens before it; only validation and test users make their last purchase after it, so
# a cold item is never in a training user's history or target, and only content can rank it.
COLD_FRACTION = 0.2
CUTOFF = 1_800_000_000  # seconds; every history (from 1.6e9, at most 16 purchases a month apart) ends before


def read_idx(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
  """An IDX image/label file pair (gzipped, as Fashion-MNIST ships): uint8 [N, 28, 28], labels [N]."""
  with gzip.open(images_path) as f:
    _, n, rows, cols = struct.unpack('>IIII', f.read(16))
    photos = np.frombuffer(f.read(), np.uint8).reshape(n, rows, cols)
  with gzip.open(labels_path) as f:
    _, n = struct.unpack('>II', f.read(8))
    labels = np.frombuffer(f.read(), np.uint8)
  if len(labels) != len(photos):
    raise formats.DatasetError(f'{labels_path}: {len(labels)} labels for the {len(photos)} photos of {images_path}')
  return photos, labels


def load_photos() -> tuple[np.ndarray, np.ndarray]:
  """The committed Fashion-MNIST subset: uint8 [2000, 28, 28], labels [2000]."""
  return read_idx(os.path.join(ASSETS, 'images-idx3-ubyte.gz'), os.path.join(ASSETS, 'labels-idx1-ubyte.gz'))


def colourise(photo: np.ndarray, colour: tuple[int, int, int], size: int) -> np.ndarray:
  gray = np.asarray(Image.fromarray(photo).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
  return np.clip(np.rint(gray[..., None] * np.asarray(colour, np.float32)), 0, 255).astype(np.uint8)


def make_items(rng: np.random.Generator, num_items: int, labels: np.ndarray) -> dict[str, np.ndarray]:
  """Item attributes as arrays (photo, category, colour, brand, style, material, price)."""
  photo = rng.permutation(np.resize(np.arange(len(labels)), num_items))
  brand_level = np.exp(rng.normal(0, 0.35, len(BRANDS)))
  attrs = dict(photo=photo, category=labels[photo].astype(np.int64),
               colour=rng.integers(len(COLOURS), size=num_items), brand=rng.integers(len(BRANDS), size=num_items),
               style=rng.integers(len(STYLES), size=num_items), material=rng.integers(len(MATERIALS), size=num_items))
  raw = np.asarray(BASE_PRICE)[attrs['category']] * brand_level[attrs['brand']] * np.exp(rng.normal(0, 0.2, num_items))
  attrs['price'] = np.round(np.maximum(raw, 2.0)) - 0.01
  return attrs


def item_record(i: int, a: dict[str, np.ndarray]) -> formats.Item:
  cat, brand = CATEGORIES[a['category'][i]], BRANDS[a['brand'][i]]
  style, material = STYLES[a['style'][i]], MATERIALS[a['material'][i]]
  return formats.Item(
      source_id=f'fmnist-{i:05d}', title=f'{brand} {style} {material} {cat}', brand=brand, category=cat,
      price=float(a['price'][i]), description=f'A {style} {cat} in {material}, made by {brand}.',
      keywords=(cat, style, material, brand.lower()), has_image=True)


def make_tastes(rng: np.random.Generator, num_users: int) -> dict[str, np.ndarray]:
  fav = rng.integers(len(COLOURS), size=num_users)
  second = (fav + rng.integers(1, len(COLOURS), size=num_users)) % len(COLOURS)
  category = rng.dirichlet(np.full(len(CATEGORIES), 0.5), size=num_users)
  liked_brands = np.stack([rng.choice(len(BRANDS), 2, replace=False) for _ in range(num_users)])
  budget = np.exp(rng.normal(np.log(45), 0.5, num_users))
  return dict(fav=fav, second=second, category=category, brands=liked_brands, budget=budget)


def utility_terms(t: dict[str, np.ndarray], user: int, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Each feature's contribution to the user's utility for every item."""
  cat_pref = t['category'][user]
  return {
      'colour': W_FAVOURITE_COLOUR * (a['colour'] == t['fav'][user]) + W_SECOND_COLOUR * (a['colour'] == t['second'][user]),
      'category': W_CATEGORY * cat_pref[a['category']] / cat_pref.max(),
      'brand': W_BRAND * np.isin(a['brand'], t['brands'][user]),
      'price': -W_PRICE * np.abs(np.log(a['price']) - np.log(t['budget'][user])),
  }


def hit_rate_at_10(probs: np.ndarray, scores: np.ndarray, seen: np.ndarray) -> float:
  """Expected HR@10 of ranking by `scores` when the target is drawn from `probs` over unseen items."""
  scores = np.where(seen, -np.inf, scores)
  return float(probs[np.argsort(-scores, kind='stable')[:10]].sum())


EXPLANATIONS = {
    ('colour', True): 'the colour is exactly what i like',
    ('colour', False): 'the colour is not for me',
    ('category', True): 'i can always use another {category}',
    ('category', False): 'i rarely wear a {category}',
    ('brand', True): '{brand} never disappoints me',
    ('brand', False): '{brand} is not a brand i like',
    ('price', True): 'the price fits my budget well',
    ('price', False): 'it costs more than i wanted to pay',
}


def simulate_user(rng, user: int, tastes, attrs, items, cold: np.ndarray, evaluated: bool):
  """One shopper's purchases, ratings, explanations, queries and selection questions, plus the oracle
  and colour-blind expected HR@10 for their last purchase and whether that purchase is a cold item.

  Cold items can be bought only by an `evaluated` (validation or test) user, as their last purchase,
  after CUTOFF. The ceilings are conditional on the last purchase's kind: the expected HR@10 of ranking
  by the true utility when the target is drawn from the user's choice probabilities restricted to warm
  (or to cold) items, whichever the drawn target is."""
  terms = utility_terms(tastes, user, attrs)
  utility = sum(terms.values())
  length = int(rng.integers(6, 17))
  seen = cold.copy()  # not released yet: never bought before the last purchase
  interactions, oracle, blind, target_cold = [], 0.0, 0.0, False
  mean, std = utility.mean(), utility.std() + 1e-9
  means = {k: v.mean() for k, v in terms.items()}
  timestamp = int(1_600_000_000 + rng.integers(0, 10_000_000))
  for step in range(length):
    last = step == length - 1
    if last and evaluated:
      seen &= ~cold  # released now
    logits = np.where(seen, -np.inf, utility / TEMPERATURE)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    item = int(rng.choice(len(probs), p=probs))
    if last:
      target_cold = bool(cold[item])
      group = np.where(cold == target_cold, probs, 0.0)
      oracle = hit_rate_at_10(group / group.sum(), utility, seen)
      blind = hit_rate_at_10(group / group.sum(), utility - terms['colour'], seen)
    seen[item] = True
    rating = int(np.clip(np.rint(3 + 1.2 * (utility[item] - mean) / std + rng.normal(0, 0.5)), 1, 5))
    feature = max(terms, key=lambda k: abs(terms[k][item] - means[k]))
    it = items[item]
    explanation = EXPLANATIONS[feature, bool(terms[feature][item] >= means[feature])].format(
        category=it.category, brand=it.brand)
    query = ' '.join(it.keywords[:2] if rng.random() < 0.5 else it.keywords[:3])
    timestamp += int(rng.integers(3_600, 30 * 86_400))
    if last and evaluated:
      timestamp = CUTOFF + int(rng.integers(3_600, 30 * 86_400))
    interactions.append(formats.Interaction(
        item=item, rating=rating, review=f'{explanation}. {rating} out of 5.', explanation=explanation,
        timestamp=timestamp, query=query))
  selections = tuple(s for s in (make_selection(rng, user, tastes, attrs, ~cold) for _ in range(2)) if s is not None)
  return formats.User(f'user-{user:05d}', tuple(interactions), selections), oracle, blind, target_cold


def make_selection(rng, user: int, tastes, attrs, warm: np.ndarray) -> formats.Selection | None:
  """1 or 2 items of the user's favourite colour among 3 warm items of one category: only the picture
  decides."""
  category = int(rng.choice(len(CATEGORIES), p=tastes['category'][user]))
  same = (attrs['category'] == category) & warm
  liked = np.flatnonzero(same & (attrs['colour'] == tastes['fav'][user]))
  other = np.flatnonzero(same & (attrs['colour'] != tastes['fav'][user]) & (attrs['colour'] != tastes['second'][user]))
  num_pos = int(rng.integers(1, 3))
  if len(liked) < num_pos or len(other) < NUM_SLOTS - num_pos:
    return None
  positives = rng.choice(liked, num_pos, replace=False)
  candidates = rng.permutation(np.concatenate([positives, rng.choice(other, NUM_SLOTS - num_pos, replace=False)]))
  return formats.Selection(tuple(int(c) for c in candidates), tuple(sorted(int(p) for p in positives)))


def build(out: str, *, num_items: int = 1250, num_users: int = 10_000, seed: int = 0, image_size: int = 32,
          bpe_vocab: int = 1024, overwrite: bool = False) -> dict:
  """The default: 1,250 items (250 cold) and 10,000 users, so 1,000 test users (one standard error at
  HR@10 = 0.25 is 0.014)."""
  rng = np.random.default_rng(seed)
  photos, labels = load_photos()
  attrs = make_items(rng, num_items, labels)
  cold = np.zeros(num_items, bool)
  cold[rng.choice(num_items, int(round(COLD_FRACTION * num_items)), replace=False)] = True
  splits = formats.split_by_user(num_users, seed)
  evaluated = np.zeros(num_users, bool)
  evaluated[splits['valid'] + splits['test']] = True
  items = [item_record(i, attrs) for i in range(num_items)]
  colours = list(COLOURS.values())
  images = (colourise(photos[attrs['photo'][i]], colours[attrs['colour'][i]], image_size) for i in range(num_items))
  tastes = make_tastes(rng, num_users)
  users, oracle, blind, target_cold = [], [], [], []
  for u in range(num_users):
    user, o, b, c = simulate_user(rng, u, tastes, attrs, items, cold, bool(evaluated[u]))
    users.append(user)
    oracle.append(o)
    blind.append(b)
    target_cold.append(c)
  test = np.asarray(splits['test'])
  oracle, blind, target_cold = np.asarray(oracle)[test], np.asarray(blind)[test], np.asarray(target_cold)[test]
  ceiling = lambda values, where: round(float(values[where].mean()), 4) if where.any() else None

  base = tokenizer_lib.train_bpe(prompts.tokenizer_corpus(items, users), bpe_vocab)
  tokenizer = tokenizer_lib.with_unimp_tokens(base, num_items=num_items,
                                              num_slots=NUM_SLOTS, num_image_codes=0)
  # Ceilings over the test users' last purchases: all, warm targets only, cold targets only.
  extra = {'generator': 'unimp_jax.data.synthetic', 'seed': seed,
           'oracle_hr@10': round(float(np.mean(oracle)), 4),
           'colour_blind_hr@10': round(float(np.mean(blind)), 4),
           'oracle_hr@10_warm': ceiling(oracle, ~target_cold), 'oracle_hr@10_cold': ceiling(oracle, target_cold),
           'colour_blind_hr@10_warm': ceiling(blind, ~target_cold),
           'colour_blind_hr@10_cold': ceiling(blind, target_cold),
           'cutoff': CUTOFF, 'cold_items': np.flatnonzero(cold).tolist(),
           'colours': list(COLOURS), 'item_colour': attrs['colour'].tolist(),
           'user_favourite_colour': tastes['fav'].tolist()}
  return formats.write_dataset(out, name='fashion-synthetic', items=items, images=images, users=users,
                               image_size=image_size, split_seed=seed, tokenizer=tokenizer, extra=extra,
                               overwrite=overwrite)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True)
  parser.add_argument('--num_items', type=int, default=1250)
  parser.add_argument('--num_users', type=int, default=10_000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--bpe_vocab', type=int, default=1024)
  parser.add_argument('--overwrite', action='store_true')
  args = parser.parse_args(argv)
  manifest = build(args.out, num_items=args.num_items, num_users=args.num_users, seed=args.seed,
                   image_size=args.image_size, bpe_vocab=args.bpe_vocab, overwrite=args.overwrite)
  print(f'wrote {args.out}: {manifest["counts"]}; oracle HR@10 {manifest["extra"]["oracle_hr@10"]}, '
        f'colour-blind HR@10 {manifest["extra"]["colour_blind_hr@10"]}')


if __name__ == '__main__':
  main()
