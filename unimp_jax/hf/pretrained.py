"""Pretrained weights from local Hugging Face directories (safetensors only; nothing is downloaded).

Three sources, config keys that training (unimp_jax.train.trainer, on a fresh start) and
`python -m unimp_jax.hf.load` read:

  pretrained.vision   CLIPVisionModel, or the vision half of a CLIPModel       -> the vision tower
  pretrained.lm       LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM  -> the LM; the connector,
                      cross-attention and added-token rows stay freshly initialised (gates at alpha_init, 0)
  pretrained.idefics  IdeficsForVisionText2Text                                -> the whole model

Each directory's `config.json` sets the architecture of what it fills (`fit_config`); its vocabulary must
be the dataset tokenizer's (build the dataset with `--tokenizer DIR`). Tensors are checked against the
model by name and shape before any is read, then streamed one at a time into their sharded places
(`unimp_jax.hf.mapping.load`), so host memory stays near one copy of the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys

from unimp_jax import config as config_lib
from unimp_jax.data import datasets, formats
from unimp_jax.hf import files, mapping

SOURCES = ('idefics', 'vision', 'lm')
TYPES = {'idefics': ('idefics',), 'vision': ('clip_vision_model', 'clip'), 'lm': mapping.LM_TYPES}


def hf_config(cfg, source: str):
  """The transformers config of `pretrained.{source}`, checked to be a model type that source accepts."""
  from transformers import AutoConfig
  directory = cfg.pretrained[source]
  files.read_json(directory)  # a clear error when config.json is missing
  hf = AutoConfig.from_pretrained(directory, local_files_only=True)
  if hf.model_type not in TYPES[source]:
    raise config_lib.ConfigError(f'config.pretrained.{source}={directory}: model_type {hf.model_type!r} is not one '
                                 f'of {TYPES[source]}')
  return hf.vision_config if hf.model_type == 'clip' else hf


def fit_config(cfg, dataset: formats.UnifiedDataset) -> None:
  """Sets the architecture of every pretrained part from its `config.json` and checks its vocabulary against
  the dataset's tokenizer. Run before `datasets.fit_model_to_dataset`; a no-op without `pretrained` dirs."""
  p = cfg.pretrained
  if p.idefics and (p.vision or p.lm):
    raise config_lib.ConfigError('config.pretrained.idefics is a whole model: leave pretrained.vision and '
                                 'pretrained.lm empty')
  ids = datasets.token_ids(cfg, dataset)
  vocab = []
  if p.idefics:
    hf = hf_config(cfg, 'idefics')
    whole = mapping.model_config_from_idefics(hf)
    cfg.model.vision.update(whole.vision)
    cfg.model.connector.update(whole.connector)
    cfg.model.lm.update({k: v for k, v in whole.lm.items() if k not in ('media_mask', 'alpha_init')})
    vocab = [('idefics', 'vocab_size', hf.vocab_size, ids.base_vocab_size)]
    # Its added rows are either all of ours (an IDEFICS this codebase exported) or tokens its own tokenizer
    # has (a real IDEFICS's `<fake_token_around_image>` and `<image>`), which fill our first added rows.
    if hf.additional_vocab_size not in (ids.added_vocab_size, *range(ids.reserved + 1)):
      raise config_lib.ConfigError(
          f'config.pretrained.idefics={p.idefics} has additional_vocab_size={hf.additional_vocab_size}, but the '
          f'dataset at {dataset.path} has {ids.added_vocab_size} added tokens, {ids.reserved} of them from its '
          f'base tokenizer: build the dataset with that model\'s tokenizer (unimp_jax.data.convert --tokenizer '
          f'{p.idefics})')
  if p.vision:
    mapping.update_vision_config(cfg.model, hf_config(cfg, 'vision'))
  if p.lm:
    hf = hf_config(cfg, 'lm')
    mapping.update_llama_config(cfg.model, hf, seq_len=cfg.data.seq_len)
    vocab = [('lm', 'vocab_size', hf.vocab_size, ids.base_vocab_size)]
  for source, key, theirs, ours in vocab:
    if theirs != ours:
      raise config_lib.ConfigError(
          f'config.pretrained.{source}={p[source]} has {key}={theirs}, but the dataset at {dataset.path} gives '
          f'{ours} (its tokenizer): build the dataset with that model\'s tokenizer (unimp_jax.data.convert '
          f'--tokenizer {p[source]})')


def load_pretrained(model, cfg) -> list[str]:
  """Fills `model` from every `pretrained.*` directory; returns one line per source loaded."""
  loaders = {'idefics': mapping.load_idefics, 'vision': mapping.load_clip_vision, 'lm': mapping.load_llama}
  lines = []
  for source in SOURCES:
    if cfg.pretrained[source]:
      tensors = files.Checkpoint(cfg.pretrained[source])
      loaders[source](model, tensors, cfg.model)
      lines.append(f'{source}: {len(tensors)} tensors from {cfg.pretrained[source]}')
  return lines


def peak_host_bytes() -> int:
  """This process's peak resident memory since it started or since `reset_peak_host_bytes` (Linux's VmHWM;
  elsewhere getrusage's maximum, which cannot be reset)."""
  try:
    with open('/proc/self/status') as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
  except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024


def reset_peak_host_bytes() -> bool:
  """Starts a new peak-memory window (Linux >= 4.0) at what the process really holds: garbage collected
  and freed heap returned to the system first. False where the peak cannot be reset."""
  gc.collect()  # model creation leaves arrays in reference cycles
  with contextlib.suppress(OSError, AttributeError):  # glibc only
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False
