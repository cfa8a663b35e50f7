"""Evaluation: process shards add up to the single-process numbers; ranking methods agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimp_jax import config as config_lib, tasks
from unimp_jax.data import datasets, formats, pipeline, splits, synthetic
from unimp_jax.eval import evaluate
from unimp_jax.model import unimp, vision
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.tasks import selection

BATCH = 4


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A small embedded dataset and a tiny model with its gates opened (images matter)."""
  path = str(tmp_path_factory.mktemp('data') / 'fashion')
  synthetic.build(path, num_items=60, num_users=60, seed=0, image_size=32, bpe_vocab=500)
  cfg = config_lib.base_config()
  cfg.data.path = path
  cfg.data.seq_len = 192  # a small BPE spells words in more tokens: room for three selection candidates
  dataset = formats.UnifiedDataset(path)
  datasets.fit_model_to_dataset(cfg, dataset)
  builder = datasets.make_builder(cfg, dataset)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  model = unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=0)
  cross = model.lm.groups.cross
  cross.alpha_attn[...] = jnp.full(cross.alpha_attn.shape, 0.7)
  cross.alpha_mlp[...] = jnp.full(cross.alpha_mlp.shape, 0.7)
  graphdef, params = nnx.split(model)
  return cfg, builder, graphdef, params, {}


def rows(setup, task, method='full', shard=0, shards=1):
  """This shard's evaluation rows, computed once per module (they are the expensive part)."""
  cfg, builder, graphdef, params, cache = setup
  key = (task, method, shard, shards)
  if key not in cache:
    users = splits.split_users(builder.dataset, cfg.data.split, 'test')
    cache[key] = evaluate.share_rows(graphdef, params, builder, task, users, shard, shards, split=cfg.data.split,
                                     stage='test', batch_size=BATCH, ranking_method=method)
  return cache[key]


# generation needs image codes in the builder: tests/test_image_codes.py evaluates it
@pytest.mark.parametrize('task', [t for t in tasks.EVALUATED if t != 'generation'])
def test_two_processes_give_the_numbers_of_one(setup, task):
  builder = setup[1]
  one = evaluate.summarise(task, rows(setup, task), builder)
  halves = evaluate.merge([rows(setup, task, shard=0, shards=2), rows(setup, task, shard=1, shards=2)])
  two = evaluate.summarise(task, halves, builder)
  assert one == two
  assert one['users'] == len(splits.split_users(builder.dataset, 'by_user', 'test'))


def test_more_processes_than_users_give_the_numbers_of_one(setup):
  """8 processes for 6 test users: the two without users contribute empty rows of the right columns."""
  cfg, builder = setup[:2]
  users = splits.split_users(builder.dataset, cfg.data.split, 'test')
  assert len(users) < 8
  shards = [rows(setup, 'recommendation', shard=k, shards=8) for k in range(8)]
  one = rows(setup, 'recommendation')
  assert [len(s['user']) for s in shards].count(0) == 8 - len(users)
  for shard in shards:
    assert {k: (v.dtype, v.shape[1:]) for k, v in shard.items()} == {k: (v.dtype, v.shape[1:]) for k, v in one.items()}
  assert evaluate.summarise('recommendation', evaluate.merge(shards), builder) == evaluate.summarise(
      'recommendation', one, builder)


def test_a_user_counted_twice_is_an_error(setup):
  shard = rows(setup, 'recommendation')
  with pytest.raises(ValueError, match='evaluated twice'):
    evaluate.merge([shard, shard])


def test_full_ranking_and_constrained_beam_search_agree(setup):
  """Atomic IDs: 20 constrained beams are exactly the top 20 of the full ranking (history excluded)."""
  full = rows(setup, 'recommendation')['rank']
  beam = rows(setup, 'recommendation', 'beam')['rank']
  num_items = setup[1].item_tokens.shape[0]
  np.testing.assert_array_equal(beam, np.where(full < 20, full, num_items))


def test_paper_protocol_counts_string_matches_only(setup):
  ranks = rows(setup, 'recommendation', 'paper')['rank']
  num_items = setup[1].item_tokens.shape[0]
  assert ((ranks >= 0) & (ranks < 10) | (ranks == num_items)).all()


def test_preference_and_selection_rows_are_well_formed(setup):
  preference = rows(setup, 'preference')
  np.testing.assert_allclose(preference['rating_probs'].sum(1), 1.0, rtol=1e-6)
  assert set(np.unique(preference['rating'])) <= {1, 2, 3, 4, 5}
  selection = rows(setup, 'selection')
  assert (selection['positives'] > 0).all() and (selection['chosen'] < 8).all()


def test_selection_decoding_writes_only_candidate_ids(setup):
  """`selection.chosen_slots` (restricted greedy decoding with the KV cache) against the same decoding
  written as full forward passes over the growing sequence, on held-out selection prompts."""
  cfg, builder, graphdef, params, _ = setup
  model = nnx.merge(graphdef, params)
  # One compiled full forward pass over a right-padded row (padding changes no earlier logit).
  forward = jax.jit(lambda tokens, images: model(tokens, images, tokens != builder.pad))
  for u in splits.split_users(builder.dataset, cfg.data.split, 'test')[:3]:
    user = builder.dataset.user(int(u))
    ex = builder.build('selection', user, len(user.interactions) - 1, with_answer=False,
                       rng=np.random.default_rng(int(u)))
    prompt = ex.tokens[:ex.prompt_length]
    images = vision.normalize(pipeline.gather_images(builder.dataset, ex.image_items)[None])
    chosen = selection.chosen_slots(graphdef, params, builder, ex.tokens[None], images, np.asarray([ex.prompt_length]))
    candidates = list(selection.candidate_ids(builder, prompt)[:, 0])
    sequence, written = list(prompt), []
    for _ in range(len(candidates) + 1):
      row = np.full((1, builder.seq_len), builder.pad, np.int32)
      row[0, :len(sequence)] = sequence
      logits = np.asarray(forward(row, images)[0, len(sequence) - 1])
      allowed = candidates + [builder.eos]
      token = allowed[int(np.argmax(logits[allowed]))]
      if token == builder.eos:
        break
      sequence.append(token)
      written.append(token)
    assert int(chosen[0]) == sum(1 << k for k, c in enumerate(candidates) if c in written)
