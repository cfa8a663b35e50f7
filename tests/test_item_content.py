"""Item content variants (image+text, text only, ids only) and short training runs of each new switch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import support
from unimp_jax import config as config_lib, tasks
from unimp_jax.data import datasets, formats, pipeline, prompts, semantic_ids, synthetic
from unimp_jax.train import report


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('data') / 'fashion')
  synthetic.build(path, num_items=80, num_users=40, seed=4, image_size=32, bpe_vocab=600)
  return formats.UnifiedDataset(path)


INSTRUCTION_WORDS = {'recommendation': 'next item recommended', 'search': 'Query:',
                     'preference': 'rating and explanation', 'selection': 'Select from:'}


def _builder(dataset, content, **data):
  cfg = config_lib.base_config()
  cfg.data.update(dict(path=dataset.path, item_content=content, seq_len=320, num_images=8, history=4), **data)
  datasets.fit_model_to_dataset(cfg, dataset)
  return cfg, datasets.make_builder(cfg, dataset)


def _user(dataset):
  return next(u for u in map(dataset.user, range(dataset.num_users)) if u.selections and len(u.interactions) > 5)


def _contains(sequence, part) -> bool:
  sequence, part = list(sequence), list(part)
  return any(sequence[i:i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


@pytest.mark.parametrize('task', ['recommendation', 'search', 'preference', 'selection'])
def test_text_only_prompts_have_no_pictures(dataset, task):
  _, full = _builder(dataset, 'image+text')
  _, text = _builder(dataset, 'text')
  assert full.uses_images and not text.uses_images
  user = _user(dataset)
  target = len(user.interactions) - 1
  ex = text.build(task, user, target, with_answer=True, rng=np.random.default_rng(0))
  with_pictures = full.build(task, user, target, with_answer=True, rng=np.random.default_rng(0))
  assert not (ex.tokens == text.ids.image).any() and (ex.image_items == prompts.IGNORE).all()
  # The same prompt as UniMP's with every `<image>` removed (same history: no image-slot limit hit here).
  np.testing.assert_array_equal(ex.tokens[ex.tokens != text.pad],
                                with_pictures.tokens[(with_pictures.tokens != full.pad)
                                                     & (with_pictures.tokens != full.ids.image)])
  assert text.tokenizer.decode(text._item_body[user.interactions[target - 1].item]) in \
      text.tokenizer.decode(ex.tokens)


def test_id_only_prompts_are_the_id_sequence(dataset):
  _, ids_only = _builder(dataset, 'ids')
  ids, tok = ids_only.ids, ids_only.tokenizer
  user = _user(dataset)
  target = len(user.interactions) - 1
  history = [i.item for i in user.interactions[:target]][-4:]
  rec = ids_only.build('recommendation', user, target, with_answer=True)
  expected = [tok for item in history for tok in (ids.answer, ids.item(item), ids.end_of_chunk)]
  instruction = ids_only._instruction(tasks.TASKS['recommendation'].instruction, user.interactions[target])
  np.testing.assert_array_equal(rec.tokens[:rec.prompt_length], [*expected, *instruction, ids.answer])
  assert rec.tokens[rec.prompt_length] == ids.item(user.interactions[target].item)
  for task in ('recommendation', 'search', 'preference', 'selection'):
    ex = ids_only.build(task, user, target, with_answer=True, rng=np.random.default_rng(0))
    text = tok.decode(ex.tokens[:ex.prompt_length])
    assert 'Category' not in text and 'Title' not in text and 'Price' not in text, text
    assert not (ex.tokens == ids.image).any()
    assert INSTRUCTION_WORDS[task] in text
  # Preference and selection: the item's id tokens stand in for the target item's chunk.
  pref = ids_only.build('preference', user, target, with_answer=True)
  assert _contains(pref.tokens[:pref.prompt_length], [ids.item(user.interactions[target].item), ids.end_of_chunk])
  sel = ids_only.build('selection', user, target, with_answer=True, rng=np.random.default_rng(0))
  selection = user.selections[target % len(user.selections)]
  for candidate in selection.candidates:
    assert _contains(sel.tokens, [*ids_only.text(' Selection'), ids.item(candidate), ids.end_of_chunk])


def test_text_only_batches_carry_no_images_and_the_model_runs_without_them(dataset):
  import jax
  from flax import nnx
  from unimp_jax.model import unimp
  from unimp_jax.sharding import mesh as mesh_lib
  from unimp_jax.train import step as step_lib
  cfg, builder = _builder(dataset, 'text', batch_size=2, seq_len=128)
  batch = next(iter(pipeline.make_dataset(builder, cfg.data, seed=0)))
  assert 'images' not in batch and (batch['image_items'] == -1).all()
  inputs = step_lib.step_inputs(batch)
  assert 'images' not in inputs
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  graphdef, params = nnx.split(unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=0))
  params = nnx.to_pure_dict(params)
  grads, sums = jax.jit(step_lib.accumulated_gradients(graphdef, cfg.train, pad_id=builder.pad))(params, inputs)
  assert sums['tokens'] > 0 and np.isfinite(sums['objective'])
  # images=None: the vision tower, the resampler and the cross-attention blocks are not in the graph.
  for tower in (grads['vision'], grads['connector'], grads['lm']['groups']['cross']):
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(tower))
  assert np.asarray(grads['lm']['embed']).any()


TRAIN = """
import json, sys
from unimp_jax import config
from unimp_jax.train import trainer
workdir, data, steps, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cfg = config.load('configs/tiny.py', (f'data.path={data}', f'train.steps={steps}', 'checkpoint.every=100',
                                      'checkpoint.async_save=False', 'train.log_every=1', *overrides))
