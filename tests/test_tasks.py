"""Task prompts, loss masks, and the Grain pipeline's determinism, resume and process sharding."""

import os

import numpy as np
import pytest

from unimp_jax import config as config_lib
from unimp_jax import tasks
from unimp_jax.data import formats, pipeline, prompts, splits, synthetic
from unimp_jax.data.tokenizer import TokenIds
from unimp_jax.tasks import selection


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('data') / 'fashion')
  synthetic.build(path, num_items=150, num_users=60, seed=1, image_size=16, bpe_vocab=500)
  return formats.UnifiedDataset(path)


@pytest.fixture(scope='module')
def builder(dataset):
  return prompts.TaskBuilder(dataset, dataset.tokenizer(), seq_len=160, num_images=6, history=4)


def _reference_mask(tokens, ids, pad):
  """The loss-mask rule written as the obvious per-token loop, to check the array version against."""
  mask, inside = [], False
  for tok in tokens:
    mask.append(inside and tok != pad)
    if tok == ids.answer:
      inside = True
    elif tok == ids.end_of_chunk:
      inside = False
  return np.asarray(mask)


@pytest.mark.parametrize('task', ['recommendation', 'search', 'preference', 'selection'])
def test_prompts_and_loss_masks(builder, dataset, task):
  tok, ids = builder.tokenizer, builder.ids
  user = next(u for u in map(dataset.user, range(dataset.num_users)) if u.selections)
  target = len(user.interactions) - 1
  train = builder.build(task, user, target, with_answer=True, rng=np.random.default_rng(0))
  evaluation = builder.build(task, user, target, with_answer=False, rng=np.random.default_rng(0))
  # Same prompt in training and evaluation; training only appends the answer.
  np.testing.assert_array_equal(train.tokens[:train.prompt_length], evaluation.tokens[:evaluation.prompt_length])
  assert evaluation.tokens[evaluation.prompt_length] == tok.pad_token_id
  np.testing.assert_array_equal(train.answer_mask, _reference_mask(train.tokens, ids, tok.pad_token_id))
  supervised = train.tokens[train.answer_mask]
  assert ids.answer not in supervised and ids.image not in supervised and tok.pad_token_id not in supervised
  final = train.tokens[train.prompt_length:train.answer_mask.nonzero()[0].max() + 1]
  assert train.answer_mask[train.prompt_length:train.prompt_length + len(final)].all()
  assert final[-1] == tok.eos_token_id
  # One image slot per `<image>`, in order; the rest empty.
  shown = train.image_items[train.image_items >= 0]
  assert (train.tokens == ids.image).sum() == len(shown)
  target_item = user.interactions[target].item
  if task in ('recommendation', 'search'):
    assert list(final[:-1]) == [ids.item(target_item)] and train.target[0] == target_item
    history = [i.item for i in user.interactions[:target]][-len(shown):]
    assert list(shown) == history
  if task == 'search':
    assert user.interactions[target].query in tok.decode(train.tokens[:train.prompt_length])
  if task == 'preference':
    assert final[0] == ids.rating(user.interactions[target].rating) and shown[-1] == target_item
  if task == 'selection':
    sel = user.selections[target % len(user.selections)]
    assert list(shown[-3:]) == list(sel.candidates)
    assert list(final[:-1]) == [ids.item(c) for c in sel.candidates if c in sel.positives]
    # Evaluation reads the candidates back from the prompt: each one's id, written after `Selection`.
    np.testing.assert_array_equal(selection.candidate_ids(builder, evaluation.tokens[:evaluation.prompt_length]),
                                  builder.item_tokens[list(sel.candidates)])


# generation needs image codes in the builder: tests/test_image_codes.py builds and scores it
@pytest.mark.parametrize('task', [t for t in tasks.EVALUATED if t != 'generation'])
def test_every_history_chunk_end_is_labelled_with_the_next_purchase(builder, dataset, task):
  """`Example.next_items` (train.next_item_weight): the end of each history chunk kept in the prompt,
  labelled with the id token of the item bought after it, the last one with the target's; nothing else."""
  ids = builder.ids
  for u in range(12):
    user = dataset.user(u)
    target = len(user.interactions) - 1 - u % 2
    ex = builder.build(task, user, target, with_answer=True, rng=np.random.default_rng(u))
    ends = np.flatnonzero(ex.next_items != prompts.IGNORE)
    assert (ex.tokens[ends] == ids.end_of_chunk).all() and (ends < ex.prompt_length).all()
    tail_chunks = {'preference': 1, 'selection': synthetic.NUM_SLOTS}.get(task, 0)  # the rated item; candidates
    assert len(ends) == (ex.tokens[:ex.prompt_length] == ids.end_of_chunk).sum() - tail_chunks >= 1
    # The chunk ends are the history's, in order: each one is the end of the chunk of interaction k.
    bought = [i.item for i in user.interactions[target - len(ends):target + 1]]
    np.testing.assert_array_equal(ex.next_items[ends], [ids.item(i) for i in bought[1:]])
    if task in ('recommendation', 'search'):  # their chunks end `<answer> item_k <|endofchunk|>`
      np.testing.assert_array_equal(ex.tokens[ends - 1], [ids.item(i) for i in bought[:-1]])


