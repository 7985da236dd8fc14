#!/usr/bin/env bash
# Run a command on a three-host cluster built from Linux network namespaces on this machine:
# host "db" (PostgreSQL and Redis, and the command itself) and two app hosts, joined by a
# bridge in the db host, each with its own address in 10.213.N.0/24 (N chosen per run; the
# namespaces are private to this run, nothing is routed outside them). Always torn down:
# every process left in the namespaces is killed, the namespaces deleted.
#
#   scripts/with-cluster.sh [--required] -- COMMAND...
#
# Exports DATABASE_URL, TEST_REDIS_URL (on the db host's address), CLUSTER_APP_NETNS and
# CLUSTER_APP_ADDRS (space-separated, host 1 then host 2), ALLOWED_HOSTS. Needs root
# (`ip netns`) and the PostgreSQL 15 binaries and redis-server. --required: fail when they are
# missing (CI); otherwise say so and exit 0.
set -euo pipefail

required=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --required) required=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

skip_or_fail() {
  if [[ $required -eq 1 ]]; then
    echo "with-cluster: $1 (required here, failing)" >&2
    exit 1
  fi
  echo "with-cluster: $1; SKIPPING the multi-host test" >&2
  exit 0
}

[[ $(id -u) -eq 0 ]] || skip_or_fail "not root: ip netns needs root"
command -v ip >/dev/null 2>&1 || skip_or_fail "ip (iproute2) not found"
command -v redis-server >/dev/null 2>&1 || skip_or_fail "redis-server not found"
pg_bin=""
for candidate in "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent)")" \
                 /usr/lib/postgresql/*/bin; do
  if [[ -x "$candidate/initdb" && -x "$candidate/pg_ctl" ]]; then pg_bin="$candidate"; break; fi
done
[[ -n "$pg_bin" ]] || skip_or_fail "initdb/pg_ctl not found"
id postgres >/dev/null 2>&1 || skip_or_fail "no 'postgres' user"

tag="sc$$"
db="$tag-db"
apps=("$tag-app1" "$tag-app2")
subnet="10.213.$((RANDOM % 200 + 20))"
workdir=$(mktemp -d /tmp/scheduler-cluster.XXXXXX)
chmod 755 "$workdir"
datadir="$workdir/pg"

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

kill_namespace() {
  local pids
  pids=$(ip netns pids "$1" 2>/dev/null || true)
  [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
}

cleanup() {
  set +e
  for ns in "${apps[@]}"; do kill_namespace "$ns"; done
  in_ns "$db" runuser -u postgres -- "$pg_bin/pg_ctl" -D "$datadir" -m immediate -w stop \
    >/dev/null 2>&1
  kill_namespace "$db"
  for ns in "${apps[@]}" "$db"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$workdir"
}
trap cleanup EXIT INT TERM

ip netns add "$db"
in_ns "$db" ip link set lo up
in_ns "$db" ip link add br0 type bridge
in_ns "$db" ip addr add "$subnet.1/24" dev br0
in_ns "$db" ip link set br0 up
addrs=()
for i in 1 2; do
  ns=${apps[$((i - 1))]}
  ip netns add "$ns"
  in_ns "$ns" ip link set lo up
  in_ns "$db" ip link add "veth$i" type veth peer name eth0 netns "$ns"
  in_ns "$db" ip link set "veth$i" master br0
  in_ns "$db" ip link set "veth$i" up
  in_ns "$ns" ip addr add "$subnet.$((i + 1))/24" dev eth0
  in_ns "$ns" ip link set eth0 up
  addrs+=("$subnet.$((i + 1))")
done

chown postgres "$workdir"
runuser -u postgres -- "$pg_bin/initdb" -D "$datadir" -U postgres --auth=trust -E UTF8 \
  --locale=C.UTF-8 >"$workdir/initdb.log" 2>&1 || { cat "$workdir/initdb.log" >&2; exit 1; }
echo "host all all $subnet.0/24 trust" >>"$datadir/pg_hba.conf"
options="-c listen_addresses=$subnet.1 -c port=5432 -c unix_socket_directories=$workdir"
options="$options -c max_connections=300 -c fsync=off -c synchronous_commit=off"
in_ns "$db" runuser -u postgres -- "$pg_bin/pg_ctl" -D "$datadir" -o "$options" \
  -l "$workdir/pg.log" -w -t 60 start >/dev/null || { cat "$workdir/pg.log" >&2; exit 1; }
# Not on loopback, so Redis's protected mode wants a password: a random one per run.
redis_password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
in_ns "$db" redis-server --bind "$subnet.1" --port 6379 --save "" --appendonly no \
  --requirepass "$redis_password" --dir "$workdir" --daemonize yes \
  --pidfile "$workdir/redis.pid" --logfile "$workdir/redis.log"
for _ in $(seq 50); do
  REDISCLI_AUTH=$redis_password in_ns "$db" redis-cli -h "$subnet.1" ping >/dev/null 2>&1 && break
  sleep 0.1
done

export DATABASE_URL="postgres://postgres@$subnet.1:5432/postgres"
export TEST_REDIS_URL="redis://:$redis_password@$subnet.1:6379/0"
export CLUSTER_APP_NETNS="${apps[*]}"
export CLUSTER_APP_ADDRS="${addrs[*]}"
export ALLOWED_HOSTS="testserver,127.0.0.1,localhost,${addrs[0]},${addrs[1]}"
echo "with-cluster: db $subnet.1 (PostgreSQL, Redis), app hosts ${addrs[*]}" >&2
set +e
in_ns "$db" "$@"
status=$?
set -e
exit $status
