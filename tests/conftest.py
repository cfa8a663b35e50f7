"""Every test runs on a fake 8-device CPU mesh; the flag must be set before jax is imported."""

import os
import shutil
import tempfile

import support  # tests/support.py: the compiler flags and the environment of processes tests start

os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), support.COMPILE_FLAGS, '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the whole run, shared by both pytest-xdist workers and inherited by
# the training processes tests start: many of those compile the same tiny train step (jax keys the cache
# by the program, its shardings and the compiler options, so a hit is the executable a compile would make).
OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), 'unimp-jax-tests-' + os.environ.get('PYTEST_XDIST_TESTRUNUID', str(os.getpid()))))

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


# The slowest modules, slowest first. They are marked `slow`: the unit tier (`-m "not slow"`, README) leaves
# them out for the inner loop. And they run first: the suite runs in 2 pytest-xdist workers that take whole
# files (README), and a long file picked up last would leave the other worker idle at the end.
SLOW = ('test_multihost.py', 'test_resume.py', 'test_hf_interop.py', 'test_train.py', 'test_main_job.py',
        'test_image_codes.py', 'test_validation.py', 'test_item_content.py', 'test_vq.py', 'test_hf_parity.py',
        'test_item_rows.py', 'test_stage1.py', 'test_checkpoint.py')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: a module that trains or starts processes; -m "not slow" skips it')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW)}
  for item in items:
    if item.path.name in rank:
      item.add_marker(pytest.mark.slow)
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session):
  if OWN_CACHE and 'PYTEST_XDIST_WORKER' not in os.environ:  # the controller, once every worker is done
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
