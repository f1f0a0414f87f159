#!/usr/bin/env bash
# Steps in Docker containers built from their environments, on the embedded engine:
#   1. register a Docker runner, an image builder (its parent image) and, when REGISTRY is
#      given, a container registry; make a stack of them the active one,
#   2. run pipeline.py: `train` runs in a container from an image built for its environment
#      (once: the rerun and every later run reuse it), `report` in a local process,
#   3. list the builds.
# Usage: run.sh [PARENT_IMAGE] [REGISTRY]  (defaults: the image of ../../scripts/docker.sh, an
# image with python3 made locally; no registry). Needs `plait` on PATH, installed with the
# docker extra (pip install 'plait[docker]'), and a Docker daemon.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
parent=${1:-$(bash "$root/scripts/docker.sh")}
registry=${2:-}
python=$(dirname "$(command -v plait)")/python
export PLAIT_HOME=${PLAIT_HOME:-$(mktemp -d)}

plait component register dock --kind runner --flavor docker -c stop_grace_seconds=5
plait component register builder --kind image_builder --flavor docker -c parent_image="$parent"
components=(-c dock -c builder -c local-artifacts)
if [[ -n $registry ]]; then
  plait component register registry --kind container_registry --flavor docker -c uri="$registry"
  components+=(-c registry)
fi
plait stack register containers "${components[@]}" --set

cd "$here"
"$python" pipeline.py
plait builds list
