#!/usr/bin/env bash
# A TPU VM pod slice, from zero to a running job (docs/LAUNCH.md). Every step is one gcloud command;
# DRY_RUN=1 prints them instead of running them.
#   TPU=my-v5e-64 ZONE=us-west4-a bash launch/tpu_vm.sh create v5litepod-64 v2-alpha-tpuv5-lite
#   TPU=... ZONE=... bash launch/tpu_vm.sh setup          copy this checkout to every worker, install jax[tpu]
#   TPU=... ZONE=... bash launch/tpu_vm.sh run JOB CONFIG WORKDIR [--config.KEY=VALUE ...]
#   TPU=... ZONE=... bash launch/tpu_vm.sh tail JOB       follow worker 0's log
#   TPU=... ZONE=... bash launch/tpu_vm.sh stop JOB       stop the job on every worker
# `run` starts the main job in the background on all workers (it survives a dropped ssh), each writing
# ~/JOB.log. WORKDIR must be a directory every worker sees, e.g. a Filestore mount: gs:// paths are not
# supported yet (docs/LAUNCH.md).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-unimp_jax}
action=${1:?usage: launch/tpu_vm.sh create|setup|run|tail|stop ...}
shift

go() {  # run, or print with DRY_RUN
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_workers() {  # a shell command on every worker (or --worker=0 when $WORKER is set)
  go gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker="${WORKER:-all}" --command "$1"
}

case "$action" in
  create)
    type=${1:?usage: create ACCELERATOR_TYPE RUNTIME_VERSION}; version=${2:?usage: create ACCELERATOR_TYPE RUNTIME_VERSION}
    go gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type "$type" --version "$version" ;;
  setup)
    root=$(cd "$(dirname "$0")/.." && pwd)
    archive=$(mktemp -d)/unimp_jax.tar.gz
    go tar -czf "$archive" -C "$root" --exclude=.git --exclude=.venv --exclude=workdir --exclude=data/generated .
    go gcloud compute tpus tpu-vm scp "$archive" "$TPU:~/unimp_jax.tar.gz" --zone "$ZONE" --worker=all
    on_workers "mkdir -p $REPO && tar -xzf ~/unimp_jax.tar.gz -C $REPO && cd $REPO && pip install -e '.[tpu]'" ;;
  run)
    job=${1:?usage: run JOB CONFIG WORKDIR [overrides...]}; shift
    [[ $# -ge 2 ]] || { echo 'usage: run JOB CONFIG WORKDIR [overrides...]' >&2; exit 2; }
    # Each argument is quoted for the remote shell, so tuple overrides such as
    # --config.train.freeze_patterns="('^vision/',)" arrive as written.
    main=$(printf '%q ' python -m unimp_jax.main --multihost --config "$1" --workdir "$2" "${@:3}")
    on_workers "cd $REPO && nohup $main > ~/$job.log 2>&1 < /dev/null & echo \$! > ~/$job.pid" ;;
  tail)
    job=${1:?usage: tail JOB}
    WORKER=${WORKER:-0} on_workers "tail -n 50 -f ~/$job.log" ;;
  stop)
    job=${1:?usage: stop JOB}
    on_workers "kill \$(cat ~/$job.pid) 2>/dev/null || true" ;;
  *)
    echo "unknown action $action: create|setup|run|tail|stop" >&2; exit 2 ;;
esac
