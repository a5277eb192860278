#!/usr/bin/env bash
# Cold start of the image (docs/serving.md, "Container"): seconds from `podman run` to the first /ping 200, to the
# first READY worker (the HEALTHCHECK passing) and to the first 200 of a generation, then the image's size.
# Runs it as docs/serving.md does (read-only root, tmpfs, no capabilities) on free loopback ports; always removed.
#
#   scripts/container_cold_start.sh [IMAGE]      # default localhost/controlnet-canny:0.1.0
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${1:-localhost/controlnet-canny:0.1.0}
NAME=controlnet-cold-start-$$
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
trap 'podman rm --force --time 0 "$NAME" >/dev/null 2>&1 || true' EXIT

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
key() { podman exec "$NAME" cat /app/artifacts/serve/key_file.json 2>/dev/null |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["inference"]["key"])' 2>/dev/null; }

START=$(now)
# runc and the limits: what these VMs need (docs/serving.md, "Container"); $(...) unquoted: no options or some
# shellcheck disable=SC2046
podman run --detach --name "$NAME" --read-only --read-only-tmpfs=false --cap-drop=ALL \
  $(command -v runc >/dev/null && echo --runtime=runc) --ulimit nofile=16384 --ulimit nproc=8192 \
  --tmpfs /tmp:rw,exec,nosuid,nodev,size=1g --tmpfs /app/artifacts/serve:rw,exec,nosuid,nodev,size=256m,mode=0700,U \
  --publish "127.0.0.1:$PORT:8080" "$IMAGE" >/dev/null

until [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(key)" "http://127.0.0.1:$PORT/ping")" = 200 ]; do
  sleep 0.2
done
echo "first /ping 200:          $(since "$START") s"
until podman healthcheck run "$NAME" >/dev/null 2>&1; do sleep 0.2; done
echo "healthy (a READY worker): $(since "$START") s"
until [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(key)" \
            -F "image=@$ROOT/tests/data/house.png" -F prompt="a house" \
            "http://127.0.0.1:$PORT/predictions/controlnet")" = 200 ]; do
  sleep 0.2
done
echo "first generation 200:     $(since "$START") s (its own duration included)"
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"
