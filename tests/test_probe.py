"""The linear probe: its logistic regression against scipy's L-BFGS on the same objective, its behaviour
on separable and on pure-noise features, and an end-to-end run on random tiny towers."""

import os

import numpy as np
import pytest
import scipy.optimize
from flax import nnx

from unimp_jax import probe as probe_cli
from unimp_jax.data import formats, synthetic
from unimp_jax.eval import probe
from unimp_jax.model import vision

TINY = os.path.join(os.path.dirname(__file__), '..', 'configs', 'tiny.py')


def _reference_fit(x, y, num_classes, l2):
  """scipy L-BFGS on mean cross-entropy + l2/2 |W|^2 (bias not penalised), written independently."""
  n, d = x.shape
  onehot = np.eye(num_classes)[y]

  def objective(theta):
    w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
    z = x @ w + b
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(n), y])) + l2 / 2 * np.sum(w * w)
    return loss, np.concatenate([(x.T @ (p - onehot) / n + l2 * w).ravel(), (p - onehot).mean(0)])

  theta = scipy.optimize.minimize(objective, np.zeros((d + 1) * num_classes), jac=True, method='L-BFGS-B',
                                  options=dict(maxiter=20_000, ftol=1e-15, gtol=1e-10)).x
  return theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]


@pytest.mark.parametrize('l2', [1e-2, 1e-3])
def test_logistic_regression_matches_scipy(l2):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 12))
  y = (x @ rng.normal(size=(12, 5)) + rng.gumbel(size=(400, 5))).argmax(1)
  w, b = probe.fit_logistic(x, y, 5, l2=l2)
  w_ref, b_ref = _reference_fit(x, y, 5, l2)
  softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
  np.testing.assert_allclose(softmax(x @ w + b), softmax(x @ w_ref + b_ref), atol=1e-5)


def test_separable_features_are_read_perfectly_and_noise_is_not():
  rng = np.random.default_rng(1)
  n, classes = 1000, 8
  y = rng.integers(classes, size=n)
  fit, held_out = np.arange(700), np.arange(700, n)
  centres = rng.normal(size=(classes, 16)) * 3
  separable = centres[y] + rng.normal(size=(n, 16)) * 0.1
  accuracy, chance = probe.linear_probe(separable, y, classes, fit, held_out)
  assert accuracy == 1.0 and chance == np.bincount(y[held_out]).max() / 300
  noise = rng.normal(size=(n, 16))
  accuracy, chance = probe.linear_probe(noise, y, classes, fit, held_out)
  assert abs(accuracy - 1 / classes) < 0.06 and accuracy < chance + 0.04


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('data') / 'fashion')
  synthetic.build(path, num_items=160, num_users=20, seed=2, image_size=32, bpe_vocab=400)
  return formats.UnifiedDataset(path)


@pytest.fixture(scope='module')
def towers(dataset):
  """Freshly initialised tiny towers exactly as the command line makes them (sharded over 8 devices)."""
  graphdef, params, opened = probe_cli._random_towers(TINY, dataset.path)
  assert opened.path == dataset.path
  return graphdef, params


def test_features_are_the_mean_resampler_latents(towers, dataset):
  graphdef, params = towers
  features = probe.picture_features(graphdef, params, dataset, [3, 7, 150])
  model = nnx.merge(graphdef, params)
  latents = model.encode_images(vision.normalize(dataset.images([3, 7, 150]))[:, None])
  np.testing.assert_allclose(features, np.asarray(latents).mean(1), rtol=1e-5, atol=1e-5)


def test_probe_runs_on_random_towers_with_the_right_chance(towers, dataset):
  graphdef, params = towers
  result = probe.probe(graphdef, params, dataset, seed=1)
  held_out = np.asarray(result['held_out_items'])
  assert (result['items_fit'], result['items_held_out'], len(held_out)) == (112, 48, 48)
  assert len(set(held_out)) == 48 and held_out.max() < 160
  colour = np.asarray(dataset.manifest['extra']['item_colour'])[held_out]
  _, counts = np.unique([dataset.items[i].category for i in held_out], return_counts=True)
  assert result['colour_chance'] == pytest.approx(np.bincount(colour).max() / 48)
  assert result['category_chance'] == pytest.approx(counts.max() / 48)
  assert (result['colour_classes'], result['category_classes'], result['feature_dim']) == (8, 10, 64)
  for name in ('colour', 'category'):
    assert 0 <= result[f'{name}_accuracy'] <= 1
  assert probe.probe(graphdef, params, dataset, seed=1) == result  # deterministic


def test_command_line_prints_the_table(towers, dataset, monkeypatch, capsys):
  monkeypatch.setattr(probe_cli, '_random_towers', lambda config, data: (*towers, formats.UnifiedDataset(data)))
  result = probe_cli.main(['--random', '--config', TINY, '--data', dataset.path])
  printed = capsys.readouterr().out
  assert f'| colour | {result["colour_accuracy"]:.3f} | {result["colour_chance"]:.3f} | 8 |' in printed
  assert f'| category | {result["category_accuracy"]:.3f} | {result["category_chance"]:.3f} | 10 |' in printed
  assert '112 items fit, 48 held out' in printed
