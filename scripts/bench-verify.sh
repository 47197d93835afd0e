#!/usr/bin/env bash
# Times `tessel replay --verify` on a large model: one nats-server (JetStream, max_payload as
# given, 8MB by default as in our configs) on a free loopback port, one node running the last
# binary given (a verifier of an older tessel reads the rows of every slot from it instead),
# a model of ROWS × DIM (4,194,304 × 64: a 1 GiB table) with deltas produced into it for 10 s, then `replay --verify` twice with each binary given, printing wall seconds, the
# verifier's peak resident memory and its JSON line. Checkpoints are off while the node runs,
# so each verify also replays the whole stream.
#
#   scripts/bench-verify.sh [TESSEL_BIN ...]        (default: target/release/tessel)
#   MAX_PAYLOAD=1MB ROWS=4194304 DIM=64 scripts/bench-verify.sh old/tessel target/release/tessel
#
# Everything it starts is stopped on exit; its files are under a temporary directory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("$root/target/release/tessel")
for b in "${bins[@]}"; do
    [ -x "$b" ] || { echo "bench-verify: $b is not an executable (build it first)" >&2; exit 2; }
done
rows="${ROWS:-4194304}"
dim="${DIM:-64}"
server="$(bash scripts/tools.sh 2>/dev/null)"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
url="nats://127.0.0.1:$port"
cat > "$work/nats.conf" <<EOF
listen: 127.0.0.1:$port
max_payload: ${MAX_PAYLOAD:-8MB}
jetstream { store_dir: "$work/js" }
EOF
"$server" -c "$work/nats.conf" > "$work/nats.log" 2>&1 &
pids+=($!)
node="${bins[-1]}"
TESSEL_CHECKPOINT_INTERVAL_MS=3600000 TESSEL_CHECKPOINT_EVERY_FRAMES=100000000 RUST_LOG=warn \
    "$node" node --nats "$url" --node-id n1 > "$work/node.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 60); do
    "$node" status --nats "$url" --json 2>/dev/null | grep -q '"leader":{' && break
    sleep 0.5
done
"$node" model create --name big --rows "$rows" --dim "$dim" --nats "$url"
for _ in $(seq 1 120); do
    "$node" model describe big --json --nats "$url" 2>/dev/null | grep -q '"state":"Serving"' && break
    sleep 0.5
done
echo "bench-verify: produce: $("$node" produce --model big --rate 300000 --batch 65536 --duration 10s --json --nats "$url")"
echo "bench-verify: $(nproc) cores, model big $rows × $dim, max_payload ${MAX_PAYLOAD:-8MB}, node ${node}"
for round in 1 2; do
    echo "bench-verify: round $round"
    for b in "${bins[@]}"; do
        # Wall time and the verifier's peak resident memory (the child's ru_maxrss, KiB).
        python3 - "$b" "$url" <<'PY'
import resource, subprocess, sys, time
b, url = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
p = subprocess.run([b, "replay", "--model", "big", "--verify", "--json", "--quiet", "--nats", url],
                   capture_output=True, text=True)
wall = time.monotonic() - t0
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
print(f"bench-verify: {b}: exit {p.returncode}, {wall:.2f} s, peak resident {rss} MiB: "
      f"{p.stdout.strip()[:300]} {p.stderr.strip()[:300]}")
PY
    done
done
