#!/usr/bin/env bash
# Run a command with a throwaway Redis on a free loopback port (no persistence), exported as
# TEST_REDIS_URL; always stopped afterwards.
#
#   scripts/with-redis.sh [--required] -- COMMAND...
#
# --required: fail if redis-server is missing (CI); otherwise run the command without Redis
# (the end-to-end tests that need it then fail loudly unless they are allowed to skip).
set -euo pipefail

required=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --required) required=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if ! command -v redis-server >/dev/null 2>&1; then
  if [[ $required -eq 1 ]]; then
    echo "with-redis: redis-server not found (apt-get install redis-server); required here" >&2
    exit 1
  fi
  echo "with-redis: redis-server not found; running WITHOUT Redis (Redis end-to-end tests skip)" >&2
  exec "$@"
fi

workdir=$(mktemp -d /tmp/scheduler-redis.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$workdir" \
  --daemonize yes --pidfile "$workdir/redis.pid" --logfile "$workdir/redis.log"
cleanup() {
  # Shut down and wait: Redis writes its log while stopping, which raced a plain kill + rm.
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  for _ in $(seq 50); do
    [[ -f "$workdir/redis.pid" ]] && kill -0 "$(cat "$workdir/redis.pid")" 2>/dev/null || break
    sleep 0.1
  done
  rm -rf "$workdir" || true
}
trap cleanup EXIT INT TERM
for _ in $(seq 50); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
export TEST_REDIS_URL="redis://127.0.0.1:$port/0"
echo "with-redis: Redis on 127.0.0.1:$port" >&2
set +e
"$@"
status=$?
set -e
exit $status
