#!/usr/bin/env bash
# What to run on a machine with a CUDA device (and driver + NVRTC libraries), in well under
# 8 minutes, printing everything:
#   1. build tessel and the gpu crate with `--features cuda` (release, so the figures count)
#   2. the gpu tests, CUDA against the CPU twin, with their output (`--nocapture`)
#   3. `tessel devices --json` and `tessel devices`
#   4. `tessel bench gpu` (pass --quick as the first argument for smaller sizes)
# No NATS server is needed. The crates must be in the cargo cache (`cargo fetch` where there is
# network). Each step is timed; a failing step stops the script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 || true
ls -l /usr/lib/x86_64-linux-gnu/libcuda.so* /usr/local/cuda/lib64/libnvrtc.so* 2>&1 || true

step "build (release, --features cuda)"
cargo build --release -p node --features cuda
cargo test --release -p gpu --features cuda --no-run

step "gpu tests"
cargo test --release -p gpu --features cuda -- --nocapture --test-threads 1

step "tessel devices"
target/release/tessel devices --json
target/release/tessel devices

step "tessel bench gpu"
target/release/tessel bench gpu ${1:-}

step "done"
