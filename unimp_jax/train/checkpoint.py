"""Checkpoints: the train state, the data iterator's position and the config, saved together per step.

One orbax CheckpointManager directory; each step is a folder of items, none of them a pickle:

    DIRECTORY/<step>/state     the train-state pytree {'step', 'params', 'opt_state'}: OCDBT/Zarr arrays that
                               every process writes shard by shard, with JSON metadata
                    /data      each process's Grain iterator state (JSON), so a resumed run sees the next batch
                    /config    the run's config (JSON)
                    /checksums two 32-bit sums of every state array's bits (JSON), checked on restore
                    /metrics   the metrics best-checkpoint retention ranks by (JSON; only with `best_metric`)

Saves are asynchronous: `save` returns once the arrays are copied to host memory (so the next step may
donate its buffers) and the iterator state is taken; the files are written on a background thread.

Never half a checkpoint: orbax writes a step into `<step>.orbax-checkpoint-tmp/` and renames it to
`<step>/` only after every item of every process is written, so a run killed mid-save leaves a tmp
folder, never a partial `<step>/`. Steps are found by listing `<step>/` folders, so a tmp folder is never
restored; a writable `Checkpointer` reports and deletes it when it opens the directory. (Not orbax's
`cleanup_tmp_directories`: that runs in the background and can outlive `close`, racing the next opener.)

A finished step can still go bad afterwards (a file deleted, truncated or garbled on disk). Garbled bytes
can decode without a read error, so what `restore` reads is compared with the checksums saved beside it
(and must be finite: training never saves NaN). `restore`
tries the newest step first and falls back to older ones, logging which step folder failed and why. A
step is only judged bad when an older one restores with the same `abstract_state`; then it is moved to
`DIRECTORY/unrestorable/` so that it neither shadows new saves (orbax refuses to save at or below the
newest step) nor gets lost. If no step restores, nothing is moved (the likelier cause is an
`abstract_state` that does not match, e.g. a changed model config) and the error lists every step's failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import grain
import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

UNRESTORABLE = 'unrestorable'
_TMP_MARK = '.orbax-checkpoint-tmp'


class CheckpointError(RuntimeError):
  """No checkpoint step could be restored; the message lists each step folder and why it failed."""


class Checkpointer:
  """Saves every `save_every` steps, keeps the last `keep` steps plus the best one by `best_metric`.

  Retention uses orbax's own policies, combined: `LatestN(keep)` OR `BestN(n=1)` on `best_metric`
  (`best_mode` 'max' or 'min'). Steps saved without metrics count only towards the last `keep`.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, best_metric: str | None = None,
               best_mode: str = 'max', async_save: bool = True):
    if save_every < 1:
      raise ValueError(f'checkpoint save_every={save_every}: must be >= 1')
    if keep < 1:
      raise ValueError(f'checkpoint keep={keep}: must be >= 1 (the newest step is what a resumed run needs)')
    if best_mode not in ('max', 'min'):
      raise ValueError(f"checkpoint best_mode={best_mode!r}: choose 'max' or 'min'")
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    _handle_unfinished_saves(self.directory, remove=True)
    policies = ocp.checkpoint_managers
    preservation = policies.LatestN(n=keep)
    best_fn = None
    if best_metric is not None:
      def best_fn(metrics):
        return metrics[best_metric]
      preservation = policies.AnyPreservationPolicy([preservation, policies.BestN(
          get_metric_fn=best_fn, reverse=best_mode == 'min', n=1, keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every),
            policies.PreemptionCheckpointingPolicy(),  # a save when the cluster announces a preemption
        ]),
        preservation_policy=preservation,
        best_fn=best_fn,  # also what makes orbax write the `metrics` item
        best_mode=best_mode,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def should_save(self, step: int) -> bool:
    """True at multiples of `save_every` (and at a preemption), unless `step` is already saved."""
    return self._manager.should_save(step)

  def save(self, step: int, state, *, data_iterator=None, config=None, metrics: Mapping | None = None,
           force: bool = False) -> bool:
    """Starts saving `step` if `should_save(step)` or `force`; returns whether a save started."""
    if step in self._manager.all_steps():  # orbax refuses to overwrite a step; e.g. a forced final save
      return False
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    items['checksums'] = ocp.args.JsonSave(checksums(state))
    if config is not None:
      items['config'] = ocp.args.JsonSave(config.to_dict() if hasattr(config, 'to_dict') else dict(config))
    if metrics is not None:
      if self.best_metric is not None and self.best_metric not in metrics:
        raise KeyError(f'checkpoint best_metric={self.best_metric!r} is not among the metrics given at step {step}: '
                       f'{sorted(metrics)}')
      metrics = {k: float(v) for k, v in metrics.items()}
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The best step by `best_metric` (the latest step when there is no metric)."""
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state, *, step: int | None = None, data_iterator=None):
    """(state, step): `step`, or the newest step that restores, onto `abstract_state`'s shardings.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` on the current mesh, which
    may differ from the mesh that saved it. `data_iterator`, when given, is moved to the saved position.
    """
    _require_shardings(abstract_state, 'abstract_state')
    self._manager.wait_until_finished()

    def args():
      items = {'state': ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
      return ocp.args.Composite(**items)

    restored, good_step, bad_steps = _restore_newest(
        self._manager, self.directory, args, step, check=lambda items, step: self._verify(items['state'], step))
    if bad_steps:
      self._set_aside(bad_steps)
    return restored['state'], good_step

  def restore_config(self, step: int | None = None) -> dict:
    """The config saved with `step` (default: the latest), as the plain dict JSON holds."""
    self._manager.wait_until_finished()
    return read_config(self.directory, step)

  def wait(self):
    """Blocks until the background save, if any, has been written and renamed into place."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _verify(self, state, step: int) -> None:
    """Raises if `state`, read back from `step`, is not what was saved. Steps saved before checksums were
    (none on disk) are only checked for NaN."""
    _require_finite(state)
    if (_step_dir(self.directory, step) / 'checksums').exists():
      saved = self._manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))['checksums']
      for path, sums in checksums(state).items():
        if saved.get(path) != sums:
          raise CheckpointError(f'{path} does not match the checksum saved with it: the checkpoint files are damaged')

  def _set_aside(self, steps: list[int]):
    """Moves bad step folders to DIRECTORY/unrestorable/ (process 0 renames; every process reloads)."""
    if jax.process_count() > 1:
      jax.experimental.multihost_utils.sync_global_devices('checkpoint: every process restored')
    if jax.process_index() == 0:
      aside = epath.Path(self.directory) / UNRESTORABLE
      aside.mkdir(exist_ok=True)
      for step in steps:
        target = aside / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
        logging.warning('checkpoint: moving unrestorable step folder %s to %s', _step_dir(self.directory, step),
                        target)
        _step_dir(self.directory, step).rename(target)
    if jax.process_count() > 1:
      jax.experimental.multihost_utils.sync_global_devices('checkpoint: bad steps set aside')
    self._manager.reload()


