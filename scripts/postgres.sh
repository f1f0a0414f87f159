#!/usr/bin/env bash
# Makes sure a throwaway PostgreSQL server for the tests runs on loopback, and prints its
# SQLAlchemy URL. Installs Debian's postgresql when missing (root, no prompts). The cluster
# lives in /tmp/plait-test-pg, owned by the postgres user, with trust auth on 127.0.0.1 and
# fsync off: it holds nothing but test databases.
set -euo pipefail
dir=/tmp/plait-test-pg
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  echo "installing postgresql (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >/dev/null
fi
bin=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
as_pg() { runuser -u postgres -- "$@"; }
if ! as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    rm -rf "$dir"; mkdir -p "$dir"; chown postgres: "$dir"
    as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
  fi
  # the first free port from 54329: another server (another checkout's) may hold one
  python3 - >"$dir/port" <<'PY'
import socket
for port in range(54329, 54429):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
PY
  port=$(<"$dir/port")
  if ! as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 30 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null; then
    echo "PostgreSQL did not start; its log ($dir/log) ends with:" >&2
    tail -n 20 "$dir/log" >&2
    exit 1
  fi
fi
# the running server's port is line 4 of its postmaster.pid
echo "postgresql+asyncpg://postgres@127.0.0.1:$(sed -n 4p "$dir/data/postmaster.pid")/postgres"
