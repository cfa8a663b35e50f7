#!/usr/bin/env bash
# Run the main job on this machine: one process, or several talking through jax.distributed on 127.0.0.1
# (what a multi-host pod does, on one machine; CPU devices use gloo collectives).
#   bash launch/local.sh configs/tiny.py workdir/tiny [--config.KEY=VALUE ...]
#   FAKE_DEVICES=8 bash launch/local.sh ...                 one process, the CPU split into 8 devices
#   PROCESSES=2 FAKE_DEVICES=4 bash launch/local.sh ...     2 processes x 4 CPU devices, one 8-device mesh
#   DRY_RUN=1 PROCESSES=2 bash launch/local.sh ...          print the commands, run nothing
# With PROCESSES > 1 each process logs to WORKDIR/process-I.log; the first failure stops them all.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
processes=${PROCESSES:-1}
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES}"
fi
command=(python -m unimp_jax.main --config "$config" --workdir "$workdir" "$@")

if [[ "$processes" == 1 ]]; then
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${command[@]}"; echo; exit 0; fi
  exec "${command[@]}"
fi

port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap stop_all INT TERM
[[ -n "${DRY_RUN:-}" ]] || mkdir -p "$workdir"
for ((i = 0; i < processes; i++)); do
  one=("${command[@]}" --coordinator "127.0.0.1:$port" --num_processes "$processes" --process_id "$i")
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${one[@]}"; echo "> $workdir/process-$i.log"; continue; fi
  "${one[@]}" > "$workdir/process-$i.log" 2>&1 &
  pids+=($!)
done
[[ -z "${DRY_RUN:-}" ]] || exit 0
status=0
for ((left = processes; left > 0; left--)); do
  if ! wait -n; then status=1; stop_all; fi
done
tail -n 40 "$workdir/process-0.log"
exit $status
