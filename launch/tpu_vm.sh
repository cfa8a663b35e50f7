#!/usr/bin/env bash
# TPU VM pod slice: the same command on every worker; jax.distributed.initialize() finds the pod.
# The repository must already be cloned and installed (pip install -e .) at $REPO on every worker,
# and WORKDIR should be a bucket path or shared disk.
#   TPU=my-v5e-64 ZONE=us-west4-a bash launch/tpu_vm.sh configs/paper.py:3b gs://bucket/run1 [overrides...]
set -euo pipefail
config=${1:?usage: launch/tpu_vm.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/tpu_vm.sh CONFIG WORKDIR [overrides...]}
shift 2
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-unimp_jax}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO && python -m unimp_jax.main --multihost --config $config --workdir $workdir $*"
