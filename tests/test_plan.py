"""The compile-ahead memory plan (`python -m unimp_jax.plan`), as a user runs it."""

import json
import os
import subprocess
import sys

import support

GIB = 2 ** 30


def test_the_3b_preset_fits_8_gib_per_device_on_64_devices():
  """The paper's default size (configs/paper.py:3b, its frozen towers) at batch 1 per device. Before the
  train step stopped differentiating frozen parameters, whose gradients lost their sharding inside the
  layer scans, this was 19.7 GiB (docs/SCALING.md)."""
  env = support.subprocess_env()  # the command asks for its own 64 devices
  proc = subprocess.run([sys.executable, '-m', 'unimp_jax.plan', '--config', 'configs/paper.py:3b', '--devices', '64',
                         '--config.data.batch_size=64'], env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  assert '64 fake CPU devices: mesh (data, fsdp, tensor) = (1, 64, 1)' in proc.stdout
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(result) == {'argument_bytes', 'output_bytes', 'temp_bytes', 'peak_bytes', 'flops', 'compile_s'}
  assert 0 < result['argument_bytes'] <= result['peak_bytes'] <= 8 * GIB, result['peak_bytes'] / GIB
  assert result['flops'] > 1e12
