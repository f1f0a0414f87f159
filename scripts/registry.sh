#!/usr/bin/env bash
# Makes sure a container registry (Debian's docker-registry, the CNCF distribution) answers on
# loopback for the tests, and prints its HOST:PORT. Installs the package when missing (root, no
# prompts). It serves plain HTTP on PLAIT_REGISTRY_ADDR (default 127.0.0.1:5077), with its own
# config and storage under PLAIT_REGISTRY_DIR (default /var/cache/plait-registry), kept between
# runs so that pushed images are cached. Docker lets any 127.0.0.0/8 registry speak plain HTTP
# without an "insecure-registries" entry, so the daemon needs no change.
set -euo pipefail
addr=${PLAIT_REGISTRY_ADDR:-127.0.0.1:5077}
dir=${PLAIT_REGISTRY_DIR:-/var/cache/plait-registry}
# python3, not curl: a fresh machine of ours has the one, not always the other
answers() {
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2).close()' \
    "http://$addr/v2/" 2>/dev/null
}
if answers; then echo "$addr"; exit 0; fi

if ! command -v docker-registry >/dev/null; then
  echo "installing docker-registry (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
  apt-get update -qq >&2
  # the package's service is not wanted (and there is no systemd here): we start our own
  apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
fi
mkdir -p "$dir/data"
cat >"$dir/config.yml" <<EOF
# written by scripts/registry.sh: a throwaway registry for the tests
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  secret: plait-test-registry
  addr: $addr
EOF
# The tests delete the images they push, but the registry keeps their layers, which makes the
# next run's pushes quick. Past 2 GB, free them before serving (unsafe while it serves).
if (($(du -sm "$dir/data" | cut -f1) > 2048)); then
  docker-registry garbage-collect --delete-untagged "$dir/config.yml" >"$dir/gc.log" 2>&1 || true
fi
# setsid: the registry outlives this script and the test command's process group
setsid docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$dir/pid"
for _ in $(seq 1 60); do
  answers && break
  kill -0 "$pid" 2>/dev/null || break # it exited (a port in use, a bad config)
  sleep 0.25
done
if ! answers; then
  echo "docker-registry did not answer on http://$addr/v2/; its log ($dir/log) ends with:" >&2
  tail -n 20 "$dir/log" >&2
  exit 1
fi
echo "$addr"
