#!/usr/bin/env bash
# A step that runs in a Docker container, against a daemon on this machine:
#   1. build a worker image (Plait from a locally built wheel, on a local base image),
#   2. start a daemon and make a `worker` token,
#   3. start `plait worker --pool containers` in a container,
#   4. run pipeline.py, whose step `where` names pool="containers".
# Needs Docker and `plait` on PATH. BASE names the base image (default: the Debian image that
# ../../scripts/docker.sh builds with debootstrap, since no registry can be reached here).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
base=${BASE:-$(bash "$root/scripts/docker.sh")}
python=$(dirname "$(command -v plait)")/python
work=$(mktemp -d)
export PLAIT_HOME=$work/home
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tag=plait-worker:example-$$
name=plait-worker-example-$$
cleanup() {
  docker rm -f "$name" >/dev/null 2>&1 || true
  plait server stop >/dev/null 2>&1 || true
  docker rmi -f "$tag" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT  # a stopped script cleans up too

echo "== building the worker image on $base"
mkdir -p "$work/context"
"$python" -m pip wheel -q "$root" -w "$work/context/wheelhouse"
cp "$here/Dockerfile" "$work/context/"
docker build -q --build-arg BASE="$base" -t "$tag" "$work/context" >/dev/null

echo "== starting a daemon on 127.0.0.1:$port"
plait server start --port "$port" >/dev/null
export PLAIT_SERVER=127.0.0.1:$port
token=$(plait token create example-worker --role worker)

echo "== starting plait worker in container $name"
# the host's network, so the daemon on loopback is reachable; no shared files: code and
# artifacts go through the control plane (--artifacts remote)
docker run -d --name "$name" --network host -e PLAIT_TOKEN="$token" "$tag" \
  --server "127.0.0.1:$port" --pool containers --artifacts remote >/dev/null

echo "== running the pipeline"
cd "$here"
"$python" pipeline.py
docker stop -t 30 "$name" >/dev/null  # drains, exits 0
echo "== the worker's log"
docker logs "$name" 2>&1 | tail -n 5
