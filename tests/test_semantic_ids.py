"""Semantic item ids: residual k-means, the collision level, embedding files, tokens, saved codes, prompts."""

import json
import os

import numpy as np
import pytest

from unimp_jax import config as config_lib
from unimp_jax.data import datasets, formats, prompts, semantic_ids, synthetic
from unimp_jax.data import tokenizer as tokenizer_lib


def _clustered(seed=0, clusters=4, per=30, dim=8):
  """Well-separated blobs (labels known), each with a finer sub-structure of 3 offsets."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, dim)) * 20
  sub = rng.normal(size=(3, dim)) * 2
  labels = np.repeat(np.arange(clusters), per)
  x = centres[labels] + sub[np.arange(len(labels)) % 3] + rng.normal(size=(len(labels), dim)) * 0.1
  return x, labels


def _semantic_cfg(**overrides):
  cfg = config_lib.base_config().data.semantic
  cfg.update(overrides)
  return cfg


def _errors(x, codes, centroids):
  """Squared reconstruction error after each level, computed here with numpy from the centroids."""
  errors, reconstruction = [], np.zeros_like(x)
  for level in range(codes.shape[1]):
    reconstruction = reconstruction + centroids[level][codes[:, level]]
    errors.append(((x - reconstruction) ** 2).sum())
  return errors


@pytest.mark.parametrize('seed', range(4))
def test_residual_kmeans_recovers_the_clusters_and_each_level_explains_more(seed):
  x, labels = _clustered(seed)
  codes, centroids = semantic_ids.residual_kmeans(x, levels=3, codebook=4, seed=seed)
  assert codes.shape == (len(x), 3) and codes.dtype == np.int32
  # Level 0 is the true partition (up to renaming the clusters): one code per label and vice versa.
  pairs = set(zip(labels.tolist(), codes[:, 0].tolist()))
  assert len(pairs) == 4 == len(set(codes[:, 0].tolist()))
  # After level 0 the error is exactly the scatter around the true cluster means; every level lowers it.
  errors = _errors(x, codes, centroids)
  true_means = np.stack([x[labels == k].mean(0) for k in range(4)])
  np.testing.assert_allclose(errors[0], ((x - true_means[labels]) ** 2).sum(), rtol=1e-9)
  assert errors[0] > errors[1] > errors[2]
  assert errors[1] < 0.1 * errors[0]  # level 1 finds the sub-structure shared by all clusters


def test_random_init_is_seeded_and_levels_still_help():
  x, _ = _clustered()
  codes, centroids = semantic_ids.residual_kmeans(x, levels=3, codebook=4, seed=5, init='random')
  again, _ = semantic_ids.residual_kmeans(x, levels=3, codebook=4, seed=5, init='random')
  np.testing.assert_array_equal(codes, again)
  errors = _errors(x, codes, centroids)
  assert errors[0] > errors[1] > errors[2]


def test_codes_are_unique_after_the_collision_level_and_deterministic():
  x, _ = _clustered(per=40)
  cfg = _semantic_cfg(levels=2, codebook=3, max_collisions=40)
  ids = semantic_ids.quantise(x, cfg)
  assert ids.codes.shape == (len(x), 3) and ids.codebook_sizes == (3, 3, 40)
  assert len({tuple(c) for c in ids.codes.tolist()}) == len(x)
  # The last level numbers the items sharing a prefix 0, 1, 2, .. in item order (a plain loop reference).
  seen = {}
  for i, prefix in enumerate(map(tuple, ids.codes[:, :2].tolist())):
    assert ids.codes[i, 2] == seen.get(prefix, 0)
    seen[prefix] = seen.get(prefix, 0) + 1
  again = semantic_ids.quantise(x, cfg)
  np.testing.assert_array_equal(again.codes, ids.codes)
  for a, b in zip(again.centroids, ids.centroids):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='config.data.semantic.max_collisions=4'):
    semantic_ids.quantise(x, _semantic_cfg(levels=2, codebook=3, max_collisions=4))


def test_more_codes_than_distinct_points_and_duplicates():
  x = np.repeat(np.eye(3), [5, 1, 1], axis=0)  # 3 distinct rows, 7 items
  ids = semantic_ids.quantise(x, _semantic_cfg(levels=2, codebook=8, max_collisions=5))
  assert len({tuple(c) for c in ids.codes.tolist()}) == 7
  assert ids.codes[:5, -1].tolist() == [0, 1, 2, 3, 4]


def test_embedding_files(tmp_path):
  good = np.arange(12, dtype=np.float32).reshape(4, 3)
  np.save(tmp_path / 'e.npy', good)
  np.testing.assert_array_equal(semantic_ids.load_embeddings(str(tmp_path / 'e.npy'), 4), good)
  from safetensors.numpy import save_file
  save_file({'embeddings': good}, str(tmp_path / 'e.safetensors'))
  np.testing.assert_array_equal(semantic_ids.load_embeddings(str(tmp_path / 'e.safetensors'), 4), good)
  with pytest.raises(ValueError, match=r'e\.npy \(config\.data\.semantic\.embeddings\) has shape \[4, 3\]'):
    semantic_ids.load_embeddings(str(tmp_path / 'e.npy'), 5)
  np.save(tmp_path / 'pickled.npy', np.asarray([{'a': 1}], dtype=object), allow_pickle=True)
  with pytest.raises(ValueError, match='pickled.npy'):
    semantic_ids.load_embeddings(str(tmp_path / 'pickled.npy'), 1)
  with pytest.raises(FileNotFoundError, match='config.data.semantic.embeddings'):
    semantic_ids.load_embeddings(str(tmp_path / 'missing.npy'), 4)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('data') / 'fashion')
  synthetic.build(path, num_items=60, num_users=20, seed=3, image_size=16, bpe_vocab=400)
  return formats.UnifiedDataset(path)


def _cfg(dataset, embeddings, **semantic):
  cfg = config_lib.base_config()
  cfg.model.vision.update(image_size=16)
  cfg.data.update(path=dataset.path, item_ids='semantic', seq_len=160, num_images=6, history=4)
  cfg.data.semantic.update(dict(levels=2, codebook=4, max_collisions=12, embeddings=embeddings), **semantic)
  return cfg


def test_semantic_tokens_extend_the_layout(dataset):
  tok = tokenizer_lib.with_semantic_tokens(dataset.tokenizer(), (4, 4, 3))
  ids = tokenizer_lib.TokenIds(tok.unimp_layout)
  plain = tokenizer_lib.TokenIds(dataset.tokenizer().unimp_layout)
  assert ids.added_vocab_size == plain.added_vocab_size + 11 and len(tok) == ids.added_range[1]
  assert ids.semantic_range(0)[0] == plain.added_range[1]  # after every existing added token
  codes = np.asarray([[0, 3, 2], [1, 0, 0]])
  names = [[f'sid_{level}_{c}' for level, c in enumerate(row)] for row in codes]
  np.testing.assert_array_equal(ids.semantic(codes), [tok.convert_tokens_to_ids(n) for n in names])
  assert tok.decode(ids.semantic(codes[0])) == 'sid_0_0sid_1_3sid_2_2'
  with pytest.raises(ValueError, match='outside the codebooks'):
    ids.semantic([[0, 4, 0]])


def test_builder_writes_semantic_ids_and_keeps_them_for_the_run(dataset, tmp_path):
  embeddings = np.random.default_rng(0).normal(size=(len(dataset.items), 5))
  np.save(tmp_path / 'emb.npy', embeddings)
  cfg = _cfg(dataset, str(tmp_path / 'emb.npy'))
  config_lib.validate(cfg, 8)
  workdir = str(tmp_path / 'run')
  datasets.fit_model_to_dataset(cfg, dataset)
  builder = datasets.make_builder(cfg, dataset, workdir)
  plain = tokenizer_lib.TokenIds(dataset.tokenizer().unimp_layout)
  assert cfg.model.lm.added_vocab_size == plain.added_vocab_size + 2 * 4 + 12  # from the config alone
  assert builder.ids.added_vocab_size == cfg.model.lm.added_vocab_size
  expected = semantic_ids.quantise(embeddings, cfg.data.semantic).codes
  np.testing.assert_array_equal(builder.item_codes, expected)
  assert builder.item_tokens.shape == (len(dataset.items), 3) and builder.item_tokens.dtype == np.int32
  assert builder.answer_budget('recommendation') == 4

  user = dataset.user(0)
  target = len(user.interactions) - 1
  for task in ('recommendation', 'search'):
    ex = builder.build(task, user, target, with_answer=True)
    final = ex.tokens[ex.prompt_length:ex.prompt_length + 4]
    assert list(final) == [*builder.item_tokens[user.interactions[target].item], builder.eos]
    assert ex.answer_mask[ex.prompt_length:ex.prompt_length + 4].all()
    history_item = user.interactions[target - 1].item
    span = [builder.ids.answer, *builder.item_tokens[history_item], builder.ids.end_of_chunk]
    prompt = list(ex.tokens[:ex.prompt_length])
    at = next(i for i in range(len(prompt)) if prompt[i:i + len(span)] == span)
    assert ex.answer_mask[at + 1:at + len(span)].all() and not ex.answer_mask[at]
    first, _ = builder.ids.item_range
    assert not ((ex.tokens >= first) & (ex.tokens < first + builder.ids.num_items)).any()  # no atomic ids

  # Saved once; a later builder (resume, evaluation) reloads them even if the embeddings changed.
  saved = json.load(open(os.path.join(workdir, semantic_ids.CODES_FILE)))
  assert saved['codes'] == expected.tolist() and saved['source'] == str(tmp_path / 'emb.npy')
  np.save(tmp_path / 'emb.npy', -embeddings)
  np.testing.assert_array_equal(datasets.make_builder(cfg, dataset, workdir).item_codes, expected)
  with pytest.raises(ValueError, match=r'config.data.semantic \(levels, codebook, max_collisions\)'):
    datasets.make_builder(_cfg(dataset, '', codebook=5), dataset, workdir)
  with pytest.raises(ValueError, match='no model parameters'):
    datasets.make_builder(_cfg(dataset, ''), dataset, str(tmp_path / 'elsewhere'))
  np.save(tmp_path / 'short.npy', embeddings[:-1])
  with pytest.raises(ValueError, match=r'short\.npy \(config.data.semantic.embeddings\)'):
    datasets.make_builder(_cfg(dataset, str(tmp_path / 'short.npy')), dataset, str(tmp_path / 'other'))


def test_ids_from_our_own_towers(dataset, tmp_path):
  import jax
  from flax import nnx
  from unimp_jax.model import unimp
  from unimp_jax.sharding import mesh as mesh_lib
  cfg = _cfg(dataset, '')
  datasets.fit_model_to_dataset(cfg, dataset)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  graphdef, params = nnx.split(unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=0))
  params = nnx.to_pure_dict(params)
  tok = dataset.tokenizer()
  embeddings = semantic_ids.tower_embeddings(graphdef, params, dataset, tok, batch_size=16)
  assert embeddings.shape == (len(dataset.items), cfg.model.vision.width + cfg.model.lm.width)
  np.testing.assert_allclose(np.linalg.norm(embeddings[:, :64], axis=1), 1.0, rtol=1e-5)
  # The text half is the mean input embedding of the item's text tokens.
  text = tok.encode(prompts.TaskBuilder.item_line(dataset.items[5]), add_special_tokens=False)
  rows = np.asarray(params['lm']['embed'])[text].mean(0)
  np.testing.assert_allclose(embeddings[5, 64:], rows / np.linalg.norm(rows), rtol=1e-4, atol=1e-6)
  builder = datasets.make_builder(cfg, dataset, str(tmp_path), params=params, graphdef=graphdef)
  np.testing.assert_array_equal(builder.item_codes, semantic_ids.quantise(embeddings, cfg.data.semantic).codes)
  assert os.path.exists(tmp_path / semantic_ids.CODES_FILE)


@pytest.mark.parametrize('overrides,key', [
    (('data.item_ids=trie',), 'data.item_ids'),
    (('data.semantic.levels=0',), 'data.semantic.levels'),
    (('data.semantic.codebook=1',), 'data.semantic.codebook'),
    (('data.semantic.max_collisions=0',), 'data.semantic.max_collisions'),
    (('data.semantic.init=kmeans',), 'data.semantic.init'),
    (('data.semantic.embeddings=/nonexistent/e.npy',), 'data.semantic.embeddings'),
    (('data.item_content=image',), 'data.item_content'),
])
def test_bad_item_settings_name_the_key(overrides, key):
  cfg = config_lib.load('configs/tiny.py', overrides)
  with pytest.raises(config_lib.ConfigError, match=f'config.{key}'):
    config_lib.validate(cfg, 8)
