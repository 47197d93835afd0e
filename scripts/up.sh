#!/usr/bin/env bash
# Quick start, step 1: installs what is missing (nats-server into .tools/) and runs the main job:
# a local cluster — NATS with JetStream on free loopback ports and 3 tessel nodes — printing its
# live status until Ctrl-C, which drains the nodes and stops everything it started.
# Pass `tessel up` arguments to change it, e.g. `scripts/up.sh --nodes 5 --servers 3`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
TESSEL_NATS_SERVER="$(bash scripts/tools.sh)"
export TESSEL_NATS_SERVER
cargo build --release --locked -p node --bin tessel
exec ./target/release/tessel up "$@"
