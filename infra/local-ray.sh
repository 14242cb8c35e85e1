#!/usr/bin/env bash
# Start a real Ray head on this machine, with the Jobs API, for `xlp submit --to ray`.
#   infra/local-ray.sh                 start (RAY_PORT, RAY_DASHBOARD_PORT, RAY_NUM_CPUS, RAY_TEMP_DIR to change)
#   infra/local-ray.sh stop            stop it (only this head: other Ray instances on the machine stay)
# Ray 2.60 turns on token authentication: the token is in ~/.ray/auth_token, which `xlp submit`
# uses (with RAY_AUTH_MODE=token) when it submits from this machine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
RAY=${RAY:-$( [ -x "$here/.venv/bin/ray" ] && echo "$here/.venv/bin/ray" || command -v ray )}
PORT=${RAY_PORT:-6379}
DASH=${RAY_DASHBOARD_PORT:-8265}
CPUS=${RAY_NUM_CPUS:-$(nproc)}
TEMP=${RAY_TEMP_DIR:-/tmp/ray-local-$PORT}
# Ray's helper processes take fixed default ports (the dashboard agent's 52365 among them); pick
# free ones so this head can sit beside other Ray instances on the machine.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [ "${1:-start}" = "stop" ]; then
  # `ray stop` would end every Ray instance on the machine; end the processes of this head's session.
  session="$TEMP/|ray\.util\.client\.server --address=[0-9.]*:$PORT "
  pkill -TERM -f -- "$session" 2>/dev/null || true
  for _ in $(seq 20); do pgrep -f -- "$session" >/dev/null || break; sleep 0.5; done
  pkill -KILL -f -- "$session" 2>/dev/null || true
  echo "local-ray.sh: stopped the head in $TEMP"; exit 0
fi

export RAY_AUTH_MODE=token
"$RAY" get-auth-token --generate >/dev/null
if "$RAY" status --address "127.0.0.1:$PORT" >/dev/null 2>&1; then
  echo "local-ray.sh: Ray head already running on port $PORT"
else
  "$RAY" start --head --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
    --num-cpus "$CPUS" --disable-usage-stats --temp-dir "$TEMP" \
    --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
    --ray-client-server-port "$(free_port)" --metrics-export-port "$(free_port)" \
    --runtime-env-agent-port "$(free_port)" >/tmp/local-ray-start.log 2>&1 \
    || { cat /tmp/local-ray-start.log >&2; exit 1; }
fi
token=$("$RAY" get-auth-token)
for _ in $(seq 90); do  # the Jobs API answers once the dashboard and its agent are up
  curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:$DASH/api/jobs/" >/dev/null 2>&1 && break
  sleep 1
done
echo "local-ray.sh: Ray head up; Jobs API at http://127.0.0.1:$DASH"
echo "  xlp submit configs/demo.yaml --to ray --address http://127.0.0.1:$DASH --wait"
