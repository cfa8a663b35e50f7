"""The image tokenizer (unimp_jax/vq): shapes and ranges, overfitting, dead-code restarts, exact resume,
and its scores against numpy."""

import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from unimp_jax import config as config_lib
from unimp_jax.data import formats, synthetic
from unimp_jax.vq import model as model_lib
from unimp_jax.vq import train as vq_train


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('data') / 'fashion')
  synthetic.build(path, num_items=40, num_users=10, seed=2, image_size=16, bpe_vocab=300)
  return formats.UnifiedDataset(path)


def _config(path='', **train):
  cfg = config_lib.load('configs/vq.py')
  cfg.data.path = path
  cfg.model.update(channels=8, downsample=4, codebook_size=16, code_dim=8)
  cfg.train.update(dict(batch_size=8, log_every=1, **train))
  cfg.checkpoint.update(every=2, async_save=False)
  return cfg


def test_codes_are_in_range_and_pictures_come_back_in_shape(dataset):
  cfg = _config()
  graphdef, params = model_lib.init(cfg.model, 0)
  codes, out = vq_train.reconstruct(graphdef, params, dataset.images(np.arange(5)))
  assert codes.shape == (5, 4, 4) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < 16
  assert out.shape == (5, 16, 16, 3) and out.min() >= 0 and out.max() <= 1


def test_a_tiny_tokenizer_overfits_a_few_pictures(dataset):
  cfg = _config(learning_rate=3e-3, restart_every=25)
  cfg.model.update(channels=16, codebook_size=32)
  images = dataset.images(np.arange(4))
  graphdef, params = model_lib.init(cfg.model, 0)
  tx = optax.adam(cfg.train.learning_rate)
  state = {'params': params, 'opt_state': tx.init(params), 'usage': jnp.full(32, 1 / 32), 'step': jnp.int32(0)}
  step = jax.jit(vq_train.make_step(graphdef, tx, cfg))
  before = vq_train.scores(graphdef, state['params'], images, 32)['PSNR (dB)']
  for i in range(150):
    state, _ = step(state, images, jax.random.key(i))
  after = vq_train.scores(graphdef, state['params'], images, 32)
  assert before < 15 and after['PSNR (dB)'] > 24, (before, after)


def test_dead_codes_move_onto_encoder_outputs_of_the_batch(dataset):
  cfg = _config(restart_every=1)
  images = dataset.images(np.arange(8))
  graphdef, params = model_lib.init(cfg.model, 0)
  tx = optax.sgd(0.0)  # no gradient step: only the restarts move the codebook
  usage = jnp.full(16, 1 / 16).at[:5].set(0.0)  # codes 0-4 unused for a long time
  state = {'params': params, 'opt_state': tx.init(params), 'usage': usage, 'step': jnp.int32(0)}
  cfg.train.usage_decay = 0.999  # one batch cannot revive them
  new, metrics = jax.jit(vq_train.make_step(graphdef, tx, cfg))(state, images, jax.random.key(0))
  z = np.asarray(nnx.merge(graphdef, params).embed(images)).reshape(-1, 8)
  book, old = np.asarray(new['params']['codebook']), np.asarray(params['codebook'])
  dead = np.asarray(usage * 0.999 + 0.001 * np.bincount(np.asarray(nnx.merge(graphdef, params).nearest(z)),
                                                         minlength=16) / len(z) < 0.03 / 16)
  assert dead[:5].all() and int(metrics['restarted_codes']) == dead.sum()
  for code in np.flatnonzero(dead):
    assert np.abs(z - book[code]).max(1).min() < 1e-5  # now one of the batch's encoder outputs
  np.testing.assert_array_equal(book[~dead], old[~dead])
  np.testing.assert_allclose(np.asarray(new['usage'])[dead], 1 / 16)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(dataset, tmp_path):
  """4 steps saved at 2 and 4; with step 4's checkpoint gone, the rerun resumes from 2 and ends equal."""
  _, straight, *_ = vq_train.train(_config(dataset.path, steps=4), str(tmp_path))
  shutil.rmtree(tmp_path / 'checkpoints' / '4')
  _, resumed, *_ = vq_train.train(_config(dataset.path, steps=4), str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_scores_match_numpy(dataset):
  cfg = _config()
  graphdef, params = model_lib.init(cfg.model, 0)
  images = dataset.images(np.arange(6))
  got = vq_train.scores(graphdef, params, images, 16)
  codes, out = vq_train.reconstruct(graphdef, params, images)
  mse = ((images / 255.0 - out) ** 2).mean((1, 2, 3))
  assert got['PSNR (dB)'] == pytest.approx(np.mean(10 * np.log10(1.0 / mse)), rel=1e-4)
  share = np.bincount(codes.ravel(), minlength=16) / codes.size
  used = share[share > 0]
  assert got['codebook perplexity'] == pytest.approx(np.exp(-(used * np.log(used)).sum()), rel=1e-6)
  assert got['codes used'] == len(used) and 0 < got['SSIM'] < 1


@pytest.mark.parametrize('key,value', [('model.downsample', 3), ('model.downsample', 32), ('train.batch_size', 3),
                                       ('model.codebook_size', 1)])
def test_bad_configs_name_the_key(dataset, key, value):
  cfg = _config(dataset.path)
  section, name = key.split('.')
  cfg[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=f'config.{key}'):
    vq_train.validate(cfg, 16, 8)