def test_selection_without_stored_questions_asks_for_the_true_next_item(builder, dataset):
  user = formats.User('u', dataset.user(0).interactions)  # no selection questions
  ex = builder.build('selection', user, 3, with_answer=True, rng=np.random.default_rng(0))
  candidates = list(ex.image_items[ex.image_items >= 0][-3:])
  assert user.interactions[3].item in candidates
  assert ex.target[2] == 1 << candidates.index(user.interactions[3].item)


def test_history_is_cut_to_fit_and_impossible_prompts_name_the_key(dataset):
  tok = dataset.tokenizer()
  small = prompts.TaskBuilder(dataset, tok, seq_len=64, num_images=2, history=10)
  user = dataset.user(1)
  ex = small.build('recommendation', user, len(user.interactions) - 1, with_answer=True)
  assert (ex.image_items >= 0).sum() <= 2 and (ex.tokens != tok.pad_token_id).sum() <= 64
  with pytest.raises(prompts.PromptTooLong, match='config.data.seq_len'):
    prompts.TaskBuilder(dataset, tok, seq_len=30, num_images=6, history=3).build(
        'selection', user, 2, with_answer=True, rng=np.random.default_rng(0))


def _data_cfg(**overrides):
  cfg = config_lib.base_config().data
  cfg.update(dict(batch_size=4, seq_len=160, num_images=6, history=4), **overrides)
  return cfg


def _batches(builder, cfg, count, **kw):
  it = iter(pipeline.make_dataset(builder, cfg, seed=7, **kw))
  return [next(it) for _ in range(count)]


def test_batches_are_a_function_of_the_seed_and_resume_exactly(builder):
  cfg = _data_cfg()
  first = _batches(builder, cfg, 5)
  again = _batches(builder, cfg, 5)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert first[0]['images'].shape == (4, 6, 16, 16, 3) and first[0]['images'].dtype == np.uint8

  it = iter(pipeline.make_dataset(builder, cfg, seed=7))
  for _ in range(3):
    next(it)
  state = it.get_state()
  resumed = iter(pipeline.make_dataset(builder, cfg, seed=7))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['tokens'], first[3]['tokens'])
  np.testing.assert_array_equal(next(resumed)['images'], first[4]['images'])


def test_two_processes_split_the_examples_without_duplicates(builder, dataset):
  cfg = _data_cfg()
  users = splits.split_users(dataset, 'by_user', 'train')
  steps = len(users) // cfg.batch_size  # one epoch
  single = _batches(builder, cfg, steps)
  halves = [_batches(builder, cfg, steps, process_index=p, process_count=2) for p in range(2)]
  key = lambda b: {(int(u), bytes(t)) for u, t in zip(b['user'], b['tokens'])}
  single_set = set().union(*map(key, single))
  union = [x for h in halves for b in h for x in key(b)]
  assert len(union) == len(set(union)) == len(single_set)
  assert set(union) == single_set
  epoch_users = [u for u, _ in single_set]  # one epoch: every example a different user of the split
  assert len(set(epoch_users)) == len(epoch_users) == steps * cfg.batch_size and set(epoch_users) <= set(users)


def test_task_mixture_and_weights(builder):
  cfg = _data_cfg(tasks=dict(recommendation=3.0, search=1.0, preference=0.0, selection=0.0, generation=0.0))
  batches = _batches(builder, cfg, 12)
  task = np.concatenate([b['task'] for b in batches])
  weight = np.concatenate([b['weight'] for b in batches])
  assert set(task) <= {tasks.NAMES.index('recommendation'), tasks.NAMES.index('search')}
  assert 0.5 < np.mean(task == tasks.NAMES.index('recommendation')) < 0.95
  np.testing.assert_array_equal(weight, np.where(task == 0, 2.0, 1.0))


def test_worker_processes_give_the_same_batches(builder):
  cfg = _data_cfg()
  in_process = _batches(builder, cfg, 3)
  with_workers = _batches(builder, _data_cfg(workers=2), 3)
  for a, b in zip(in_process, with_workers):
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
    np.testing.assert_array_equal(a['images'], b['images'])


def test_token_ids_match_the_tokenizer(dataset):
  tok = dataset.tokenizer()
  ids = TokenIds(tok.unimp_layout)
  for name, i in [('<|endofchunk|>', ids.end_of_chunk), ('<answer>', ids.answer), ('rate_3', ids.rating(3)),
                  ('s_2', ids.slot(2)), ('item_0', ids.item(0))]:
    assert tok.convert_tokens_to_ids(name) == i


