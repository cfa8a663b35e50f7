"""The optimizer, with freezing and weight decay chosen by parameter-name patterns from the config.

Parameter names are '/'-joined paths such as `lm/groups/cross/q/kernel` (see
`python -m unimp_jax.model.summary`). A parameter matching any `train.freeze_patterns` regex gets no
update at all (and no optimizer state); weight decay applies only to those matching
`train.decay_patterns` (paper: cross-attention weights). Frozen towers are frozen here, through the
optimizer, not by stop-gradients in the model.
"""

from __future__ import annotations

import re

import jax
import optax


def param_names(params) -> dict:
  """The same tree as `params` with each leaf replaced by its '/'-joined path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: '/'.join(str(getattr(k, 'key', k)) for k in path), params)


def matches(params, patterns) -> dict:
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda name: any(p.search(name) for p in compiled), param_names(params))


def schedule(train_cfg) -> optax.Schedule:
  warmup = max(1, int(round(train_cfg.warmup_fraction * train_cfg.steps)))
  peak, rest = train_cfg.learning_rate, max(1, train_cfg.steps - warmup)
  decay = {'cosine': optax.cosine_decay_schedule(peak, rest),
           'linear': optax.linear_schedule(peak, 0.0, rest),
           'constant': optax.constant_schedule(peak)}[train_cfg.schedule]
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(train_cfg, params) -> optax.GradientTransformation:
  frozen = matches(params, train_cfg.freeze_patterns)
  if all(jax.tree.leaves(frozen)):
    raise ValueError('config.train.freeze_patterns freeze every parameter; nothing would train')
  adamw = optax.adamw(schedule(train_cfg), b1=0.9, b2=0.999, weight_decay=train_cfg.weight_decay,
                      mask=matches(params, train_cfg.decay_patterns))
  trained = optax.chain(optax.clip_by_global_norm(train_cfg.clip_norm), adamw)
  labels = jax.tree.map(lambda f: 'frozen' if f else 'trained', frozen)
  return optax.multi_transform({'trained': trained, 'frozen': optax.set_to_zero()}, labels)