run = trainer.train(cfg, workdir)
print('RESULT', json.dumps(dict(last_step=run.last_step, item_tokens=list(run.builder.item_tokens.shape),
                                uses_images=run.builder.uses_images, added=cfg.model.lm.added_vocab_size)))
"""


SEMANTIC = ('model.item_embeddings=learned', 'data.item_ids=semantic', 'data.semantic.levels=2', 'data.semantic.codebook=8',
            'data.semantic.max_collisions=16', 'train.next_item_weight=0.0')  # the next-item loss needs atomic ids


@pytest.fixture(scope='module')
def trained(dataset, tmp_path_factory):
  """Two 2-step training runs, semantic ids and text only, in processes side by side (both mostly compile)."""
  env = support.subprocess_env()
  runs = {name: (tmp_path_factory.mktemp(name), overrides) for name, overrides in
          (('semantic', SEMANTIC), ('text', ('data.item_content=text',)))}
  procs = {name: subprocess.Popen([sys.executable, '-c', TRAIN, str(workdir), dataset.path, '2', *overrides],
                                  env=env, cwd=os.path.dirname(os.path.dirname(__file__)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for name, (workdir, overrides) in runs.items()}
  results = {}
  for name, proc in procs.items():
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    line = next(line for line in out.splitlines() if line.startswith('RESULT '))
    results[name] = (str(runs[name][0]), json.loads(line[len('RESULT '):]))
  return results


def test_training_with_semantic_ids(dataset, trained):
  tmp_path, out = trained['semantic']
  assert out['last_step'] == 2 and out['item_tokens'] == [80, 3] and out['uses_images']
  losses = [r['loss'] for r in report.read_metrics(os.path.join(tmp_path, 'metrics.jsonl'))]
  assert len(losses) == 2 and all(np.isfinite(losses))
  # The ids came from the initial towers and were saved; evaluation (no parameters given) reloads them.
  with open(os.path.join(tmp_path, semantic_ids.CODES_FILE)) as f:
    saved = json.load(f)
  assert saved['source'] == 'towers'
  cfg = config_lib.load('configs/tiny.py', (f'data.path={dataset.path}', *SEMANTIC))
  datasets.fit_model_to_dataset(cfg, dataset)
  builder = datasets.make_builder(cfg, dataset, str(tmp_path))
  np.testing.assert_array_equal(builder.item_codes, saved['codes'])
  assert cfg.model.lm.added_vocab_size == out['added']


def test_training_text_only(trained):
  tmp_path, out = trained['text']
  assert out['last_step'] == 2 and out['item_tokens'] == [80, 1] and not out['uses_images']
  losses = [r['loss'] for r in report.read_metrics(os.path.join(tmp_path, 'metrics.jsonl'))]
  assert len(losses) == 2 and all(np.isfinite(losses))
