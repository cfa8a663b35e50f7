"""Image codes in the data (unimp_jax.vq.codes): the file ties codes to one dataset's pictures, the
`img_k` tokens land where the layout says, and generation examples answer with the target's codes."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import scipy.linalg
from PIL import Image
from flax import nnx

from unimp_jax import config as config_lib
from unimp_jax.data import datasets, formats, pipeline, splits, synthetic
from unimp_jax.data import tokenizer as tokenizer_lib
from unimp_jax.data.tokenizer import TokenIds
from unimp_jax.eval import evaluate, generate, predictor as predictor_lib
from unimp_jax.model import unimp, vision
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.tasks import generation
from unimp_jax.vq import codes as codes_lib
from unimp_jax.vq import judge as judge_lib
from unimp_jax.vq import model as vq_model
from unimp_jax.vq import train as vq_train

CODEBOOK = 16


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('data') / 'fashion')
  synthetic.build(path, num_items=160, num_users=40, seed=3, image_size=16, bpe_vocab=300)
  return formats.UnifiedDataset(path)


@pytest.fixture(scope='module')
def codes_file(dataset, tmp_path_factory):
  """Codes from an (untrained) image tokenizer, as `python -m unimp_jax.vq.train` writes them."""
  cfg = config_lib.load('configs/vq.py')
  cfg.model.update(channels=8, downsample=4, codebook_size=CODEBOOK, code_dim=8)
  graphdef, params = vq_model.init(cfg.model, 0)
  codes, _ = vq_train.reconstruct(graphdef, params, dataset.images(np.arange(len(dataset.items))))
  path = str(tmp_path_factory.mktemp('vq') / codes_lib.FILE)
  codes_lib.write(path, codes, dataset, CODEBOOK)
  return path, codes.reshape(len(codes), -1)


def _config(dataset, codes_path='', generation=0.0):
  cfg = config_lib.base_config()
  cfg.data.path, cfg.data.image_codes = dataset.path, codes_path
  cfg.model.vision.image_size = dataset.image_size
  cfg.data.tasks.generation = generation
  cfg.data.seq_len = 256
  return cfg


def test_codes_round_trip_and_items_without_a_picture_have_none(dataset, codes_file, tmp_path):
  path, expected = codes_file
  loaded = codes_lib.load(path, dataset)
  np.testing.assert_array_equal(loaded.codes, expected)
  assert loaded.codebook_size == CODEBOOK and loaded.grid == (4, 4) and loaded.length == 16
  # An item without a picture gets -1 codes, whatever the tokenizer made of its empty slot.
  partial = formats.UnifiedDataset(dataset.path)
  partial.items[5] = dataclasses.replace(partial.items[5], has_image=False)
  other = str(tmp_path / 'partial.safetensors')
  codes_lib.write(other, expected.reshape(-1, 4, 4), partial, CODEBOOK)
  codes = codes_lib.load(other, partial).codes
  assert (codes[5] == -1).all() and (np.delete(codes, 5, 0) == np.delete(expected, 5, 0)).all()
  with pytest.raises(ValueError, match='codes for items without a picture'):
    codes_lib.load(path, partial)  # the first file has codes for item 5


def test_codes_made_from_other_pictures_are_refused(dataset, codes_file, tmp_path):
  copy = str(tmp_path / 'copy')
  shutil.copytree(dataset.path, copy)
  manifest_path = os.path.join(copy, 'manifest.json')
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest['checksums']['images/c/0/0/0/0'] = '0' * 64  # another picture 0
  with open(manifest_path, 'w') as f:
    json.dump(manifest, f)
  with pytest.raises(ValueError, match=r'config\.data\.image_codes: .* other pictures'):
    codes_lib.load(codes_file[0], formats.UnifiedDataset(copy))


def test_bad_codes_files_name_the_file_and_the_key(dataset, tmp_path):
  with pytest.raises(FileNotFoundError, match=r'config\.data\.image_codes: .*missing'):
    codes_lib.load(str(tmp_path / 'missing'), dataset)
  plain = str(tmp_path / 'plain.safetensors')
  safetensors.numpy.save_file({'codes': np.zeros((len(dataset.items), 16), np.int32)}, plain)
  with pytest.raises(ValueError, match='not an image-codes file'):
    codes_lib.load(plain, dataset)
  out_of_range = str(tmp_path / 'range.safetensors')
  codes_lib.write(out_of_range, np.full((len(dataset.items), 4, 4), CODEBOOK, np.int32), dataset, CODEBOOK)
  with pytest.raises(ValueError, match=f'outside the codebook \\[0, {CODEBOOK}\\)'):
    codes_lib.load(out_of_range, dataset)


def test_image_code_tokens_come_after_the_items_and_before_semantic_ids(dataset):
  tokenizer = tokenizer_lib.with_image_code_tokens(dataset.tokenizer(), CODEBOOK)
  tokenizer = tokenizer_lib.with_semantic_tokens(tokenizer, (4, 3))
  ids = TokenIds(tokenizer.unimp_layout)
  assert tokenizer.convert_ids_to_tokens([ids.item(len(dataset.items) - 1), ids.image_code(0),
                                          ids.image_code(CODEBOOK - 1)]) == [f'item_{len(dataset.items) - 1}',
                                                                             'img_0', f'img_{CODEBOOK - 1}']
  assert tokenizer.convert_ids_to_tokens(list(ids.semantic([0, 2]))) == ['sid_0_0', 'sid_1_2']
  assert ids.added_range[1] == len(tokenizer)
  with pytest.raises(ValueError, match='already has image-code or semantic'):
    tokenizer_lib.with_image_code_tokens(tokenizer, CODEBOOK)


def test_generation_needs_image_codes():
  cfg = config_lib.base_config()
  cfg.data.tasks.generation = 1.0
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.image_codes'):
    config_lib.validate(cfg, 8)


def test_generation_examples_answer_with_the_targets_codes(dataset, codes_file):
  path, codes = codes_file
  plain = _config(dataset)
  datasets.fit_model_to_dataset(plain, dataset)
  cfg = _config(dataset, path, generation=1.0)
  config_lib.validate(cfg, 8)
  datasets.fit_model_to_dataset(cfg, dataset)
  builder = datasets.make_builder(cfg, dataset)
  assert cfg.model.lm.added_vocab_size == plain.model.lm.added_vocab_size + CODEBOOK  # the model gets img_k rows
  ids, lo, hi = builder.ids, builder.ids.image_code(0), builder.ids.image_code(CODEBOOK)
  user = dataset.user(0)
  target = len(user.interactions) - 1
  ex = builder.build('generation', user, target, with_answer=True, rng=np.random.default_rng(0))
  answer = ex.tokens[ex.prompt_length:ex.prompt_length + codes.shape[1] + 1]
  np.testing.assert_array_equal(answer[:-1], lo + codes[user.interactions[target].item])
  assert answer[-1] == builder.eos and ex.answer_mask[ex.prompt_length:ex.prompt_length + len(answer)].all()
  # Each history chunk shown answers with its own item's codes, right after its `<answer>`.
  starts = np.flatnonzero(ex.tokens[:ex.prompt_length] == ids.answer)[:-1]
  assert len(starts) >= 1
  for start in starts:
    span = ex.tokens[start + 1:start + 1 + codes.shape[1]]
    assert ((span >= lo) & (span < hi)).all() and ex.tokens[start + 1 + codes.shape[1]] == ids.end_of_chunk
  shown = [i.item for i in user.interactions[:target]][-len(starts):]
  for start, item in zip(starts, shown):
    np.testing.assert_array_equal(ex.tokens[start + 1:start + 1 + codes.shape[1]], lo + codes[item])
  # The Grain pipeline's batches carry generation examples when the mixture asks for them.
  cfg.data.tasks.update(recommendation=0.0, search=0.0, preference=0.0, selection=0.0)
  batch = next(iter(pipeline.make_dataset(builder, cfg.data, seed=0)))
  supervised = batch['tokens'][batch['answer_mask']]
  assert (((supervised >= lo) & (supervised < hi)) | np.isin(supervised, [builder.eos, ids.end_of_chunk])).all()


@pytest.fixture(scope='module')
def generator(dataset, codes_file, tmp_path_factory):
  """A random UniMP over the dataset with image codes (its vocabulary holds img_k), and an image tokenizer
  trained for two steps in the directory the codes file is in, as `python -m unimp_jax.vq.train` leaves it."""
  vq_dir = str(tmp_path_factory.mktemp('vq-run'))
  vq_cfg = config_lib.load('configs/vq.py')
  vq_cfg.data.path = dataset.path
  vq_cfg.model.update(channels=8, downsample=4, codebook_size=CODEBOOK, code_dim=8)
  vq_cfg.train.update(steps=2, batch_size=8)
  vq_cfg.checkpoint.async_save = False
  graphdef, params, images, _, _ = vq_train.train(vq_cfg, vq_dir)
  path = os.path.join(vq_dir, codes_lib.FILE)
  codes_lib.write(path, vq_train.reconstruct(graphdef, params, images)[0], dataset, CODEBOOK)
  cfg = _config(dataset, path, generation=1.0)
  datasets.fit_model_to_dataset(cfg, dataset)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  graphdef, state = nnx.split(unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=0))
  return cfg, graphdef, nnx.to_pure_dict(state)


def _generation_prompts(builder, dataset, users=(0, 1, 2)):
  examples = [builder.build('generation', dataset.user(u), len(dataset.user(u).interactions) - 1,
                            with_answer=False) for u in users]
  width = max(e.prompt_length for e in examples)
  tokens = np.stack([e.tokens[:width] for e in examples])
  images = vision.normalize(np.stack([pipeline.gather_images(dataset, e.image_items) for e in examples]))
  return tokens, images, np.asarray([e.prompt_length for e in examples], np.int32)


@pytest.mark.parametrize('decoding', generation.DECODINGS)
def test_generated_codes_are_whole_pictures_of_codes_only(dataset, generator, decoding):
  cfg, graphdef, params = generator
  datasets.fit_model_to_dataset(cfg, dataset)
  builder = datasets.make_builder(cfg, dataset)
  tokens, images, lengths = _generation_prompts(builder, dataset)
  for seed in range(3):  # hot sampling from a random model: unconstrained, most tokens would not be codes
    codes = generation.generate_codes(graphdef, params, builder, tokens, images, lengths, decoding=decoding,
                                      rng=jax.random.key(seed), temperature=5.0, top_p=0.99, num_beams=3)
    assert codes.shape == (3, 16) and codes.dtype == np.int32
    assert ((codes >= 0) & (codes < CODEBOOK)).all()
  free = np.asarray(generate.sample(graphdef, params, tokens, images, lengths, jax.random.key(0), max_new=16,
                                    pad_id=builder.pad, eos_id=builder.eos, temperature=5.0))
  lo = builder.ids.image_code(0)
  assert not ((free >= lo) & (free < lo + CODEBOOK)).all()  # what the constraint prevents


def test_predictor_draws_the_generated_codes_with_the_image_tokenizer(dataset, generator):
  cfg, graphdef, params = generator
  predictor = predictor_lib.Predictor(cfg, graphdef, params, dataset, workdir='')
  picture = predictor.generate([3, 7, 11], 'blue shirt')
  assert picture.shape == (16, 16, 3) and picture.dtype == np.uint8
  # The same picture as drawing the greedy codes directly with the tokenizer in the codes file's folder.
  builder, _, tokens, images, lengths = predictor._example('generation', [3, 7, 11],
                                                            formats.Interaction(item=0, query='blue shirt'))
  codes = generation.generate_codes(graphdef, predictor.params, builder, tokens, images, lengths)
  vq_graphdef, vq_params, _ = vq_train.load(os.path.dirname(cfg.data.image_codes))
  np.testing.assert_array_equal(picture, vq_train.pictures_from_codes(vq_graphdef, vq_params,
                                                                      codes.reshape(1, 4, 4))[0])
  with pytest.raises(ValueError, match='a new item has no image codes'):
    predictor.generate([3, predictor_lib.NewItem('', 'Linen shirt', 'shirt')], 'blue shirt')


def test_frechet_distance_matches_the_fid_formula_with_scipy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(300, 5)), rng.normal(0.5, 2.0, size=(200, 5)) @ rng.normal(size=(5, 5))
  mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
  assert judge_lib.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
  assert judge_lib.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_the_judge_tells_held_out_colours_and_scores_pictures_consistently(dataset, generator):
  judge = generation._judge(dataset.path)
  assert judge.labels['colour'] == list(dataset.manifest['extra']['colours'])
  assert judge.accuracy['colour'] > 0.5 > 1 / 8  # cold items, never trained on
  cfg, graphdef, params = generator
  datasets.fit_model_to_dataset(cfg, dataset)
  builder = datasets.make_builder(cfg, dataset)
  users, targets = np.asarray([0, 1, 2, 3]), np.asarray([len(dataset.user(u).interactions) - 1 for u in range(4)])
  items = generation.target_items(dataset, users, targets)
  real = dataset.images(items)
  scores = generation.picture_scores(builder, users, targets, real[::-1])
  seen = judge.predict(real[::-1])
  labels = judge_lib.item_labels(dataset)
  assert scores["target's colour shown"] == np.mean(seen['colour'] == labels['colour'][1][items])
  assert scores['category shown'] == np.mean(seen['category'] == labels['category'][1][items])
  squared = ((real.astype(np.float64) - real[::-1]) / 255) ** 2
  assert scores['PSNR (dB, of the mean squared error)'] == pytest.approx(-10 * np.log10(squared.mean()), rel=1e-5)
  assert scores['users'] == 4  # the same pictures in another order: the same distribution
  assert scores['Fréchet distance (judge features)'] == pytest.approx(0.0, abs=1e-3)
  assert generation.picture_scores(builder, users, targets, real)['SSIM'] == pytest.approx(1.0)


def test_generation_is_evaluated_with_its_references(dataset, generator):
  cfg, graphdef, params = generator
  predictor = predictor_lib.Predictor(cfg, graphdef, params, dataset, workdir='')
  rows = evaluate.evaluate_rows(graphdef, predictor.params, predictor.builder, split=cfg.data.split,
                                batch_size=4, tasks_to_run=('generation',))['generation']
  assert rows['codes'].shape == (len(rows['user']), 16)
  model = generation.TASK.summarise(rows, predictor.builder)
  tables = generation.TASK.report_tables(predictor, cfg.data.split, rows)
  ceiling = tables['generation reference: tokenizer reconstruction of the target (ceiling)']
  assert set(model) == set(ceiling) and model['users'] == ceiling['users'] == len(rows['user'])
  # The ceiling draws the target's own codes: the same pictures the decoder makes of them.
  items = generation.target_items(dataset, rows['user'], rows['target'])
  np.testing.assert_array_equal(generation.pictures(predictor.builder, predictor.builder.image_codes[items]),
                                generation.pictures(predictor.builder, codes_lib.load(cfg.data.image_codes,
                                                                                      dataset).codes[items]))
  assert tables['generation judge (held-out item pictures)']['colour chance'] == 1 / 8


def test_generation_gallery_shows_history_generated_and_target(dataset, generator, tmp_path):
  cfg, graphdef, params = generator
  predictor = predictor_lib.Predictor(cfg, graphdef, params, dataset, workdir='')
  lines = generation.TASK.gallery(predictor, cfg.data.split, str(tmp_path), 2)
  assert '![generation](generation.png)' in lines and lines[-1].count('\n| test user') == 2
  grid = np.asarray(Image.open(tmp_path / 'generation.png'))
  side = dataset.image_size * 4  # drawn 4x
  assert grid.shape[0] == 2 * side and grid.shape[1] % side == 0
  # The last picture of the first row is the real target, the one before it the generated picture.
  users = splits.split_users(dataset, cfg.data.split, 'test')
  user = dataset.user(int(users[0]))
  target = dataset.images([user.interactions[-1].item])[0]
  np.testing.assert_array_equal(grid[:side:4, -side::4], target)
  history = [i.item for i in user.interactions[:-1]]
  np.testing.assert_array_equal(grid[:side:4, -2 * side:-side:4],
                                predictor.generate(history, predictor.builder.query_text(user.interactions[-1])))
