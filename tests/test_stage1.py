"""Stage 1: caption examples from an image–caption corpus, the config and pipeline rules that keep the
stages apart, and a stage-2 run starting from a stage-1 checkpoint (parameters restored exactly, added
vocabulary rows as documented)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimp_jax import config as config_lib, tasks
from unimp_jax.data import captions, datasets, formats, pipeline, prompts, synthetic
from unimp_jax.model import unimp
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.train import checkpoint as checkpoint_lib


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """A tiny catalogue and a caption corpus on its base vocabulary, as configs/pretrain.py builds them."""
  root = tmp_path_factory.mktemp('stage1')
  catalogue = str(root / 'catalogue')
  synthetic.build(catalogue, num_items=120, num_users=40, seed=1, image_size=16, bpe_vocab=400)
  corpus = str(root / 'captions')
  captions.build(corpus, num=60, seed=2, image_size=16, tokenizer=f'{catalogue}/tokenizer')
  return formats.UnifiedDataset(catalogue), formats.UnifiedDataset(corpus)


def _config(data_path, stage1: bool, probe_data: str = ''):
  cfg = config_lib.base_config()
  cfg.model.vision.update(image_size=16, patch_size=8)
  cfg.data.path = data_path
  cfg.eval.probe_data = probe_data
  if stage1:
    cfg.data.tasks.update(recommendation=0.0, search=0.0, preference=0.0, selection=0.0, caption=1.0)
  else:
    cfg.model.item_embeddings = 'content'
  return cfg


def test_a_caption_example_is_pictures_each_followed_by_its_caption(data):
  _, corpus = data
  builder = prompts.TaskBuilder(corpus, corpus.tokenizer(), seq_len=128, num_images=5, history=10)
  ids = builder.ids
  user = tasks.caption.window(corpus, 7, np.random.default_rng([0, 0, 7]))
  assert user.interactions[-1].item == 7 and 7 not in [i.item for i in user.interactions[:-1]]
  ex = builder.build('caption', user, len(user.interactions) - 1, with_answer=True)
  expected = []
  for n, inter in enumerate(user.interactions):
    words = corpus.tokenizer().encode(' ' + corpus.items[inter.item].title, add_special_tokens=False)
    last = n == len(user.interactions) - 1
    expected += [ids.image, ids.answer, *words, builder.eos if last else ids.end_of_chunk]
  np.testing.assert_array_equal(ex.tokens[:len(expected)], expected)
  assert (ex.tokens[len(expected):] == builder.pad).all()
  # Every caption token is supervised (and the chunk ends), nothing else.
  supervised = ex.tokens[ex.answer_mask]
  assert not np.isin(supervised, [ids.image, ids.answer, builder.pad]).any()
  assert ex.answer_mask.sum() == len(expected) - 2 * len(user.interactions)
  np.testing.assert_array_equal(ex.image_items[:len(user.interactions)], [i.item for i in user.interactions])


def test_the_pipeline_runs_over_pictures_and_keeps_the_stages_apart(data):
  catalogue, corpus = data
  cfg = _config(corpus.path, True, catalogue.path)
  config_lib.validate(cfg, jax.device_count())
  builder = datasets.make_builder(cfg, corpus)
  batches = list(pipeline.make_dataset(builder, cfg.data, seed=0, num_epochs=1))
  assert sum(len(b['task']) for b in batches) >= len(corpus.items) - cfg.data.batch_size
  assert set(np.concatenate([b['task'] for b in batches])) == {tasks.NAMES.index('caption')}
  again = list(pipeline.make_dataset(builder, cfg.data, seed=0, num_epochs=1))
  np.testing.assert_array_equal(batches[3]['tokens'], again[3]['tokens'])  # (seed, epoch, picture)
  with pytest.raises(ValueError, match='0 users, but config.data.tasks has no caption task'):
    pipeline.make_dataset(builder, _config(corpus.path, False).data, seed=0)
  with pytest.raises(ValueError, match='40 users, but config.data.tasks trains captions'):
    pipeline.make_dataset(datasets.make_builder(cfg, catalogue), cfg.data, seed=0)
  mixed = _config(corpus.path, True, catalogue.path)
  mixed.data.tasks.recommendation = 1.0
  with pytest.raises(config_lib.ConfigError, match='caption .stage 1. trains alone'):
    config_lib.validate(mixed, jax.device_count())
  with pytest.raises(config_lib.ConfigError, match='eval.probe_data'):
    config_lib.validate(_config(corpus.path, True), jax.device_count())


def _params(cfg, dataset, mesh, seed):
  datasets.fit_model_to_dataset(cfg, dataset)
  return nnx.to_pure_dict(nnx.state(unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=seed)))


def test_stage2_starts_from_stage1_with_its_vocabulary_as_a_prefix(data, tmp_path):
  catalogue, corpus = data
  mesh = mesh_lib.make_mesh(config_lib.base_config().mesh)
  stage1 = _params(_config(corpus.path, True, catalogue.path), corpus, mesh, seed=1)
  with checkpoint_lib.Checkpointer(str(tmp_path / 'ckpt'), save_every=1, keep=1, async_save=False) as ckpt:
    ckpt.save(5, {'step': jnp.int32(5), 'params': stage1, 'opt_state': jnp.zeros(())}, force=True)
  fresh = _params(_config(catalogue.path, False), catalogue, mesh, seed=2)
  params, lines = checkpoint_lib.init_params(str(tmp_path / 'ckpt'), fresh)

  flat1, flat2, flat0 = (dict(jax.tree_util.tree_flatten_with_path(p)[0]) for p in (stage1, params, fresh))
  assert set(flat2) == set(flat0)
  for path, value in flat2.items():
    name = jax.tree_util.keystr(path)
    if path not in flat1:  # the content-row projections: stage 1 has no items
      assert name.startswith("['items']"), name
      np.testing.assert_array_equal(value, flat0[path])
    elif value.shape == flat1[path].shape:
      np.testing.assert_array_equal(value, flat1[path])
      assert value.sharding.is_equivalent_to(flat0[path].sharding, value.ndim)
  # Added vocabulary: stage 1's tokens (<image> ... slots) come first in stage 2 and are restored; the
  # item tokens after them keep their fresh rows.
  ids1, ids2 = corpus.tokenizer().unimp_layout, catalogue.tokenizer().unimp_layout
  n1 = stage1['lm']['added_embed'].shape[0]
  assert n1 < params['lm']['added_embed'].shape[0] and ids1['base_vocab_size'] == ids2['base_vocab_size']
  np.testing.assert_array_equal(params['lm']['added_embed'][:n1], stage1['lm']['added_embed'])
  np.testing.assert_array_equal(params['lm']['added_embed'][n1:], fresh['lm']['added_embed'][n1:])
  np.testing.assert_array_equal(params['lm']['added_head'][:, :n1], stage1['lm']['added_head'])
  np.testing.assert_array_equal(params['lm']['added_head'][:, n1:], fresh['lm']['added_head'][:, n1:])
  assert any('vocabulary rows restored' in line for line in lines)
  assert any(line.startswith('freshly initialised') and 'items/' in line for line in lines)


def test_a_checkpoint_of_another_architecture_is_refused_by_name(data, tmp_path):
  catalogue, _ = data
  mesh = mesh_lib.make_mesh(config_lib.base_config().mesh)
  cfg = _config(catalogue.path, False)
  params = _params(cfg, catalogue, mesh, seed=1)
  with checkpoint_lib.Checkpointer(str(tmp_path / 'ckpt'), save_every=1, keep=1, async_save=False) as ckpt:
    ckpt.save(1, {'step': jnp.int32(1), 'params': params, 'opt_state': jnp.zeros(())}, force=True)
  wider = _config(catalogue.path, False)
  wider.model.vision.mlp_dim = 128
  refused = r'parameter vision/blocks/fc1/bias is \(2, 256\) there but \(2, 128\)'
  with pytest.raises(checkpoint_lib.CheckpointError, match=refused):
    checkpoint_lib.init_params(str(tmp_path / 'ckpt'), _params(wider, catalogue, mesh, seed=1))


def test_the_stage1_report_probes_the_run_and_the_towers_it_started_from(data):
  """Probed before any training, the run's towers are the random ones, so both tables agree exactly."""
  catalogue, corpus = data
  cfg = _config(corpus.path, True, catalogue.path)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  datasets.fit_model_to_dataset(cfg, corpus)
  graphdef, params = nnx.split(unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=cfg.seed))
  run = types.SimpleNamespace(cfg=cfg, graphdef=graphdef, params=params)
  tables = tasks.TASKS['caption'].report_tables(run, cfg.data.split, None)
  trained, random = (v for k, v in sorted(tables.items(), key=lambda kv: 'random' in kv[0]))
  assert trained == random and set(trained) == {'colour accuracy', 'colour chance', 'category accuracy',
                                                'category chance'}
  assert all('84 pictures fit, 36 held out' in title for title in tables)
  assert trained['colour accuracy'] > trained['colour chance']  # colour is a linear function of the pixels
