"""Every test runs on a fake 8-device CPU mesh; the flag must be set before jax is imported."""

import os

os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags; under pytest nobody parses them

jax.config.update('jax_default_matmul_precision', 'highest')

if jax.device_count() != 8:
  raise RuntimeError(f'expected 8 fake CPU devices, got {jax.device_count()}: XLA_FLAGS={os.environ["XLA_FLAGS"]!r}')


@pytest.fixture(scope='session')
def devices():
  return jax.devices()
