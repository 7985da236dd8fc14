#!/usr/bin/env bash
# Run a command with a throwaway RabbitMQ node (Debian's rabbitmq-server) on free loopback
# ports, exported as TEST_RABBITMQ_URL; always stopped and removed afterwards.
#
#   scripts/with-rabbitmq.sh [--required] -- COMMAND...
#   scripts/with-rabbitmq.sh --restart DIR     (tests: SIGKILL the node of DIR, start it again)
#
# --required: fail if rabbitmq-server is missing (CI); otherwise run the command without it
# (the tests that need it then fail loudly unless they are allowed to skip).
#
# The node is private: its own node name, AMQP and distribution ports, its own epmd (on a free
# port too, so it never meets another node on this machine), a random user and password (no
# default account), and its data, logs, config and Erlang cookie in a temporary folder
# (exported as TEST_RABBITMQ_DIR). As root it runs as root, with HOME in that folder.
set -euo pipefail

RABBIT_BIN=/usr/lib/rabbitmq/bin

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Start the node described by $1/env and wait until it accepts AMQP connections.
start_node() {
  local dir=$1
  # shellcheck disable=SC1091
  source "$dir/env"
  "$RABBIT_BIN/rabbitmq-server" >>"$dir/server.out" 2>&1 &
  for _ in $(seq 120); do
    if "$RABBIT_BIN/rabbitmqctl" -q await_startup --timeout 1 >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  echo "with-rabbitmq: the node did not start; its output:" >&2
  tail -40 "$dir/server.out" >&2 || true
  return 1
}

# SIGKILL the node's Erlang VM (as a crash would) and wait until it is gone.
kill_node() {
  local dir=$1 pid
  pid=$(cat "$dir/rabbit.pid" 2>/dev/null || true)
  if [[ -n $pid ]]; then
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
}

if [[ ${1:-} == --restart ]]; then
  dir=$2
  kill_node "$dir"
  sleep "${3:-2}"
  start_node "$dir"
  exit 0
fi

required=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --required) required=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [[ ! -x $RABBIT_BIN/rabbitmq-server ]]; then
  if [[ $required -eq 1 ]]; then
    echo "with-rabbitmq: rabbitmq-server not found (apt-get install rabbitmq-server); required here" >&2
    exit 1
  fi
  echo "with-rabbitmq: rabbitmq-server not found; running WITHOUT RabbitMQ (its tests skip)" >&2
  exec "$@"
fi

workdir=$(mktemp -d /tmp/scheduler-rabbitmq.XXXXXX)
port=$(free_port)
dist_port=$(free_port)
epmd_port=$(free_port)
user="test-$(python3 -c 'import secrets; print(secrets.token_hex(4))')"
password=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
node="scheduler-test-$$-$port@localhost"
mkdir -p "$workdir/mnesia" "$workdir/log"
cat >"$workdir/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$port
default_user = $user
default_pass = $password
loopback_users = none
EOF
echo "[]." >"$workdir/enabled_plugins"
touch "$workdir/rabbitmq-env.conf"
cat >"$workdir/env" <<EOF
export HOME="$workdir"
export ERL_EPMD_PORT=$epmd_port
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_NODENAME="$node"
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$port
export RABBITMQ_DIST_PORT=$dist_port
export RABBITMQ_CONF_ENV_FILE="$workdir/rabbitmq-env.conf"
export RABBITMQ_CONFIG_FILE="$workdir/rabbitmq.conf"
export RABBITMQ_ENABLED_PLUGINS_FILE="$workdir/enabled_plugins"
export RABBITMQ_MNESIA_BASE="$workdir/mnesia"
export RABBITMQ_LOG_BASE="$workdir/log"
export RABBITMQ_PID_FILE="$workdir/rabbit.pid"
EOF

cleanup() {
  (
    # shellcheck disable=SC1091
    source "$workdir/env"
    "$RABBIT_BIN/rabbitmqctl" -q stop --idle-timeout 20 >/dev/null 2>&1 || kill_node "$workdir"
    kill_node "$workdir"
    # Only the epmd of this run: it listens on this run's own port.
    epmd -kill >/dev/null 2>&1 || true
  )
  rm -rf "$workdir" || true
}
trap cleanup EXIT INT TERM

start_node "$workdir"
export TEST_RABBITMQ_URL="amqp://$user:$password@127.0.0.1:$port//"
export TEST_RABBITMQ_DIR="$workdir"
echo "with-rabbitmq: RabbitMQ on 127.0.0.1:$port (node $node)" >&2
set +e
"$@"
status=$?
set -e
exit $status
