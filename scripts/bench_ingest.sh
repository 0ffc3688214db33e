#!/usr/bin/env bash
# Pure MQTT ingest, sensorflow against Debian's mosquitto, in one run: the same simulated devices
# (64-sample binary packets, QoS 1, 200 Hz) publish to each for the same time, and the simulator
# reports acknowledged packets/s and whether it could keep its schedule (lag events).
# sensorflow's side is ingest + durable log (`batch` durability, PUBACK after the append) without
# the pipeline (crates/ingest/examples/ingest_log_server.rs); mosquitto keeps messages in memory.
#
#   scripts/bench_ingest.sh [SENSORS...]        (default: 5000 10000 20000; 10 s each)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mosquitto >/dev/null || { echo "needs Debian's mosquitto (apt-get install mosquitto)"; exit 1; }
DURATION=${DURATION:-10}
SIZES=("$@"); [ ${#SIZES[@]} -gt 0 ] || SIZES=(5000 10000 20000)
cargo build --release --locked --quiet -p sensorflow -p sensorflow-ingest --example ingest_log_server
cargo build --release --locked --quiet -p sensorflow
SIM=./target/release/sensorflow
run_against() { # name port sensors
    local out
    out=$(SENSORFLOW_LOG=info "$SIM" simulate --port "$2" --sensors "$3" --duration "$DURATION" 2>&1 | grep "simulation finished" | sed 's/\x1b\[[0-9;]*m//g')
    echo "| $1 | $3 | $(echo "$out" | grep -o 'acked=[0-9]*' | cut -d= -f2) | $(echo "$out" | grep -o 'lag_events=[0-9]*' | cut -d= -f2) | $(echo "$out" | grep -o 'lost=[0-9]*' | cut -d= -f2) |"
}
echo "| broker | sensors | packets acked in ${DURATION} s | lag events | lost |"
echo "|---|---|---|---|---|"
for n in "${SIZES[@]}"; do
    mosquitto -p 18883 >/dev/null 2>&1 & mpid=$!
    ./target/release/examples/ingest_log_server 127.0.0.1:18884 >/dev/null & spid=$!
    sleep 1
    run_against "mosquitto $(mosquitto -h 2>/dev/null | head -1 | grep -o '[0-9.]*' | head -1)" 18883 "$n"
    run_against "sensorflow ingest + log" 18884 "$n"
    kill "$mpid" "$spid"; wait "$mpid" "$spid" 2>/dev/null || true
done
