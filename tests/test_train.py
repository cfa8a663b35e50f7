"""The objective, gradient accumulation, freezing, overfitting and the NaN guard of the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimp_jax import config as config_lib
from unimp_jax.data import datasets, formats, pipeline, prompts, synthetic
from unimp_jax.model import unimp
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.train import loss as loss_lib
from unimp_jax.train import optim
from unimp_jax.train import step as step_lib


@pytest.mark.parametrize('gamma, next_weight, excluded', [
    (0.0, 0.0, ()), (2.0, 0.0, ()), (0.0, 1.5, ()), (2.0, 0.5, (3, 7))])
def test_loss_matches_a_numpy_reference(gamma, next_weight, excluded):
  rng = np.random.default_rng(0)
  b, t, v, num_tasks = 3, 7, 11, 5
  logits = rng.normal(size=(b, t, v)) * 3
  tokens = rng.integers(0, v, (b, t))
  mask = rng.random((b, t)) < 0.5
  weight = np.asarray([2.0, 1.0, 0.5])
  task = np.asarray([0, 3, 0])
  # Next-item labels at some positions whose following token carries no loss (history chunk ends).
  next_items = np.where((rng.random((b, t)) < 0.4) & ~np.roll(mask, -1, axis=1), rng.integers(0, v, (b, t)), -1)
  next_items[:, -1] = -1
  # Excluded tokens (unreleased items) are never targets, and drop out of every softmax.
  tokens = np.where(np.isin(tokens, excluded), 0, tokens)
  next_items = np.where(np.isin(next_items, excluded), 0, next_items)
  kw = dict(num_tasks=num_tasks, focal_gamma=gamma, z_loss=0.0, next_items_bt=jnp.asarray(next_items),
            next_item_weight=next_weight, excluded=np.asarray(excluded, np.int32))
  labels = (tokens, mask, jnp.asarray(weight, jnp.float32), task)
  out = loss_lib.token_losses(jnp.asarray(logits, jnp.float32), *labels, **kw)
  # The chunked loss, with the identity as the head: 6 predicting positions in chunks of 4 (one padded).
  chunked = loss_lib.chunked_token_losses(jnp.asarray(logits, jnp.float32), lambda h: h, *labels, chunk=4, **kw)
  # numpy, float64, one token at a time: position i predicts token i+1, or the next item where labelled.
  objective, count, ce_sum, next_sum, next_count = 0.0, 0, np.zeros(num_tasks), 0.0, 0
  for r in range(b):
    for i in range(t - 1):
      kept = np.delete(np.arange(v), excluded)
      logp = logits[r, i] - np.log(np.exp(logits[r, i, kept]).sum())
      if mask[r, i + 1]:
        ce = -logp[tokens[r, i + 1]]
        objective += weight[r] * (1 - np.exp(-ce)) ** gamma * ce
        count += 1
        ce_sum[task[r]] += ce
      elif next_weight and next_items[r, i] >= 0:
        ce = -logp[next_items[r, i]]
        objective += next_weight * (1 - np.exp(-ce)) ** gamma * ce
        count += 1
        next_sum, next_count = next_sum + ce, next_count + 1
  assert next_count > 0 or not next_weight
  for result in (out, chunked):
    np.testing.assert_allclose(result['objective'], objective, rtol=1e-5)
    assert result['tokens'] == count
    np.testing.assert_allclose(result['ce_sum'], ce_sum, rtol=1e-5)
    np.testing.assert_allclose([result['next_item_ce_sum'], result['next_item_count']], [next_sum, next_count],
                               rtol=1e-5)
    # The mean loss divides by supervised tokens, not by weights.
    np.testing.assert_allclose(result['objective'] / result['tokens'], objective / count, rtol=1e-5)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cfg = config_lib.base_config()
  path = str(tmp_path_factory.mktemp('train') / 'fashion')
  synthetic.build(path, num_items=150, num_users=60, seed=1, image_size=cfg.model.vision.image_size, bpe_vocab=1024)
  dataset = formats.UnifiedDataset(path)
  datasets.fit_model_to_dataset(cfg, dataset)
  cfg.data.update(seq_len=128, num_images=5, history=4)
  builder = prompts.TaskBuilder(dataset, dataset.tokenizer(), seq_len=128, num_images=5, history=4)
  batch = next(iter(pipeline.make_dataset(builder, cfg.data, seed=0)))
  batch = {k: batch[k] for k in step_lib.BATCH_KEYS}
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])  # numerics: one device compiles fastest
  graphdef, params = nnx.split(unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=0))
  return cfg, mesh, graphdef, params, batch, dataset.tokenizer().pad_token_id


def _trainer(setup, **train_overrides):
  cfg, mesh, graphdef, params, batch, pad = setup
  train_cfg = cfg.train.copy_and_resolve_references()
  train_cfg.update(train_overrides)
  pure = nnx.to_pure_dict(params)
  tx = optim.make_optimizer(train_cfg, pure)
  shardings, _ = step_lib.state_shardings(params, tx, mesh, cfg.mesh.rules)
  state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=shardings)(pure)
  batch_sharding = step_lib.batch_shardings(mesh, cfg.mesh.rules, {k: v.ndim for k, v in batch.items()})
  step = step_lib.make_train_step(graphdef, tx, train_cfg, pad_id=pad, shardings=shardings,
                                  batch_sharding=batch_sharding)
  return state, step


def test_four_micro_batches_give_the_gradient_of_one_batch(setup):
  cfg, _, graphdef, params, batch, pad = setup
  pure = nnx.to_pure_dict(params)

  def grads(microbatches):
    train_cfg = cfg.train.copy_and_resolve_references()
    train_cfg.microbatches = microbatches
    return jax.jit(step_lib.accumulated_gradients(graphdef, train_cfg, pad_id=pad))(pure, batch)

  (one, sums_one), (four, sums_four) = grads(1), grads(4)
  assert sums_one['tokens'] == sums_four['tokens'] > 0
  np.testing.assert_allclose(sums_four['objective'], sums_one['objective'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), four, one)


def test_the_chunked_loss_gives_the_gradient_of_the_whole_one(setup):
  """`train.loss_chunk`: the head applied 48 positions at a time (the 127 predicting positions in 3 chunks,
  the last padded) gives the same sums and gradients as all positions at once."""
  cfg, _, graphdef, params, batch, pad = setup
  pure = nnx.to_pure_dict(params)

  def grads(chunk):
    train_cfg = cfg.train.copy_and_resolve_references()
    train_cfg.update(loss_chunk=chunk, next_item_weight=1.0, z_loss=1e-3)
    return jax.jit(step_lib.accumulated_gradients(graphdef, train_cfg, pad_id=pad))(pure, batch)

  (whole, sums_whole), (chunked, sums_chunked) = grads(0), grads(48)
  assert sums_whole['tokens'] == sums_chunked['tokens'] > 0 and sums_whole['next_item_count'] > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), sums_chunked, sums_whole)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), chunked, whole)


def test_overfits_one_batch_and_stops_on_nan(setup):
  state, step = _trainer(setup, learning_rate=3e-3, warmup_fraction=0.0, steps=30, schedule='constant')
  batch = setup[4]
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch, None)
    losses.append(float(metrics['loss']))
  assert losses[0] > 5.0 and losses[-1] < 1.0, losses
  assert all(np.isfinite(losses))
  before = jax.tree.map(np.asarray, state)
  state, metrics = step(state, dict(batch, weight=np.full_like(batch["weight"], np.nan)), None)
  assert not bool(metrics['finite'])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)


def test_frozen_parameters_stay_bit_identical(setup):
  state, step = _trainer(setup, freeze_patterns=(r'^vision/', r'^lm/head$', r'^lm/groups/layers/'))
  start = jax.tree.map(np.asarray, state['params'])
  for _ in range(5):
    state, _ = step(state, setup[4], None)
  end = jax.tree.map(np.asarray, state['params'])
  names = optim.param_names(start)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), start, end)
  for name, did_move in zip(jax.tree.leaves(names), jax.tree.leaves(moved)):
    frozen = name.startswith(('vision/', 'lm/groups/layers/')) or name == 'lm/head'
    if frozen:
      assert not did_move, name
  # Added vocabulary rows of the head train while the base rows stay frozen; the connector trains.
  assert not np.array_equal(start['lm']['added_head'], end['lm']['added_head'])
  np.testing.assert_array_equal(start['lm']['head'], end['lm']['head'])
  assert not np.array_equal(start['connector']['latents'], end['connector']['latents'])


def test_frozen_parameters_are_not_differentiated(setup):
  cfg, _, graphdef, params, batch, pad = setup
  pure = nnx.to_pure_dict(params)
  patterns = (r'^vision/', r'^lm/groups/layers/', r'^lm/head$')

  def compiled(freeze):
    train_cfg = cfg.train.copy_and_resolve_references()
    train_cfg.freeze_patterns = freeze
    return jax.jit(step_lib.accumulated_gradients(graphdef, train_cfg, pad_id=pad)).lower(pure, batch).compile()

  full_step, partial_step = compiled(()), compiled(patterns)
  everything, _ = full_step(pure, batch)
  partial, _ = partial_step(pure, batch)
  frozen = optim.matches(pure, patterns)
  for is_frozen, full, part in zip(jax.tree.leaves(frozen), jax.tree.leaves(everything),
                                   jax.tree.leaves(partial, is_leaf=lambda x: x is None)):
    if is_frozen:
      assert part is None
    else:
      np.testing.assert_allclose(part, full, atol=1e-7, rtol=1e-5)
  # XLA's own count: the frozen towers' weight gradients are gone from the compiled program.
  flops = [c.cost_analysis()['flops'] for c in (full_step, partial_step)]
  assert flops[1] < 0.85 * flops[0], flops


def test_freezing_everything_is_refused(setup):
  train_cfg = config_lib.base_config().train
  train_cfg.freeze_patterns = ('.*',)
  with pytest.raises(ValueError, match='freeze every parameter'):
    optim.make_optimizer(train_cfg, nnx.to_pure_dict(setup[3]))


def test_checkpoint_from_one_mesh_restores_on_another_with_the_same_next_loss(setup, tmp_path):
  from unimp_jax.train import checkpoint as checkpoint_lib
  cfg, _, graphdef, params, batch, pad = setup
  tx = optim.make_optimizer(cfg.train, nnx.to_pure_dict(params))
  grads = step_lib.accumulated_gradients(graphdef, cfg.train, pad_id=pad)

  def on_mesh(shape):
    mesh_cfg = cfg.mesh.copy_and_resolve_references()
    mesh_cfg.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
    mesh = mesh_lib.make_mesh(mesh_cfg)
    shardings, abstract = step_lib.state_shardings(params, tx, mesh, cfg.mesh.rules)
    placed = {k: jax.device_put(v, mesh_lib.data_sharding(mesh, cfg.mesh.rules, v.ndim)) for k, v in batch.items()}
    return mesh, shardings, abstract, placed

  mesh_a, shardings_a, _, batch_a = on_mesh((8, 1, 1))
  params_a = jax.device_put(nnx.to_pure_dict(params), shardings_a['params'])
  state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=shardings_a)(params_a)
  with checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, keep=1, async_save=False) as checkpointer:
    checkpointer.save(1, state)
  mesh_b, _, abstract_b, batch_b = on_mesh((2, 4, 1))
  with checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, keep=1) as checkpointer:
    restored, step = checkpointer.restore(abstract_b)
  assert step == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
  assert restored['params']['lm']['embed'].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
  with mesh_lib.use_mesh(mesh_a, cfg.mesh.rules):
    loss_a = jax.jit(grads)(state['params'], batch_a)[1]
  with mesh_lib.use_mesh(mesh_b, cfg.mesh.rules):
    loss_b = jax.jit(grads)(restored['params'], batch_b)[1]
  np.testing.assert_allclose(loss_b['objective'] / loss_b['tokens'], loss_a['objective'] / loss_a['tokens'],
                             rtol=1e-6)
