"""Config loading, validation at start-up, and parameter counts of every preset."""

import math
import os
import subprocess
import sys

import jax
import pytest

import support
from unimp_jax import config as config_lib
from unimp_jax.model import unimp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ['configs/tiny.py', 'configs/small.py', 'configs/paper.py:1b', 'configs/paper.py:3b',
           'configs/paper.py:7b']


def test_command_line_overrides_apply_and_unknown_keys_fail():
  cfg = config_lib.load('configs/tiny.py', ('model.lm.num_layers=8', 'model.lm.vocab_size=1000'))
  assert cfg.model.lm.num_layers == 8
  assert cfg.model.image_token_id == 1000  # follows the vocabulary: `<image>` is the first added token
  with pytest.raises(config_lib.ConfigError, match='model.lm.num_layrs'):
    config_lib.load('configs/tiny.py', ('model.lm.num_layrs=8',))


@pytest.mark.parametrize('overrides,key', [
    (('mesh.tensor=8',), 'model.vision.num_heads'),
    (('mesh.data=3',), 'mesh'),
    (('mesh.fsdp=-1', 'mesh.data=-1'), 'mesh'),
    (('data.batch_size=12',), 'data.batch_size'),
    (('model.lm.num_kv_heads=3',), 'model.lm.num_kv_heads'),
    (('model.lm.cross_attn_every=3',), 'model.lm.cross_attn_every'),
    (('model.lm.media_mask=nearest',), 'model.lm.media_mask'),
    (('model.vision.patch_size=7',), 'model.vision.image_size'),
    (('train.microbatches=3',), 'train.microbatches'),
    (('train.schedule=exponential',), 'train.schedule'),
    (('data.split=random',), 'data.split'),
    (('train.next_item_weight=-1.0',), 'train.next_item_weight'),
    (('model.item_embeddings=learned', 'data.item_ids=semantic', 'train.next_item_weight=1.0'),
     'train.next_item_weight'),
    (('model.item_pool=True', 'model.item_embeddings=learned', 'data.item_ids=semantic',
      'train.next_item_weight=0.0'), 'model.item_pool'),
    (('train.steps=-5',), 'train.steps'),
    (('data.batch_size=0',), 'data.batch_size'),
    (('mesh.data=0',), 'mesh.data'),
    (('checkpoint.every=0',), 'checkpoint.every'),
    (('train.learning_rate=nan',), 'train.learning_rate'),
    (('train.learning_rate=-1e-3',), 'train.learning_rate'),
    (('train.warmup_fraction=1.0',), 'train.warmup_fraction'),
    (('train.clip_norm=0.0',), 'train.clip_norm'),
    (('train.z_loss=nan',), 'train.z_loss'),
    (('model.lm.rope_scaling.type=yarn',), 'model.lm.rope_scaling.type'),
    (('model.lm.rope_scaling.factor=0.0',), 'model.lm.rope_scaling.factor'),
    (('model.lm.rope_scaling.type=llama3', 'model.lm.rope_scaling.low_freq_factor=4.0'), 'model.lm.rope_scaling'),
])
def test_bad_configs_fail_before_compiling_and_name_the_key(overrides, key):
  cfg = config_lib.load('configs/tiny.py', overrides)
  with pytest.raises(config_lib.ConfigError, match=f'config.{key}'):
    config_lib.validate(cfg, 8)


@pytest.mark.parametrize('preset,overrides', [(p, ()) for p in PRESETS] + [
    ('configs/tiny.py', ('model.lm.qkv_bias=True', 'model.lm.num_kv_heads=2', 'model.lm.tie_embeddings=True')),
    ('configs/tiny.py', ('model.item_embeddings=content+id',))])
def test_parameter_counts_match_the_analytic_formula(preset, overrides):
  cfg = config_lib.load(preset, overrides)
  _, state = unimp.abstract_model(cfg.model)  # shapes only: paper presets are never allocated
  by_tower = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    tower = path[0].key
    by_tower[tower] = by_tower.get(tower, 0) + math.prod(leaf.shape)
  analytic = config_lib.num_params_analytic(cfg.model)
  assert by_tower == {k: analytic[k] for k in ('vision', 'connector', 'lm', 'items') if analytic[k]}


