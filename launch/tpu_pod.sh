#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU pod slice; jax.distributed
# finds the other workers by itself (TPU_WORKER_HOSTNAMES), so no flags are added.
# The repository must be at the same path on every worker (e.g. cloned by a
# startup script), with `bash launch/setup.sh` run there (use jax[tpu]).
#
#   TPU=my-v5e-64 ZONE=us-west4-a launch/tpu_pod.sh \
#     .venv/bin/python -m geotoken_jax.train --config configs/earth.py --workdir gs://bucket/run1
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
repo_dir=${REPO_DIR:-'~/geotoken-jax'}
command=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "cd $repo_dir && $command"
