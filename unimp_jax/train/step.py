"""The train step: a pure function of (state, batch), compiled once with shardings and donation.

The state is a plain dict pytree, `{'step', 'params', 'opt_state'}`, whose `params` is the model's
`nnx.Param` state as a nested dict (`nnx.to_pure_dict`), so Orbax, optax masks and shardings all see
ordinary nested dicts. The batch's leading dimension is split into `train.microbatches` micro-batches
run by `lax.scan`; loss sums and token counts are accumulated and divided once, so accumulation gives
the same update as one large batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unimp_jax import tasks
from unimp_jax.data import formats
from unimp_jax.model import items
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.train import loss as loss_lib
from unimp_jax.train import optim

BATCH_KEYS = ('tokens', 'answer_mask', 'images', 'weight', 'task', 'next_items')


def step_inputs(batch: dict) -> dict:
  """The batch arrays the step reads. Text-only and id-only runs (`data.item_content`) have no
  'images': the step then runs the model without images, skipping the vision tower and cross-attention."""
  return {k: batch[k] for k in BATCH_KEYS if k in batch}


def init_state(params, tx: optax.GradientTransformation) -> dict:
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}


def state_shardings(abstract_params, tx, mesh, rules):
  """(shardings, abstract state carrying them) of the whole train state: optimizer moments take their
  parameter's sharding (`optax.tree_map_params` pairs them), counters and other scalars are replicated."""
  pure_params = nnx.to_pure_dict(abstract_params)
  param_shardings = nnx.to_pure_dict(mesh_lib.state_shardings(abstract_params, mesh, rules))
  abstract_state = jax.eval_shape(lambda p: init_state(p, tx), pure_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen parameters hold no optimizer state
  opt_shardings = optax.tree_map_params(
      tx, lambda leaf, sharding: leaf if masked(leaf) else sharding, abstract_state['opt_state'], param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=masked)
  shardings = {'step': replicated, 'params': param_shardings, 'opt_state': opt_shardings}
  return shardings, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 abstract_state, shardings)


def accumulated_gradients(graphdef, train_cfg, *, pad_id: int, excluded=None):
  """`(params, batch, catalogue=None, key=None) -> (grads, sums)`: mean gradient over the batch's supervised
  tokens, accumulated over `train.microbatches` micro-batches by `lax.scan` (sums first, one division at
  the end). `catalogue` (TaskBuilder.catalogue().arrays()) feeds content item rows (unimp_jax.model.items);
  the token ids `excluded` are left out of the softmax (`excluded_tokens`). `key` drives dropout
  (`model.lm.dropout`), one key per micro-batch."""
  num_tasks = len(tasks.NAMES)

  def objective(params, micro, catalogue, key):
    tokens = micro['tokens']
    images = micro.get('images')
    params = items.with_item_rows(graphdef, params, catalogue, pad_id=pad_id)
    model = nnx.merge(graphdef, params)
    labels = (tokens, micro['answer_mask'], micro['weight'], micro['task'])
    kw = dict(num_tasks=num_tasks, focal_gamma=train_cfg.focal_gamma, z_loss=train_cfg.z_loss,
              next_items_bt=micro.get('next_items'), next_item_weight=train_cfg.next_item_weight, excluded=excluded)
    if train_cfg.loss_chunk:  # the head a chunk of positions at a time: no [B, T, V] logits
      hidden = model.hidden(tokens, images, tokens != pad_id, dropout_key=key)
      out = loss_lib.chunked_token_losses(hidden, model.lm.logits, *labels, chunk=train_cfg.loss_chunk, **kw)
    else:
      out = loss_lib.token_losses(model(tokens, images, tokens != pad_id, dropout_key=key), *labels, **kw)
    return out['objective'], out

  def gradients(params, batch, catalogue=None, key=None):
    m = train_cfg.microbatches
    micro = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), step_inputs(batch))
    keys = None if key is None else jax.random.split(key, m)
    # Only the trained parameters are differentiated: a frozen tower's weight gradients would cost
    # FLOPs and memory and then be thrown away (docs/SCALING.md). Their places hold None.
    trained = jax.tree.map(lambda p, frozen: None if frozen else p, params,
                           optim.matches(params, train_cfg.freeze_patterns))

    def loss(trained, mb, k):
      merged = jax.tree.map(lambda p, t: p if t is None else t, params, trained)
      return objective(merged, mb, catalogue, k)

    def accumulate(carry, xs):
      mb, k = xs
      (_, out), grads = jax.value_and_grad(loss, has_aux=True)(trained, mb, k)
      return jax.tree.map(jnp.add, carry, (grads, out)), None

    sums_shape = jax.eval_shape(lambda: objective(params, jax.tree.map(lambda x: x[0], micro), catalogue, None)[1])
    init = (jax.tree.map(jnp.zeros_like, trained), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grad_sum, sums), _ = jax.lax.scan(accumulate, init, (micro, keys))
    return jax.tree.map(lambda g: g / jnp.maximum(sums['tokens'], 1.0), grad_sum), sums

  return gradients