def test_paper_preset_sizes_are_what_their_names_say():
  totals = {p: config_lib.num_params_analytic(config_lib.load(f'configs/paper.py:{p}').model)
            for p in ('1b', '3b', '7b')}
  # A ViT-L/14 tower is ~0.30B parameters.
  assert all(abs(t['vision'] - 303e6) < 1e6 for t in totals.values())
  # The LMs without cross-attention are Llama-3.2-1B (1.24B), Llama-3.2-3B (3.21B) and Llama-2-7B (6.74B).
  for preset, llama in (('1b', 1.236e9), ('3b', 3.213e9), ('7b', 6.738e9)):
    lm_only = totals[preset]['lm'] - totals[preset]['cross_attention'] - 16 * 2 * (
        2048 if preset == '1b' else 3072 if preset == '3b' else 4096)
    assert abs(lm_only - llama) / llama < 0.01, (preset, lm_only)


def test_summary_command_prints_counts_and_shardings():
  out = subprocess.run([sys.executable, '-m', 'unimp_jax.model.summary', '--config', 'configs/paper.py:3b',
                        '--devices', '16', '--config.data.batch_size=16'],
                       capture_output=True, text=True, check=True, timeout=300).stdout
  assert 'mesh (data, fsdp, tensor) = (1, 16, 1)' in out
  assert 'lm/groups/layers/mlp/gate/kernel' in out and '(-, -, fsdp, -)' in out
  total = config_lib.num_params_analytic(config_lib.load('configs/paper.py:3b').model)['total']
  assert f'{total:,d}' in out


@pytest.mark.parametrize('args,says', [
    (['--config.train.stepz=5'], 'unknown key \'stepz\'; Did you mean "steps"'),
    (['--config.train.steps=abc'], '--config.train.steps=abc'),
    (['--config.train.steps=-5'], 'config.train.steps: -5: must be >= 1'),
    (['--config.data.path={tmp}/mistyped/fashion'], 'config.data.path: no dataset at'),
])
def test_the_main_job_refuses_a_bad_config_in_one_line(tmp_path, args, says):
  proc = subprocess.run([sys.executable, '-m', 'unimp_jax.main', '--config', 'configs/tiny.py',
                         f'--workdir={tmp_path}/run', *(a.format(tmp=tmp_path) for a in args)],
                        env=support.subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith('error: ') and says in proc.stderr
  assert not (tmp_path / 'mistyped').exists() and not (tmp_path / 'run' / 'checkpoints').exists()


def test_a_workdir_no_file_can_be_written_in_is_refused_at_start_up(tmp_path):
  """A path under a regular file, and an existing folder that refuses new files for any user including
  root (/proc on Linux). ConfigError is what the commands print in one line (the test above)."""
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(config_lib.ConfigError, match=r'a_file/run: cannot write there \(Not a directory\)'):
    config_lib.make_workdir(str(tmp_path / 'a_file' / 'run'))
  with pytest.raises(config_lib.ConfigError, match='--workdir /proc: cannot write there'):
    config_lib.make_workdir('/proc')
  config_lib.make_workdir(str(tmp_path / 'new' / 'run'))
  assert os.listdir(tmp_path / 'new' / 'run') == []  # created, and the probe file is gone


def test_transformers_advisories_are_silenced_by_importing_the_package():
  """transformers' "PyTorch was not found" is an advisory printed on import; commands import unimp_jax first."""
  advise = "import transformers; transformers.utils.logging.get_logger('transformers').warning_advice('ADVICE')"
  env = {k: v for k, v in os.environ.items() if k != 'TRANSFORMERS_NO_ADVISORY_WARNINGS'}
  plain = subprocess.run([sys.executable, '-c', advise], capture_output=True, text=True, env=env, check=True)
  ours = subprocess.run([sys.executable, '-c', 'import unimp_jax; ' + advise], capture_output=True, text=True,
                        env=env, check=True)
  assert 'ADVICE' in plain.stderr and 'ADVICE' not in ours.stderr
