#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL cluster: initdb in a temporary directory, start
# it on a free loopback port (as the postgres user when we are root: initdb and postgres refuse
# to run as root), export DATABASE_URL, run the command, and always stop and remove the cluster.
#
#   scripts/with-postgres.sh [--required] [--tuned] -- COMMAND...
#
# --required: fail if PostgreSQL cannot start (CI); otherwise skip the command with a warning.
# --tuned:    settings for the test suite (fsync off); the benchmark runs without it.
set -euo pipefail

required=0
tuned=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --required) required=1; shift ;;
    --tuned) tuned=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

skip_or_fail() {
  if [[ $required -eq 1 ]]; then
    echo "with-postgres: $1 (PostgreSQL is required here, failing)" >&2
    exit 1
  fi
  echo "" >&2
  echo "######################################################################" >&2
  echo "# with-postgres: $1" >&2
  echo "# SKIPPING the PostgreSQL leg. Concurrency tests did NOT run." >&2
  echo "######################################################################" >&2
  exit 0
}

pg_bin=""
for candidate in "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent)")" \
                 /usr/lib/postgresql/*/bin; do
  if [[ -x "$candidate/initdb" && -x "$candidate/pg_ctl" ]]; then pg_bin="$candidate"; break; fi
done
[[ -n "$pg_bin" ]] || skip_or_fail "initdb/pg_ctl not found (install PostgreSQL 15 server binaries)"

as_pg=()
if [[ $(id -u) -eq 0 ]]; then
  id postgres >/dev/null 2>&1 || skip_or_fail "running as root but there is no 'postgres' user"
  as_pg=(runuser -u postgres --)
fi

workdir=$(mktemp -d /tmp/scheduler-pg.XXXXXX)
chmod 755 "$workdir"
[[ ${#as_pg[@]} -gt 0 ]] && chown postgres "$workdir"
datadir="$workdir/data"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')

cleanup() {
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$datadir" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$workdir"
}
trap cleanup EXIT INT TERM

# trust auth on a private loopback port of a cluster that lives for one run: no password to leak.
"${as_pg[@]}" "$pg_bin/initdb" -D "$datadir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
  >"$workdir/initdb.log" 2>&1 || { cat "$workdir/initdb.log" >&2; skip_or_fail "initdb failed"; }

options="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$workdir -c max_connections=200"
# WITH_POSTGRES_OPTIONS: more server options (the worker bench's --profile loads
# pg_stat_statements with it).
options="$options ${WITH_POSTGRES_OPTIONS:-}"
if [[ $tuned -eq 1 ]]; then
  options="$options -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
fi
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$datadir" -o "$options" -l "$workdir/server.log" -w -t 60 start \
  >/dev/null || { cat "$workdir/server.log" >&2; skip_or_fail "PostgreSQL did not start"; }

export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
echo "with-postgres: PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
set +e
"$@"
status=$?
set -e
exit $status
