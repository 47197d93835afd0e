#!/usr/bin/env bash
# Builds, here (no CUDA needed: cudarc loads libcuda and libnvrtc at run time), what
# scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain and no network, and
# packs it into .gpu-pack/ (ignored by git, about 35 MB):
#   tessel        release build with `--features cuda`, stripped
#   gpu_unit      the gpu crate's unit tests (with cuda)
#   cuda_vs_cpu   the CUDA-against-CPU integration tests
#   nats-server   for the delta benchmark through NATS
# Then, on the GPU machine, from the repository root: `bash scripts/gpu-check.sh`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$root/.gpu-pack"
mkdir -p "$out"
cargo build --release -p node --features cuda
cp target/release/tessel "$out/tessel"
cargo test --release -p gpu --features cuda --no-run --message-format json 2>/dev/null |
    python3 -c '
import json, shutil, sys
names = {"gpu": "gpu_unit", "cuda_vs_cpu": "cuda_vs_cpu"}
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = names.get(m["target"]["name"])
        if name:
            shutil.copy(m["executable"], sys.argv[1] + "/" + name)
' "$out"
server="${TESSEL_NATS_SERVER:-$(bash scripts/tools.sh)}"
cp -L "$server" "$out/nats-server"
strip "$out/tessel" "$out/gpu_unit" "$out/cuda_vs_cpu" 2>/dev/null || true
ls -l "$out"
