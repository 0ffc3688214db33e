#!/usr/bin/env bash
# Inference throughput of the demo LSTM, sensorflow's engines against Python onnxruntime, in one
# run (same machine state), for BENCHMARKS.md: tract, the native fused LSTM kernel (1 thread, and
# two models in parallel), ONNX Runtime through `ort` with 1 and 2
# intra-op threads, two single-threaded sessions in parallel (how `run`'s two pipeline shards
# use it), and Python onnxruntime at its best batching and threading.
#
#   scripts/bench_inference.sh [SECONDS_PER_CASE]      (default 3; needs scripts/test.sh's .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-3}
cargo build --release --locked --quiet -p sensorflow-model --example bench_engines
ORT_DYLIB_PATH=$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1* | head -n 1)
export ORT_DYLIB_PATH
echo "== sensorflow-model (Rust)"
./target/release/examples/bench_engines "$SECS" "$ORT_DYLIB_PATH"
echo "== Python onnxruntime"
.venv/bin/python scripts/bench_onnxruntime.py "$SECS"
