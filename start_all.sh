#!/usr/bin/env bash
# Run the whole service: one worker per GPU (or one CPU worker with the tiny preset), then the gateway.
# The workers run under `python -m server.supervisor`, which restarts any that exits or hangs.
#   bash start_all.sh [--config PATH] [--foreground]   start; --foreground stays attached and stops
#                                                      everything when it ends (container entry point)
#   bash start_all.sh stop [--config PATH]             stop exactly the processes this script started
# Logs and pid files live in service.run_dir (default run/). Sets itself up (scripts/setup_env.sh).
set -euo pipefail

action=start
config=""
foreground=0
while [ $# -gt 0 ]; do
  case "$1" in
    stop) action=stop ;;
    --config) config=$(realpath "$2"); shift ;;
    --config=*) config=$(realpath "${1#*=}") ;;
    --foreground) foreground=1 ;;
    -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "start_all.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "${BASH_SOURCE[0]}")"
config=${config:-$PWD/config.json}
PY=.venv/bin/python

if [ "$action" = start ]; then
  bash scripts/setup_env.sh
fi

# Settings this script needs, read through the one config schema.
eval "$("$PY" - "$config" <<'EOF'
import shlex
import sys

from common.config import ConfigError, load_config

try:
    cfg = load_config(sys.argv[1])
except ConfigError as exc:
    print(f"echo {shlex.quote(str(exc))} >&2; exit 2")
    sys.exit()
values = {
    "run_dir": cfg.service.run_dir,
    "gateway_port": cfg.service.gateway_port,
    "base_port": cfg.service.worker_base_port,
    "scheme": "https" if cfg.tls.enabled else "http",
}
for name, value in values.items():
    print(f"{name}={shlex.quote(str(value))}")
EOF
)"
mkdir -p "$run_dir"

# True when pid file $1 names a live process that this script started (guards against pid reuse).
ours() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qE -- '-m (server|server\.supervisor|workers\.worker)( |$)'
}

# The supervisor first (it stops its workers itself), the gateway, then any worker left over (a
# supervisor that was killed). Pid files are read before anything is signalled.
stop_all() {
  local pidfile pids=() pid
  for pidfile in "$run_dir"/supervisor.pid "$run_dir"/gateway.pid "$run_dir"/worker_*.pid; do
    [ -f "$pidfile" ] || continue
    ours "$pidfile" && pids+=("$(cat "$pidfile")")
  done
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 75); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$run_dir"/supervisor.pid "$run_dir"/gateway.pid "$run_dir"/worker_*.pid
  [ ${#pids[@]} -gt 0 ] && echo "[start_all] stopped ${#pids[@]} process(es)"
  return 0
}

if [ "$action" = stop ]; then
  stop_all
  exit 0
fi

if [ -f "$run_dir/gateway.pid" ] && ours "$run_dir/gateway.pid"; then
  echo "[start_all] already running (pid $(cat "$run_dir/gateway.pid")); run: bash start_all.sh stop" >&2
  exit 1
fi

# GPUs: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists.
gpus=()
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=',' read -ra listed <<<"$CUDA_VISIBLE_DEVICES"
  for dev in "${listed[@]}"; do [[ -n "$dev" && "$dev" != -* ]] && gpus+=("$dev"); done
elif [ -z "${CUDA_VISIBLE_DEVICES+set}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  for ((i = 0; i < count; i++)); do gpus+=("$i"); done
fi

# The supervisor starts the workers: one per GPU, each seeing only its GPU (cuda:0 inside the process).
supervisor_args=(--config "$config")
devices=("${gpus[@]}")
if [ ${#gpus[@]} -gt 0 ]; then
  supervisor_args+=(--gpus "$(IFS=,; echo "${gpus[*]}")")
else
  echo "[start_all] no GPU found: one CPU worker with the tiny preset"
  supervisor_args+=(--worker-set model.preset=tiny)
  devices=("")
fi
rm -f "$run_dir"/worker_*.pid  # stale files of a run that was killed; the supervisor writes new ones
nohup "$PY" -m server.supervisor "${supervisor_args[@]}" >"$run_dir/supervisor.log" 2>&1 &
supervisor_pid=$!
echo "$supervisor_pid" >"$run_dir/supervisor.pid"
echo "[start_all] supervisor (pid $supervisor_pid), log $run_dir/supervisor.log"

worker_targets=()
worker_urls=()
for i in "${!devices[@]}"; do
  port=$((base_port + i))
  device=${devices[$i]}
  # A worker that exits during start is restarted; waiting fails only if the supervisor gives up.
  worker_targets+=("http://127.0.0.1:$port=$supervisor_pid")
  worker_urls+=(--worker-url "http://127.0.0.1:$port")
  echo "[start_all] worker $i (port $port, ${device:+GPU $device}${device:-CPU}), log $run_dir/worker_$i.log"
done

echo "[start_all] waiting for the workers to load, compile and warm up"
if ! "$PY" -m server.wait_workers "${worker_targets[@]}"; then
  for log in "$run_dir"/supervisor.log "$run_dir"/worker_*.log; do echo "--- $log"; tail -n 20 "$log"; done
  stop_all
  exit 1
fi

nohup "$PY" -m server --config "$config" "${worker_urls[@]}" >"$run_dir/gateway.log" 2>&1 &
echo $! >"$run_dir/gateway.pid"
gateway="$scheme://127.0.0.1:$gateway_port"
gateway_up() {
  "$PY" -c "import ssl, sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2, context=ssl._create_unverified_context())" "$gateway/health" 2>/dev/null
}
for _ in $(seq 1 150); do
  gateway_up && break
  ours "$run_dir/gateway.pid" || break
  sleep 0.2
done
if ! gateway_up; then
  echo "[start_all] the gateway did not come up:" >&2
  tail -n 20 "$run_dir/gateway.log" >&2
  stop_all
  exit 1
fi

ws=${scheme/http/ws}
host=$(hostname -f 2>/dev/null || hostname)
cat <<EOF
[start_all] service is up
  browser page     $scheme://$host:$gateway_port/
  legacy duplex    $ws://$host:$gateway_port/ws/duplex/<session_id>
  realtime v2      $ws://$host:$gateway_port/v1/realtime?mode=audio|video
  health, status   $scheme://$host:$gateway_port/health  $scheme://$host:$gateway_port/status
  logs             $run_dir/  (workers restart on exit or hang: see supervisor.log)
  stop             bash start_all.sh stop --config $config
EOF

if [ "$foreground" = 1 ]; then
  trap 'stop_all; exit 0' INT TERM
  pids=("$supervisor_pid" "$(cat "$run_dir/gateway.pid")")
  # The supervisor rides out worker faults; if it or the gateway ends, the service ends (the
  # container restarts it as a whole).
  set +e
  wait -n "${pids[@]}"
  status=$?
  set -e
  echo "[start_all] a service process exited (status $status); stopping the rest" >&2
  stop_all
  exit "$status"
fi
