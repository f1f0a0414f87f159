#!/usr/bin/env bash
# Two control-plane replicas on one PostgreSQL database, and a run that outlives one of them:
#   1. make a database and start replicas a and b on it (one artifact store, 2 s leases),
#   2. start a run through a client that lists both (PLAIT_SERVER=a,b: it talks to a),
#   3. kill -9 replica a while the run's steps are running,
#   4. follow the run: the client moves to b, which takes a's run over once a's lease expired
#      and finishes it; what had finished is not run again.
# Usage: run.sh [POSTGRES_URL] (a server URL, postgresql+asyncpg://USER@HOST:PORT/DB; the
# default is the throwaway server of ../../scripts/postgres.sh). Needs `plait` on PATH, installed
# with the postgres extra, and `psql`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
server=${1:-$(bash "$root/scripts/postgres.sh")}
python=$(dirname "$(command -v plait)")/python
work=$(mktemp -d)
db=plait_replicas_example_$$
libpq=${server/postgresql+asyncpg/postgresql}
url=${server%/*}/$db
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  psql -q "$libpq" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT
free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

psql -q "$libpq" -c "CREATE DATABASE $db" >/dev/null
declare -A port
for name in a b; do
  port[$name]=$(free_port)
  mkdir -p "$work/$name"
  PLAIT_HOME=$work/$name plait server start --foreground --port "${port[$name]}" \
    --database-url "$url" --artifact-store "file://$work/artifacts" --heartbeat-timeout 2 \
    >"$work/$name.log" 2>&1 &
  pids+=($!)
  disown  # no job notice when it is killed
  echo "== replica $name on 127.0.0.1:${port[$name]} (pid $!)"
done
i=0
for name in a b; do
  until PLAIT_HOME=$work/$name plait server status >/dev/null 2>&1; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "replica $name did not start:" >&2
      cat "$work/$name.log" >&2
      exit 1
    fi
    sleep 0.2
  done
  i=$((i + 1))
done
# a token of the shared database: good on every replica
export PLAIT_TOKEN=$(PLAIT_HOME=$work/a plait token create example --role user)
export PLAIT_SERVER=127.0.0.1:${port[a]},127.0.0.1:${port[b]}
export PLAIT_HOME=$work/client

cd "$here"
run=$(plait run pipeline.py:squares --detach)
echo "== run $run started through replica a"
sleep 2
echo "== kill -9 replica a (pid ${pids[0]})"
kill -9 "${pids[0]}"
plait runs watch "$run"
plait runs show "$run"
echo "== replica b's log"
grep -i "took over" "$work/b.log"
