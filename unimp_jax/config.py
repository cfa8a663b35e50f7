"""The configuration tree every preset in configs/ starts from, and its one-time validation.

Sections: `model` (vision, connector, lm), `mesh` (axis sizes and the logical-axis rules table),
`data` (the dataset, batch shape, task mixture, and how items are shown and named), `train` and
`checkpoint`. Configs are locked, so a misspelt key, in a file or on the command line
(`--config.model.lm.num_layers=8`), fails at once and names the key.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from unimp_jax import tasks
from unimp_jax.data import prompts, semantic_ids, splits
from unimp_jax.model import items, layers
from unimp_jax.sharding import mesh as mesh_lib

DTYPES = ('float32', 'bfloat16', 'float16')
REMAT = tuple(layers.REMAT_POLICIES)  # what a scanned block's backward pass keeps (model.remat)
ACTIVATIONS = ('quick_gelu', 'gelu')
MEDIA_MASKS = ('previous', 'all')
ALPHA_TYPES = ('float', 'vector')
SCHEDULES = ('cosine', 'linear', 'constant')
ITEM_IDS = ('atomic', 'semantic')


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def base_config() -> ml_collections.ConfigDict:
  """The `tiny` preset (SPEC §7): seconds on a CPU. Other presets override `model`."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.dtype = 'float32'         # compute dtype: bfloat16 on accelerators
  c.model.param_dtype = 'float32'   # storage dtype of parameters (and optimizer state)
  c.model.remat = 'none'            # what the backward pass recomputes, per scanned block
  c.model.scan_layers = True        # False: layers written out (unrolled); see unimp_jax.model.layers.scan
  c.model.attention = 'xla'         # jax.nn.dot_product_attention's implementation: 'xla', or 'cudnn' (NVIDIA GPUs)
  c.model.vision = ml_collections.ConfigDict(dict(
      image_size=32, patch_size=8, channels=3, width=64, depth=2, mlp_dim=256, num_heads=4,
      act='quick_gelu', norm_eps=1e-5))
  c.model.connector = ml_collections.ConfigDict(dict(
      num_latents=8, depth=2, num_heads=4, head_dim=16, mlp_ratio=4, qk_norm=False, norm_eps=1e-5))
  c.model.lm = ml_collections.ConfigDict(dict(
      vocab_size=4096,
      # Rows for `<image>`, `<|endofchunk|>`, `<answer>`, ratings, slots, items and image codes. The
      # dataset's tokenizer sets the real count; `<image>` is always the first added token.
      added_vocab_size=16,
      width=128, mlp_dim=352, num_layers=4, num_heads=4, num_kv_heads=4, rope_theta=10000.0,
      norm_eps=1e-6, tie_embeddings=False, qkv_bias=False,  # qkv_bias: Qwen2's q/k/v projections
      # Rotary embeddings rescaled for a longer context, as a Hugging Face config's `rope_parameters` says
      # (type 'linear' or 'llama3', the Llama 3.2 presets' scheme; model.layers.rope_frequencies).
      rope_scaling=dict(type='default', factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
      cross_attn_every=2, media_mask='previous', alpha_type='float', alpha_init=0.0, qk_norm=False,
      # Residual dropout in training (token embeddings and every attention and MLP output of the LM);
      # Llama and IDEFICS train without it. Against memorising the training users (eval.every).
      dropout=0.0))
  c.model.image_token_id = c.model.lm.get_ref('vocab_size')
  # 'content': an item token's embedding and head row are computed from the item's picture and text by
  # the model's own towers (unimp_jax.model.items), so items are ranked by what they are and new items
  # can be ranked at all; 'content+id': those rows plus a learned row per item, zero at the start
  # (cold items, which no training example names, keep their content row); 'learned': one free row per
  # item (the paper's default). Atomic ids only.
  c.model.item_embeddings = 'learned'
  # True: a pooled user tower beside the LM (unimp_jax.model.unimp.pool_items). At every position the mean
  # content row of the item tokens so far, through a learned square matrix (the identity at the start),
  # is added to the LM's last hidden state, so an item's logit includes <W mean(history rows), its row>,
  # the score FISM-style recommenders give. The paper's LM has to learn to gather the history's items with
  # attention, and at CPU scale it does not (docs/BENCHMARKS.md). Not expressible in a Hugging Face model:
  # such runs do not export. Atomic ids only.
  c.model.item_pool = False
  c.model.item_tokens = (0, 0)  # [first, end) ids of the item tokens: the dataset's tokenizer sets them

  # Local Hugging Face directories to start from (unimp_jax.hf.load): a CLIP vision tower and/or a
  # Llama-family LM, or a whole IDEFICS model. Their config.json sets the architecture of what they fill.
  c.pretrained = ml_collections.ConfigDict(dict(vision='', lm='', idefics=''))

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = mesh_lib.DEFAULT_RULES

  c.data = ml_collections.ConfigDict()
  c.data.path = 'data/generated/fashion'  # a unified dataset (unimp_jax.data.formats)
  c.data.split = 'by_user'  # or 'leave_last_out'
  c.data.batch_size = 8     # global batch, split over processes and over mesh.data x mesh.fsdp
  c.data.seq_len = 128
  c.data.num_images = 5     # image slots per example
  c.data.history = 10       # most recent items in a prompt (fewer when seq_len or num_images run out)
  c.data.workers = 0        # Grain worker processes (0: in the training process)
  c.data.train_users = 0    # train on the split's first N training users only (0: all): learning curves by data size
  # What an item chunk shows: 'image+text' (UniMP), 'text' (no pictures; the model runs without images)
  # or 'ids' (only the item's id tokens: the history is the id sequence). See unimp_jax.data.prompts.
  c.data.item_content = 'image+text'
  # How an item is written: 'atomic' (one token item_i per item) or 'semantic' (residual k-means codes of
  # item embeddings, one token per level and code, sid_{level}_{code}; unimp_jax.data.semantic_ids).
  c.data.item_ids = 'atomic'
  c.data.semantic = ml_collections.ConfigDict(dict(
      levels=3,             # k-means levels, then one collision level
      codebook=32,          # codes per k-means level
      max_collisions=16,    # tokens of the collision level: most items that may share all k-means codes
      embeddings='',        # .npy / .safetensors [num_items, D]; '' = our own towers' item embeddings
      seed=0, init='k-means++', iterations=50))
  # The catalogue pictures' image codes (WORKDIR/image_codes.safetensors of `python -m unimp_jax.vq.train`):
  # the generation task answers with them as `img_k` tokens. '' = none; the generation task needs them.
  c.data.image_codes = ''
  # Task mixture (relative proportions) and per-example loss weights (paper: recommendation 2.0); the
  # tasks are unimp_jax.tasks.TASKS. `caption` is stage 1 and trains alone, on an image–caption corpus.
  c.data.tasks = ml_collections.ConfigDict(dict(
      recommendation=1.0, search=1.0, preference=1.0, selection=1.0, generation=0.0, caption=0.0))
  c.data.task_weights = ml_collections.ConfigDict(dict(
      recommendation=2.0, search=1.0, preference=1.0, selection=1.0, generation=1.0, caption=1.0))

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300
  c.train.learning_rate = 1e-3
  c.train.schedule = 'cosine'        # or 'linear', 'constant'; after a linear warm-up
  c.train.warmup_fraction = 0.01
  c.train.weight_decay = 0.1
  c.train.clip_norm = 1.0
  c.train.focal_gamma = 2.0          # (1 - p_t)^gamma re-weighting; 0 = plain cross-entropy
  c.train.z_loss = 0.0               # coefficient of mean(logsumexp(logits)^2) on supervised tokens
  # > 0: every history chunk also predicts the item bought next, with this loss weight (unimp_jax.train.loss;
  # the paper supervises only answer spans). Atomic item ids only.
  c.train.next_item_weight = 0.0
  # Items released after the data's cut-off (cold items) are left out of the training softmax: they do not
  # exist yet at training time (unimp_jax.train.loss). Atomic item ids (semantic codes are shared).
  c.train.exclude_cold_items = True
  c.train.microbatches = 1           # gradient accumulation: the batch is split into this many
  # > 0: the loss applies the output head this many positions at a time, recomputing each chunk's logits
  # in the backward pass, so the float32 logits [batch, seq_len, vocabulary] never exist at once (at a
  # 128k vocabulary they are GiBs per device). 0: all positions at once.
  c.train.loss_chunk = 0
  # Regexes over parameter paths (`python -m unimp_jax.model.summary`). tiny trains from scratch, so
  # nothing is frozen; configs/paper.py freezes the pretrained towers as the paper does.
  c.train.freeze_patterns = ()
  c.train.decay_patterns = (r'^lm/groups/cross/.*kernel$',)  # paper: decay on cross-attention weights only
  c.train.log_every = 10

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100           # steps between saves (plus one at the end and one on SIGTERM)
  c.checkpoint.keep = 3              # most recent checkpoints kept
  c.checkpoint.async_save = True
  # A checkpoints/ directory to start from (its parameters only): another run of this model, or a stage-1
  # run, whose added vocabulary is a prefix of this one's (unimp_jax.train.checkpoint.init_params).
  c.checkpoint.init_params_from = ''

  c.eval = ml_collections.ConfigDict()
  c.eval.probe_data = ''  # a catalogue whose pictures stage 1's report probes (unimp_jax.tasks.caption)
  # Validation during training (unimp_jax.train.trainer): every `every` steps (0: never) the first `users`
  # validation users are scored on `metric` ('task/metric', as the report names it); that step is saved with
  # its score, the best step is kept and evaluated and served in the end, and a run stops early after
  # `patience` evaluations without a better score (0: never).
  c.eval.every = 0
  c.eval.users = 500
  c.eval.metric = 'recommendation/HR@10'
  c.eval.mode = 'max'                # 'min' for a metric where lower is better (preference/RMSE)
  c.eval.patience = 0
  return c


def _check(ok: bool, key: str, message: str):
  if not ok:
    raise ConfigError(f'config.{key}: {message}')


def _check_choice(cfg, key: str, choices):
  value = cfg
  for part in key.split('.'):
    value = value[part]
  _check(value in choices, key, f'{value!r} is not one of {choices}')


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks everything that can be checked before compiling; returns the resolved mesh shape."""
  m, v, c, lm = cfg.model, cfg.model.vision, cfg.model.connector, cfg.model.lm
  for key, choices in (('model.dtype', DTYPES), ('model.param_dtype', DTYPES), ('model.remat', REMAT),
                       ('model.vision.act', ACTIVATIONS), ('model.lm.media_mask', MEDIA_MASKS),
                       ('model.lm.alpha_type', ALPHA_TYPES), ('model.lm.rope_scaling.type', layers.ROPE_SCALINGS),
                       ('model.attention', layers.ATTENTION)):
    _check_choice(cfg, key, choices)
  _check(m.attention != 'cudnn' or jax.default_backend() == 'gpu', 'model.attention',
         f"'cudnn' is cuDNN's fused attention for NVIDIA GPUs; this process runs on {jax.default_backend()}: use 'xla'")
  rope = lm.rope_scaling
  _check(math.isfinite(rope.factor) and rope.factor > 0, 'model.lm.rope_scaling.factor', f'{rope.factor}: must be > 0')
  _check(rope.type != 'llama3' or 0 < rope.low_freq_factor < rope.high_freq_factor, 'model.lm.rope_scaling',
         f'llama3 needs 0 < low_freq_factor < high_freq_factor (got {rope.low_freq_factor}, {rope.high_freq_factor})')
  _check(rope.original_max_position_embeddings > 0, 'model.lm.rope_scaling.original_max_position_embeddings',
         f'{rope.original_max_position_embeddings}: must be > 0')
  _check(v.image_size % v.patch_size == 0, 'model.vision.image_size',
         f'{v.image_size} is not a multiple of model.vision.patch_size={v.patch_size}')
  _check(v.width % v.num_heads == 0, 'model.vision.num_heads',
         f'model.vision.width={v.width} is not divisible by {v.num_heads} heads')
  _check(lm.width % lm.num_heads == 0, 'model.lm.num_heads',
         f'model.lm.width={lm.width} is not divisible by {lm.num_heads} heads')
  _check(lm.num_heads % lm.num_kv_heads == 0, 'model.lm.num_kv_heads',
         f'{lm.num_heads} query heads cannot be grouped into {lm.num_kv_heads} key/value heads')
  _check((lm.width // lm.num_heads) % 2 == 0, 'model.lm.num_heads', 'rotary embeddings need an even head dim')
  _check(lm.num_layers % lm.cross_attn_every == 0, 'model.lm.cross_attn_every',
         f'model.lm.num_layers={lm.num_layers} is not a multiple of {lm.cross_attn_every}')
  _check(0 <= lm.dropout < 1, 'model.lm.dropout', f'{lm.dropout}: must be in [0, 1)')
  _check(lm.added_vocab_size >= 1, 'model.lm.added_vocab_size', 'must be >= 1: `<image>` is an added token')
  _check(0 <= m.image_token_id < lm.vocab_size + lm.added_vocab_size, 'model.image_token_id',
         f'{m.image_token_id} is outside the vocabulary [0, {lm.vocab_size + lm.added_vocab_size})')

  for key in ('data', 'fsdp', 'tensor'):
    size = cfg.mesh[key]
    _check(size == -1 or size >= 1, f'mesh.{key}', f'{size}: a mesh axis has >= 1 devices, or -1 for the rest')
  positive = {'train.steps': cfg.train.steps, 'train.microbatches': cfg.train.microbatches,
              'train.log_every': cfg.train.log_every, 'data.batch_size': cfg.data.batch_size,
              'data.seq_len': cfg.data.seq_len, 'data.history': cfg.data.history,
              'checkpoint.every': cfg.checkpoint.every, 'checkpoint.keep': cfg.checkpoint.keep}
  for key, value in positive.items():
    _check(value >= 1, key, f'{value}: must be >= 1')
  e = cfg.eval
  _check(e.every >= 0 and e.patience >= 0 and e.users >= 1, 'eval',
         f'every={e.every}, patience={e.patience}, users={e.users}: every and patience >= 0, users >= 1')
  _check_choice(cfg, 'eval.mode', ('max', 'min'))
  task, _, metric = e.metric.partition('/')
  _check(task in tasks.EVALUATED and metric, 'eval.metric',
         f"{e.metric!r}: 'task/metric' with a task of {tasks.EVALUATED}, e.g. 'recommendation/HR@10'")
  _check(not e.every or cfg.data.tasks[task] > 0, 'eval.metric', f'{e.metric!r}: the run does not train {task}')
  _check(cfg.data.train_users >= 0, 'data.train_users', f'{cfg.data.train_users}: must be >= 0 (0: every user)')
  _check(cfg.data.num_images >= 0, 'data.num_images', f'{cfg.data.num_images}: must be >= 0')
  _check(cfg.data.tasks.generation == 0 or cfg.data.image_codes, 'data.image_codes',
         'the generation task answers with image codes: name the image_codes.safetensors that '
         '`python -m unimp_jax.vq.train` writes')
  _check(math.isfinite(cfg.train.learning_rate) and cfg.train.learning_rate > 0, 'train.learning_rate',
         f'{cfg.train.learning_rate}: must be a positive number')
  _check(0 <= cfg.train.warmup_fraction < 1, 'train.warmup_fraction', f'{cfg.train.warmup_fraction}: must be in [0, 1)')
  for key in ('weight_decay', 'focal_gamma', 'z_loss'):
    value = cfg.train[key]
    _check(math.isfinite(value) and value >= 0, f'train.{key}', f'{value}: must be a number >= 0')
  _check(cfg.train.loss_chunk >= 0, 'train.loss_chunk', f'{cfg.train.loss_chunk}: must be >= 0 (0: no chunks)')
  _check(cfg.train.clip_norm > 0, 'train.clip_norm', f'{cfg.train.clip_norm}: must be > 0 (inf: no clipping)')
  try:
    shape = mesh_lib.mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, num_devices)
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  data, fsdp, tensor = shape
  for key, heads in (('model.vision.num_heads', v.num_heads), ('model.connector.num_heads', c.num_heads),
                     ('model.lm.num_heads', lm.num_heads), ('model.lm.num_kv_heads', lm.num_kv_heads)):
    _check(heads % tensor == 0, key, f'{heads} heads are not divisible by mesh.tensor={tensor}; '
           'lower mesh.tensor or change the head count')
  _check(cfg.data.batch_size % (data * fsdp) == 0, 'data.batch_size',
         f'{cfg.data.batch_size} is not divisible by mesh.data*mesh.fsdp={data * fsdp}')
  _check(cfg.data.split in splits.SPLITS, 'data.split', f'{cfg.data.split!r} is not one of {splits.SPLITS}')
  for key in ('tasks', 'task_weights'):
    _check(set(cfg.data[key]) == set(tasks.NAMES), f'data.{key}', f'needs exactly the tasks {tasks.NAMES}')
  _check(sum(cfg.data.tasks.values()) > 0 and min(cfg.data.tasks.values()) >= 0, 'data.tasks',
         'proportions must be >= 0 and not all 0')
  if cfg.data.tasks.caption > 0:
    _check(sum(cfg.data.tasks.values()) == cfg.data.tasks.caption, 'data.tasks',
           'caption (stage 1) trains alone, on an image–caption corpus; set the other tasks to 0')
    _check(bool(cfg.eval.probe_data), 'eval.probe_data',
           'stage 1 needs the catalogue it prepares for: its tokenizer, and the pictures its report probes')
  _check_choice(cfg, 'data.item_content', prompts.ITEM_CONTENTS)
  _check_choice(cfg, 'data.item_ids', ITEM_IDS)
  _check_choice(cfg, 'model.item_embeddings', items.ITEM_EMBEDDINGS)
  if m.item_embeddings != 'learned':
    _check(cfg.data.item_ids == 'atomic', 'model.item_embeddings',
           "'content' rows are rows of atomic item tokens; with data.item_ids='semantic' set it to 'learned'")
    _check(cfg.data.item_content != 'ids', 'model.item_embeddings',
           "'content' rows need the items' text or pictures; with data.item_content='ids' set it to 'learned'")
  if m.item_pool:
    _check(cfg.data.item_ids == 'atomic', 'model.item_pool',
           "pools atomic item tokens; with data.item_ids='semantic' set it to False")
  sem = cfg.data.semantic
  _check(sem.levels >= 1, 'data.semantic.levels', f'{sem.levels}: needs at least 1 k-means level')
  _check(sem.codebook >= 2, 'data.semantic.codebook', f'{sem.codebook}: needs at least 2 codes per level')
  _check(sem.max_collisions >= 1, 'data.semantic.max_collisions', f'{sem.max_collisions}: must be >= 1')
  _check(sem.iterations >= 1, 'data.semantic.iterations', f'{sem.iterations}: must be >= 1')
  _check_choice(cfg, 'data.semantic.init', semantic_ids.INITS)
  _check(not sem.embeddings or os.path.isfile(sem.embeddings), 'data.semantic.embeddings',
         f'{sem.embeddings!r} is not a file (a .npy or .safetensors [num_items, D]; \'\' = our own towers)')
  for source, directory in cfg.pretrained.items():
    _check(not directory or os.path.isdir(directory), f'pretrained.{source}', f'{directory!r} is not a directory')
  t = cfg.train
  _check(t.schedule in SCHEDULES, 'train.schedule', f'{t.schedule!r} is not one of {SCHEDULES}')
  _check(t.next_item_weight >= 0, 'train.next_item_weight', f'{t.next_item_weight} is negative')
  _check(not t.next_item_weight or cfg.data.item_ids == 'atomic', 'train.next_item_weight',
         "the next-item loss predicts one atomic item token; with data.item_ids='semantic' set it to 0")
  per_process = cfg.data.batch_size // max(1, data * fsdp)
  _check(cfg.data.batch_size % (t.microbatches * data * fsdp) == 0, 'train.microbatches',
         f'data.batch_size={cfg.data.batch_size} does not split into {t.microbatches} micro-batches of a '
         f'multiple of mesh.data*mesh.fsdp={data * fsdp} ({per_process} rows per batch shard)')
  for key in ('freeze_patterns', 'decay_patterns'):
    for pattern in t[key]:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f'config.train.{key}: {pattern!r} is not a regex ({e})') from None
  rule_names = {name for name, _ in cfg.mesh.rules}
  for name, target in cfg.mesh.rules:
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    for axis in targets:
      _check(axis in mesh_lib.MESH_AXES, 'mesh.rules', f'{name!r} maps to unknown mesh axis {axis!r}; '
             f'mesh axes are {mesh_lib.MESH_AXES}')
  missing = {name for name, _ in mesh_lib.DEFAULT_RULES} - rule_names
  _check(not missing, 'mesh.rules', f'no rule for logical axes {sorted(missing)}')
  return shape


# On resume: keys under these prefixes must equal the checkpoint's (the model, the data and its order, the
# optimizer); of them, `RESUME_MAY_CHANGE` may differ with a warning (a longer run, another log interval, a
# dataset moved). Any other key (mesh, checkpoint, eval, pretrained paths) may change freely.
RESUME_MUST_MATCH = ('model.', 'data.', 'train.', 'seed')
RESUME_MAY_CHANGE = ('train.steps', 'train.log_every', 'train.loss_chunk', 'data.path', 'data.image_codes')


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def flat(cfg: ml_collections.ConfigDict) -> dict:
  """{'model.lm.width': 128, ...}: every leaf of `cfg` as JSON holds it (references resolved)."""
  return _flat(json.loads(json.dumps(cfg.to_dict())))


def command_line_overrides() -> frozenset[str]:
  """The keys this process's command line set with `--config.KEY=VALUE` (none without a parsed --config)."""
  if 'config' not in flags.FLAGS or not flags.FLAGS.is_parsed():
    return frozenset()
  try:
    return frozenset(config_flags.get_override_values(flags.FLAGS['config']))
  except TypeError:  # a --config flag that is not a config file flag
    return frozenset()


def require_kept(before: dict, cfg: ml_collections.ConfigDict, keys, how: str, source: str, advice: str) -> None:
  """Raises if fitting `cfg` to facts changed one of `keys`, whose values `before` (`flat(cfg)` from before
  the fitting) were set `how` (e.g. 'on the command line'); `source` names the facts."""
  after = flat(cfg)
  changed = sorted(k for k in keys if k in before and before[k] != after.get(k))
  if changed:
    key = changed[0]
    raise ConfigError(f'config.{key}: set to {before[key]!r} {how}, but {source} gives {after.get(key)!r}; {advice}')


def resume_changes(saved: dict, cfg: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """(refused, allowed) descriptions of how `cfg` differs from the config a checkpoint was `saved` with.
  Keys only one side has (added or removed by a code change since) are not compared."""
  before, now = _flat(saved), flat(cfg)
  refused, allowed = [], []
  for key in sorted(set(before) & set(now)):
    if before[key] != now[key] and key.startswith(RESUME_MUST_MATCH):
      line = f'config.{key}: {before[key]!r} in the checkpoint, {now[key]!r} now'
      (allowed if key in RESUME_MAY_CHANGE else refused).append(line)
  return refused, allowed


def make_workdir(workdir: str) -> None:
  """Creates `--workdir` and checks that a file can be written in it, so that a read-only or misnamed
  folder fails at start-up in one line (ConfigError), not at the first save after compiling."""
  try:
    os.makedirs(workdir, exist_ok=True)
    tempfile.TemporaryFile(dir=workdir).close()  # a file can be created there (and is gone again)
  except OSError as e:
    raise ConfigError(f'--workdir {workdir}: cannot write there ({e.strerror or e})') from None


def run_main(main) -> None:
  """`absl.app.run(main)` for commands with `--config`: a mistyped or invalid key (at parse time, or a
  ConfigError from `validate`) ends in one line on stderr and exit status 2, not a traceback."""
  def fail(e: Exception):
    message = str(e)
    if isinstance(e, AttributeError):  # ml_collections: the repr of a KeyError, e.g. '\'stepz\'\nDid you mean...'
      message = 'unknown key ' + message.encode().decode('unicode_escape')[1:-1]
    print(f'error: {message}'.replace('\n', '; '), file=sys.stderr)
    sys.exit(2)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      fail(e)

  def guarded(argv):
    try:
      return main(argv)
    except ConfigError as e:
      fail(e)

  app.run(guarded, flags_parser=parse)


def load(path: str, overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` with `--config.KEY=VALUE` style overrides, exactly as the command line does."""
  argv = ['load', f'--config={path}', *(f'--config.{o}' for o in overrides)]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    raise ConfigError(f'{path} with overrides {list(overrides)}: {e}') from None
  return flag_values.config


def num_params_analytic(model_cfg) -> dict[str, int]:
  """Parameter counts from the architecture's formulas, written independently of the module code."""
  v, c, lm = model_cfg.vision, model_cfg.connector, model_cfg.lm
  d, f = v.width, v.mlp_dim
  patches = (v.image_size // v.patch_size) ** 2
  vision = (v.patch_size ** 2 * v.channels * d + d + (patches + 1) * d + 2 * d + 2 * d
            + v.depth * (4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d))
  inner = c.num_heads * c.head_dim
  connector = (c.num_latents * d + 2 * d + c.depth * (
      3 * 2 * d + 3 * d * inner + inner * d + 2 * d * c.mlp_ratio * d + (2 * 2 * c.head_dim if c.qk_norm else 0)))
  w, hd = lm.width, lm.width // lm.num_heads
  vocab = lm.vocab_size + lm.added_vocab_size
  attn = w * lm.num_heads * hd * 2 + w * lm.num_kv_heads * hd * 2
  attn += (lm.num_heads + 2 * lm.num_kv_heads) * hd if lm.qkv_bias else 0
  swiglu = 3 * w * lm.mlp_dim
  decoder = lm.num_layers * (attn + swiglu + 2 * w)
  alpha = w if lm.alpha_type == 'vector' else 1
  cross = (lm.num_layers // lm.cross_attn_every) * (
      2 * w * lm.num_heads * hd + 2 * d * lm.num_heads * hd + swiglu + 2 * w + 2 * alpha
      + (2 * hd if lm.qk_norm else 0))
  embeddings = vocab * w * (1 if lm.tie_embeddings else 2)
  language = embeddings + decoder + cross + w
  item_encoder = (w * w + w + d * w) if model_cfg.item_embeddings != 'learned' else 0  # one shared bias
  item_encoder += lm.added_vocab_size * w if model_cfg.item_embeddings == 'content+id' else 0
  item_encoder += w * w if model_cfg.item_pool else 0
  return dict(vision=vision, connector=connector, lm=language, cross_attention=cross, items=item_encoder,
              total=vision + connector + language + item_encoder)
