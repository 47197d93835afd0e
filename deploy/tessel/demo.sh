#!/bin/sh
# The demo workload of deploy/docker-compose.yml's producer service: register a model, wait
# until its deploy saga has it serving, then publish deltas and print the producer's JSON
# summary (rows_acked, rows_per_s, latencies). Credentials come from TESSEL_USER and
# TESSEL_PASSWORD. Every DEMO_* variable has a default.
set -eu

nats="${DEMO_NATS:-nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222}"
model="${DEMO_MODEL:-demo}"
rows="${DEMO_ROWS:-4096}"
dim="${DEMO_DIM:-16}"
rate="${DEMO_RATE:-50}"
batch="${DEMO_BATCH:-256}"
duration="${DEMO_DURATION:-60s}"
# how many 2-second waits for the cluster to take the model and serve it
tries="${DEMO_WAIT_TRIES:-90}"

log() { echo "demo: $*" >&2; }

i=0
until tessel model describe "$model" --nats "$nats" >/dev/null 2>&1; do
  # The nodes may still be electing a leader; the create is retried until the model exists.
  tessel model create --nats "$nats" --name "$model" --rows "$rows" --dim "$dim" >&2 || true
  i=$((i + 1))
  [ "$i" -lt "$tries" ] || { log "model $model was never created"; exit 1; }
  sleep 2
done
log "model $model exists; waiting for it to serve"

i=0
until tessel model describe "$model" --nats "$nats" 2>/dev/null | grep -q ": Serving "; do
  i=$((i + 1))
  [ "$i" -lt "$tries" ] || { log "model $model never reached Serving"; exit 1; }
  sleep 2
done
log "model $model is serving; producing for $duration"

exec tessel produce --nats "$nats" --model "$model" --rate "$rate" --batch "$batch" \
  --duration "$duration" --json
