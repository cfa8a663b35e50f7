"""Trains the image tokenizer on a dataset's item pictures, then reports it on held-out items.

  python -m unimp_jax.vq.train --config configs/vq.py --workdir workdir/vq [--config.KEY=VALUE ...]

Training pictures are the catalogue's items that have one; the held-out items are its cold items (never
in any training example, unimp_jax.data.synthetic), or the last 10% of item ids for data without cold
items. Every batch is a pure function of (seed, step), so a rerun resumes exactly from the newest
checkpoint (WORKDIR/checkpoints, the same Orbax checkpointer as the main job); metrics go to
metrics.jsonl and TensorBoard as the main job's do. The report (WORKDIR/report.md, printed) gives
reconstruction PSNR and SSIM (dm-pix) on the held-out pictures, codebook perplexity and the share of
codes used, and WORKDIR/reconstructions.png shows held-out pictures above their reconstructions.
WORKDIR/image_codes.safetensors holds every item's codes for `data.image_codes` (unimp_jax.vq.codes).
"""

from __future__ import annotations

import functools
import os

import dm_pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import flags, logging
from flax import nnx
from ml_collections import config_flags
from PIL import Image

from unimp_jax import config as config_lib
from unimp_jax.data import formats
from unimp_jax.train import checkpoint as checkpoint_lib
from unimp_jax.train import metrics as metrics_lib
from unimp_jax.vq import codes as codes_lib, model as model_lib


def validate(cfg, image_size: int, num_devices: int) -> None:
  m, t = cfg.model, cfg.train
  checks = [
      (m.downsample >= 2 and not m.downsample & (m.downsample - 1), 'model.downsample', 'must be a power of 2, >= 2'),
      (image_size % m.downsample == 0, 'model.downsample', f'must divide the pictures\' {image_size} px'),
      (m.codebook_size >= 2, 'model.codebook_size', 'must be >= 2'),
      (m.channels >= 1 and m.code_dim >= 1, 'model.channels', 'channels and code_dim must be >= 1'),
      (t.steps >= 1, 'train.steps', 'must be >= 1'),
      (t.batch_size >= 1 and t.batch_size % num_devices == 0, 'train.batch_size',
       f'must be a positive multiple of the {num_devices} devices'),
      (t.learning_rate > 0, 'train.learning_rate', 'must be > 0'),
      (t.restart_every >= 1, 'train.restart_every', 'must be >= 1'),
      (0 <= t.usage_decay < 1, 'train.usage_decay', 'must be in [0, 1)'),
      (cfg.checkpoint.every >= 1, 'checkpoint.every', 'must be >= 1'),
  ]
  for ok, key, message in checks:
    if not ok:
      raise config_lib.ConfigError(f'config.{key}: {cfg[key.split(".")[0]][key.split(".")[1]]}: {message}')


