#!/usr/bin/env bash
# Runs every test suite of sensorflow, installing what the tests need on a fresh machine:
# Debian packages (chromium for the dashboard test, build tools, Java and Maven for the Kafka
# broker), a Python venv with the test clients (paho-mqtt, pyarrow, DuckDB, onnxruntime,
# confluent-kafka), playwright-core from npm, and Kafka's jars from Maven Central
# (scripts/kafka.sh; the tests start one broker per pytest session).
#
#   scripts/test.sh            everything (formatting and clippy first)
#   scripts/test.sh --rust     only cargo tests (still sets up the venv: ONNX Runtime comes from it)
#
# Exit code: non-zero if any suite fails.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

install_system_packages() {
    local missing=()
    command -v chromium >/dev/null || missing+=(chromium)
    command -v cmake >/dev/null || missing+=(cmake)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
    command -v mvn >/dev/null || missing+=(maven)
    if ((${#missing[@]})); then
        step "installing Debian packages: ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_python() {
    if [ ! -x .venv/bin/python ]; then
        step "creating .venv"
        python3 -m venv .venv
    fi
    step "installing Python test packages"
    .venv/bin/pip install -q --disable-pip-version-check -r tests/python/requirements.txt
}

install_node() {
    step "installing playwright-core (no browser download: Debian's chromium is used)"
    (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --silent)
}

lint() {
    # First, and cheap: formatting and clippy with warnings as errors, so style drift and lint
    # regressions fail the suite like a failing test.
    step "cargo fmt --check"
    cargo fmt --all --check
    step "cargo clippy (warnings are errors)"
    cargo clippy --workspace --all-targets --locked --features sensorflow/failpoints -- -D warnings
    # The default build (what `demo` and releases compile) has no fail points: lint it too, so
    # code that only the fail points use cannot leave warnings there.
    cargo clippy --package sensorflow --all-targets --locked -- -D warnings
}

rust_tests() {
    # The `failpoints` feature lets the Python fault tests slow or break components through
    # the FAILPOINTS environment variable; release builds never carry it.
    step "cargo build (debug; dependencies optimised, see Cargo.toml)"
    cargo build --workspace --all-targets --locked --features sensorflow/failpoints
    step "cargo test"
    cargo test --workspace --locked --features sensorflow/failpoints
}

python_tests() {
    step "fetching the Kafka broker's jars (once; cached by scripts/kafka.sh)"
    scripts/kafka.sh fetch >/dev/null
    step "end-to-end, crash, fault, lake reader, inference cross-check, security, browser and Kafka tests (pytest)"
    local rc=0
    SENSORFLOW_BIN="$ROOT/target/debug/sensorflow" SENSORFLOW_INFER_JSON="$ROOT/target/debug/examples/infer_json" \
        SENSORFLOW_WRITE_SAMPLE_LAKE="$ROOT/target/debug/examples/write_sample_lake" \
        .venv/bin/python -m pytest tests/python -q -p no:cacheprovider --timeout 600 || rc=$?
    # pytest exits 5 when it collected no test: an empty suite is not a failure.
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
        return "$rc"
    fi
}

fuzz_smoke() {
    # 60 s of coverage-guided fuzzing per target: the packet decoder, the ingest record codec,
    # the log's record reader and arbitrary records through every pipeline stage. cargo-fuzz
    # needs a nightly toolchain (for the sanitizer flags).
    if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
        echo "no nightly toolchain: skipping the fuzz runs (install one with rustup to run them)"
        return 0
    fi
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
    for target in framing record log_segment pipeline; do
        step "fuzzing $target for 60 s"
        mkdir -p "fuzz/corpus/$target"
        local seeds=()
        [ -d "fuzz/seeds/$target" ] && seeds=("seeds/$target")
        local log="$ROOT/target/fuzz-$target.log"
        mkdir -p "$ROOT/target"
        if ! (cd fuzz && cargo +nightly fuzz run "$target" "corpus/$target" "${seeds[@]}" -- \
            -max_total_time=60 -rss_limit_mb=2048 -print_final_stats=1) >"$log" 2>&1; then
            tail -n 60 "$log"
            echo "fuzz target $target failed (crash input under fuzz/artifacts/$target)"
            return 1
        fi
        grep -E '^Done|stat::number_of_executed_units' "$log" || true
    done
}

install_system_packages
# Before the cargo tests: the model crate's onnxruntime tests load the wheel's library.
install_python
ORT_DYLIB_PATH=$(ls "$ROOT"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1* | head -n 1)
export ORT_DYLIB_PATH
lint
rust_tests
if [ "${1:-}" = "--rust" ]; then
    exit 0
fi
install_node
python_tests
fuzz_smoke
step "all tests passed"
