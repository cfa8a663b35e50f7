"""vq: the image tokenizer for the embedded catalogue's 32 px pictures (unimp_jax/vq).

  python -m unimp_jax.vq.train --config configs/vq.py --workdir workdir/vq
  python -m unimp_jax.vq.train --config configs/vq.py:f8 --workdir workdir/vq-f8

f4 (the default): a 32 px picture becomes 8 x 8 = 64 codes out of 512, for reconstruction.
f8: 4 x 4 = 16 codes out of 256, short enough for UniMP to generate within a tiny prompt
(configs/generation.py): five history pictures and the answer are 96 code tokens.
"""

import ml_collections


def get_config(arg='f4'):
  if arg not in ('f4', 'f8'):
    raise ValueError(f'configs/vq.py:{arg}: unknown preset; choose f4 or f8')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(path='data/generated/fashion'))
  c.model = ml_collections.ConfigDict(dict(
      channels=16,        # of the first level; x2 per downsampling, at most x4
      downsample=4,       # f: pictures of H x W become (H / f) x (W / f) codes
      codebook_size=512,
      code_dim=32))
  if arg == 'f8':
    c.model.update(downsample=8, codebook_size=256)
  c.train = ml_collections.ConfigDict(dict(
      steps=2000, batch_size=32, learning_rate=1e-3,
      beta=0.25,          # commitment weight
      restart_every=100,  # dead-code restarts: how often codes are checked
      dead_below=0.03,    # a code used at under this share of the uniform rate is dead
      usage_decay=0.99,   # of the moving average of each code's share
      log_every=50))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=2, async_save=True))
  return c