def _read_only(directory: str, best_fn=None, best_mode: str = 'max', **kw) -> ocp.CheckpointManager:
  """A read-only manager of another run's (or a finished run's) directory. Orbax warns "Given directory
  is read only" whenever one is made, which is what is asked for here: the warning is kept out of logs."""
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, create=False, best_fn=best_fn, best_mode=best_mode), **kw)
  finally:
    logging.set_verbosity(previous)


def read_config(directory: str, step: int | None = None) -> dict:
  """The config saved with `step` (default: the newest) of a Checkpointer directory, read-only."""
  directory = os.path.abspath(directory)
  with _read_only(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {directory}')
    return dict(manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config'])


def served_step(directory: str) -> int:
  """The step a finished run is evaluated and served from: the best by the validation score the run kept
  (config `eval`, the score saved with every evaluated step: unimp_jax.train.trainer), else the newest.
  The same choice as the training run's own Checkpointer (orbax's `best_step`)."""
  evaluation = read_config(directory).get('eval', {})
  key = f'valid/{evaluation.get("metric")}'
  best_fn = (lambda metrics: metrics[key]) if evaluation.get('every') else None
  with _read_only(os.path.abspath(directory), best_fn=best_fn, best_mode=evaluation.get('mode', 'max')) as manager:
    return manager.best_step()


def restore_params(directory: str, abstract_params, *, step: int | None = None):
  """Only `state['params']` of a Checkpointer directory, onto `abstract_params`' shardings.

  For starting one run from another's weights (e.g. single-task fine-tuning from a multi-task run):
  the optimizer state, data position and step are not read. Falls back past bad steps like `restore`,
  but moves nothing (the directory belongs to another run). Returns the params pytree.
  """
  _require_shardings(abstract_params, 'abstract_params')
  directory = os.path.abspath(directory)
  _handle_unfinished_saves(directory, remove=False)
  target = {'params': abstract_params}

  def args():
    return ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))

  with _read_only(directory) as manager:
    restored, good_step, _ = _restore_newest(manager, directory, args, step)
  params = restored['state']['params']
  # A partial restore leaves a parameter the checkpoint lacks as its abstract placeholder.
  missing = ['/'.join(map(str, path)) for path, leaf in traverse_util.flatten_dict(params).items()
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise CheckpointError(f'{directory} step {good_step} has no {", ".join(missing)}: it was written by another '
                          'model (an older version of the code, or a different config)')
  return params


# A stage-1 run's added vocabulary `[<image> <|endofchunk|> <answer> rate_1..5 slots]` is a prefix of every
# stage-2 vocabulary on the same base tokens (unimp_jax.data.captions); path -> the vocabulary axis.
VOCABULARY_TABLES = {'lm/added_embed': 0, 'lm/added_head': 1}


def stored_param_shapes(directory: str, step: int | None = None) -> dict[str, tuple[int, ...]]:
  """{'lm/added_embed': shape, ...}: every parameter a Checkpointer directory's `step` (default: the
  newest) holds, from its metadata (nothing is read but the metadata)."""
  directory = os.path.abspath(directory)
  with _read_only(directory, item_handlers={'state': ocp.PyTreeCheckpointHandler()}) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {directory}')
    tree = manager.metadata(step).item_metadata['state'].tree['params']
  return {'/'.join(k): tuple(m.shape) for k, m in traverse_util.flatten_dict(tree).items()}


def init_params(directory: str, params: dict, *, step: int | None = None) -> tuple[dict, list[str]]:
  """`params` (a fresh model's, sharded) with what a Checkpointer directory holds restored into them,
  for starting a run from another run's weights (`checkpoint.init_params_from`):

  - a parameter of the same shape is restored exactly;
  - an added-vocabulary table (`VOCABULARY_TABLES`) the checkpoint holds fewer tokens of is restored into
    its first rows (columns of the head); the tokens after them (a stage-2 run's item tokens) keep their
    fresh initialisation;
  - a parameter the checkpoint lacks (e.g. the content-row projections after stage 1) keeps its fresh
    initialisation;
  - a parameter only the checkpoint has, or any other shape, is an error naming it.

  Returns (params, lines saying what was restored and what was not).
  """
  stored = stored_param_shapes(directory, step)
  fresh = {'/'.join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  unknown = sorted(set(stored) - set(fresh))
  if unknown:
    raise CheckpointError(f'{directory} holds parameters this model does not have: {", ".join(unknown[:5])}'
                          f'{" ..." if len(unknown) > 5 else ""} (a different architecture?)')
  target = {}
  for path, shape in stored.items():
    have = fresh[path]
    axis = VOCABULARY_TABLES.get(path)
    prefix = (axis is not None and len(shape) == have.ndim and shape[axis] <= have.shape[axis]
              and all(a == b for i, (a, b) in enumerate(zip(shape, have.shape)) if i != axis))
    if shape != have.shape and not prefix:
      raise CheckpointError(f'{directory}: parameter {path} is {shape} there but {have.shape} in this model')
    sharding = have.sharding if shape == have.shape else jax.sharding.NamedSharding(
        have.sharding.mesh, jax.sharding.PartitionSpec())
    target[path] = jax.ShapeDtypeStruct(shape, have.dtype, sharding=sharding)
  restored = restore_params(directory, traverse_util.unflatten_dict(target, sep='/'), step=step)
  restored = {'/'.join(k): v for k, v in traverse_util.flatten_dict(restored).items()}
  lines = [f'restored {len(restored)} of {len(fresh)} parameter arrays from {directory}']
  for path, value in restored.items():
    if value.shape != fresh[path].shape:
      axis = VOCABULARY_TABLES[path]
      lines.append(f'{path}: the first {value.shape[axis]} of {fresh[path].shape[axis]} vocabulary rows '
                   'restored, the rest freshly initialised')
      value = jax.jit(lambda f, r: jax.lax.dynamic_update_slice(f, r, (0,) * f.ndim),
                      out_shardings=fresh[path].sharding)(fresh[path], value)
    fresh[path] = value
  missing = sorted(set(fresh) - set(restored))
  if missing:
    lines.append(f'freshly initialised (not in the checkpoint): {", ".join(missing)}')
  return traverse_util.unflatten_dict(fresh, sep='/'), lines


# --------------------------------------------------------------------------------------------------
# Finding a step that restores
# --------------------------------------------------------------------------------------------------

def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32, one per element (two per element of a 64-bit dtype)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _sums(state):
  """Per array: the sum of its words, and their sum weighted by 1 + position (mod 2**32, so any order of
  adding gives the same; the position comes from iotas, so no array is reshaped across its shards). One
  changed word changes the first; two swapped ones change the second."""
  def one(x):
    words = _words(x)
    position, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for axis in reversed(range(words.ndim)):
      position += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
      stride = stride * words.shape[axis] % 2**32
    return jnp.stack([words.sum(dtype=jnp.uint32), (words * (position + 1)).sum(dtype=jnp.uint32)])
  return jax.tree.map(one, state)


def checksums(state) -> dict[str, list[int]]:
  """{"['params']['lm']...": [sum, weighted sum]} of every array in `state` (see `_sums`). One computation
  per set of devices the arrays live on (a jitted computation takes one; a scalar may sit on one device)."""
  groups = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    devices = frozenset(x.sharding.device_set) if isinstance(x, jax.Array) else None
    groups.setdefault(devices, {})[jax.tree_util.keystr(path)] = x
  return {name: [int(v) for v in value]
          for group in groups.values() for name, value in jax.device_get(_sums(group)).items()}


def _require_finite(state) -> None:
  """Raises if a floating-point array of `state` holds NaN or inf. Training never saves such a state (its
  step keeps the previous state when the update is not finite), so one read back means the files were
  damaged after the save: e.g. garbage bytes in a data file decode to NaN without any read error."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not np.issubdtype(leaf.dtype, np.inexact):
      continue
    # Each of this process's shards on its own device (a one-device op, whatever the mesh); one bool back.
    shards = [s.data for s in leaf.addressable_shards] if isinstance(leaf, jax.Array) else [leaf]
    if not all(bool(jax.numpy.isfinite(x).all()) for x in shards):
      raise CheckpointError(f'{jax.tree_util.keystr(path)} holds NaN or inf: the checkpoint files are damaged')


def _restore_newest(manager: ocp.CheckpointManager, directory: str, make_args: Callable, step: int | None,
                    check: Callable | None = None):
  """(restored items, step, newer steps that failed). Tries `step` only, or every step newest first; a
  step whose restored items `check(items, step)` raises on counts as failed."""
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f'no checkpoint in {directory}')
  failures, last_error = [], None
  for candidate in steps:
    try:
      restored = manager.restore(candidate, args=make_args())
      if check is not None:
        check(restored, candidate)
      return restored, candidate, [s for s, _ in failures]
    except Exception as e:  # noqa: BLE001 -- any read error means "this step is unusable"; the next is tried
      reason, last_error = _one_line(e), e
      failures.append((candidate, reason))
      if step is None:
        logging.warning('checkpoint: step %d at %s cannot be restored (%s); trying the previous step',
                        candidate, _step_dir(directory, candidate), reason)
  listing = '\n'.join(f'  step {s} at {_step_dir(directory, s)}: {reason}' for s, reason in failures)
  hint = ('If every step fails the same way, what was asked for does not match what was saved: a changed model or '
          'optimizer config, or a data iterator asked of checkpoints saved without one.')
  raise CheckpointError(f'no checkpoint in {directory} could be restored:\n{listing}\n{hint}') from last_error


def _handle_unfinished_saves(directory: str, *, remove: bool):
  """Logs (and removes) the tmp folders a run killed mid-save left behind; orbax never lists them as steps."""
  path = epath.Path(directory)
  leftovers = sorted(p for p in path.iterdir() if _TMP_MARK in p.name) if path.exists() else []
  for leftover in leftovers:
    logging.warning('checkpoint: step %s at %s was never finished (a run stopped mid-save); it is ignored%s',
                    leftover.name.split('.')[0], leftover, ' and removed' if remove else '')
    if remove and jax.process_index() == 0:
      leftover.rmtree()
  if remove and jax.process_count() > 1:
    jax.experimental.multihost_utils.sync_global_devices('checkpoint: unfinished saves removed')


def _step_dir(directory: str, step: int) -> epath.Path:
  return epath.Path(directory) / str(step)  # orbax's default step naming: no prefix, no padding


def _require_shardings(tree, what: str):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if getattr(leaf, 'sharding', None) is None:
      raise ValueError(f'{what}{jax.tree_util.keystr(path)} has no sharding; build it as '
                       'jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))')


def _one_line(e: Exception, limit: int = 300) -> str:
  text = ' '.join(f'{type(e).__name__}: {e}'.split())
  return text if len(text) <= limit else text[:limit] + '...'
