#!/usr/bin/env bash
# Quick start, step 2: every test. This is what `.ci/run` runs.
#   1. format check   2. clippy, warnings denied   3. all tests (unit, property, integration,
#   planted bugs)   4. the simulator over 5,000 seeds, with a determinism check on 200 of them.
# Installs its own tools first (scripts/tools.sh); NATS servers that tests need are started and
# stopped by the tests themselves, on loopback.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "tools"
TESSEL_NATS_SERVER="$(bash scripts/tools.sh)"
export TESSEL_NATS_SERVER

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --locked --workspace --all-targets --all-features -- -D warnings

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --all-features --no-fail-fast
  # nextest does not run doctests
  cargo test --locked --workspace --all-features --doc
else
  cargo test --locked --workspace --all-features --no-fail-fast
fi

step "simulator: 5,000 seeds"
cargo build --release --locked -p node --bin tessel
./target/release/tessel sim --seeds 5000
step "simulator: determinism, 200 seeds run twice"
./target/release/tessel sim --seeds 200 --first-seed 90000 --check-determinism

step "all green"
