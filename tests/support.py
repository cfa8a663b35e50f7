"""What the tests share besides conftest's fixtures: the environment of the processes they start, and
reading what those processes print."""

import json
import os

# XLA's backend optimisation off. The tests' programs are tiny and each is compiled once or twice, so
# compiling, not running, is most of the suite's time; these flags change how much LLVM optimises the
# machine code, not what the program computes.
COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def subprocess_env(devices: int = 1, **extra) -> dict:
  """Environment for a process a test starts: the suite's compiler flags and compilation cache (conftest),
  on `devices` fake CPU devices (1, the default, compiles fastest)."""
  count = f' --xla_force_host_platform_device_count={devices}' if devices > 1 else ''
  return dict(os.environ, XLA_FLAGS=COMPILE_FLAGS + count, JAX_PLATFORMS='cpu', **extra)


def printed(output: str, tag: str):
  """The JSON value a process printed on its line `TAG value` (the first such line)."""
  return json.loads(next(line for line in output.splitlines() if line.startswith(tag + ' '))[len(tag) + 1:])
