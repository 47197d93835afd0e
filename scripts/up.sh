#!/usr/bin/env bash
# Quick start, step 1: installs what is missing and runs the main job.
# For now the main job is the deterministic simulator over 1,000 seeds (`tessel sim`); pass
# other `tessel sim` arguments to change it, e.g. `scripts/up.sh --seeds 5000`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/tools.sh >/dev/null
cargo build --release --locked -p node --bin tessel
if [ "$#" -eq 0 ]; then set -- --seeds 1000; fi
exec ./target/release/tessel sim "$@"
