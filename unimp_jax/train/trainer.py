"""The training loop, readable top to bottom: data, mesh, state, compile, loop, checkpoints.

A run is resumable exactly: the train state and the Grain iterator position are saved together, and
every batch is a pure function of (seed, epoch, user), so a restarted run (after a crash, SIGKILL or
SIGTERM) continues with the same batches and, on CPU, bit-identical losses.

With `eval.every` the run is scored on validation users while it trains, and the step it hands on is the
best one: a model that fits its training users ever more closely can get worse on new ones
(docs/BENCHMARKS.md, "47 times the training examples"). Early stopping (`eval.patience`) is a function of
the saved scores alone, so it resumes exactly too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time

import jax
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils

from unimp_jax import config as config_lib, runs
from unimp_jax.data import datasets, pipeline, prompts
from unimp_jax.eval import evaluate
from unimp_jax.hf import pretrained as pretrained_lib
from unimp_jax.model import items, unimp
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.train import checkpoint as checkpoint_lib
from unimp_jax.train import metrics as metrics_lib
from unimp_jax.train import optim
from unimp_jax.train import step as step_lib


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient; the last good checkpoint is kept."""


@dataclasses.dataclass
class Run:
  """What a finished (or stopped) run hands on: for evaluation, reports and tests."""
  cfg: object
  mesh: jax.sharding.Mesh
  graphdef: object
  state: dict
  builder: prompts.TaskBuilder
  last_step: int
  stopped_by_signal: bool
  state_step: int  # the step `state` is from: the best validation step with `eval.every`, else `last_step`

  @functools.cached_property
  def params(self) -> dict:
    """The parameters to evaluate and predict with: content item rows written in (model.items)."""
    return items.inference_params(self.graphdef, self.state['params'], self.builder)