def test_items_without_pictures_work_end_to_end(tmp_path):
  """MovieLens has no pictures: chunks carry no `<image>`, slots stay empty, batches still flow."""
  from unimp_jax.data import convert
  root = os.path.join(os.path.dirname(__file__), 'fixtures', 'raw', 'movielens', 'ml-100k')
  convert.main(['movielens', '--root', root, '--out', str(tmp_path / 'ml'), '--min_user_interactions', '3',
                '--min_item_interactions', '2', '--image_size', '16', '--bpe_vocab', '300'])
  dataset = formats.UnifiedDataset(str(tmp_path / 'ml'))
  builder = prompts.TaskBuilder(dataset, dataset.tokenizer(), seq_len=320, num_images=4, history=4)
  cfg = _data_cfg(batch_size=2, seq_len=320, num_images=4, split='by_user',
                  tasks=dict(recommendation=1.0, search=1.0, preference=1.0, selection=1.0, generation=0.0))
  batch = _batches(builder, cfg, 1)[0]
  assert (batch['image_items'] == -1).all() and not batch['images'].any()
  assert not (batch['tokens'] == builder.ids.image).any()
  assert batch['answer_mask'].any(axis=1).all()


def test_orbax_checkpoints_the_iterator_state(builder, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  cfg = _data_cfg()
  expected = _batches(builder, cfg, 4)
  it = iter(pipeline.make_dataset(builder, cfg, seed=7))
  next(it), next(it)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as manager:
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  restored = iter(pipeline.make_dataset(builder, cfg, seed=7))
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as manager:
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(next(restored)['tokens'], expected[2]['tokens'])
  np.testing.assert_array_equal(next(restored)['images'], expected[3]['images'])


def test_generation_prompts_carry_image_codes(dataset):
  from unimp_jax.data import tokenizer as tokenizer_lib
  from unimp_jax.vq import codes as vq_codes
  codes = np.random.default_rng(0).integers(0, 16, (len(dataset.items), 4))
  tok = tokenizer_lib.with_unimp_tokens(tokenizer_lib.train_bpe(prompts.tokenizer_corpus(dataset.items, []), 500),
                                        num_items=len(dataset.items), num_slots=3, num_image_codes=16)
  builder = prompts.TaskBuilder(dataset, tok, seq_len=200, num_images=6, history=3,
                                image_codes=vq_codes.ImageCodes(codes=codes, codebook_size=16, grid=(2, 2), path=''))
  user = dataset.user(0)
  target = len(user.interactions) - 1
  ex = builder.build('generation', user, target, with_answer=True)
  final = ex.tokens[ex.prompt_length:ex.answer_mask.nonzero()[0].max()]
  assert list(final) == [builder.ids.image_code(c) for c in codes[user.interactions[target].item]]
  # The history items' text carries their own codes as answer spans.
  history_item = user.interactions[target - 1].item
  span = [builder.ids.answer, *(builder.ids.image_code(c) for c in codes[history_item]), builder.ids.end_of_chunk]
  prompt = list(ex.tokens[:ex.prompt_length])
  assert any(prompt[i:i + len(span)] == span for i in range(len(prompt)))


def test_global_batches_are_sharded_over_the_batch_axes(builder):
  import jax
  from unimp_jax.sharding import mesh as mesh_lib
  cfg = config_lib.base_config()
  cfg.mesh.update(data=2, fsdp=4)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  local = _batches(builder, _data_cfg(batch_size=8), 1)[0]
  batch = pipeline.global_batch(local, mesh, cfg.mesh.rules)
  assert jax.device_count() == 8
  for key, value in batch.items():
    assert value.shape == local[key].shape and value.sharding.spec[0] == ('data', 'fsdp')
    assert value.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(value), local[key])


def test_the_registry_is_what_the_config_and_batches_name(builder, dataset):
  """One entry per config key; batches index tasks in registry order; only scored tasks are evaluated."""
  cfg = config_lib.base_config()
  assert set(tasks.NAMES) == set(cfg.data.tasks) == set(cfg.data.task_weights) and len(tasks.NAMES) == 6
  assert all(name == task.name for name, task in tasks.TASKS.items())
  assert tasks.EVALUATED == ('recommendation', 'search', 'preference', 'selection', 'generation')
  user = dataset.user(0)
  for i, name in enumerate(tasks.NAMES[:4]):
    assert builder.build(name, user, 2, with_answer=True, rng=np.random.default_rng(0)).task == i
  with pytest.raises(ValueError, match="unknown task 'reranking'"):
    builder.build('reranking', user, 2, with_answer=True)
  assert not tasks.TASKS['generation'].available(builder, user)  # this builder has no image codes


def test_selection_chance_levels_by_hand():
  """One question with slot 0 right, one with slots 0 and 1 right; F1 of each of the 7 answers by hand."""
  one = [1, 0, 0, 2 / 3, 2 / 3, 0, 1 / 2]         # {0} {1} {2} {0,1} {0,2} {1,2} {0,1,2}
  two = [2 / 3, 2 / 3, 0, 1, 1 / 2, 1 / 2, 4 / 5]
  out = tasks.selection.constant_answers(np.asarray([0b001, 0b011]), 3)
  assert out['random slot set F1 (chance)'] == pytest.approx((sum(one) + sum(two)) / 14)
  assert out['every slot F1'] == pytest.approx((1 / 2 + 4 / 5) / 2)
  assert out['first slot F1'] == pytest.approx((1 + 2 / 3) / 2)
