#!/usr/bin/env bash
# Run the main job on this machine. FAKE_DEVICES=8 splits the CPU into 8 devices to try a mesh.
#   bash launch/local.sh configs/tiny.py workdir/tiny [--config.KEY=VALUE ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES}"
fi
exec python -m unimp_jax.main --config "$config" --workdir "$workdir" "$@"
