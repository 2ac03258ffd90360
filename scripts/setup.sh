#!/usr/bin/env bash
# Install what vmigrate needs on a Debian 12 machine. Idempotent: a second run
# checks and returns in seconds. Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS="qemu-system-x86 qemu-utils busybox-static cpio iproute2 openssh-server openssh-client
      gcc libc6-dev iputils-ping python3-venv rsync"
missing=""
for p in $DEBS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: these Debian packages are missing and installing them needs root:$missing" >&2
    exit 1
  fi
  echo "setup: installing Debian packages:$missing"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating the virtual environment .venv"
  "$PY" -m venv .venv
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
stamp=".venv/.stamp-install$extra"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing vmigrate$extra into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e ".$extra"
  touch "$stamp"
fi

# The lab guest image: cached, rebuilt only when its sources change.
if [ "$(id -u)" = 0 ]; then
  .venv/bin/vmigrate lab image
else
  echo "setup: not root, skipping the lab guest image (the lab needs root anyway)"
fi
