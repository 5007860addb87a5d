#!/usr/bin/env bash
# Runs N processes of a geotoken-jax command on this machine, as a multi-host job
# would: each process gets --coordinator_address/--num_processes/--process_id and,
# on CPU, D fake devices. Output of process i goes to $LOGDIR/process_i.log.
#
#   launch/local.sh N D -- python -m geotoken_jax.train --config configs/earth.py:smoke --workdir /tmp/w
set -euo pipefail
if [ $# -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND..." >&2
  exit 2
fi
num_processes=$1
devices=$2
shift 3
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logdir=${LOGDIR:-$(mktemp -d)}
echo "logs: $logdir" >&2
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
    "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" --process_id="$i" \
    >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
cat "$logdir/process_0.log"
exit "$status"
