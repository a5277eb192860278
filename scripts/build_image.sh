#!/usr/bin/env bash
# Builds the container image with podman on a machine that reaches Debian's and Python's package registries but no
# image registry (`make image`):
#   1. the base, when missing: a minimal Debian root file system with Python (mmdebstrap), imported into podman;
#   2. the Dockerfile on that base (`podman build --isolation chroot`: RUN steps without a container runtime's
#      cgroups; `--format docker`: OCI images drop HEALTHCHECK), pip configured as this machine's pip is: its
#      index, extra index, find-links, constraint and certificate settings become build arguments, and the local
#      directories and files they name are mounted read-only at the same paths for the build only.
#
# Environment: IMAGE (default controlnet-canny:0.1.0), BASE_IMAGE (default localhost/debian-python:bookworm; set it
# to python:3.11-slim-bookworm where a registry is reachable), SUITE (bookworm), MIRROR (http://deb.debian.org),
# PYTHON (whose pip configuration the build copies; default .venv/bin/python, else python3), BUILD_ARGS (more
# `podman build` arguments, e.g. "--build-arg TORCH_VARIANT=cu128").
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${IMAGE:-controlnet-canny:0.1.0}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org}
PYTHON=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}

need() { command -v "$1" >/dev/null || { echo "$1 is missing: apt-get install -y $1" >&2; exit 1; }; }
need podman

if [[ $BASE_IMAGE == localhost/* ]] && ! podman image exists "$BASE_IMAGE"; then
  need mmdebstrap
  echo "Making $BASE_IMAGE with mmdebstrap ($SUITE from $MIRROR) ..."
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  # No documentation, manual pages or translations (copyright files stay; the dpkg options stay in the image for
  # later installs), no package lists. Java's package needs the man1 directory to exist all the same.
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* && mkdir -p "$1"/usr/share/man/man1' \
    "$SUITE" "$WORK/base.tar" \
    "deb $MIRROR/debian $SUITE main" "deb $MIRROR/debian $SUITE-updates main" \
    "deb $MIRROR/debian-security $SUITE-security main"
  podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' "$WORK/base.tar" "$BASE_IMAGE"
fi

# pip's effective settings on this machine as `podman build` arguments: --build-arg PIP_X=... for the Dockerfile's
# ARGs, --volume for what they name on the local disk.
mapfile -t PIP_ARGS < <("$PYTHON" - <<'EOF'
import ast, re, subprocess, sys
from pathlib import Path
from urllib.parse import urlparse

listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
precedence = {"global": 0, "install": 1, "user": 1, "site": 2, ":env:": 3}  # pip: environment over files
settings, ranks = {}, {}
for line in listed.splitlines():
    match = re.match(r"^(:env:|[^.]+)\.([a-z-]+)=(.*)$", line)
    if match and match[2] in ("index-url", "extra-index-url", "find-links", "constraint", "cert"):
        scope, key, value = match[1], match[2], ast.literal_eval(match[3])
        if precedence.get(scope, 0) >= ranks.get(key, -1):
            settings[key], ranks[key] = value, precedence.get(scope, 0)
# The Dockerfile's defaults are PyTorch's index: keep PyPI as the index unless this machine names another.
settings.setdefault("index-url", "https://pypi.org/simple")
settings.setdefault("extra-index-url", "https://pypi.org/simple")
mounts = set()
for key, value in settings.items():
    print(f"--build-arg=PIP_{key.upper().replace('-', '_')}={value}")
    for item in value.split():
        path = Path(urlparse(item).path) if item.startswith("file://") else Path(item) if item.startswith("/") else None
        if path is not None and path.exists():
            # a local index's files sit beside its simple/ directory (PEP 503 pages link to ../../files/...)
            mounts.add(path.parent if key.endswith("index-url") else path)
for path in sorted(mounts):
    print(f"--volume={path}:{path}:ro")
EOF
)

echo "Building $IMAGE on $BASE_IMAGE (pip: ${PIP_ARGS[*]}) ..."
PREVIOUS=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
# shellcheck disable=SC2086  # BUILD_ARGS is a list of arguments
podman build --isolation chroot --format docker --build-arg "BASE_IMAGE=$BASE_IMAGE" "${PIP_ARGS[@]}" \
  ${BUILD_ARGS:-} --tag "$IMAGE" "$ROOT"
# The image this one replaces holds gigabytes of its own layers; it stays while a container uses it.
if [ -n "$PREVIOUS" ] && [ "$PREVIOUS" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
  podman rmi "$PREVIOUS" >/dev/null 2>&1 || true
fi
podman image ls "$IMAGE"
