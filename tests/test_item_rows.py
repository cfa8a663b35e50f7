"""Content item rows (model.item_embeddings='content', unimp_jax/model/items.py)."""

import jax
import numpy as np
import pytest
from flax import nnx

from unimp_jax import config as config_lib
from unimp_jax.data import datasets, formats, pipeline, synthetic
from unimp_jax.model import items, unimp, vision
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.train import step as step_lib


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('data') / 'fashion')
  synthetic.build(path, num_items=64, num_users=24, seed=5, image_size=32, bpe_vocab=600)
  return formats.UnifiedDataset(path)


def _model(dataset, content='image+text', rows='content'):
  cfg = config_lib.base_config()
  cfg.model.item_embeddings = rows
  cfg.data.update(path=dataset.path, item_content=content, batch_size=2)
  datasets.fit_model_to_dataset(cfg, dataset)
  builder = datasets.make_builder(cfg, dataset)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  graphdef, params = nnx.split(unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=0))
  return cfg, builder, graphdef, jax.tree.map(np.asarray, nnx.to_pure_dict(params))


def _reference_rows(model, params, builder, catalogue):
  """The documented formula in numpy; the pictures' latents come from the model's own towers."""
  embed = params['lm']['embed']
  text = catalogue.text
  valid = text != builder.pad
  words = embed[np.where(valid, text, 0)] * valid[..., None]
  mean = words.sum(1) / valid.sum(1, keepdims=True)
  unit = lambda x: (x - x.mean(0)) / (x.std(0) + 1e-6) / np.sqrt(x.shape[1])  # over the catalogue
  rows = unit(mean) @ params['items']['text_proj']['kernel']
  if catalogue.images is not None:
    latents = np.asarray(model.encode_images(vision.normalize(catalogue.images)[:, None]))
    rows = rows + (unit(latents.mean(1)) * catalogue.has_image[:, None]) @ params['items']['image_proj']['kernel']
  return rows


@pytest.mark.parametrize('content', ['image+text', 'text'])
def test_item_rows_are_the_items_content_in_embedding_and_head(dataset, content):
  cfg, builder, graphdef, params = _model(dataset, content)
  catalogue = builder.catalogue()
  assert (catalogue.images is None) == (content == 'text')
  expected = _reference_rows(nnx.merge(graphdef, params), params, builder, catalogue)
  out = items.inference_params(graphdef, params, builder)
  first, last = (r - builder.ids.base_vocab_size for r in builder.ids.item_range)
  np.testing.assert_allclose(np.asarray(out['lm']['added_embed'][first:last]), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out['lm']['added_head'][:, first:last]), expected.T, rtol=1e-4, atol=1e-5)
  # Every other row is untouched, and so is every other parameter.
  np.testing.assert_array_equal(np.asarray(out['lm']['added_embed'][:first]), params['lm']['added_embed'][:first])
  np.testing.assert_array_equal(np.asarray(out['lm']['embed']), params['lm']['embed'])


def test_an_items_row_follows_its_own_picture(dataset):
  cfg, builder, graphdef, params = _model(dataset)
  arrays = builder.catalogue().arrays()
  rows = lambda a: np.asarray(jax.jit(lambda p, c: items.with_item_rows(graphdef, p, c, pad_id=builder.pad))(
      params, a)['lm']['added_embed'])
  before = rows(arrays)
  recoloured = dict(arrays, images=arrays['images'].copy())
  item = 7
  recoloured['images'][item] = recoloured['images'][item][..., ::-1]  # swap red and blue channels
  after = rows(recoloured)
  row = builder.ids.item(item) - builder.ids.base_vocab_size
  change = np.abs(after - before).max(1)
  # Other rows move only through the catalogue statistics (`items.standardise`); the rest of the added
  # vocabulary does not move at all.
  assert change.argmax() == row and change[row] > 10 * np.delete(change, row).max()
  first, last = (r - builder.ids.base_vocab_size for r in builder.ids.item_range)
  assert not change[:first].any() and not change[last:].any()


def test_the_train_step_trains_the_item_encoder_and_needs_the_catalogue(dataset):
  cfg, builder, graphdef, params = _model(dataset)
  batch = step_lib.step_inputs(next(iter(pipeline.make_dataset(builder, cfg.data, seed=0))))
  gradients = jax.jit(step_lib.accumulated_gradients(graphdef, cfg.train, pad_id=builder.pad))
  grads, sums = gradients(params, batch, builder.catalogue().arrays())
  assert np.isfinite(sums['objective'])
  assert np.abs(np.asarray(grads['items']['text_proj']['kernel'])).max() > 0
  assert np.abs(np.asarray(grads['items']['image_proj']['kernel'])).max() > 0
  # The stored item rows are never read: content replaces them.
  first, last = (r - builder.ids.base_vocab_size for r in builder.ids.item_range)
  assert not np.asarray(grads['lm']['added_embed'][first:last]).any()
  with pytest.raises(ValueError, match='needs the catalogue'):
    gradients(params, batch)


def test_learned_id_rows_start_at_zero_and_cold_items_never_get_one(dataset):
  """'content+id': an item's row is its content row plus a learned row, zero at the start. A cold item
  (never in a training history, left out of the training softmax) gets no gradient, so it keeps its
  content row; every other item's learned row is trained."""
  cfg, builder, graphdef, params = _model(dataset, rows='content+id')
  catalogue = builder.catalogue()
  first, last = (r - builder.ids.base_vocab_size for r in builder.ids.item_range)
  out = items.inference_params(graphdef, params, builder)
  expected = _reference_rows(nnx.merge(graphdef, params), params, builder, catalogue)
  np.testing.assert_allclose(np.asarray(out['lm']['added_embed'][first:last]), expected, rtol=1e-4, atol=1e-5)

  cfg.train.exclude_cold_items = True
  excluded = step_lib.excluded_tokens(cfg.train, builder)
  cold = np.isin(np.arange(first, last) + builder.ids.base_vocab_size, excluded)
  assert 0 < cold.sum() < len(cold)
  batch = step_lib.step_inputs(next(iter(pipeline.make_dataset(builder, cfg.data, seed=0))))
  gradients = jax.jit(step_lib.accumulated_gradients(graphdef, cfg.train, pad_id=builder.pad, excluded=excluded))
  grads, _ = gradients(params, batch, catalogue.arrays())
  moved = np.abs(np.asarray(grads['items']['id_rows'][first:last])).max(1) > 0
  np.testing.assert_array_equal(moved, ~cold)
  # A learned row adds to the item's content row, nothing else.
  id_rows = np.array(params['items']['id_rows'])
  id_rows[first + 3] += 1.0
  shifted = items.inference_params(graphdef, dict(params, items=dict(params['items'], id_rows=id_rows)),
                                   builder)['lm']['added_embed']
  np.testing.assert_allclose(np.asarray(shifted - out['lm']['added_embed'])[first:last],
                             np.eye(last - first)[3][:, None] * np.ones(expected.shape[1]), atol=1e-5)


@pytest.mark.parametrize('overrides', [('data.item_ids=semantic',), ('data.item_content=ids',)])
@pytest.mark.parametrize('rows', ['content', 'content+id'])
def test_content_rows_need_atomic_ids_and_content(overrides, rows):
  cfg = config_lib.load('configs/tiny.py', (f'model.item_embeddings={rows}', *overrides))
  with pytest.raises(config_lib.ConfigError, match='config.model.item_embeddings'):
    config_lib.validate(cfg, 8)