def pictures(dataset: formats.UnifiedDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(uint8 [N, H, W, 3] of every item, training item ids, held-out item ids), items with pictures only."""
  has_image = np.asarray([item.has_image for item in dataset.items])
  if not has_image.any():
    raise formats.DatasetError(f'{dataset.path}: no item has a picture; the image tokenizer needs pictures')
  held_out = formats.cold_mask(dataset)
  if not held_out.any():
    held_out[int(0.9 * len(held_out)):] = True
  ids = np.arange(len(dataset.items))
  return dataset.images(ids), ids[has_image & ~held_out], ids[has_image & held_out]


def make_step(graphdef, tx, cfg):
  """`step(state, images_u8, key) -> (state, metrics)`: one Adam step, then dead-code restarts.

  `usage` is an exponential moving average of each code's share of the batch's codes. Every
  `restart_every` steps, a code used at under `dead_below` of the uniform share is moved onto a random
  encoder output of this batch, and its usage reset to the uniform share.
  """
  k, t = cfg.model.codebook_size, cfg.train

  def step(state, images, key):
    def objective(params):
      loss, terms, z, codes = nnx.merge(graphdef, params).losses(images, t.beta)
      return loss, (terms, z, codes)

    (loss, (terms, z, codes)), grads = jax.value_and_grad(objective, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    share = jnp.bincount(codes.reshape(-1), length=k) / codes.size
    usage = t.usage_decay * state['usage'] + (1 - t.usage_decay) * share
    dead = ((state['step'] + 1) % t.restart_every == 0) & (usage < t.dead_below / k)
    flat = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]))
    moved = flat[jax.random.randint(key, (k,), 0, flat.shape[0])]
    params = dict(params, codebook=jnp.where(dead[:, None], moved, params['codebook']))
    metrics = {'loss': loss, **{f'loss/{n}': v for n, v in terms.items()}, 'restarted_codes': dead.sum(),
               'batch_perplexity': jnp.exp(-jnp.sum(share * jnp.log(jnp.where(share > 0, share, 1.0))))}
    return {'params': params, 'opt_state': opt_state, 'usage': jnp.where(dead, 1.0 / k, usage),
            'step': state['step'] + 1}, metrics

  return step


def train(cfg, workdir: str):
  """Trains (or resumes) in `workdir`; returns (graphdef, params, dataset pictures, train ids, held-out ids)."""
  dataset = formats.UnifiedDataset(cfg.data.path)
  validate(cfg, dataset.image_size, jax.device_count())
  images, train_ids, held_out = pictures(dataset)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  by_row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  graphdef, params = model_lib.init(cfg.model, cfg.seed)
  tx = optax.adam(cfg.train.learning_rate)
  state = {'params': params, 'opt_state': tx.init(params),
           'usage': jnp.full(cfg.model.codebook_size, 1.0 / cfg.model.codebook_size), 'step': jnp.zeros((), jnp.int32)}
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), save_every=cfg.checkpoint.every,
                                             keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  if checkpointer.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    state, start = checkpointer.restore(abstract)
  else:
    state, start = jax.device_put(state, replicated), 0
  step_fn = jax.jit(make_step(graphdef, tx, cfg), donate_argnums=0, out_shardings=replicated)
  writer = metrics_lib.MetricsWriter(workdir)
  key = jax.random.key(cfg.seed)
  try:
    for step in tqdm.trange(start, cfg.train.steps, initial=start, total=cfg.train.steps, desc='vq',
                            disable=jax.process_index() != 0):
      batch = images[np.random.default_rng([cfg.seed, step]).choice(train_ids, cfg.train.batch_size)]
      state, metrics = step_fn(state, jax.device_put(batch, by_row), jax.random.fold_in(key, step))
      if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
        writer.write(step + 1, jax.device_get(metrics))
      if checkpointer.should_save(step + 1) or step + 1 == cfg.train.steps:
        checkpointer.save(step + 1, state, config=cfg, force=True)
  finally:
    writer.close()
    checkpointer.wait()
    checkpointer.close()
  return graphdef, jax.device_get(state['params']), images, train_ids, held_out


def reconstruct(graphdef, params, images_u8: np.ndarray, batch_size: int = 256):
  """(codes int32 [N, h, w], reconstructions float32 [N, H, W, 3] in [0, 1])."""
  model = nnx.merge(graphdef, params)
  encode = jax.jit(lambda x: model.encode(x))
  decode = jax.jit(lambda c: model.decode(c))
  codes = np.concatenate([np.asarray(encode(images_u8[i:i + batch_size]))
                          for i in range(0, len(images_u8), batch_size)])
  out = np.concatenate([np.asarray(decode(codes[i:i + batch_size])) for i in range(0, len(codes), batch_size)])
  return codes, out


def load(workdir: str, step: int | None = None):
  """(graphdef, params, config) of the tokenizer trained in `workdir` (its newest checkpoint, or `step`)."""
  directory = os.path.join(workdir, 'checkpoints')
  cfg = ml_collections.ConfigDict(checkpoint_lib.read_config(directory, step))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.Tokenizer(cfg.model, rngs=nnx.Rngs(0))))
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ('data',)),
                                          jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          nnx.to_pure_dict(abstract))
  return graphdef, checkpoint_lib.restore_params(directory, abstract, step=step), cfg


@functools.partial(jax.jit, static_argnames='graphdef')
def _decode(graphdef, params, codes):
  return nnx.merge(graphdef, params).decode(codes)


def pictures_from_codes(graphdef, params, codes: np.ndarray) -> np.ndarray:
  """uint8 pictures [N, H, W, 3] of codes int32 [N, h, w] (compiled once per graphdef and shape)."""
  out = np.asarray(_decode(graphdef, params, codes))
  return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def scores(graphdef, params, images_u8: np.ndarray, codebook_size: int) -> dict[str, float]:
  """Reconstruction PSNR and SSIM (dm-pix, pictures in [0, 1]), codebook perplexity and the share of
  codes used, over `images_u8`."""
  codes, out = reconstruct(graphdef, params, images_u8)
  target = images_u8.astype(np.float32) / 255.0
  share = np.bincount(codes.reshape(-1), minlength=codebook_size) / codes.size
  used = share[share > 0]
  return {'pictures': len(images_u8), 'PSNR (dB)': float(jnp.mean(dm_pix.psnr(target, out))),
          'SSIM': float(jnp.mean(dm_pix.ssim(target, out))),
          'codebook perplexity': float(np.exp(-(used * np.log(used)).sum())),
          'codes used': int((share > 0).sum()), 'codebook size': codebook_size,
          'codes per picture': int(codes[0].size)}


def write_report(workdir: str, graphdef, params, images, train_ids, held_out, cfg) -> str:
  """WORKDIR/report.md (returned) and WORKDIR/reconstructions.png."""
  rows = {'held-out items': scores(graphdef, params, images[held_out], cfg.model.codebook_size),
          'training items': scores(graphdef, params, images[train_ids], cfg.model.codebook_size)}
  names = list(rows['held-out items'])
  lines = ['# Image tokenizer', '', f'{cfg.train.steps} steps on {cfg.data.path}; held-out items: the '
           'cold items (never in training), or the last 10% of ids.', '',
           '| | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  lines += [f'| {split} | ' + ' | '.join(f'{v:.4f}' if isinstance(v, float) else str(v) for v in r.values()) + ' |'
            for split, r in rows.items()]
  text = '\n'.join(lines + ['', '![held-out pictures above their reconstructions](reconstructions.png)', ''])
  shown = images[held_out[:8]]
  _, out = reconstruct(graphdef, params, shown)
  grid = np.concatenate([np.concatenate(list(shown), 1), np.concatenate(list((out * 255).round().astype(np.uint8)), 1)])
  if jax.process_index() == 0:
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.Resampling.NEAREST).save(
        os.path.join(workdir, 'reconstructions.png'))
    with open(os.path.join(workdir, 'report.md'), 'w') as f:
      f.write(text)
  return text


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  config_lib.make_workdir(workdir)
  graphdef, params, images, train_ids, held_out = train(cfg, workdir)
  if jax.process_index() == 0:
    codes_lib.write(os.path.join(workdir, codes_lib.FILE), reconstruct(graphdef, params, images)[0],
                    formats.UnifiedDataset(cfg.data.path), cfg.model.codebook_size)
  print(write_report(workdir, graphdef, params, images, train_ids, held_out, cfg))


if __name__ == '__main__':  # flags defined here only: importing this module must not clash with other commands'
  config_flags.DEFINE_config_file('config', 'configs/vq.py', 'Preset file[:arg].', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and the report go.', required=True)
  config_lib.run_main(main)
