#!/usr/bin/env python3
"""Inference throughput of the demo LSTM in Python onnxruntime: the reference for the Rust
engines (`cargo run --release -p sensorflow-model --example bench_engines`).

Same workload as the Rust benchmark: B sensors with T = 64 new samples each per call, the
recurrent state fed back from call to call, batch 1, 64 and 256, with intra_op_num_threads 1
and 2 and otherwise default session options (all graph optimisations). Intra-op spinning is
measured both ways: onnxruntime's default (on) and off, as the Rust engine configures it.

    .venv/bin/python scripts/bench_onnxruntime.py [SECONDS_PER_CASE] [MODEL.onnx]
"""

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

STEPS = 64


def session(model: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def measure(sess: ort.InferenceSession, batch: int, secs: float) -> tuple[float, float]:
    """Calls per second and microseconds per call, state carried between calls."""
    names = {i.name for i in sess.get_inputs()}
    features = np.sin(
        (np.arange(STEPS * 2)[None, :] + np.arange(batch)[:, None]) * 0.01, dtype=np.float32
    ).reshape(batch, STEPS, 2)
    h = np.zeros((2, batch, 32), dtype=np.float32)
    c = np.zeros((2, batch, 32), dtype=np.float32)
    outputs = ["velocity_pred", "movement_prob", "h_n", "c_n"]

    def call():
        nonlocal h, c
        feeds = {"sequence_features": features}
        if "h_0" in names:
            feeds.update(h_0=h, c_0=c)
        _, _, h, c = sess.run(outputs, feeds)

    call()  # warm-up: first-run allocations
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < secs:
        call()
        calls += 1
    elapsed = time.perf_counter() - started
    return calls / elapsed, elapsed * 1e6 / calls


def main() -> None:
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    root = Path(__file__).resolve().parent.parent
    model = Path(sys.argv[2]) if len(sys.argv) > 2 else root / "models" / "demo_lstm.onnx"
    print(f"onnxruntime {ort.__version__}, {model.name}, T = {STEPS}, {secs} s per case")
    print(f"{'threads':>7} {'spinning':>8} {'batch':>6} {'calls/s':>10} {'timesteps/s':>14} {'us/call':>12}")
    for threads in (1, 2):
        for spinning in (True, False) if threads > 1 else (False,):
            sess = session(model, threads, spinning)
            for batch in (1, 64, 256):
                calls_per_s, us = measure(sess, batch, secs)
                print(
                    f"{threads:>7} {'on' if spinning else 'off':>8} {batch:>6} {calls_per_s:>10.0f} "
                    f"{calls_per_s * batch * STEPS:>14.0f} {us:>12.1f}"
                )


if __name__ == "__main__":
    main()
