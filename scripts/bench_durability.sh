#!/usr/bin/env bash
# Sustained sensors at 200 Hz with log.durability = fsync, batch and none, measured back to back
# in one run of this script (same build, same machine state), for BENCHMARKS.md.
#
#   scripts/bench_durability.sh            # 30 s per load step, ramp from 1,000 sensors
#   DURATION=60 START=500 scripts/bench_durability.sh
#
# Each mode runs `sensorflow loadtest --ramp` (a fresh `sensorflow run` child per step, see
# BENCHMARKS.md section 1); the JSON report of the best sustained step of each mode is kept in
# target/bench-durability-<mode>.json and summarised as a Markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-30}
START=${START:-1000}
cargo build --release --locked --quiet
for mode in fsync batch none; do
    echo "== durability $mode" >&2
    ./target/release/sensorflow loadtest --ramp --sensors "$START" --duration "$DURATION" --json \
        --platform-env "SENSORFLOW_LOG_DURABILITY=$mode" > "target/bench-durability-$mode.json"
done
python3 - <<'PY'
import json
print("| durability | sustained sensors | samples/s | p50 ms | p99 ms | platform CPU % | peak RSS MB | lost |")
print("|---|---|---|---|---|---|---|---|")
for mode in ("fsync", "batch", "none"):
    r = json.load(open(f"target/bench-durability-{mode}.json"))
    print(f"| {mode} | {r['sensors']:,} | {r['sensors'] * r['rate_hz']:,} | {r['latency_ms_p50']:.1f} | "
          f"{r['latency_ms_p99']:.1f} | {r['cpu_pct_mean']:.0f} | {r['rss_mb_max']:.0f} | {r['lost']} |")
PY
