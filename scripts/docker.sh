#!/usr/bin/env bash
# Makes sure a Docker daemon runs and a local Debian base image with Python exists (no image
# can be pulled from a registry here), and prints the base image's name. Installs Debian's
# docker.io and debootstrap when missing (root, no prompts). The image is cached by Docker.
set -euo pipefail
image=plait-test-base:bookworm
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
  echo "installing ${need[*]} (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  (dockerd >/tmp/plait-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start:" >&2; tail -5 /tmp/plait-dockerd.log >&2; exit 1; }
fi
if ! docker image inspect "$image" >/dev/null 2>&1; then
  echo "building $image with debootstrap (about a minute, once)" >&2
  root=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" \
    >"$root.log" 2>&1 || { tail -5 "$root.log" >&2; exit 1; }
  tar -C "$root" -c . | docker import - "$image" >/dev/null
  rm -rf "$root" "$root.log"
fi
echo "$image"