def excluded_tokens(train_cfg, builder) -> np.ndarray | None:
  """The item tokens of items released after the data's cut-off (`extra.cold_items`), which
  `train.exclude_cold_items` leaves out of the training softmax (unimp_jax.train.loss); None when nothing
  is left out. Semantic ids leave nothing out: their code tokens are shared with released items."""
  cold = formats.cold_mask(builder.dataset)[:builder.ids.num_items]
  if not (train_cfg.exclude_cold_items and cold.any() and builder.item_tokens.shape[1] == 1):
    return None
  return builder.item_tokens[cold, 0]


def make_train_step(graphdef, tx, train_cfg, *, pad_id: int, shardings, batch_sharding, excluded=None, seed=0):
  """`step(state, batch, catalogue) -> (state, metrics)`, jitted, donating the old state;
  `catalogue` as in `accumulated_gradients` (None for learned item rows), `excluded` its `excluded_tokens`.
  Dropout masks are a function of (`seed`, step), so a resumed run draws the same ones.

  A non-finite loss or gradient leaves the state unchanged and reports `finite = False`; the trainer
  stops and keeps the last good checkpoint.
  """
  gradients = accumulated_gradients(graphdef, train_cfg, pad_id=pad_id, excluded=excluded)

  def step(state, batch, catalogue):
    params = state['params']
    grads, sums = gradients(params, batch, catalogue, jax.random.fold_in(jax.random.key(seed), state['step']))
    loss = sums['objective'] / jnp.maximum(sums['tokens'], 1.0)
    grad_norm = optax.global_norm(grads)  # of the trained parameters: the norm that clipping sees
    # The optimizer takes the whole tree; frozen places get zeros it never reads (optim: set_to_zero).
    whole = jax.tree.map(lambda p, g: jnp.zeros_like(p) if g is None else g, params, grads)
    updates, opt_state = tx.update(whole, state['opt_state'], params)
    new_params = jax.tree.map(lambda p, u, g: p if g is None else optax.apply_updates(p, u), params, updates, grads)
    new_state = {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state}
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'tokens': sums['tokens'], 'finite': finite}
    per_task = sums['ce_sum'] / jnp.maximum(sums['count'], 1.0)
    for i, name in enumerate(tasks.NAMES):
      metrics[f'loss/{name}'] = jnp.where(sums['count'][i] > 0, per_task[i], jnp.nan)
    if train_cfg.next_item_weight:
      metrics['loss/next_item'] = sums['next_item_ce_sum'] / jnp.maximum(sums['next_item_count'], 1.0)
    return new_state, metrics

  return jax.jit(step, in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None),
                 donate_argnums=(0,))


def batch_shardings(mesh, rules, batch_spec: dict) -> dict:
  """Data-parallel sharding for every batch array (by its rank)."""
  return {k: mesh_lib.data_sharding(mesh, rules, ndim) for k, ndim in batch_spec.items()}
