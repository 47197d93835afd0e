#!/usr/bin/env bash
# Where the node's CPU goes with tables on the GPU: per-thread CPU and what each thread is
# doing (sampled /proc/<tid>/syscall) during the deltas bench's latency phase.
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"; out="${OUT:-/tmp/out}"; mkdir -p "$out"
mkdir -p /tmp/tessel-cuda-lib
nvrtc="$(find /usr/local/cuda*/ /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu -name 'libnvrtc.so*' -not -path '*stubs*' 2>/dev/null | grep -v builtins | sort | head -n1)"
[ -n "$nvrtc" ] && ln -sf "$nvrtc" /tmp/tessel-cuda-lib/libnvrtc.so
export LD_LIBRARY_PATH="/tmp/tessel-cuda-lib:/usr/local/nvidia/lib64:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export TESSEL_NATS_SERVER="$root/.gpu-pack/nats-server"
w="$(mktemp -d)"; cd "$w"
"$root/.gpu-pack/tessel" bench --only deltas > o.txt 2> e.txt &
b=$!
for i in $(seq 1 900); do grep -q "deltas end to end:" e.txt && break; sleep 0.1; done
node="$(pgrep -P "$b" -x tessel | head -1)"
echo "node pid $node, threads $(ls /proc/$node/task | wc -l)"
snap() { for t in /proc/$node/task/*; do c="$(tr ' ' _ < $t/comm)"; s="$(sed 's/.*) //' $t/stat | awk '{print $12+$13}')"; v="$(awk '/^voluntary_ctxt/{print $2}' $t/status)"; n="$(awk '/^nonvoluntary_ctxt/{print $2}' $t/status)"; echo "${t##*/} $c $s $v $n"; done; }
sleep 1; snap > a.txt
for i in $(seq 1 40); do for t in /proc/$node/task/*; do echo "$(tr ' ' _ < $t/comm) $(cut -d' ' -f1 $t/syscall)"; done; sleep 0.1; done > samples.txt
snap > b.txt
echo "== per thread name: threads, CPU ticks (10 ms) in the window, voluntary and involuntary switches"
join <(sort a.txt) <(sort b.txt) | awk '{c=$2; n[c]++; cpu[c]+=$7-$3; v[c]+=$8-$4; nv[c]+=$9-$5} END {for (c in n) print c, n[c], cpu[c], v[c], nv[c]}' | sort -k3 -nr | head -20
echo "== busiest threads: tid, name, CPU ticks, voluntary, involuntary"
join <(sort a.txt) <(sort b.txt) | awk '{print $1, $2, $7-$3, $8-$4, $9-$5}' | sort -k3 -nr | head -14
echo "== samples: thread name, syscall (running = in user space)"
sort samples.txt | uniq -c | sort -nr | head -25
wait $b
grep -E "^bench: deltas (end to end|latency)" e.txt
cd /; rm -rf "$w"
