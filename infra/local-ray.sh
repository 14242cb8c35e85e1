#!/usr/bin/env bash
# Start a real Ray cluster on this machine, with the Jobs API, for `xlp submit --to ray`.
#   infra/local-ray.sh                 a head (RAY_PORT, RAY_DASHBOARD_PORT, RAY_NUM_CPUS, RAY_TEMP_DIR to change)
#   infra/local-ray.sh --workers N     the head on the nodes' bridge (10.77.0.1) and N worker nodes,
#                                      xlp-ray1..N, each a raylet in a network namespace of its own with
#                                      its own address and host name (infra/local-nodes.sh; needs root);
#                                      RAY_NUM_CPUS each
#   infra/local-ray.sh stop            stop it, workers included (only this head's cluster: other Ray
#                                      instances on the machine stay)
# Ray 2.60 turns on token authentication: the token is in ~/.ray/auth_token (mode 0600), which `xlp submit`
# uses (with RAY_AUTH_MODE=token) when it submits from this machine. `ray start`'s output goes to
# $RAY_TEMP_DIR/local-ray-start.log.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
WORKERS=0
ACTION=start
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --workers=*) WORKERS=${1#--workers=}; shift ;;
    stop|start) ACTION=$1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "local-ray.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$WORKERS" in ''|*[!0-9]*) echo "local-ray.sh: --workers must be a number, not '$WORKERS'" >&2; exit 2 ;; esac
RAY=${RAY:-$( [ -x "$here/.venv/bin/ray" ] && echo "$here/.venv/bin/ray" || command -v ray )}
PORT=${RAY_PORT:-6379}
DASH=${RAY_DASHBOARD_PORT:-8265}
CPUS=${RAY_NUM_CPUS:-$(nproc)}
TEMP=${RAY_TEMP_DIR:-/tmp/ray-local-$PORT}
# Ray's helper processes take fixed default ports (the dashboard agent's 52365 among them); pick
# free ones so this head can sit beside other Ray instances on the machine.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [ "$ACTION" = stop ]; then
  # `ray stop` would end every Ray instance on the machine; end the processes of this head's session.
  session="$TEMP/|ray\.util\.client\.server --address=[0-9.]*:$PORT "
  # with every process they started: the raylet's dashboard and runtime-env agents rename themselves
  # (ray::DashboardAgent), so no pattern finds them, and once the raylet is gone they live on
  tree() { local p; for p in "$@"; do echo "$p"; tree $(pgrep -P "$p"); done; }
  pids=$(tree $(pgrep -f -- "$session"))
  [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 20); do alive=$(ps -o pid= -p "$(echo $pids | tr ' ' ,)" 2>/dev/null) || break; [ -n "$alive" ] || break; sleep 0.5; done
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  echo "local-ray.sh: stopped the head in $TEMP"; exit 0
fi

export RAY_AUTH_MODE=token
# The token lets whoever holds it run code on the cluster: only its owner may read it (Ray writes it
# with the umask's mode, 0644 under the usual 022). A token an older start left readable is tightened.
token_file=$HOME/.ray/auth_token
( umask 077 && "$RAY" get-auth-token --generate >/dev/null )
for f in "$token_file" "${RAY_AUTH_TOKEN_PATH:-}"; do
  if [ -n "$f" ] && [ -f "$f" ] && [ -O "$f" ] && [ -n "$(find "$f" -perm /077 2>/dev/null)" ]; then
    chmod 600 "$f" && echo "local-ray.sh: $f was readable by other users; it is mode 0600 now"
  fi
done
# this head's own log of `ray start` (several heads may run on one machine), in its temp dir
mkdir -p "$TEMP"
LOG=$TEMP/local-ray-start.log
HEAD_IP=127.0.0.1
head_ip_args=()
if [ "$WORKERS" -gt 0 ]; then
  source "$here/infra/local-nodes.sh"
  local_bridge_up
  HEAD_IP=$LOCAL_BRIDGE_IP  # where the worker nodes reach the head
  head_ip_args=(--node-ip-address "$HEAD_IP")
fi
# `ray status` on a port nothing listens on retries for about 40 s: ask it only when something answers there
if timeout 5 bash -c "exec 3<>/dev/tcp/$HEAD_IP/$PORT" 2>/dev/null && "$RAY" status --address "$HEAD_IP:$PORT" >/dev/null 2>&1; then
  echo "local-ray.sh: Ray head already running on port $PORT"
else
  "$RAY" start --head "${head_ip_args[@]}" --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
    --num-cpus "$CPUS" --disable-usage-stats --temp-dir "$TEMP" \
    --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
    --ray-client-server-port "$(free_port)" --metrics-export-port "$(free_port)" \
    --runtime-env-agent-port "$(free_port)" >"$LOG" 2>&1 \
    || { cat "$LOG" >&2; echo "local-ray.sh: ray start failed; its log: $LOG" >&2; exit 1; }
fi
for k in $(seq "$WORKERS"); do
  node="xlp-ray$k"
  local_node_up "$node" "10.77.0.$((100 + k))"
  if local_node_pids "$node" | xargs -r ps -o args= -p 2>/dev/null | grep -q "raylet.*$TEMP"; then
    continue  # this worker node is up
  fi
  local_node_run "$node" "$RAY" start --address "$HEAD_IP:$PORT" --num-cpus "$CPUS" --disable-usage-stats \
    --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
    --metrics-export-port "$(free_port)" --runtime-env-agent-port "$(free_port)" >>"$LOG" 2>&1 \
    || { tail -n 30 "$LOG" >&2; echo "local-ray.sh: worker $node failed to start; the log: $LOG" >&2; exit 1; }
done
alive_nodes() {
  "$(dirname "$RAY")/python" - "$HEAD_IP:$PORT" 2>/dev/null <<'PY' || echo 0
import sys, logging, ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
}
if [ "$WORKERS" -gt 0 ]; then
  for _ in $(seq 60); do [ "$(alive_nodes)" -ge $((WORKERS + 1)) ] && break; sleep 1; done
fi
token=$("$RAY" get-auth-token)
for _ in $(seq 90); do  # the Jobs API answers once the dashboard and its agent are up
  curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:$DASH/api/jobs/" >/dev/null 2>&1 && break
  sleep 1
done
echo "local-ray.sh: Ray head up with $WORKERS worker node(s); Jobs API at http://127.0.0.1:$DASH; log: $LOG"
echo "  xlp submit demo --to ray --address http://127.0.0.1:$DASH --wait"
