#!/usr/bin/env bash
# What to run on a machine with a CUDA device (driver + NVRTC), from the repository root, in
# about 80 s on an H200, printing everything:
#   1. the gpu unit tests and the CUDA-against-CPU tests
#   2. `tessel devices --json` and `tessel devices`
#   3. the first touch of fresh memory, twice (scripts/first-touch.py), then `tessel bench gpu`
#      (the table kernels against memcpy)
#   4. `tessel bench --only deltas` twice: tables on the GPU, then on the CPU
#      (`CUDA_VISIBLE_DEVICES=`), same machine, same binary; on more than 10 cores a third
#      time, on the CPU with `--replay-workers` (cores − 2)
# Binaries: from .gpu-pack/ when it holds them (made by scripts/gpu-pack.sh on any machine;
# GPU machines here have no Rust toolchain and no network), else built here with cargo.
# With $OUT set, the JSON of each benchmark and the whole log are written there.
# Pass --quick for smaller benchmark sizes. Each step is bounded by `timeout`; a failing step
# is reported and the script goes on, exiting non-zero at the end if any failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
quick="${1:-}"
out="${OUT:-$root/.gpu-pack/out}"
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
failed=0
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
run() { "$@" || { echo "FAILED (exit $?): $*"; failed=1; }; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || true
echo "cpus: $(nproc)"
# cudarc looks for libnvrtc.so (and .so.12, .so.1, …); CUDA 13 toolkits ship libnvrtc.so.13.
mkdir -p /tmp/tessel-cuda-lib
nvrtc="$(find /usr/local/cuda*/ /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu -name 'libnvrtc.so*' \
    -not -path '*stubs*' 2>/dev/null | grep -v builtins | sort | head -n1)"
echo "nvrtc: ${nvrtc:-none found}"
[ -n "$nvrtc" ] && ln -sf "$nvrtc" /tmp/tessel-cuda-lib/libnvrtc.so
export LD_LIBRARY_PATH="/tmp/tessel-cuda-lib:/usr/local/nvidia/lib64:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"

pack="$root/.gpu-pack"
if [ -x "$pack/tessel" ] && [ -x "$pack/gpu_unit" ] && [ -x "$pack/cuda_vs_cpu" ]; then
    step "binaries from .gpu-pack"
    tessel="$pack/tessel"
    unit=("$pack/gpu_unit")
    vs=("$pack/cuda_vs_cpu")
    [ -x "$pack/nats-server" ] && export TESSEL_NATS_SERVER="$pack/nats-server"
else
    step "build (release, --features cuda)"
    cargo build --release -p node --features cuda || exit 1
    tessel="$root/target/release/tessel"
    unit=(cargo test --release -p gpu --features cuda --lib --)
    vs=(cargo test --release -p gpu --features cuda --test cuda_vs_cpu --)
    export TESSEL_NATS_SERVER="${TESSEL_NATS_SERVER:-$(bash scripts/tools.sh)}"
fi

step "gpu unit tests"
run timeout 120 "${unit[@]}" --test-threads 1
step "cuda vs cpu"
run timeout 120 "${vs[@]}" --nocapture --test-threads 1

step "tessel devices"
run "$tessel" devices --json
run "$tessel" devices

step "first touch of fresh memory (a fresh VM backs guest pages on first use; see docs/benchmarks.md)"
if command -v python3 >/dev/null; then
    run timeout 60 python3 scripts/first-touch.py 2
    run timeout 60 python3 scripts/first-touch.py 2
else
    echo "no python3 here: skipped"
fi

step "tessel bench gpu"
run timeout 150 "$tessel" bench gpu $quick --json "$out/gpu.json"

work="$(mktemp -d)"
cd "$work"
step "tessel bench --only deltas, tables on the GPU"
run timeout 180 "$tessel" bench --only deltas $quick --json "$out/deltas-gpu.json"
rm -rf "$work/.tessel"
step "tessel bench --only deltas, tables on the CPU (CUDA_VISIBLE_DEVICES=)"
CUDA_VISIBLE_DEVICES= run timeout 180 "$tessel" bench --only deltas $quick --json "$out/deltas-cpu.json"
# On many cores: the replay again with more threads making its zero tables (the default is 8
# at most); the lines "the reader waited … for the workers" of both runs say whether it helps.
more=$(( $(nproc) - 2 ))
if [ "$more" -gt 8 ]; then
    rm -rf "$work/.tessel"
    step "tessel bench --only deltas, tables on the CPU, --replay-workers $more"
    CUDA_VISIBLE_DEVICES= run timeout 180 "$tessel" bench --only deltas $quick \
        --replay-workers "$more" --json "$out/deltas-cpu-workers-$more.json"
fi
cd "$root" && rm -rf "$work"

step "done (failed: $failed)"
exit "$failed"
