"""The dataset a config names, and the config fitted to it: the one place a run's data side is set up.

  open_dataset          the dataset at `data.path` (the embedded ones are built on first use under data/generated/)
  token_ids             the run's token layout (the dataset's tokenizer, image codes, semantic ids)
  fit_model_to_dataset  vocabulary sizes and `<image>` from that layout, before any model exists
  make_builder          the task builder of training, evaluation and prediction

The examples and batches themselves are unimp_jax.data.pipeline's.
"""

from __future__ import annotations

import os

import jax
import jax.experimental.multihost_utils
from absl import logging

from unimp_jax import config as config_lib
from unimp_jax.data import captions, formats, prompts, semantic_ids, synthetic
from unimp_jax.data import tokenizer as tokenizer_lib
from unimp_jax.data.tokenizer import TokenIds
from unimp_jax.vq import codes as vq_codes

GENERATED = 'data/generated'  # where the embedded datasets are built on first use (git-ignored)


def _check_buildable(key: str, path: str) -> None:
  generated = os.path.abspath(GENERATED)
  if os.path.exists(os.path.join(path, 'manifest.json')) or \
      os.path.commonpath([os.path.abspath(path), generated]) == generated:
    return
  raise config_lib.ConfigError(
      f'config.{key}: no dataset at {path!r} (no manifest.json). The embedded datasets are built on first use '
      f'only under {GENERATED}/; convert real data with python -m unimp_jax.data.convert')


def open_dataset(cfg) -> formats.UnifiedDataset:
  """The dataset at `data.path`. If nothing is there yet and the path is under `data/generated/`, the
  embedded one is built there first: the default catalogue, or for stage 1 (`data.tasks.caption`) the
  embedded caption corpus on the base vocabulary of the catalogue `eval.probe_data` (itself built first
  if missing), so that a stage-1 checkpoint starts stage 2 on the same tokens. Anywhere else a missing
  dataset is an error: a mistyped path must not train on a freshly built synthetic dataset."""
  if not os.path.exists(os.path.join(cfg.data.path, 'manifest.json')):
    _check_buildable('data.path', cfg.data.path)
    if cfg.data.tasks.caption > 0:
      _check_buildable('eval.probe_data', cfg.eval.probe_data)
    if jax.process_index() == 0:
      size = cfg.model.vision.image_size
      if cfg.data.tasks.caption > 0:
        catalogue = cfg.eval.probe_data
        if not os.path.exists(os.path.join(catalogue, 'manifest.json')):
          logging.info('building the embedded default dataset at %s', catalogue)
          synthetic.build(catalogue, seed=cfg.seed, image_size=size)
        logging.info('building the embedded caption corpus at %s', cfg.data.path)
        captions.build(cfg.data.path, seed=cfg.seed, image_size=size, tokenizer=os.path.join(catalogue, 'tokenizer'))
      else:
        logging.info('building the embedded default dataset at %s', cfg.data.path)
        synthetic.build(cfg.data.path, seed=cfg.seed, image_size=size)
    jax.experimental.multihost_utils.sync_global_devices('dataset built')
  return formats.UnifiedDataset(cfg.data.path)


def image_codes(cfg, dataset: formats.UnifiedDataset) -> vq_codes.ImageCodes | None:
  """The catalogue's image codes `data.image_codes` names (checked against the dataset), or None."""
  return vq_codes.load(cfg.data.image_codes, dataset) if cfg.data.image_codes else None


def token_ids(cfg, dataset: formats.UnifiedDataset) -> TokenIds:
  """The run's token layout: the dataset tokenizer's, plus the image-code tokens of `data.image_codes` and
  the semantic id tokens `data.semantic` fixes."""
  layout = dataset.tokenizer().unimp_layout
  if cfg.data.image_codes:
    layout = dict(layout, num_image_codes=image_codes(cfg, dataset).codebook_size)
  if cfg.data.item_ids == 'semantic':
    layout = dict(layout, semantic_codebooks=list(semantic_ids.codebook_sizes(cfg.data.semantic)))
  return TokenIds(layout)


def fit_model_to_dataset(cfg, dataset: formats.UnifiedDataset) -> None:
  """Sets the vocabulary sizes from the dataset's tokenizer and the config's semantic id tokens (item
  counts come from the data, never from a preset) and checks that the stored pictures have the vision
  tower's size. Needs no model parameters, so the model can be built after it."""
  ids = token_ids(cfg, dataset)
  cfg.model.lm.vocab_size = ids.base_vocab_size  # `<image>` is usually the first added token: image_token_id follows
  cfg.model.lm.added_vocab_size = ids.added_vocab_size
  cfg.model.item_tokens = tuple(ids.item_range)
  if cfg.model.image_token_id != ids.image:  # a base tokenizer's own <image> (a real IDEFICS's): a fact of the data
    with cfg.model.unlocked():  # assigning would move the field it refers to (lm.vocab_size): replace it
      del cfg.model['image_token_id']
      cfg.model.image_token_id = ids.image
  if dataset.image_size != cfg.model.vision.image_size:
    raise ValueError(f'{dataset.path} stores {dataset.image_size} px pictures but config.model.vision.image_size '
                     f'is {cfg.model.vision.image_size}; rebuild the dataset or change the config')


def make_builder(cfg, dataset: formats.UnifiedDataset, workdir: str | None = None, params=None,
                 graphdef=None) -> prompts.TaskBuilder:
  """The one place a task builder is made from a config: training, evaluation and prediction. The model's
  vocabulary is fitted before, once (`unimp_jax.runs`). With `data.item_ids = 'semantic'` the items' codes
  are WORKDIR's saved ones, or are computed (from `data.semantic.embeddings`, or from the model
  `params`/`graphdef` the run starts from) and saved there; see unimp_jax.data.semantic_ids.
  """
  tokenizer, codes, pictures = dataset.tokenizer(), None, image_codes(cfg, dataset)
  if pictures is not None:  # before any semantic id tokens: the layout puts img_k right after the items
    tokenizer = tokenizer_lib.with_image_code_tokens(tokenizer, pictures.codebook_size)
  if cfg.data.item_ids == 'semantic':
    tokenizer = tokenizer_lib.with_semantic_tokens(tokenizer, semantic_ids.codebook_sizes(cfg.data.semantic))
    codes = semantic_ids.for_run(cfg, dataset, tokenizer, workdir, params, graphdef).codes
  return prompts.TaskBuilder(dataset, tokenizer, seq_len=cfg.data.seq_len, num_images=cfg.data.num_images,
                             history=cfg.data.history, item_codes=codes, item_content=cfg.data.item_content,
                             image_codes=pictures)
