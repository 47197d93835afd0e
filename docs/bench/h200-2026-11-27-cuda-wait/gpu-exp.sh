#!/usr/bin/env bash
# GPU-table node CPU: where it goes (per-thread user and system time from /proc during the
# deltas bench's latency phase), and three knobs of the experiment binary (branch
# exp-cuda-wait): TESSEL_CUDA_WAIT=block (the apply's last wait on a blocking-sync event
# instead of a spinning stream synchronise), TESSEL_CUDA_STREAMS=one (a table's copies on its
# compute stream), TESSEL_DEVICE_THREADS=N (the device's apply threads; 8 by default).
# Run from the repository root with .gpu-pack/ built from that branch.
set -u
root="$(pwd)"; out="${OUT:-/tmp/out}"; mkdir -p "$out"
mkdir -p /tmp/tessel-cuda-lib
nvrtc="$(find /usr/local/cuda*/ /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu -name 'libnvrtc.so*' -not -path '*stubs*' 2>/dev/null | grep -v builtins | sort | head -n1)"
[ -n "$nvrtc" ] && ln -sf "$nvrtc" /tmp/tessel-cuda-lib/libnvrtc.so
export LD_LIBRARY_PATH="/tmp/tessel-cuda-lib:/usr/local/nvidia/lib64:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export TESSEL_NATS_SERVER="$root/.gpu-pack/nats-server"
exec > >(tee "$out/gpu-exp.log") 2>&1
echo "== correctness with every knob on (block, one stream, 2 threads)"
TESSEL_CUDA_WAIT=block TESSEL_CUDA_STREAMS=one timeout 60 .gpu-pack/gpu_unit --test-threads 1 2>&1 | grep "test result"
TESSEL_CUDA_WAIT=block TESSEL_CUDA_STREAMS=one timeout 60 .gpu-pack/cuda_vs_cpu --test-threads 1 2>&1 | grep "test result"
# tid name utime stime (clock ticks)
snap() { for t in /proc/$1/task/*; do s="$(sed 's/.*) //' "$t/stat" 2>/dev/null)" || continue; echo "${t##*/} $(tr ' ' _ < "$t/comm" 2>/dev/null) $(echo "$s" | awk '{print $12, $13}')"; done; }
variant() {
    local name="$1"; shift
    echo; echo "== $name: $* ($(date +%T))"
    local w; w="$(mktemp -d)"; cd "$w"
    env "$@" timeout 150 "$root/.gpu-pack/tessel" bench --only deltas --json "$out/$name.json" > o.txt 2> e.txt &
    local b=$!
    for _ in $(seq 1 1200); do grep -q "deltas end to end:" e.txt && break; sleep 0.1; done
    sleep 2
    # $b is `timeout`; its child is the bench, whose child is the node. (The first device run,
    # gpu-exp.log, took the bench's pid here: its per-thread lines describe the bench process,
    # not the node. gpu-exp-profiled.log is the corrected script, base variant only.)
    local node; node="$(pgrep -P "$(pgrep -P "$b" -x tessel | head -1)" -x tessel | head -1)"
    local pa; pa="$(sed 's/.*) //' /proc/$node/stat | awk '{print $12, $13}')"
    snap "$node" > a.txt
    : > states.txt
    for _ in $(seq 1 40); do
        for t in /proc/$node/task/*; do echo "$(tr ' ' _ < "$t/comm" 2>/dev/null) $(sed 's/.*) //' "$t/stat" 2>/dev/null | cut -d' ' -f1)"; done >> states.txt
        sleep 0.2
    done
    snap "$node" > b.txt
    local pb; pb="$(sed 's/.*) //' /proc/$node/stat | awk '{print $12, $13}')"
    echo "node, whole process over the window (ticks of 10 ms): user $(( ${pb% *} - ${pa% *} )), system $(( ${pb#* } - ${pa#* } )); threads now $(ls /proc/$node/task | wc -l)"
    echo "per thread name (threads alive at both ends): threads, user ticks, system ticks"
    join <(sort a.txt) <(sort b.txt) | awk '{c=$2; n[c]++; u[c]+=$6-$3; s[c]+=$7-$4} END {for (c in n) print c, n[c], u[c], s[c]}' | sort -k3 -nr | head -8
    echo "thread states sampled (name state count)"
    sort states.txt | uniq -c | sort -nr | head -8
    wait "$b"
    grep -E "^bench: deltas (end to end|latency)" e.txt
    grep -E "^delta (end to end, dim|replay, 1 GiB)" o.txt
    cd "$root"; rm -rf "$w"
}
variant base
variant block TESSEL_CUDA_WAIT=block
variant one-stream TESSEL_CUDA_STREAMS=one
variant threads-2 TESSEL_DEVICE_THREADS=2
variant block-one-stream TESSEL_CUDA_WAIT=block TESSEL_CUDA_STREAMS=one
echo "== done $(date +%T)"