def say(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process. A SIGTERM may reach one process of a multi-process run only (one
  host preempted): every process must still leave the loop after the same step and save it together, or
  the others wait forever in the next step's collectives."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def validation_metrics(cfg, graphdef, params, builder: prompts.TaskBuilder) -> dict[str, float]:
  """{'valid/TASK/METRIC': value} of `eval.metric`'s task on the first `eval.users` validation users (never
  trained on), warm and cold targets included ('valid/TASK, warm targets/HR@10')."""
  task = cfg.eval.metric.split('/')[0]
  results = evaluate.evaluate(graphdef, items.inference_params(graphdef, params, builder), builder,
                              split=cfg.data.split, stage='valid', batch_size=cfg.data.batch_size,
                              tasks_to_run=(task,), max_users=cfg.eval.users)
  return {f'valid/{name}/{k}': float(v) for name, m in results.items() for k, v in m.items() if k != 'users'}


def train(cfg, workdir: str) -> Run:
  # ---- data: the vocabulary is fitted from the dataset and config alone, before the model exists -------
  config_lib.validate(cfg, jax.device_count())  # the preset's own mistakes, before any dataset is built or read
  dataset = datasets.open_dataset(cfg)
  mesh_shape = runs.resolve(cfg, dataset)  # pretrained parts, vocabulary

  # ---- set up the mesh, model and optimizer ------------------------------------------------------------
  mesh = mesh_lib.make_mesh(cfg.mesh)
  say(f'mesh (data, fsdp, tensor) = {mesh_shape} over {jax.device_count()} {jax.devices()[0].platform} device(s)')
  graphdef, abstract_params = unimp.abstract_model(cfg.model, cfg.seed)
  tx = optim.make_optimizer(cfg.train, nnx.to_pure_dict(abstract_params))
  shardings, abstract_state = step_lib.state_shardings(abstract_params, tx, mesh, cfg.mesh.rules)

  # ---- restore, or initialise directly sharded -----------------------------------------------------------
  # The task builder comes between: semantic item ids are computed from the parameters a fresh run starts
  # from (and saved in the workdir), while a resumed run reloads its saved ids before its data position.
  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), save_every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
      async_save=cfg.checkpoint.async_save, best_metric=f'valid/{cfg.eval.metric}' if cfg.eval.every else None,
      best_mode=cfg.eval.mode)
  if checkpointer.latest_step() is not None:
    refused, allowed = config_lib.resume_changes(checkpointer.restore_config(), cfg)
    if refused:  # e.g. another batch size would silently skip examples: the data position counts batches
      raise config_lib.ConfigError(f'{workdir} holds a run with another config, which it cannot resume: '
                                   + '; '.join(refused) + '. Use a new workdir, or the checkpoint\'s values')
    for line in allowed:
      say(f'warning: resuming with {line}')
    builder = datasets.make_builder(cfg, dataset, workdir)
    batches = iter(pipeline.make_dataset(builder, cfg.data, seed=cfg.seed))
    state, start = checkpointer.restore(abstract_state, data_iterator=batches)
    say(f'resumed from step {start} ({checkpointer.directory})')
  else:
    model = unimp.create_sharded(cfg.model, mesh, cfg.mesh.rules, seed=cfg.seed)
    if cfg.checkpoint.init_params_from:  # a stage-1 run, or e.g. a multi-task run to fine-tune on one task
      params, lines = checkpoint_lib.init_params(cfg.checkpoint.init_params_from, nnx.to_pure_dict(nnx.state(model)))
    else:
      lines = [f'pretrained {line}' for line in pretrained_lib.load_pretrained(model, cfg)]
      params = nnx.to_pure_dict(nnx.state(model))
    for line in lines:
      say(line)
    del model
    builder = datasets.make_builder(cfg, dataset, workdir, params=params, graphdef=graphdef)
    batches = iter(pipeline.make_dataset(builder, cfg.data, seed=cfg.seed))
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=shardings)(params)
    start = 0

  # ---- compile the step once; show its memory before step 0 ----------------------------------------------
  first = next(batches)
  # Content item rows (unimp_jax.model.items) are computed from every item's picture and text each step.
  catalogue = None
  if cfg.model.item_embeddings != 'learned':
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    catalogue = jax.device_put(builder.catalogue().arrays(), replicated)
  batch_spec = {k: v.ndim for k, v in step_lib.step_inputs(first).items()}
  train_step = step_lib.make_train_step(
      graphdef, tx, cfg.train, pad_id=builder.pad, shardings=shardings,
      batch_sharding=step_lib.batch_shardings(mesh, cfg.mesh.rules, batch_spec),
      excluded=step_lib.excluded_tokens(cfg.train, builder), seed=cfg.seed)
  with mesh_lib.use_mesh(mesh, cfg.mesh.rules):
    global_first = pipeline.global_batch(step_lib.step_inputs(first), mesh, cfg.mesh.rules)
    compiled = train_step.lower(state, global_first, catalogue).compile()
  say(f'compiled train step memory: {compiled.memory_analysis()}')
  images_per_example = cfg.data.num_images if builder.uses_images else 0
  flops_per_step = metrics_lib.flops_per_example(cfg.model, cfg.data.seq_len, images_per_example)['total'] \
      * cfg.data.batch_size
  learning_rate = optim.schedule(cfg.train)

  # ---- SIGTERM (preemption): finish the current step, save, exit -------------------------------------------
  # The handler only records the signal; `stopping` is what every process agrees on after each step.
  stop = {'signal': False}
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
  stopping = False

  # ---- the loop ------------------------------------------------------------------------------------------
  writer = metrics_lib.MetricsWriter(workdir)
  progress = tqdm.tqdm(total=cfg.train.steps, initial=start, desc='train', dynamic_ncols=True,
                       disable=jax.process_index() != 0)

  def out_of_patience(at: int) -> bool:  # early stopping, from the saved scores alone (so a resumed run agrees)
    best = checkpointer.best_step() if cfg.eval.every and cfg.eval.patience else None
    return best is not None and at - best >= cfg.eval.patience * cfg.eval.every

  def more_steps() -> bool:
    return step < cfg.train.steps and not stopping and not stopped_early

  def scalars_of(done) -> dict:
    """The host side of a finished step: its metrics fetched, checked and turned into logged scalars."""
    nonlocal finished
    at, metrics, local, dispatched = done
    metrics = jax.device_get(metrics)  # waits for the step; the next one is already queued behind it
    seconds = time.perf_counter() - max(dispatched, finished)  # from when it started, or the previous ended
    finished = time.perf_counter()
    if not metrics['finite']:
      raise TrainingDiverged(f'step {at}: loss {metrics["loss"]} / gradient norm {metrics["grad_norm"]} is not '
                             f'finite; the last good checkpoint is at step {checkpointer.latest_step()}')
    images = int((local['image_items'] >= 0).sum())
    scalars = {k: float(v) for k, v in metrics.items() if k != 'finite' and np.isfinite(v)}
    scalars.update(learning_rate=float(learning_rate(at - 1)), step_seconds=seconds,
                   tokens_per_second=local['tokens'].size / seconds, images_per_second=images / seconds)
    mfu = metrics_lib.mfu(flops_per_step, seconds, jax.device_count(), jax.devices()[0].device_kind)
    if mfu is not None:
      scalars['mfu'] = mfu
    return scalars

  def log(at: int, scalars: dict) -> None:
    writer.write(at, scalars)
    progress.update(1)
    if at % cfg.train.log_every == 0 or at == 1:
      progress.set_postfix(loss=f'{scalars["loss"]:.3f}', grad_norm=f'{scalars["grad_norm"]:.2f}',
                           tokens_per_s=f'{scalars["tokens_per_second"]:.0f}')

  # Each step's metrics are read one step late: the host dispatches step N, then fetches step N - 1's numbers
  # (already computed) and the next batch while the devices run step N. A step that is evaluated or saved,
  # and the last one (every way out of the loop saves), is read at once: no state is scored or saved past a
  # step that diverged, and none is left unread.
  step, local, stopped_early, pending, finished = start, first, out_of_patience(start), None, 0.0
  try:
    with mesh_lib.use_mesh(mesh, cfg.mesh.rules):
      while more_steps():
        dispatched = time.perf_counter()
        batch = pipeline.global_batch(step_lib.step_inputs(local), mesh, cfg.mesh.rules)
        state, metrics = compiled(state, batch, catalogue)
        step += 1
        if pending is not None:
          log(pending[0], scalars_of(pending))
        pending = (step, metrics, local, dispatched)
        stopping = any_process(stop['signal'])
        evaluate_now = cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps)
        if evaluate_now or checkpointer.should_save(step) or stopping or step == cfg.train.steps:
          scalars, pending = scalars_of(pending), None
          valid = None
          if evaluate_now:
            valid = validation_metrics(cfg, graphdef, state['params'], builder)
            scalars.update(valid)
            say(f'step {step}: validation {cfg.eval.metric} {valid[f"valid/{cfg.eval.metric}"]:.4f}')
          begin = time.perf_counter()
          checkpointer.save(step, state, data_iterator=batches, config=cfg, metrics=valid, force=True)
          scalars['checkpoint_blocking_seconds'] = time.perf_counter() - begin  # the rest is asynchronous
          stopped_early = valid is not None and out_of_patience(step)  # the best step moves only with a score
          log(step, scalars)
        if more_steps():
          local = next(batches)
    if stopped_early:
      say(f'stopped early at step {step}: validation {cfg.eval.metric} has not improved for {cfg.eval.patience} '
          'evaluations (eval.patience)')
    state_step = step
    best = checkpointer.best_step() if cfg.eval.every else None
    if best is not None and best != step and not stopping:
      say(f'the best validation {cfg.eval.metric} is step {best}\'s: it is the step evaluated and served')
      state, state_step = checkpointer.restore(abstract_state, step=best)
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    progress.close()
    writer.close()
    checkpointer.wait()
    checkpointer.close()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(cfg.to_dict(), f, indent=2, default=str)
  return Run(cfg, mesh, graphdef, state, builder, step, stopping, state_step)
