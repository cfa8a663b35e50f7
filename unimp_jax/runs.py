"""A config resolved once for its dataset, and a trained run directory read back.

`resolve` is the one order in which every command turns a preset into the config it runs: the preset is
validated, the pretrained parts' architecture comes from their config.json, the vocabulary from the
dataset's tokenizer, and the result is validated again. `load` reads a main-job or benchmark workdir for
evaluation, prediction, probing and export: its saved config, checked against the dataset as it is now,
and its parameters. Neither knows about training; the trainer calls `resolve` like everyone else.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from flax import nnx

from unimp_jax import config as config_lib
from unimp_jax.data import datasets, formats
from unimp_jax.hf import pretrained
from unimp_jax.model import unimp
from unimp_jax.sharding import mesh as mesh_lib
from unimp_jax.train import checkpoint as checkpoint_lib


def resolve(cfg, dataset: formats.UnifiedDataset, explicit=None) -> tuple[int, int, int]:
  """Fits `cfg` to `dataset` and returns the mesh shape. A key in `explicit` (default: this process's
  command-line overrides) that the pretrained config.json or the dataset changes is an error naming both
  values; the preset's own values yield to those facts. The config is validated once fitted: before, a
  preset completed by a config.json may not be valid yet."""
  explicit = config_lib.command_line_overrides() if explicit is None else explicit
  before = config_lib.flat(cfg)
  pretrained.fit_config(cfg, dataset)
  datasets.fit_model_to_dataset(cfg, dataset)
  config_lib.require_kept(before, cfg, explicit, 'on the command line', 'the pretrained checkpoint or the dataset',
                          'drop the override or change the source')
  return config_lib.validate(cfg, jax.device_count())


def saved_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a run directory's newest (or `step`) checkpoint was saved with, over today's defaults (keys
  added since the run keep their defaults). The defaults are taken with their references resolved, so that
  a saved value lands on its own key only: `model.image_token_id` defaults to a reference to
  `model.lm.vocab_size`, and assigning through it would move the vocabulary."""
  defaults = ml_collections.ConfigDict(config_lib.base_config().to_dict())
  return _merged(defaults, checkpoint_lib.read_config(os.path.join(workdir, 'checkpoints'), step))


def _merged(cfg, saved: dict, prefix: str = ''):
  for key, value in saved.items():
    if key not in cfg:
      raise ValueError(f'the run\'s config has config.{prefix}{key}, which this version does not know')
    if isinstance(value, dict):
      _merged(cfg[key], value, f'{prefix}{key}.')
    else:
      cfg[key] = _tuples(value)
  return cfg


def _tuples(value):
  """JSON lists back to the tuples configs hold (e.g. the sharding rules table)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run as evaluation and serving read it."""
  cfg: ml_collections.ConfigDict  # the saved config, fitted to the dataset (the same values it trained with)
  dataset: formats.UnifiedDataset
  graphdef: object
  params: dict                    # as trained (the checkpoint's `params`), on this process's mesh
  step: int


def load(workdir: str, step: int | None = None) -> Run:
  """A run directory's checkpoint at `step`; by default the step the run hands on (the best by its
  validation score with `eval.every`, else the newest: checkpoint.served_step). A dataset whose vocabulary
  no longer matches the run's (its tokenizer rebuilt since) is an error naming the key and both values."""
  directory = os.path.join(workdir, 'checkpoints')
  step = checkpoint_lib.served_step(directory) if step is None else step
  cfg = saved_config(workdir, step)
  dataset = formats.UnifiedDataset(cfg.data.path)
  saved = config_lib.flat(cfg)
  datasets.fit_model_to_dataset(cfg, dataset)
  config_lib.require_kept(saved, cfg, saved.keys(), 'when the run was trained', f'the dataset at {dataset.path}',
                          'the dataset changed since: rebuild it as it was, or train again')
  config_lib.validate(cfg, jax.device_count())  # e.g. a mesh this machine's devices cannot form
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, abstract = unimp.abstract_model(cfg.model, cfg.seed)
  shardings = nnx.to_pure_dict(mesh_lib.state_shardings(abstract, mesh, cfg.mesh.rules))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), shardings)
  return Run(cfg, dataset, graphdef, checkpoint_lib.restore_params(directory, target, step=step), step)
