#!/usr/bin/env bash
# Distributed mode on one machine: a Kafka broker (scripts/kafka.sh), one gateway, one
# processor and one api replica (release build), driven by `sensorflow loadtest` through the
# gateway's MQTT listener and the api's WebSockets, then the same load on embedded `run` for
# comparison. Prints one JSON report per run (loadtest's) plus the CPU seconds each process
# used during the load.
#
#   scripts/bench_distributed.sh [SENSORS...]     default: 250 500 1000
#
# Environment: DURATION (s of load per run, default 30), COMMIT_MS (the processors'
# kafka.processor.commit_interval_ms, default 1000), MAX_P99_MS (loadtest's sustained
# threshold, default 2000: outputs are visible at the processor's commits), PARTITIONS (of
# every topic, default 12).
set -euo pipefail
cd "$(dirname "$0")/.."
SENSORS=("${@:-250 500 1000}")
read -r -a SENSORS <<<"${SENSORS[*]}"
DURATION=${DURATION:-30}
COMMIT_MS=${COMMIT_MS:-1000}
MAX_P99_MS=${MAX_P99_MS:-2000}
PARTITIONS=${PARTITIONS:-12}
BIN=target/release/sensorflow
[ -x "$BIN" ] || cargo build --release
scripts/kafka.sh fetch >/dev/null
# The broker with its JIT's full optimisation (the tests' broker stops at C1 to start faster).
export SENSORFLOW_KAFKA_JAVA_OPTS=${SENSORFLOW_KAFKA_JAVA_OPTS:--Xms1g -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true}

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # URL: until it answers 200
    for _ in $(seq 1 600); do
        curl -fs "$1" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "bench_distributed: $1 never answered; logs:" >&2
    tail -n 20 "$WORK"/run-*/*.log "$WORK/kafka.log" >&2 || true
    exit 1
}
cpu_seconds() { # PID: user+system CPU seconds so far
    awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"
}

KPORT=$(free_port)
scripts/kafka.sh start "$WORK/kafka" "$KPORT" >"$WORK/kafka.log" 2>&1 &
PIDS+=($!)
BROKERS=127.0.0.1:$KPORT
for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$KPORT") 2>/dev/null && break
    sleep 0.2
done

for n in "${SENSORS[@]}"; do
    run="$WORK/run-$n"
    mkdir -p "$run"
    cat >"$run/config.toml" <<TOML
[kafka]
partitions = $PARTITIONS
[kafka.topics]
ingest = "ingest-$n"
transformed = "transformed-$n"
aggregated = "aggregated-$n"
sessions = "sessions-$n"
windows = "windows-$n"
gaps = "gaps-$n"
late = "late-$n"
changelog = "state-$n"
[kafka.processor]
group_id = "bench-$n"
commit_interval_ms = $COMMIT_MS
TOML
    gw_mqtt=$(free_port); gw_http=$(free_port); p_http=$(free_port); api_http=$(free_port)
    SENSORFLOW_LOG=warn "$BIN" gateway --config "$run/config.toml" --kafka-brokers "$BROKERS" \
        --mqtt-listen "127.0.0.1:$gw_mqtt" --http-listen "127.0.0.1:$gw_http" 2>"$run/gateway.log" &
    gw=$!; PIDS+=($gw)
    SENSORFLOW_LOG=warn "$BIN" processor --config "$run/config.toml" --kafka-brokers "$BROKERS" \
        --http-listen "127.0.0.1:$p_http" --data-dir "$run/p" --lake "$run/lake" 2>"$run/processor.log" &
    pr=$!; PIDS+=($pr)
    SENSORFLOW_LOG=warn "$BIN" api --config "$run/config.toml" --kafka-brokers "$BROKERS" \
        --http-listen "127.0.0.1:$api_http" 2>"$run/api.log" &
    api=$!; PIDS+=($api)
    wait_http "http://127.0.0.1:$gw_http/ready"
    wait_http "http://127.0.0.1:$p_http/ready"
    wait_http "http://127.0.0.1:$api_http/ready"
    kafka_pid=$(pgrep -f "kafka.Kafka $WORK/kafka" | head -1)
    declare -A before=()
    for p in $gw $pr $api $kafka_pid; do before[$p]=$(cpu_seconds "$p"); done
    "$BIN" loadtest --mqtt "127.0.0.1:$gw_mqtt" --http "127.0.0.1:$api_http" --lake "$run/lake" \
        --sensors "$n" --duration "$DURATION" --max-p99-ms "$MAX_P99_MS" --json >"$run/report.json"
    cpu=""
    for role in gateway:$gw processor:$pr api:$api kafka:$kafka_pid; do
        p=${role#*:}
        used=$(awk -v a="${before[$p]}" -v b="$(cpu_seconds "$p")" 'BEGIN {printf "%.1f", b - a}')
        cpu="$cpu\"${role%%:*}_cpu_s\": $used, "
    done
    pm=$(curl -fs "http://127.0.0.1:$p_http/metrics")
    commits=$(awk '/^sensorflow_processor_commits_total/ {print $2}' <<<"$pm")
    commit_s=$(awk '/^sensorflow_processor_commit_seconds_total/ {print $2}' <<<"$pm")
    lake_s=$(awk '/^sensorflow_processor_lake_commit_seconds_total/ {print $2}' <<<"$pm")
    echo "{\"mode\": \"distributed\", \"commit_interval_ms\": $COMMIT_MS, \"partitions\": $PARTITIONS, ${cpu}\"processor_commits\": $commits, \"processor_commit_s\": $commit_s, \"processor_lake_commit_s\": $lake_s, \"loadtest\": $(cat "$run/report.json")}"
    kill $gw $pr $api
    wait $gw $pr $api 2>/dev/null || true
    "$BIN" loadtest --sensors "$n" --duration "$DURATION" --json | sed 's/^/{"mode": "embedded", "loadtest": /; s/$/}/'
done
